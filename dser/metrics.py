"""Evaluation metrics for speech emotion recognition, computed over a whole evaluation set.

Categorical: UA (unweighted accuracy = balanced accuracy, the mean of per-class recalls over
the classes present in the reference), WA (weighted accuracy = plain accuracy), macro-F1 and
the confusion matrix. Dimensional: the concordance correlation coefficient (CCC) per attribute
and their mean. Definitions follow scikit-learn's ``balanced_accuracy_score``,
``accuracy_score`` and ``f1_score(average="macro")`` so numbers are comparable with papers.

Predictions are collected per rank and gathered (``gather_predictions``) before computing, so
every sample counts exactly once however the shards split across ranks.

Usage::

    acc = PredictionAccumulator()
    acc.add(utt_ids, logits, emotion_targets, attribute_preds, attribute_targets)
    preds = gather_predictions(acc.as_dict())     # on every rank
    metrics = compute_metrics(preds, class_names=["neutral", "happy", "angry", "sad"])
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
import torch.distributed as dist

from dser.labels import ATTRIBUTES


def unweighted_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (balanced accuracy)."""
    classes = np.unique(y_true)
    recalls = [np.mean(y_pred[y_true == c] == c) for c in classes]
    return float(np.mean(recalls)) if recalls else float("nan")


def weighted_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of correct predictions."""
    return float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean F1 over the classes present in ``y_true`` or ``y_pred`` (as sklearn)."""
    classes = np.union1d(y_true, y_pred)
    scores = []
    for c in classes:
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores)) if scores else float("nan")


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix (num_classes, num_classes): rows are references, columns predictions."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m


def concordance_cc(pred: np.ndarray, target: np.ndarray) -> float:
    """Lin's concordance correlation coefficient with population (biased) moments.

    CCC = 2·cov(x, y) / (var(x) + var(y) + (mean(x) − mean(y))²).
    """
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if len(pred) < 2:
        return float("nan")
    mx, my = pred.mean(), target.mean()
    vx, vy = pred.var(), target.var()
    cov = np.mean((pred - mx) * (target - my))
    denom = vx + vy + (mx - my) ** 2
    return float(2 * cov / denom) if denom > 0 else float("nan")


class PredictionAccumulator:
    """Collects one rank's predictions batch by batch (on the host, once per batch)."""

    def __init__(self):
        self.utt_id: list[str] = []
        self.emotion_pred: list[np.ndarray] = []
        self.emotion_prob: list[np.ndarray] = []
        self.emotion_true: list[np.ndarray] = []
        self.attr_pred: list[np.ndarray] = []
        self.attr_true: list[np.ndarray] = []

    def add(self, utt_ids: list[str], logits: torch.Tensor | None, emotion: torch.Tensor | None,
            attributes: torch.Tensor | None, attribute_targets: torch.Tensor | None) -> None:
        """Add a batch.

        Args:
            utt_ids: B utterance ids.
            logits: (B, C) class scores or None.
            emotion: (B,) class targets (−100 = unlabelled) or None.
            attributes: (B, 3) predicted valence/arousal/dominance or None.
            attribute_targets: (B, 3) targets (NaN = unlabelled) or None.
        """
        self.utt_id.extend(utt_ids)
        if logits is not None:
            probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
            self.emotion_prob.append(probs)
            self.emotion_pred.append(probs.argmax(-1))
            self.emotion_true.append(emotion.cpu().numpy())
        if attributes is not None:
            self.attr_pred.append(attributes.float().cpu().numpy())
            self.attr_true.append(attribute_targets.float().cpu().numpy())

    def as_dict(self) -> dict:
        cat = lambda xs: np.concatenate(xs) if xs else None  # noqa: E731
        return {"utt_id": list(self.utt_id), "emotion_pred": cat(self.emotion_pred),
                "emotion_prob": cat(self.emotion_prob), "emotion_true": cat(self.emotion_true),
                "attr_pred": cat(self.attr_pred), "attr_true": cat(self.attr_true)}


def gather_predictions(local: dict) -> dict:
    """Concatenate every rank's predictions (all ranks must call this); checks no sample twice.

    Raises:
        RuntimeError: when an utterance id was evaluated on more than one rank or twice.
    """
    parts = [local]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
    out: dict = {"utt_id": [u for p in parts for u in p["utt_id"]]}
    for key in ("emotion_pred", "emotion_prob", "emotion_true", "attr_pred", "attr_true"):
        arrays = [p[key] for p in parts if p[key] is not None]
        out[key] = np.concatenate(arrays) if arrays else None
    dupes = [u for u, n in Counter(out["utt_id"]).items() if n > 1]
    if dupes:
        # A user's mistake (a copy of a shard among loose .tar specs), so a ValueError: one line, no traceback.
        raise ValueError(f"evaluation read {len(dupes)} utterance(s) more than once, e.g. {dupes[:3]}: two of the "
                         f"shards given hold the same clips (a copy of a shard?); give each shard once")
    return out


def compute_metrics(preds: dict, class_names: list[str] | None = None) -> dict:
    """Metrics over gathered predictions.

    Returns:
        ``{"samples", "ua", "wa", "macro_f1", "confusion"}`` for categorical predictions (only
        labelled samples count) and ``{"ccc_valence", "ccc_arousal", "ccc_dominance",
        "ccc_mean"}`` for dimensional ones (each attribute over the samples that have it).
    """
    out: dict = {"samples": len(preds["utt_id"])}
    if preds.get("emotion_pred") is not None:
        keep = preds["emotion_true"] >= 0
        y_true, y_pred = preds["emotion_true"][keep], preds["emotion_pred"][keep]
        n = len(class_names) if class_names else int(preds["emotion_prob"].shape[1])
        out.update(ua=unweighted_accuracy(y_true, y_pred), wa=weighted_accuracy(y_true, y_pred),
                   macro_f1=macro_f1(y_true, y_pred), confusion=confusion(y_true, y_pred, n).tolist(),
                   labelled=int(keep.sum()))
        if class_names:
            out["classes"] = list(class_names)
    if preds.get("attr_pred") is not None:
        cccs = []
        for j, name in enumerate(ATTRIBUTES):
            keep = np.isfinite(preds["attr_true"][:, j])
            c = concordance_cc(preds["attr_pred"][keep, j], preds["attr_true"][keep, j])
            out[f"ccc_{name}"] = c
            if np.isfinite(c):
                cccs.append(c)
        out["ccc_mean"] = float(np.mean(cccs)) if cccs else float("nan")
    return out
