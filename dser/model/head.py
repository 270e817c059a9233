"""The SER head and its losses.

Frames (B, F, H) from the backbone (last layer or weighted layer sum) go through::

    projector Linear(H, 256) [→ activation] → pooling over valid frames → classifier Linear(D, C)
                                                                        → regressor  Linear(D, 3) [→ sigmoid]

- Pooling never sees padding: it uses the backbone's frame mask (sample lengths mapped to frame
  lengths through the front end's strides). ``mean`` is the masked mean (D = 256);
  ``attentive_stats`` is attentive statistics pooling (Okabe et al., 2018): a learned attention
  over the valid frames gives a weighted mean and standard deviation (D = 512).
- The projector has no activation by default: projector → mean → linear is s3prl's emotion
  head, which the paper's setup follows.
- The regressor ends in a sigmoid by default. Attribute targets are in [0, 1] by construction
  (``dser.labels.rescale_attribute``), so every prediction is a valid attribute value (what
  ``dser predict`` reports); CCC itself needs no squashing, and because labels rarely sit at
  the extremes where the sigmoid saturates, it costs the loss nothing. ``linear`` is the option.
- ``task``: ``categorical`` (classifier), ``dimensional`` (regressor) or ``both``.

Losses (``Head.loss``): cross-entropy over labelled clips (emotion −100 = unlabelled; optional
class weights, as ``F.cross_entropy`` weights them); 1 − CCC averaged over valence, arousal and
dominance, each computed over the batch's clips that have that attribute (NaN = unlabelled);
``both`` adds them, the CCC term times ``attribute_loss_weight``. No host sync: a batch without
labels gives a zero loss that still backpropagates (every DeepSpeed rank must run backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dser.model.config import TASKS, HeadConfig  # the configs live where importing them needs no torch
from dser.schema import IGNORE_INDEX  # the batch contract's: one definition

ACTIVATIONS = {"none": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU}


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid frames.

    Args:
        x: (B, F, D) frames.
        mask: (B, F) bool, True on valid frames (at least one per row).

    Returns:
        (B, D).
    """
    weight = mask.unsqueeze(-1).to(x.dtype)  # (B, F, 1)
    return (x * weight).sum(1) / weight.sum(1).clamp(min=1.0)


class AttentiveStatsPooling(nn.Module):
    """Attention-weighted mean and standard deviation over valid frames (Okabe et al., 2018)."""

    def __init__(self, dim: int, attention_dim: int):
        super().__init__()
        self.attention = nn.Sequential(nn.Linear(dim, attention_dim), nn.Tanh(), nn.Linear(attention_dim, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Args: x (B, F, D), mask (B, F) bool. Returns: (B, 2D) = [weighted mean, weighted std]."""
        scores = self.attention(x).squeeze(-1).float()  # (B, F)
        scores = scores.masked_fill(~mask, float("-inf"))  # padding gets weight exactly 0
        weight = torch.softmax(scores, dim=1).unsqueeze(-1).to(x.dtype)  # (B, F, 1)
        mean = (weight * x).sum(1)  # (B, D)
        var = (weight * (x - mean.unsqueeze(1)) ** 2).sum(1)  # (B, D)
        # The floor keeps the sqrt's gradient finite on constant channels.
        return torch.cat([mean, var.clamp(min=1e-6).sqrt()], dim=-1)


class Head(nn.Module):
    """Projector → pooling → classifier and/or regressor (parameters under ``head.``)."""

    def __init__(self, hidden_size: int, cfg: HeadConfig, task: str, num_classes: int | None):
        """
        Args:
            hidden_size: width H of the backbone's hidden states.
            cfg: head settings.
            task: ``categorical``, ``dimensional`` or ``both``.
            num_classes: emotion classes (at least 2) for ``categorical`` / ``both``; ignored otherwise.

        Raises:
            ValueError: an unknown task or a missing class count.
        """
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if task != "dimensional" and (num_classes is None or num_classes < 2):
            raise ValueError(f"task {task!r} needs a label set of at least 2 classes, got {num_classes}")
        self.task = task
        self.cfg = cfg
        self.projector = nn.Linear(hidden_size, cfg.projector_dim)
        self.activation = ACTIVATIONS[cfg.activation]()
        self.pooling = (
            AttentiveStatsPooling(cfg.projector_dim, cfg.attention_dim) if cfg.pooling == "attentive_stats" else None
        )
        pooled = cfg.projector_dim * (2 if self.pooling is not None else 1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(pooled, num_classes) if task != "dimensional" else None
        self.regressor = nn.Linear(pooled, 3) if task != "categorical" else None

    def forward(self, hidden: torch.Tensor, frame_mask: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Pool and predict.

        Args:
            hidden: (B, F, H) frames.
            frame_mask: (B, F) bool, True on valid frames.

        Returns:
            ``logits`` (B, C) or None, ``attributes`` (B, 3) valence/arousal/dominance or None,
            ``pooled`` (B, D).
        """
        x = self.activation(self.projector(hidden))  # (B, F, D)
        pooled = self.pooling(x, frame_mask) if self.pooling is not None else masked_mean(x, frame_mask)  # (B, D)
        z = self.dropout(pooled)
        attributes = None
        if self.regressor is not None:
            attributes = self.regressor(z)  # (B, 3)
            if self.cfg.regressor_output == "sigmoid":
                attributes = torch.sigmoid(attributes)
        return {
            "logits": self.classifier(z) if self.classifier is not None else None,
            "attributes": attributes,
            "pooled": pooled,
        }

    def loss(
        self, outputs: dict, batch: dict, class_weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of a batch.

        Args:
            outputs: what ``forward`` returned.
            batch: needs ``emotion`` (B,) long, −100 where unlabelled (categorical / both) and
                ``attributes`` (B, 3) float, NaN where unlabelled (dimensional / both).
            class_weights: (C,) cross-entropy class weights, or None.

        Returns:
            ``(loss, parts)``: the scalar loss and its detached parts (``ce``, ``ccc_loss``).
        """
        parts: dict[str, torch.Tensor] = {}
        total = None
        if self.task != "dimensional":
            ce = cross_entropy(outputs["logits"], batch["emotion"], class_weights)
            parts["ce"] = ce.detach()
            total = ce
        if self.task != "categorical":
            ccc = ccc_loss(outputs["attributes"], batch["attributes"])
            parts["ccc_loss"] = ccc.detach()
            weight = self.cfg.attribute_loss_weight if self.task == "both" else 1.0
            total = weight * ccc if total is None else total + weight * ccc
        return total, parts


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy over labelled rows; zero (with a graph) when no row is labelled.

    Equals ``F.cross_entropy(logits, target, weight=class_weights, ignore_index=-100)`` whenever
    a row is labelled (the weighted mean divides by the labelled rows' weights).

    Args:
        logits: (B, C).
        target: (B,) long, −100 where unlabelled.
        class_weights: (C,) or None.
    """
    logits = logits.float()
    target = target.to(logits.device).long()
    labelled = target != IGNORE_INDEX  # (B,)
    weight = class_weights.to(logits.device, torch.float32) if class_weights is not None else None
    per_row = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE_INDEX, reduction="none")  # (B,)
    row_weight = labelled.float() if weight is None else weight[target.clamp(min=0)] * labelled  # (B,)
    return per_row.sum() / row_weight.sum().clamp(min=1e-12)


def concordance_cc(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Lin's concordance correlation coefficient 2·cov / (var_p + var_t + (mean_p − mean_t)²).

    Population (biased) moments over the valid rows.

    Args:
        pred: (N,) predictions.
        target: (N,) targets (rows outside ``valid`` may hold NaN).
        valid: (N,) bool rows to use; None means all.

    Returns:
        A scalar; 0 when fewer than 2 rows are valid.
    """
    pred = pred.float()
    target = target.float()
    if valid is None:
        valid = torch.ones_like(target, dtype=torch.bool)
    w = valid.float()
    n = w.sum().clamp(min=1.0)
    target = torch.where(valid, target, torch.zeros_like(target))  # NaN * 0 would still be NaN
    mean_p = (pred * w).sum() / n
    mean_t = (target * w).sum() / n
    dp, dt = (pred - mean_p) * w, (target - mean_t) * w
    cov = (dp * dt).sum() / n
    var_p = (dp * dp).sum() / n
    var_t = (dt * dt).sum() / n
    ccc = 2.0 * cov / (var_p + var_t + (mean_p - mean_t) ** 2 + 1e-8)
    return torch.where(w.sum() >= 2, ccc, torch.zeros_like(ccc))


def ccc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − CCC averaged over the attributes that have at least 2 labelled rows in the batch.

    Args:
        pred: (B, 3) predictions.
        target: (B, 3) targets, NaN where unlabelled.

    Returns:
        A scalar; zero (with a graph) when no attribute has 2 labelled rows.
    """
    target = target.to(pred.device)
    valid = torch.isfinite(target)  # (B, 3)
    losses, usable = [], []
    for a in range(pred.shape[1]):
        losses.append(1.0 - concordance_cc(pred[:, a], target[:, a], valid[:, a]))
        usable.append((valid[:, a].sum() >= 2).float())
    losses_t, usable_t = torch.stack(losses), torch.stack(usable)  # (3,), (3,)
    return (losses_t * usable_t).sum() / usable_t.sum().clamp(min=1.0)
