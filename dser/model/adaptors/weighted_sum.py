"""Weighted layer sum (SUPERB / s3prl style): the head sees Σ_l softmax(w)_l · h_l over every hidden state.

The module becomes the model's ``readout``: without it the head sees the last layer only. ``w`` (``wsum_layers.weights``, one per hidden
state: the front-end output and each transformer layer) starts at zero, i.e. uniform weights.
s3prl does not normalise the hidden states first; ``layer_norm: true`` applies a parameter-free
layer norm to each one before the sum (useful when layer scales differ a lot, e.g. pre-LN
encoders whose intermediate states are not normalised).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dser.model.adaptors import ADAPTORS
from dser.model.adaptors.configs import WeightedSumConfig

PATTERN = ADAPTORS["weighted_sum"].pattern


class WeightedLayerSum(nn.Module):
    """Softmax-weighted sum of hidden states; a module so ZeRO-3 gathers its weights when called."""

    def __init__(self, num_states: int, layer_norm: bool = False):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_states))
        self.layer_norm = layer_norm

    def forward(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Args: ``num_states`` tensors (B, F, H). Returns: (B, F, H)."""
        stacked = torch.stack(hidden_states)  # (L+1, B, F, H)
        if self.layer_norm:
            stacked = F.layer_norm(stacked, stacked.shape[-1:])
        weights = torch.softmax(self.weights.float(), dim=0).to(stacked.dtype)  # (L+1,)
        return torch.einsum("l,lbfh->bfh", weights, stacked)


def apply(model, cfg: WeightedSumConfig, set_name: str = "default") -> list[str]:
    """Make the head read the weighted sum of all hidden states (``model.wsum_layers``, the model's ``readout``).

    Returns:
        A one-line description of what is summed.
    """
    states = model.backbone.num_layers + 1
    model.wsum_layers = WeightedLayerSum(states, cfg.layer_norm)
    # A bound method, not the module: assigning the module would register it a second time.
    model.readout = model.wsum_layers.__call__
    return [f"backbone hidden states 0..{states - 1} (front end + {states - 1} layers)"]
