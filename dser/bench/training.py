"""Training runs of the recipe (``dser/train.py``) through the DeepSpeed launcher, measured:
what the peft, pipeline and soak sections train.

Every run starts from one run config (``work/bench_run.yaml``: the bench's shards, the
section's backbone and sizes, logging every step, the precision ``auto`` picks) plus the
section's ``--set`` overrides. Its rates come from the run's own TensorBoard scalars after its
warm-up steps, its memory from ``PeakMemory``, its bytes from the checkpoint it saved.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from dser.bench.console import gib
from dser.bench.corpus import train_shards, valid_shards
from dser.bench.memory import PeakMemory
from dser.bench.sizes import PEFT_COMBINATION, BenchError, BenchSizes


def dir_bytes(path: Path, pattern: str = "*") -> int:
    """Bytes of the files under ``path`` whose names match ``pattern``."""
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())


def tensorboard_scalars(run_dir: Path, tag: str) -> list:
    """The run's TensorBoard events of one scalar, in step order (``.step``, ``.wall_time``,
    ``.value``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return sorted(acc.Scalars(tag), key=lambda e: e.step)


def _tensorboard_rate(run_dir: Path, tag: str, warmup_steps: int) -> float:
    """The mean of a per-step rate scalar over the steps after ``warmup_steps``, weighted by
    each step's wall time (so it is total amount / total time)."""
    events = tensorboard_scalars(run_dir, tag)
    amount = seconds = 0.0
    for prev, cur in zip(events, events[1:]):
        if cur.step > warmup_steps:
            dt = cur.wall_time - prev.wall_time
            amount += cur.value * dt
            seconds += dt
    if seconds <= 0:
        raise BenchError(f"{run_dir}: no {tag} scalars after step {warmup_steps}; was train.log_every 1?")
    return amount / seconds


def precision_label(runs: list[dict]) -> str:
    """The precision a set of training runs trained in (``bf16``; ``bf16/fp32`` if they differ)."""
    return "/".join(dict.fromkeys(r["precision"] for r in runs))


def failed_run(kind: str, name: str, rc: int, log_path: Path) -> BenchError:
    """The error for a training or baseline run that exited ``rc``, with its log's last lines."""
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
    return BenchError(f"{kind} run {name} failed (exit {rc}); log {log_path}:\n{tail}")


def base_run_config(work: Path, sizes: BenchSizes) -> Path:
    """The run config every bench training run starts from (written once)."""
    path = work / "bench_run.yaml"
    if path.is_file():
        return path
    shards, valid = train_shards(work, sizes), valid_shards(work)
    steps = sizes.warmup_steps + sizes.measured_steps
    config = {
        "name": "bench", "runs_dir": str(work / "runs"), "seed": 0, "task": "categorical",
        "data": {"train": [str(shards)], "valid": [str(valid)], "label_set": "4class",
                 "max_seconds": sizes.max_seconds, "eval_max_seconds": 2.0,
                 "max_batch_seconds": sizes.max_batch_seconds, "num_workers": 1},
        "model": {"backbone": {"name": sizes.backbone}, "adaptors": PEFT_COMBINATION},
        "optim": {"lr": 1e-4, "max_steps": steps, "warmup_steps": 1, "schedule": "constant"},
        # Log every step (rates per step, warm-up left out); no validation before the end.
        "train": {"log_every": 1, "eval_every": 10 ** 9, "save_every": 10 ** 9, "keep_last": 1, "progress": False},
        "deepspeed": {"config": "zero2", "precision": "auto"},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train_run(work: Path, sizes: BenchSizes, name: str, overrides: list[str], ranks: int,
              log: Callable[[str], None], warmup_steps: int | None = None) -> dict:
    """One run of the recipe through the DeepSpeed launcher, measured.

    Returns:
        ``samples_per_s``, ``audio_seconds_per_s`` (after warm-up, from its TensorBoard
        scalars), ``peak_rss_bytes`` (max over ranks) and ``peak_rss_bytes_per_rank``,
        ``checkpoint_bytes``, ``optimizer_state_bytes``, ``model_state_bytes`` (of the
        checkpoint saved at the last step, when ``train.save_every`` asks for it),
        ``export_bytes``, ``trainable_params``, ``total_params``, ``wall_seconds``, ``precision``
        and ``precision_reason`` (what the run trained in, and why), and ``rss_series_per_rank``
        (the ``PeakMemory.rss`` readings, for the caller to reduce).
    """
    warmup_steps = sizes.warmup_steps if warmup_steps is None else warmup_steps
    from dser.launch import TRAIN_SCRIPT, launch_command

    config = base_run_config(work, sizes)
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["--stage", "1", "--config", str(config), "--run-dir", str(run_dir)]
    for o in overrides:
        args += ["--set", o]
    cmd, env = launch_command(args, ranks=ranks)
    env["HF_HUB_OFFLINE"] = "1"
    if not torch.cuda.is_available():
        # The cores split evenly between ranks, whatever OMP_NUM_THREADS the caller has set.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
    log_path = work / f"{name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
        with PeakMemory(proc.pid, TRAIN_SCRIPT.name) as memory:
            rc = proc.wait()
    wall = time.perf_counter() - start
    if rc != 0:
        raise failed_run("training", name, rc, log_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("step*") if p.is_dir())
    ckpt = ckpts[-1] if ckpts else None
    peaks = [memory.peaks[pid] for pid in sorted(memory.peaks)]
    result = {
        "samples_per_s": _tensorboard_rate(run_dir, "train/samples_per_s", warmup_steps),
        "audio_seconds_per_s": _tensorboard_rate(run_dir, "train/audio_seconds_per_s", warmup_steps),
        "peak_rss_bytes": max(peaks) if peaks else None,
        "peak_rss_bytes_per_rank": peaks,
        "checkpoint_bytes": dir_bytes(ckpt) if ckpt else None,
        "optimizer_state_bytes": dir_bytes(ckpt, "*optim_states*") if ckpt else None,
        "model_state_bytes": dir_bytes(ckpt, "*model_states*") if ckpt else None,
        "export_bytes": dir_bytes(run_dir / "export"),
        "trainable_params": metrics["params"]["all"]["trainable"],
        "total_params": metrics["params"]["all"]["total"],
        "wall_seconds": wall,
        "precision": metrics["precision"], "precision_reason": metrics["precision_reason"],
        "rss_series_per_rank": [memory.rss.get(pid, []) for pid in sorted(memory.peaks)],
    }
    log(f"  {name}: {result['samples_per_s']:.2f} samples/s, {result['audio_seconds_per_s']:.1f} audio-s/s, "
        f"peak {gib(result['peak_rss_bytes'] or 0)}/rank, run {wall:.0f} s, {result['precision']}")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a full-finetuning one is > 1 GB
    return result
