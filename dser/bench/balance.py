"""Section 7, balance: how evenly a step's ranks are loaded, the per-rank planner (dser's before
the global plan, and still what loose tars get) side by side with the global epoch plan
(``dser.global_plan``), at 2, 4 and 8 simulated ranks, on
IEMOCAP-like lengths (20 000 in a full run), for two batchings: the IEMOCAP recipe's
(``dser/configs/iemocap_loso.yaml``: 15 s crops, 160 s per batch) and the run config's defaults
(``dser.runconfig.DataConfig``: 6 s, 48 s).

A step lasts as long as its slowest rank, so the measure is each step's mean padded seconds
over its largest (B × T_max of each rank's batch), averaged over the steps (``step_balance``);
``busy_fraction`` weighs the steps by their length instead (the summed means over the summed
maxima: the share of the ranks' time spent on their own batch, if a step lasts as long as its
largest batch).

The per-rank planner is the loader's own ``ShardStream.plan``, run once per simulated rank on
stub shards (JSON durations, a one-byte FLAC) of 250 clips each, so every rank count gets the
same number of shards per rank, as the streaming loader splits them: rank ``r`` of ``W`` plans the
shards ``r::W`` of the epoch's shard order. Step ``k`` pairs every rank's ``k``-th batch, up to
the rank with the fewest batches. The global plan is planned from the same durations. Also
written: the real (non-padded) share of each planner's batches, the global plan's repeats, and
the time to plan 100 000 clips.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from dser.bench.console import pct, text_table
from dser.bench.corpus import iemocap_like_lengths
from dser.bench.padding import _write_plan_shards
from dser.bench.sizes import SAMPLE_RATE, BenchSizes

NAME = "balance"
RANKS = (2, 4, 8)
BATCHINGS = ("recipe", "default")
PLANNERS = ("per_rank", "global")
# The numbers this section writes that goals and readers refer to (dotted, from the results' top).
MEASURES = tuple(f"balance.{batching}.{planner}.ranks_{w}.{k}" for batching in BATCHINGS for planner in PLANNERS
                 for w in RANKS for k in ("step_balance", "busy_fraction", "real_fraction")) \
    + tuple(f"balance.{batching}.global.ranks_{w}.repeats" for batching in BATCHINGS for w in RANKS) \
    + ("balance.global_plan_seconds_100k",)
CLIPS_PER_SHARD = 250


def _batchings() -> dict[str, dict]:
    """The two batchings measured: the IEMOCAP recipe's and the run config's defaults."""
    from dser.runconfig import CONFIGS_DIR, DataConfig, resolve_config

    recipe = resolve_config(CONFIGS_DIR / "iemocap_loso.yaml", [], stage=1).data
    return {name: {"max_seconds": d.max_seconds, "max_batch_seconds": d.max_batch_seconds,
                   "bucket_buffer": d.bucket_buffer, "shuffle_buffer": d.shuffle_buffer}
            for name, d in (("recipe", recipe), ("default", DataConfig()))}


def _stats(steps: list[list[np.ndarray]]) -> dict:
    """Step balance and real share of steps of per-rank batches (each batch: its clip lengths)."""
    from dser.global_plan import step_balance

    padded = [[len(b) * int(b.max()) for b in step] for step in steps]
    real = sum(int(b.sum()) for step in steps for b in step)
    # If a step takes as long as its largest batch: the share of the ranks' time on their own batch
    # (small steps weigh less here than in step_balance, where every step counts the same).
    busy = sum(sum(p) / len(p) for p in padded) / sum(max(p) for p in padded)
    return {"step_balance": step_balance(padded), "busy_fraction": busy, "real_fraction": real / sum(map(sum, padded)),
            "steps": len(steps)}


def _per_rank(shards: list[str], batching: dict, world_size: int, seed: int) -> dict:
    """Today's loader: each rank plans its own share of the shards (``ShardStream.plan``)."""
    from dser.data import LoaderConfig, ShardStream

    per_rank = []
    for rank in range(world_size):
        cfg = LoaderConfig(shards=shards, label_set="4class", train=True, seed=seed, num_workers=0,
                           rank=rank, world_size=world_size, **batching)
        per_rank.append([np.array([c.length for c in b.clips], dtype=np.int64)
                         for b in ShardStream(cfg, shards, rank, world_size, epoch=0, skip=0).plan() if b.clips])
    counts = [len(b) for b in per_rank]
    result = _stats([list(step) for step in zip(*per_rank)])
    result["batches_per_rank_min"], result["batches_per_rank_max"] = min(counts), max(counts)
    return result


def _global(lengths: np.ndarray, batching: dict, world_size: int, seed: int) -> dict:
    """The global epoch plan of the same clips."""
    from dser.global_plan import plan_epoch

    plan = plan_epoch(lengths, seed=seed, epoch=0, world_size=world_size, max_seconds=batching["max_seconds"],
                      max_batch_seconds=batching["max_batch_seconds"], bucket_buffer=batching["bucket_buffer"],
                      sample_rate=SAMPLE_RATE)
    result = _stats([[np.array([c.length for c in b.clips], dtype=np.int64) for b in step] for step in plan.steps])
    result["repeats"] = plan.repeats
    return result


def bench_balance(work: Path, sizes: BenchSizes, log: Callable[[str], None]) -> dict:
    """Step balance and real audio of the per-rank planner and the global plan, side by side.

    Returns:
        ``clips``, ``clips_per_shard``, ``shards``, ``global_plan_seconds_100k`` and per
        batching (``recipe``, ``default``) its settings and, per planner (``per_rank``,
        ``global``) and rank count (``ranks_2`` …), ``step_balance``, ``busy_fraction``,
        ``real_fraction`` and ``steps`` (the per-rank planner also ``batches_per_rank_min`` /
        ``_max``, the global plan ``repeats``).
    """
    from dser.global_plan import plan_epoch
    from dser.shardfiles import resolve_shards

    lengths = iemocap_like_lengths(sizes.padding_clips, seed=7)
    plan_dir = Path(tempfile.mkdtemp(prefix="balance-shards-", dir=work))  # ours alone: removed below
    _write_plan_shards(plan_dir, lengths, per_shard=CLIPS_PER_SHARD)
    shards = resolve_shards([str(plan_dir / "*.tar")])
    result: dict = {"clips": len(lengths), "clips_per_shard": CLIPS_PER_SHARD, "shards": len(shards)}
    try:
        for name, batching in _batchings().items():
            entry = {**batching, "per_rank": {}, "global": {}}
            for w in RANKS:
                entry["per_rank"][f"ranks_{w}"] = old = _per_rank(shards, batching, w, seed=0)
                entry["global"][f"ranks_{w}"] = new = _global(lengths, batching, w, seed=0)
                log(f"  {name}, {w} ranks: step balance per-rank {pct(old['step_balance'])}, "
                    f"global {pct(new['step_balance'])}; real audio {pct(old['real_fraction'])} / "
                    f"{pct(new['real_fraction'])}; {new['repeats']} repeats")
            result[name] = entry
    finally:
        shutil.rmtree(plan_dir, ignore_errors=True)
    many = iemocap_like_lengths(100_000, seed=8)
    recipe = result["recipe"]
    start = time.perf_counter()
    plan_epoch(many, seed=0, epoch=0, world_size=8, max_seconds=recipe["max_seconds"],
               max_batch_seconds=recipe["max_batch_seconds"], bucket_buffer=recipe["bucket_buffer"])
    result["global_plan_seconds_100k"] = time.perf_counter() - start
    log(f"  global plan of 100 000 clips, 8 ranks: {result['global_plan_seconds_100k']:.2f} s")
    return result


def table(result: dict) -> list[str]:
    """The section's console table."""
    rows = []
    for name in BATCHINGS:
        b = result[name]
        for w in RANKS:
            old, new = b["per_rank"][f"ranks_{w}"], b["global"][f"ranks_{w}"]
            rows.append([f"{b['max_seconds']:g} s crops, {b['max_batch_seconds']:g} s cap", w,
                         pct(old["step_balance"]), pct(new["step_balance"]), pct(old["real_fraction"]),
                         pct(new["real_fraction"]), new["repeats"]])
    return text_table(f"7. balance: a step's ranks, mean / max padded seconds ({result['clips']} IEMOCAP-like "
                      f"lengths; global plan of 100 000 clips in {result['global_plan_seconds_100k']:.2f} s)",
                      ["batching", "ranks", "per-rank", "global", "real, per-rank", "real, global", "repeats"], rows)
