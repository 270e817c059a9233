"""Evaluation over shards: the loop the training recipe runs, and ``dser evaluate RUN_DIR``.

The loop works on one process or many. With several ranks every rank keeps stepping until
*all* ranks are out of data (ranks that are out forward a one-clip dummy batch whose output is
thrown away): under ZeRO-3 every forward is a collective, so a rank that stopped early would
hang the others. Predictions are gathered across ranks before metrics are computed, so each
clip counts exactly once however the shards divide.

Usage::

    metrics = evaluate_shards(model_forward, ["shards/demo-acted/test"], label_set, task="categorical")
    # or from the command line, on a finished run:
    dser evaluate runs/demo-stage1-20261124-010203 --shards shards/demo-natural/test
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from dser.data import LoaderConfig, make_loader
from dser.labels import LabelSet
from dser.metrics import PredictionAccumulator, compute_metrics, gather_predictions


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _dummy_batch(sample_rate: int = 16000) -> dict:
    audio = torch.zeros(1, sample_rate)  # (1, T): one second of silence
    return {"audio": audio, "attention_mask": torch.ones(1, sample_rate, dtype=torch.bool),
            "lengths": torch.tensor([sample_rate]), "emotion": torch.tensor([-100]),
            "attributes": torch.full((1, 3), float("nan")), "utt_id": []}


@torch.no_grad()
def evaluate_shards(forward: Callable[[torch.Tensor, torch.Tensor], dict], shards: list[str],
                    label_set: LabelSet | None, task: str, *, max_seconds: float = 30.0,
                    max_batch_seconds: float = 64.0, num_workers: int = 1, device: str = "cpu",
                    styles: list[str] | None = None,
                    dtype: torch.dtype = torch.float32, return_predictions: bool = False) -> dict:
    """Evaluate a model over shard groups (call on every rank).

    Args:
        forward: ``forward(audio (B,T), attention_mask (B,T)) -> {"logits", "attributes"}``.
        shards: shard groups (directories, files, globs).
        label_set: the model's classes (categorical tasks), else None.
        task: ``categorical``, ``dimensional`` or ``both``.
        max_seconds: clips are cut to this length.
        max_batch_seconds: padded seconds per batch.
        num_workers: loader workers.
        device: where the model runs.
        dtype: the model's floating dtype (audio is cast to it).
        return_predictions: also return the gathered per-clip predictions.
        styles: keep only clips of these styles (None: all).

    Returns:
        The metrics dict of ``dser.metrics.compute_metrics`` (plus ``predictions`` on request).
    """
    require = {"categorical": "emotion", "dimensional": "attributes", "both": "any"}[task]
    cfg = LoaderConfig(shards=list(shards), label_set=label_set, require=require, train=False, styles=styles,
                       max_seconds=max_seconds, max_batch_seconds=max_batch_seconds,
                       num_workers=num_workers)
    loader = iter(make_loader(cfg))
    acc = PredictionAccumulator()
    while True:
        batch = next(loader, None)
        more = torch.tensor([0 if batch is None else 1])
        if _distributed():
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            break
        real = batch is not None
        batch = batch if real else _dummy_batch()
        out = forward(batch["audio"].to(device, dtype), batch["attention_mask"].to(device))
        if real:
            acc.add(batch["utt_id"], out.get("logits"), batch["emotion"],
                    out.get("attributes"), batch["attributes"])
    preds = gather_predictions(acc.as_dict())
    metrics = compute_metrics(preds, list(label_set.classes) if label_set is not None else None)
    if return_predictions:
        metrics["predictions"] = preds
    return metrics


def evaluate_run(run_dir: Path, shards: list[str], *, num_workers: int = 1, device: str = "cpu") -> dict:
    """``dser evaluate``: load a run's export and evaluate it on shard groups (one process).

    Raises:
        ValueError: ``run_dir`` is missing, not a finished run (no export) or its export cannot be
            loaded; a shard spec is wrong or a shard unreadable. Each names the path.
    """
    from dser.predict import load_model

    model, run_config, label_set = load_model(run_dir, device)
    return evaluate_shards(lambda a, m: model(a, m), shards, label_set, run_config["task"],
                           num_workers=num_workers, device=device,
                           max_seconds=run_config["data"]["eval_max_seconds"])


def format_metrics(name: str, m: dict) -> str:
    """One line per evaluation set, for the console."""
    parts = [f"{name}: {m['samples']} clips"]
    for key in ("ua", "wa", "macro_f1", "ccc_valence", "ccc_arousal", "ccc_dominance", "ccc_mean"):
        if key in m:
            parts.append(f"{key}={m[key]:.3f}")
    return "  ".join(parts)


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    tmp.replace(path)
