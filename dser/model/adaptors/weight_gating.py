"""Weight-gating: a learned per-channel gate on each transformer layer's output.

Default (``variant: identity``): h ← h ⊙ 2·sigmoid(g) with g = 0 at start, so every gate is
exactly 1 and the model starts as the bare backbone. ``variant: paper`` reproduces the paper's
code instead: h ← h ⊙ sigmoid(g) with g = 1 at start, a gate of sigmoid(1) ≈ 0.73 on every
channel of every layer, so that model does NOT start as the backbone (each layer's output is
shrunk before the next layer and the head see it).

Implemented as forward hooks on ``backbone.layers[i]`` rewriting the layer's output (a tensor,
or a tuple led by it, e.g. WavLM's ``(hidden, position_bias)``; ``hooks.rewrite_output``). The backbone collects hidden
states from the hooked outputs, so a gate changes both the next layer's input and the state the
head (or the weighted sum) sees. Parameters: ``wgate_gates.<layer>.g`` (size H).
"""

from __future__ import annotations

import torch
from torch import nn

from dser.model.adaptors import ADAPTORS
from dser.model.adaptors.configs import WeightGatingConfig
from dser.model.adaptors.hooks import rewrite_output, selected_layers

PATTERN = ADAPTORS["weight_gating"].pattern


class WeightGate(nn.Module):
    """A per-channel gate over (B, F, H) hidden states."""

    def __init__(self, hidden: int, variant: str):
        super().__init__()
        self.variant = variant
        self.g = nn.Parameter(torch.zeros(hidden) if variant == "identity" else torch.ones(hidden))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: (B, F, H); 2 * sigmoid(0) is exactly 1.0 in floating point, so the identity is exact.
        gate = torch.sigmoid(self.g)
        if self.variant == "identity":
            gate = 2.0 * gate
        return h * gate.to(h.dtype)


def apply(model, cfg: WeightGatingConfig, set_name: str = "default") -> list[str]:
    """Gate each selected layer's output (``model.wgate_gates``).

    Returns:
        Names (in ``model``) of the gated layers.

    Raises:
        ConfigError: a layer index out of range.
    """
    backbone = model.backbone
    layers = selected_layers(cfg.layers, backbone, "model.weight_gating.layers")
    model.wgate_gates = nn.ModuleDict()
    targeted = []
    for i in layers:
        gate = WeightGate(backbone.hidden_size, cfg.variant)
        model.wgate_gates[str(i)] = gate
        layer = backbone.layers[i]
        rewrite_output(model, layer, gate)
        targeted.append(model.module_name(layer))
    return targeted
