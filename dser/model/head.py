"""The SER head and its losses.

Projector (hidden → 256) → pooling over valid frames (masked mean, or attentive statistics)
→ a classifier over N emotion classes and/or a regressor for valence/arousal/dominance.
Padding never leaks in: pooling uses the backbone's frame mask (sample lengths mapped to frame
lengths through the front end's strides). The regressor ends in a sigmoid, because attribute
targets live in [0, 1] (dser rescales every corpus's scale); CCC is invariant to nothing of
that, so the squashing only keeps early predictions in range.

Losses: cross-entropy (optional class weights, −100 = unlabelled), 1 − CCC averaged over the
attributes that have labels in the batch, and their weighted sum for ``task: both``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dser.config import knob


@dataclass
class HeadConfig:
    projector_dim: int = knob(256, "width of the projector before pooling")
    pooling: Literal["mean", "attentive_stats"] = knob("mean", "masked mean, or attentive statistics (mean + std)")
    dropout: float = knob(0.1, "dropout before the classifier / regressor")
    attribute_loss_weight: float = knob(1.0, "weight of (1 - CCC) against cross-entropy when task is both")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, F, D) over frames where mask (B, F) is True → (B, D)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


class AttentiveStatsPooling(nn.Module):
    """Attention-weighted mean and standard deviation over valid frames (Okabe et al. 2018)."""

    def __init__(self, dim: int):
        super().__init__()
        self.attention = nn.Sequential(nn.Linear(dim, dim // 2), nn.Tanh(), nn.Linear(dim // 2, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, F, D) → (B, 2D)
        scores = self.attention(x).squeeze(-1).float()  # (B, F)
        scores = scores.masked_fill(~mask, float("-inf"))
        w = torch.softmax(scores, dim=1).unsqueeze(-1).to(x.dtype)  # (B, F, 1)
        mean = (w * x).sum(1)
        var = (w * (x - mean.unsqueeze(1)) ** 2).sum(1)
        return torch.cat([mean, var.clamp(min=1e-6).sqrt()], dim=-1)


class Head(nn.Module):
    """Projector → pooling → classifier and/or regressor."""

    def __init__(self, hidden: int, cfg: HeadConfig, task: str, num_classes: int | None):
        super().__init__()
        if task in ("categorical", "both") and not num_classes:
            raise ValueError(f"a {task} head needs num_classes")
        self.task = task
        self.projector = nn.Linear(hidden, cfg.projector_dim)
        self.pooling = AttentiveStatsPooling(cfg.projector_dim) if cfg.pooling == "attentive_stats" else None
        pooled = cfg.projector_dim * (2 if self.pooling is not None else 1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(pooled, num_classes) if task in ("categorical", "both") else None
        self.regressor = nn.Linear(pooled, 3) if task in ("dimensional", "both") else None

    def forward(self, hidden: torch.Tensor, frame_mask: torch.Tensor) -> dict:
        """hidden (B, F, H), frame_mask (B, F) → logits (B, C) / attributes (B, 3) / pooled (B, D)."""
        x = self.projector(hidden)  # (B, F, D)
        pooled = self.pooling(x, frame_mask) if self.pooling is not None else masked_mean(x, frame_mask)
        z = self.dropout(pooled)
        return {"pooled": pooled,
                "logits": self.classifier(z) if self.classifier is not None else None,
                "attributes": torch.sigmoid(self.regressor(z)) if self.regressor is not None else None}


def ccc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − CCC averaged over attributes, each over the rows whose target is finite.

    Args:
        pred: (B, 3) predictions.
        target: (B, 3) targets, NaN where unlabelled.
    """
    losses = []
    for j in range(pred.shape[1]):
        keep = torch.isfinite(target[:, j])
        if keep.sum() < 2:
            continue
        x, y = pred[keep, j].float(), target[keep, j].float()
        mx, my = x.mean(), y.mean()
        vx, vy = x.var(unbiased=False), y.var(unbiased=False)
        cov = ((x - mx) * (y - my)).mean()
        losses.append(1 - 2 * cov / (vx + vy + (mx - my) ** 2 + 1e-8))
    if not losses:
        return pred.sum() * 0.0
    return torch.stack(losses).mean()


def ser_loss(out: dict, emotion: torch.Tensor, attributes: torch.Tensor, task: str,
             attribute_loss_weight: float = 1.0, class_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The training loss for a batch and its parts (detached, for logging)."""
    parts = {}
    total = None
    if task in ("categorical", "both"):
        logits = out["logits"].float()
        if (emotion >= 0).any():
            w = class_weights.to(logits.device) if class_weights is not None else None
            ce = nn.functional.cross_entropy(logits, emotion, weight=w, ignore_index=-100)
        else:
            ce = logits.sum() * 0.0
        parts["ce"] = ce.detach()
        total = ce
    if task in ("dimensional", "both"):
        ccc = ccc_loss(out["attributes"], attributes)
        parts["ccc_loss"] = ccc.detach()
        total = ccc * (attribute_loss_weight if task == "both" else 1.0) + (total if total is not None else 0.0)
    return total, parts
