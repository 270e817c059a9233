"""Bottleneck adapters (Houlsby et al., 2019): a residual down-projection → non-linearity → up-projection.

In each adapted layer the feed-forward block's output ``y`` (before the layer's residual add)
becomes ``y + up(act(down(y)))``, through a forward hook on ``backbone.ffn_module(i)``; with
``after_attention`` the attention block's output gets its own adapter the same way
(``backbone.attn_module(i)``). ``up`` starts at zero (weights and bias), so at start the model
computes exactly what the bare backbone does.

Settings: ``BottleneckConfig`` (``configs.py``). Parameters live in
``model.bneck_adapters[<set>]["ffn<i>" | "attn<i>"]`` (the model creates the set container from
the registry's ``sets``)::

    bneck_adapters.default.ffn3.down.weight     (H → dim)
    bneck_adapters.default.ffn3.up.weight       (dim → H, zero at start)

Stage 2 may add a fresh set (``bneck_adapters.stage2``); its hooks run after the loaded set's,
so the fresh adapter sees the loaded adapter's output.
"""

from __future__ import annotations

import torch
from torch import nn

from dser.config import ConfigError
from dser.model.adaptors import ADAPTORS
from dser.model.adaptors.configs import BottleneckConfig
from dser.model.adaptors.hooks import rewrite_output, selected_layers

PATTERN = ADAPTORS["bottleneck"].pattern
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class BottleneckAdapter(nn.Module):
    """``x + up(act(down(x)))`` with ``up`` zero-initialised, so it starts as the identity."""

    def __init__(self, hidden: int, dim: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(dim, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, F, H)
        return x + self.up(self.act(self.down(x)))


def apply(model, cfg: BottleneckConfig, set_name: str = "default") -> list[str]:
    """Add a set of bottleneck adapters (``model.bneck_adapters[set_name]``) with their hooks.

    Args:
        model: the ``SERModel``.
        cfg: the bottleneck settings.
        set_name: ``default``, or ``stage2`` for a fresh stage-2 set.

    Returns:
        Names (in ``model``) of the hooked modules.

    Raises:
        ConfigError: a layer index out of range.
    """
    backbone = model.backbone
    layers = selected_layers(cfg.layers, backbone, "model.bottleneck.layers")
    if set_name in model.bneck_adapters:
        raise ConfigError(f"a bottleneck set named {set_name!r} is already in the model")
    adapters = nn.ModuleDict()
    model.bneck_adapters[set_name] = adapters
    targeted = []
    for i in layers:
        points = [("ffn", backbone.ffn_module(i))]
        if cfg.after_attention:
            points.append(("attn", backbone.attn_module(i)))
        for kind, module in points:
            adapter = BottleneckAdapter(backbone.hidden_size, cfg.dim, cfg.activation)
            adapters[f"{kind}{i}"] = adapter
            rewrite_output(model, module, adapter)
            targeted.append(model.module_name(module))
    return targeted
