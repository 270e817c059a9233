"""Weight-gating: each transformer layer's output is gated per channel, h ← h ⊙ 2·sigmoid(g).

``g`` starts at zero, so the gate starts as the identity. ``variant: paper`` reproduces the
paper's code instead, h ← h ⊙ sigmoid(g) with g = 1 at start (a gate of ~0.73, *not* the
identity: the model does not start as the backbone). Implemented as forward hooks on
``backbone.layers[i]``; the backbone collects hidden states after the hooks, so a gate changes
both the next layer's input and the state the head sees. Prefix ``wgate_``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dser.config import knob

PREFIX = "wgate_"


@dataclass
class WeightGatingConfig:
    variant: Literal["identity", "paper"] = knob(
        "identity", "identity: h*2*sigmoid(g), g=0 at start; paper: h*sigmoid(g), g=1 at start")
    layers: list[int] | None = knob(None, "transformer layer indices to gate (null: all)")


class Gate(nn.Module):
    """A per-channel gate over (B, F, H) hidden states."""

    def __init__(self, hidden: int, variant: str):
        super().__init__()
        self.variant = variant
        self.g = nn.Parameter(torch.zeros(hidden) if variant == "identity" else torch.ones(hidden))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.g)
        if self.variant == "identity":
            gate = 2 * gate
        return h * gate.to(h.dtype)


def _hook(gate: Gate):
    def hook(_module, _inputs, output):
        if isinstance(output, tuple):  # WavLM layers return (hidden, position_bias)
            return (gate(output[0]),) + tuple(output[1:])
        return gate(output)
    return hook


def apply(model, cfg: WeightGatingConfig) -> list[str]:
    backbone = model.backbone
    layers = cfg.layers if cfg.layers is not None else range(backbone.num_layers)
    model.wgate_gates = nn.ModuleDict()
    for i in layers:
        gate = Gate(backbone.hidden_size, cfg.variant)
        model.wgate_gates[str(i)] = gate
        model.hook_handles.append(backbone.layers[i].register_forward_hook(_hook(gate)))
    return [f"layers.{i}" for i in layers]
