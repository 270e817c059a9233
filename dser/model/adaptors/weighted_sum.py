"""Weighted sum of layers (SUPERB-style): the head sees Σ softmax(w)_l · h_l over all hidden
states instead of the last layer. ``w`` starts at zero (uniform weights). Prefix ``wsum_``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dser.config import knob

PREFIX = "wsum_"


@dataclass
class WeightedSumConfig:
    layer_norm: bool = knob(False, "layer-normalise each hidden state before summing (off, as s3prl)")


class LayerWeights(nn.Module):
    """Learned softmax weights over ``n`` hidden states (a module so ZeRO-3 gathers it on call)."""

    def __init__(self, n: int, layer_norm: bool):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(n))
        self.layer_norm = layer_norm

    def forward(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        stacked = torch.stack(hidden_states)  # (L+1, B, F, H)
        if self.layer_norm:
            stacked = nn.functional.layer_norm(stacked, stacked.shape[-1:])
        w = torch.softmax(self.weights.float(), 0).to(stacked.dtype)  # (L+1,)
        return torch.einsum("l,lbfh->bfh", w, stacked)


def apply(model, cfg: WeightedSumConfig) -> list[str]:
    model.wsum_layers = LayerWeights(model.backbone.num_layers + 1, cfg.layer_norm)
    return [f"hidden_states[0..{model.backbone.num_layers}]"]
