"""Bottleneck adapters (Houlsby et al., 2019): a residual down-projection → non-linearity → up-projection.

In each adapted layer the feed-forward block's output ``y`` (before the layer's residual add)
becomes ``y + up(act(down(y)))``, through a forward hook on ``backbone.ffn_module(i)``; with
``after_attention`` the attention block's output gets its own adapter the same way
(``backbone.attn_module(i)``). ``up`` starts at zero (weights and bias), so at start the model
computes exactly what the bare backbone does.

Parameters live in ``model.bneck_adapters[<set>]["ffn<i>" | "attn<i>"]``::

    bneck_adapters.default.ffn3.down.weight     (H → dim)
    bneck_adapters.default.ffn3.up.weight       (dim → H, zero at start)

Stage 2 may add a fresh set (``bneck_adapters.stage2``); its hooks run after the loaded set's,
so the fresh adapter sees the loaded adapter's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dser.config import ConfigError, knob

PATTERN = r"^bneck_adapters\.(?P<set>[^.]+)\."
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


@dataclass
class BottleneckConfig:
    """Bottleneck adapter settings (``model.bottleneck``)."""

    dim: int = knob(64, "bottleneck width (hidden → dim → hidden)")
    activation: Literal["relu", "gelu", "silu"] = knob("relu", "non-linearity between down- and up-projection")
    layers: list[int] | None = knob(None, "transformer layer indices to adapt (0-based); null = all layers")
    after_attention: bool = knob(False, "also adapt each attention block's output (not only the feed-forward's)")

    def __post_init__(self):
        if self.dim < 1:
            raise ValueError(f"bottleneck.dim must be at least 1, got {self.dim}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"bottleneck.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")


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


def _residual_hook(adapter: BottleneckAdapter):
    """A forward hook that passes a block's output (tensor, or tuple led by it) through ``adapter``.

    The adapter is called as a module (not its weights read directly), so ZeRO-3 gathers them.
    """

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (adapter(output[0]),) + tuple(output[1:])
        return adapter(output)

    return hook


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
    bad = [i for i in cfg.layers or [] if not 0 <= i < backbone.num_layers]
    if bad:
        raise ConfigError(f"model.bottleneck.layers: {bad} outside 0..{backbone.num_layers - 1} ({backbone.family})")
    if set_name in model.bneck_adapters:
        raise ConfigError(f"a bottleneck set named {set_name!r} is already in the model")
    layers = sorted(set(cfg.layers)) if cfg.layers is not None else range(backbone.num_layers)
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
            model.hook_handles.append(module.register_forward_hook(_residual_hook(adapter)))
            targeted.append(model.module_name(module))
    return targeted
