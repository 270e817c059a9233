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
from dser.schema import IGNORE_INDEX


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _dummy_batch(sample_rate: int = 16000) -> dict:
    audio = torch.zeros(1, sample_rate)  # (1, T): one second of silence
    return {"audio": audio, "attention_mask": torch.ones(1, sample_rate, dtype=torch.bool),
            "lengths": torch.tensor([sample_rate]), "emotion": torch.tensor([IGNORE_INDEX]),
            "attributes": torch.full((1, 3), float("nan")), "utt_id": []}


@torch.no_grad()
def evaluate_loader(forward: Callable[[torch.Tensor, torch.Tensor], dict], cfg: LoaderConfig, task: str, *,
                    device: str = "cpu", dtype: torch.dtype = torch.float32,
                    return_predictions: bool = False) -> dict:
    """Evaluate a model over the clips of an evaluation loader config (call on every rank).

    Args:
        forward: ``forward(audio (B,T), attention_mask (B,T)) -> {"logits", "attributes"}``.
        cfg: what to read and how to batch it (``runconfig.loader_config(..., train=False)``
            gives a run's).
        task: ``categorical``, ``dimensional`` or ``both``.
        device: where the model runs.
        dtype: the model's floating dtype (audio is cast to it).
        return_predictions: also return the gathered per-clip predictions.

    Returns:
        The metrics dict of ``dser.metrics.compute_metrics`` (plus ``predictions`` on request).
    """
    label_set = cfg.label_set  # a LabelSet (LoaderConfig resolves names) or None
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


def evaluate_shards(forward: Callable[[torch.Tensor, torch.Tensor], dict], shards: list[str],
                    label_set: LabelSet | None, task: str, *, styles: list[str] | None = None,
                    device: str = "cpu", dtype: torch.dtype = torch.float32, return_predictions: bool = False,
                    **loader: object) -> dict:
    """``evaluate_loader`` on shard groups with ``LoaderConfig``'s defaults, for a model that
    has no run config (the recipe and ``dser evaluate`` use the run's, through
    ``runconfig.loader_config``).

    Args:
        shards: shard groups (directories, files, globs).
        label_set: the model's classes (categorical tasks), else None.
        styles: keep only clips of these styles (None: all).
        loader: any other ``LoaderConfig`` field (``max_seconds``, ``max_batch_seconds``, …).
    """
    from dser.runconfig import REQUIRE

    cfg = LoaderConfig(shards=list(shards), label_set=label_set, require=REQUIRE[task], train=False, styles=styles,
                       **loader)
    return evaluate_loader(forward, cfg, task, device=device, dtype=dtype, return_predictions=return_predictions)


def evaluate_run(run_dir: Path, shards: list[str], *, styles: list[str] | None = None,
                 num_workers: int | None = None, device: str = "cpu") -> dict:
    """``dser evaluate``: load a run's export and evaluate it on shard groups (one process),
    batched as the run evaluated (``runconfig.loader_config``: its ``data.eval_max_seconds``,
    ``data.max_batch_seconds``, buffers and workers), so a run's own test set gives the run's
    numbers.

    Args:
        styles: keep only clips of these styles (None: all, as a run evaluates a test set without
            ``data.test_styles``).
        num_workers: loader workers (None: the run's ``data.num_workers``).

    Raises:
        ValueError: ``run_dir`` is missing, not a finished run (no export) or its export cannot be
            loaded; a shard spec is wrong or a shard unreadable. Each names the path.
    """
    from dataclasses import replace

    from dser.predict import load_model
    from dser.runconfig import loader_config, run_config_of_export

    model, run_config, label_set = load_model(run_dir, device)
    cfg = run_config_of_export(run_config, where=f"{Path(run_dir) / 'export' / 'config.yaml'}")
    loader = loader_config(cfg, shards, train=False, styles=styles, label_set=label_set)
    if num_workers is not None:
        loader = replace(loader, num_workers=num_workers)
    return evaluate_loader(lambda a, m: model(a, m), loader, cfg.task, device=device)


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
