"""Bottleneck adapters (Houlsby et al. 2019): a residual down → non-linearity → up projection.

Each adapted layer's feed-forward block output ``y`` (before the layer's residual add) becomes
``y + up(act(down(y)))`` through a forward hook on ``backbone.ffn_module(i)`` (and, with
``after_attention``, on ``backbone.attn_module(i)``). ``up`` starts at zero, so the model starts
exactly as the backbone. Parameters live in ``model.bneck_adapters[<set>]`` (prefix ``bneck_``);
stage 2 may add a fresh set beside the loaded one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dser.config import knob

PREFIX = "bneck_"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


@dataclass
class BottleneckConfig:
    dim: int = knob(64, "bottleneck width")
    activation: Literal["relu", "gelu", "silu"] = knob("relu", "non-linearity between the projections")
    layers: list[int] | None = knob(None, "transformer layer indices to adapt (null: all)")
    after_attention: bool = knob(False, "also adapt each attention block's output")


class Bottleneck(nn.Module):
    """``x + up(act(down(x)))`` with ``up`` zero-initialised."""

    def __init__(self, hidden: int, dim: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(dim, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F, H) → (B, F, H)
        return x + self.up(self.act(self.down(x)))


def _hook(adapter: Bottleneck):
    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (adapter(output[0]),) + tuple(output[1:])
        return adapter(output)
    return hook


def apply(model, cfg: BottleneckConfig, set_name: str = "default") -> list[str]:
    """Add a bottleneck set to ``model`` (hooks on the backbone); returns the hooked modules."""
    backbone = model.backbone
    layers = cfg.layers if cfg.layers is not None else range(backbone.num_layers)
    bad = [i for i in layers if not 0 <= i < backbone.num_layers]
    if bad:
        raise ValueError(f"bottleneck.layers {bad} outside 0..{backbone.num_layers - 1}")
    adapters = nn.ModuleDict()
    targeted = []
    for i in layers:
        points = [("ffn", backbone.ffn_module(i))]
        if cfg.after_attention:
            points.append(("attn", backbone.attn_module(i)))
        for kind, module in points:
            adapter = Bottleneck(backbone.hidden_size, cfg.dim, cfg.activation)
            adapters[f"{kind}{i}"] = adapter
            model.hook_handles.append(module.register_forward_hook(_hook(adapter)))
            targeted.append(f"layers.{i}.{kind}")
    model.bneck_adapters[set_name] = adapters
    return targeted
