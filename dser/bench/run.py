"""``dser bench``: how much audio dser pushes through a machine, measured in one run.

Six measurements, each a rate or a ratio taken in the same run on the same machine, on audio
generated here (speech-like clips from ``dser.corpora.synthetic``, cut to IEMOCAP-like lengths:
log-normal, median 3.5 s, mean ≈ 4.5 s, 0.6–30 s)::

    sharding   dser shard (build_shards) in × real time: 16 kHz and 48 kHz (soxr-resampled)
               WAV input, 1 and 2 encoding workers
    loading    the streaming loader (decode FLAC, bucket, pad) in × real time per worker, against
               the same clips as WAV files through a plain torch Dataset + DataLoader
               (bench_baseline.WavDataset: one file per clip, random batches padded to the longest)
    padding    real (non-padded) share of the samples in training batches: dser's plan (the
               loader's own ShardStream.plan with the default run config's batching) against
               random batches of a fixed clip count, on 20 000 IEMOCAP-like lengths
    peft       the training recipe through the DeepSpeed launcher (2 CPU ranks, ZeRO-2) on
               the WavLM Base+ architecture (random weights, ~94 M parameters) with adaptors
               full, lora, lora+bottleneck+weighted_sum+weight_gating: samples/s, peak memory
               per rank (VmHWM of each rank process), optimizer-state and checkpoint bytes,
               each also as a ratio to full
    pipeline   audio-seconds/s of a dser training run against bench_baseline.py (transformers +
               peft + DataLoader over WAV files, random padded batches, plain AdamW, one
               process) on the same model, data and number of optimizer steps, run in alternation;
               where the hardware has native bf16, also against the script in bf16 autocast
    soak       resident memory (VmRSS) of each rank over a long tiny-model run of the recipe
               (2,000 steps, evaluating and checkpointing on the way): growth after warm-up

Every training run trains in the precision ``deepspeed.precision: auto`` picks on this machine
(bf16 only where the GPU or CPU has it natively, else fp16 on a GPU, fp32 on a CPU) and every
figure is labelled with the precision it was measured in. Rates of training runs leave out their
first ``warmup_steps`` steps (start-up, first batches, kernel selection). ``--quick`` shrinks every size so the whole bench finishes in a few minutes
on a 2-core machine; the numbers in BENCHMARKS.md come from a run without it.

Usage::

    dser bench --quick --out bench.json             # console table + JSON
    results = run_bench(Path("bench.json"), quick=True)
    print(format_table(results))
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import soundfile as sf
import torch
import yaml

from dser import __version__

SECTIONS = ("sharding", "loading", "padding", "peft", "pipeline", "soak")
FORMAT = "dser-bench/1"
SAMPLE_RATE = 16000
CLASSES = ("neutral", "happy", "angry", "sad")
PEFT_COMBINATION = ["lora", "bottleneck", "weighted_sum", "weight_gating"]
# The feed-forward projections: both dser and a stock transformers WavLM call these as modules,
# so peft's LoRA on them trains in both pipelines (see bench_baseline's docstring).
PIPELINE_LORA_TARGETS = ["intermediate_dense", "output_dense"]
BASELINE_SCRIPT = Path(__file__).resolve().parent / "bench_baseline.py"

# The goals, checked against the results (name, dotted path, comparison, threshold).
GOALS = [
    ("dser vs usual pipeline, audio-s/s", "pipeline.speedup", ">=", 1.5),
    ("PEFT combination vs full, samples/s", "peft.combination.samples_per_s_ratio", ">=", 1.3),
    ("PEFT combination vs full, peak memory per rank", "peft.combination.peak_rss_ratio", "<=", 0.7),
    ("PEFT combination vs full, checkpoint bytes", "peft.combination.checkpoint_bytes_ratio", "<=", 0.05),
    ("loader, x real time per worker", "loading.dser.per_worker_x_realtime", ">=", 500.0),
    ("bucketing, real audio in every batch", "padding.cropped.dser.min_batch_real_fraction", ">=", 0.9),
    ("frozen CNN keeps no activations (bytes)", "peft.full.front_end_saved_activation_bytes", "<=", 0),
    ("resident memory after warm-up, growth", "soak.rss_growth", "<=", 1.10),
]


class BenchError(RuntimeError):
    """A benchmark step failed; the message names the step and where its log is."""


@dataclass(frozen=True)
class BenchSizes:
    """How big each measurement is (``QUICK`` and ``FULL``).

    Attributes:
        shard_clips_16k, shard_clips_48k: clips of the generated corpora (IEMOCAP-like lengths).
        loader_passes: epochs over the 16 kHz shards per loader measurement.
        padding_clips: lengths drawn for the padding measurement.
        backbone: the model of the training runs (``random:wavlm-base-plus`` or a tiny preset).
        max_seconds: training crop (``data.max_seconds``) of the training runs.
        max_batch_seconds: padded seconds per batch and rank (``data.max_batch_seconds``); the
            baseline's fixed batch is ``ranks × max_batch_seconds / max_seconds`` clips, the same
            worst-case padded size.
        warmup_steps, measured_steps: optimizer steps of a training run left out / measured.
        rounds: dser / baseline alternations in the pipeline comparison.
        soak_backbone, soak_steps, soak_warmup_steps: the long tiny-model run whose resident
            memory is watched, and the steps left out as warm-up.
    """

    shard_clips_16k: int
    shard_clips_48k: int
    loader_passes: int
    padding_clips: int
    backbone: str
    max_seconds: float
    max_batch_seconds: float
    warmup_steps: int
    measured_steps: int
    rounds: int
    soak_backbone: str = "tiny-whisper"
    soak_steps: int = 2000
    soak_warmup_steps: int = 200


QUICK = BenchSizes(shard_clips_16k=120, shard_clips_48k=40, loader_passes=2, padding_clips=4000,
                   backbone="random:wavlm-base-plus", max_seconds=3.0, max_batch_seconds=6.0,
                   warmup_steps=1, measured_steps=2, rounds=1, soak_steps=200, soak_warmup_steps=50)
FULL = BenchSizes(shard_clips_16k=1200, shard_clips_48k=400, loader_passes=3, padding_clips=20000,
                  backbone="random:wavlm-base-plus", max_seconds=6.0, max_batch_seconds=12.0,
                  warmup_steps=2, measured_steps=8, rounds=2)


# ----------------------------------------------------------------------------------------
# the benchmark corpus
# ----------------------------------------------------------------------------------------

def iemocap_like_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Clip lengths in seconds shaped like IEMOCAP's utterances.

    Log-normal with median 3.5 s and sigma 0.71 (mean ≈ 4.5 s, as IEMOCAP's), clipped to
    [0.6, 30] s.

    Returns:
        (n,) float64 seconds.
    """
    rng = np.random.default_rng([seed, 0x1E3])
    return np.clip(np.exp(rng.normal(math.log(3.5), 0.71, n)), 0.6, 30.0)


def write_bench_corpus(out: Path, lengths: Sequence[float], sample_rate: int = SAMPLE_RATE,
                       seed: int = 0, group: str = "train") -> Path:
    """Write 16-bit WAV clips of the given lengths and a manifest ``dser shard manifest`` reads.

    Each clip is a run of speech-like synthetic utterances (``dser.corpora.synthetic``), so FLAC
    compresses it as it would speech; emotions cycle through the 4-class set.

    Args:
        out: directory to create (``wav/``, ``pool/``, ``manifest.jsonl``).
        lengths: seconds per clip.
        sample_rate: of the WAV files.
        seed: picks the pieces of each clip.
        group: the clips' shard group.

    Returns:
        The manifest path.
    """
    from dser.corpora.synthetic import synthesize

    out = Path(out)
    pool_manifest = synthesize(out / "pool", "acted", utterances=24, speakers=3, seed=seed, sample_rate=sample_rate,
                               overwrite=True)
    pool = [sf.read(pool_manifest.parent / json.loads(line)["path"], dtype="float32")[0]
            for line in pool_manifest.read_text().splitlines() if line.strip()]
    (out / "wav").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0xC0])
    rows = []
    for i, seconds in enumerate(lengths):
        n = int(round(seconds * sample_rate))
        pieces, have = [], 0
        while have < n:
            piece = pool[rng.integers(len(pool))]
            pieces.append(piece)
            have += len(piece)
        name = f"{group}_{i:05d}"
        sf.write(out / "wav" / f"{name}.wav", np.concatenate(pieces)[:n], sample_rate, subtype="PCM_16")
        rows.append({"path": f"wav/{name}.wav", "utt_id": name, "emotion": CLASSES[i % len(CLASSES)],
                     "speaker": f"spk{i % 8}", "group": group, "style": "acted"})
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def _shard(manifest: Path, out: Path, workers: int, max_shard_samples: int) -> tuple[float, float, int]:
    """``dser shard manifest`` through ``build_shards``; returns (wall s, audio s, clips)."""
    from dser.corpora import read_corpus
    from dser.shards import build_shards

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        index = build_shards(read_corpus("manifest", manifest), out, corpus="bench", root=manifest,
                             workers=workers, max_shard_samples=max_shard_samples, progress=False)
    wall = time.perf_counter() - start
    seconds = sum(s["seconds"] for g in index.data["groups"].values() for s in g["shards"])
    return wall, seconds, index.totals["samples"]


# ----------------------------------------------------------------------------------------
# 1. sharding
# ----------------------------------------------------------------------------------------

def bench_sharding(work: Path, sizes: BenchSizes, log: Callable[[str], None]) -> dict:
    """``dser shard`` throughput on 16 kHz and 48 kHz WAV input, 1 and 2 workers.

    Leaves ``work/shards16k`` (the 16 kHz corpus, 1 worker) for the loading and training runs.
    """
    result = {}
    for rate, clips in ((16000, sizes.shard_clips_16k), (48000, sizes.shard_clips_48k)):
        tag = f"{rate // 1000}k"
        log(f"sharding: writing {clips} clips at {rate} Hz")
        manifest = _corpus(work, rate, clips)
        per_shard = max(4, math.ceil(clips / 8))
        entry = {"input_sample_rate": rate, "clips": clips}
        for workers in (1, 2):
            out = work / f"shards{tag}" if workers == 1 else work / f"shards{tag}-w{workers}"
            wall, seconds, n = _shard(manifest, out, workers, per_shard)
            entry["audio_seconds"] = round(seconds, 3)
            entry[f"workers{workers}_x_realtime"] = seconds / wall
            entry[f"workers{workers}_seconds"] = wall
            log(f"  {tag}, {workers} worker(s): {seconds:.0f} s of audio in {wall:.2f} s "
                f"= {seconds / wall:.0f}x real time")
            if workers != 1 or rate != 16000:
                shutil.rmtree(out, ignore_errors=True)
        entry["workers2_speedup"] = entry["workers2_x_realtime"] / entry["workers1_x_realtime"]
        result[tag] = entry
    return result


def _corpus(work: Path, rate: int, clips: int) -> Path:
    """The generated corpus at ``rate`` (made once per bench run)."""
    out = work / f"corpus{rate // 1000}k"
    manifest = out / "manifest.jsonl"
    if not manifest.is_file():
        write_bench_corpus(out, iemocap_like_lengths(clips, seed=rate), rate, seed=1)
    return manifest


def _train_shards(work: Path, sizes: BenchSizes) -> Path:
    """The 16 kHz shards (from the sharding step, or made here when it was skipped)."""
    out = work / "shards16k"
    if not (out / "index.json").is_file():
        manifest = _corpus(work, 16000, sizes.shard_clips_16k)
        _shard(manifest, out, 1, max(4, math.ceil(sizes.shard_clips_16k / 8)))
    return out


# ----------------------------------------------------------------------------------------
# 2. loading
# ----------------------------------------------------------------------------------------

def _run_dser_loader(shards: Path, workers: int, passes: int) -> dict:
    from dser.data import LoaderConfig, make_loader

    cfg = LoaderConfig(shards=[str(shards)], label_set="4class", require="emotion", max_seconds=None,
                       max_batch_seconds=48.0, train=True, num_workers=workers, rank=0, world_size=1)
    audio = padded = 0.0
    batches = 0
    start = time.perf_counter()
    for epoch in range(passes):
        for batch in make_loader(cfg, epoch=epoch):
            audio += batch["duration_s"]
            padded += batch["audio"].numel() / SAMPLE_RATE
            batches += 1
    wall = time.perf_counter() - start
    return {"audio_seconds": audio, "wall_seconds": wall, "batches": batches, "real_fraction": audio / padded}


def _run_plain_loader(manifest: Path, workers: int, passes: int, batch_size: int) -> dict:
    from torch.utils.data import DataLoader

    from dser.bench_baseline import WavDataset, pad_collate, read_manifest

    dataset = WavDataset(read_manifest(manifest), manifest.parent)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=pad_collate)
    audio = padded = 0.0
    batches = 0
    start = time.perf_counter()
    for _ in range(passes):
        for batch in loader:
            audio += float(batch["lengths"].sum()) / SAMPLE_RATE
            padded += batch["audio"].numel() / SAMPLE_RATE
            batches += 1
    wall = time.perf_counter() - start
    return {"audio_seconds": audio, "wall_seconds": wall, "batches": batches, "real_fraction": audio / padded}


def bench_loading(work: Path, sizes: BenchSizes, log: Callable[[str], None]) -> dict:
    """The streaming loader against a plain Dataset over the same clips as WAV files.

    Whole clips (no crop) so every decoded second is delivered; 0 workers (all in this
    process: the per-worker rate) and 2 workers (per worker = total / 2), measured in
    alternation after one warm-up pass of each (page cache).
    """
    shards = _train_shards(work, sizes)
    manifest = _corpus(work, 16000, sizes.shard_clips_16k)
    batch_size = 8  # the plain loader's clip count: 48 s (dser's batch cap) / 6 s (its crop)
    _run_dser_loader(shards, 0, 1)
    _run_plain_loader(manifest, 0, 1, batch_size)
    result: dict = {"dser": {}, "plain": {}, "plain_batch_size": batch_size, "passes": sizes.loader_passes}
    for workers in (0, 2):
        d = _run_dser_loader(shards, workers, sizes.loader_passes)
        p = _run_plain_loader(manifest, workers, sizes.loader_passes, batch_size)
        for name, r in (("dser", d), ("plain", p)):
            rate = r["audio_seconds"] / r["wall_seconds"]
            result[name][f"workers{workers}_x_realtime"] = rate
            result[name]["real_fraction"] = r["real_fraction"]
            log(f"  {name:5s} loader, {workers} workers: {rate:.0f}x real time "
                f"({r['batches']} batches, {100 * r['real_fraction']:.0f}% real audio)")
    for name in ("dser", "plain"):
        r = result[name]
        # 0 workers: decoding and batching in this one process, i.e. one worker's rate.
        r["per_worker_x_realtime"] = r["workers0_x_realtime"]
        r["per_worker_x_realtime_2_workers"] = r["workers2_x_realtime"] / 2
    result["ratio_dser_to_plain"] = result["dser"]["workers0_x_realtime"] / result["plain"]["workers0_x_realtime"]
    result["ratio_dser_to_plain_2_workers"] = (result["dser"]["workers2_x_realtime"]
                                               / result["plain"]["workers2_x_realtime"])
    return result


# ----------------------------------------------------------------------------------------
# 3. padding
# ----------------------------------------------------------------------------------------

def _write_plan_shards(out: Path, lengths: np.ndarray, per_shard: int = 2000) -> None:
    """Shards whose JSON carries the given durations and whose FLAC is a stub: the loader's
    planning (bucketing) reads only the JSON, so its batches can be measured without audio."""
    out.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(lengths), per_shard):
        with tarfile.open(out / f"plan-{s // per_shard:06d}.tar", "w") as tar:
            for i in range(s, min(s + per_shard, len(lengths))):
                key = f"clip{i:06d}"
                meta = json.dumps({"utt_id": key, "emotion": CLASSES[i % 4], "valence": None, "arousal": None,
                                   "dominance": None, "style": "acted", "duration": float(lengths[i])}).encode()
                for name, data in ((f"{key}.json", meta), (f"{key}.flac", b"\0")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def _padding_stats(batches: list[np.ndarray]) -> dict:
    """Real share of padded samples: overall, worst batch, share of batches at >= 90 %."""
    real = np.array([b.sum() for b in batches], dtype=np.float64)
    padded = np.array([len(b) * b.max() for b in batches], dtype=np.float64)
    frac = real / padded
    return {"real_fraction": float(real.sum() / padded.sum()), "min_batch_real_fraction": float(frac.min()),
            "batches_at_least_90": float((frac >= 0.9).mean()), "batches": len(batches),
            "mean_clips_per_batch": float(np.mean([len(b) for b in batches])),
            "mean_padded_seconds": float(padded.mean() / SAMPLE_RATE)}


def bench_padding(work: Path, sizes: BenchSizes, log: Callable[[str], None]) -> dict:
    """dser's planned training batches against random batches of a fixed clip count.

    dser's batches are exactly what the loader plans (``ShardStream.plan``) with the default
    run config's batching (``dser.runconfig.DataConfig``: crop, batch cap, bucket and shuffle
    buffers). Two cases: ``cropped`` (training, clips cut to ``data.max_seconds``; random
    batches of ``max_batch_seconds / max_seconds`` clips, the same worst-case padded size) and
    ``whole`` (no crop, 8 clips per random batch).
    """
    from dser.data import LoaderConfig, ShardStream, resolve_shards
    from dser.runconfig import DataConfig

    d = DataConfig()
    lengths = iemocap_like_lengths(sizes.padding_clips, seed=7)
    plan_dir = work / "plan-shards"
    _write_plan_shards(plan_dir, lengths)
    shards = resolve_shards([str(plan_dir / "*.tar")])  # loose stub tars, no index
    result = {"clips": len(lengths), "median_seconds": float(np.median(lengths)), "mean_seconds": float(lengths.mean()),
              "min_seconds": float(lengths.min()), "max_seconds": float(lengths.max()),
              "max_batch_seconds": d.max_batch_seconds, "bucket_buffer": d.bucket_buffer}
    rng = np.random.default_rng(11)
    for case, crop, clips_per_batch in (("cropped", d.max_seconds, int(d.max_batch_seconds // d.max_seconds)),
                                        ("whole", None, 8)):
        cfg = LoaderConfig(shards=shards, label_set="4class", max_seconds=crop, max_batch_seconds=d.max_batch_seconds,
                           bucket_buffer=d.bucket_buffer, shuffle_buffer=d.shuffle_buffer, train=True,
                           rank=0, world_size=1, num_workers=0)
        planned = [np.array([c.length for c in b.clips], dtype=np.int64)
                   for b in ShardStream(cfg, shards, 0, 1, epoch=0, skip=0).plan() if b.clips]
        samples = np.concatenate(planned)
        order = rng.permutation(len(samples))
        random_batches = [samples[order[i: i + clips_per_batch]] for i in range(0, len(samples), clips_per_batch)]
        dser_stats, random_stats = _padding_stats(planned), _padding_stats(random_batches)
        random_stats["clips_per_batch"] = clips_per_batch
        result[case] = {"max_seconds": crop, "dser": dser_stats, "random": random_stats,
                        "ratio_dser_to_random": dser_stats["real_fraction"] / random_stats["real_fraction"]}
        log(f"  {case}: dser {100 * dser_stats['real_fraction']:.1f}% real (worst batch "
            f"{100 * dser_stats['min_batch_real_fraction']:.1f}%), random batches of {clips_per_batch} "
            f"{100 * random_stats['real_fraction']:.1f}%")
    shutil.rmtree(plan_dir, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------------------
# training runs: the recipe through the launcher, and the baseline script
# ----------------------------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    """Parent pid → child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # The command name may hold spaces and parentheses: the ppid follows the last ")".
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _runs_script(pid: int, script: str) -> bool:
    """Whether a process is ``python [-flags] …/script …`` (not ``python -m launcher … script``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except OSError:
        return False
    program = next((a for a in args[1:] if not a.startswith("-")), "")
    return Path(program).name == script and "-m" not in args[1:args.index(program)]


def _vm_status(pid: int, field: str = "VmHWM") -> int | None:
    """A memory field of a process in bytes (``VmHWM``: peak resident set size, ``VmRSS``:
    resident now), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Polls the peak RSS (VmHWM) and the RSS now (VmRSS) of the rank processes under a
    launcher, from outside.

    A rank is a descendant process whose program is ``script`` and whose parent's is not (the
    DataLoader workers a rank forks have the rank's command line and are left out). VmHWM only
    grows, so the last reading before a rank exits is its peak up to the polling interval.
    ``rss[pid]`` is the series of ``(time.time(), bytes)`` readings.
    """

    def __init__(self, root_pid: int, script: str, interval: float = 0.2):
        self.root, self.script, self.interval = root_pid, script, interval
        self.peaks: dict[int, int] = {}
        self.rss: dict[int, list[tuple[float, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            tree = _children()
            stack, seen = [self.root], set()
            while stack:
                pid = stack.pop()
                for child in tree.get(pid, []):
                    if child in seen:
                        continue
                    seen.add(child)
                    stack.append(child)
                    if _runs_script(child, self.script) and not _runs_script(pid, self.script):
                        hwm, rss = _vm_status(child, "VmHWM"), _vm_status(child, "VmRSS")
                        if hwm is not None:
                            self.peaks[child] = max(self.peaks.get(child, 0), hwm)
                        if rss is not None:
                            self.rss.setdefault(child, []).append((time.time(), rss))
            self._stop.wait(self.interval)


def _dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())


def _tensorboard_rate(run_dir: Path, tag: str, warmup_steps: int) -> float:
    """The mean of a per-step rate scalar over the steps after ``warmup_steps``, weighted by
    each step's wall time (so it is total amount / total time)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    events = sorted(acc.Scalars(tag), key=lambda e: e.step)
    amount = seconds = 0.0
    for prev, cur in zip(events, events[1:]):
        if cur.step > warmup_steps:
            dt = cur.wall_time - prev.wall_time
            amount += cur.value * dt
            seconds += dt
    if seconds <= 0:
        raise BenchError(f"{run_dir}: no {tag} scalars after step {warmup_steps}; was train.log_every 1?")
    return amount / seconds


def _base_run_config(work: Path, sizes: BenchSizes) -> Path:
    """The run config every bench training run starts from (written once)."""
    path = work / "bench_run.yaml"
    if path.is_file():
        return path
    shards = _train_shards(work, sizes)
    valid = work / "shards-valid"
    if not (valid / "index.json").is_file():
        from dser.corpora import read_corpus
        from dser.shards import build_shards
        manifest = write_bench_corpus(work / "corpus-valid", [1.0] * 4, seed=2, group="valid")
        with contextlib.redirect_stdout(io.StringIO()):
            build_shards(read_corpus("manifest", manifest), valid, corpus="bench-valid", root=manifest, progress=False)
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

    config = _base_run_config(work, sizes)
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
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise BenchError(f"training run {name} failed (exit {rc}); log {log_path}:\n{tail}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("step*") if p.is_dir())
    ckpt = ckpts[-1] if ckpts else None
    peaks = [memory.peaks[pid] for pid in sorted(memory.peaks)]
    result = {
        "samples_per_s": _tensorboard_rate(run_dir, "train/samples_per_s", warmup_steps),
        "audio_seconds_per_s": _tensorboard_rate(run_dir, "train/audio_seconds_per_s", warmup_steps),
        "peak_rss_bytes": max(peaks) if peaks else None,
        "peak_rss_bytes_per_rank": peaks,
        "checkpoint_bytes": _dir_bytes(ckpt) if ckpt else None,
        "optimizer_state_bytes": _dir_bytes(ckpt, "*optim_states*") if ckpt else None,
        "model_state_bytes": _dir_bytes(ckpt, "*model_states*") if ckpt else None,
        "export_bytes": _dir_bytes(run_dir / "export"),
        "trainable_params": metrics["params"]["all"]["trainable"],
        "total_params": metrics["params"]["all"]["total"],
        "wall_seconds": wall,
        "precision": metrics["precision"], "precision_reason": metrics["precision_reason"],
        "rss_series_per_rank": [memory.rss.get(pid, []) for pid in sorted(memory.peaks)],
    }
    log(f"  {name}: {result['samples_per_s']:.2f} samples/s, {result['audio_seconds_per_s']:.1f} audio-s/s, "
        f"peak {(result['peak_rss_bytes'] or 0) / 2 ** 30:.2f} GiB/rank, run {wall:.0f} s, {result['precision']}")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a full-finetuning one is > 1 GB
    return result


def baseline_run(work: Path, sizes: BenchSizes, name: str, ranks: int, log: Callable[[str], None],
                 precision: str = "fp32") -> dict:
    """One run of ``bench_baseline.py`` on the same clips and architecture, measured."""
    from dser.model.backbone import load_backbone

    # The transformers config exactly as dser's backbone runs it: dser turns the architecture's
    # LayerDrop (0.1) and SpecAugment (0.05) off unless configured, so the baseline must too.
    config_dir = work / "baseline-backbone"
    config_dir.mkdir(exist_ok=True)
    with torch.device("meta"):  # shapes only: no memory, no weights
        load_backbone(sizes.backbone).hf_model.config.to_json_file(str(config_dir / "config.json"))
    manifest = _corpus(work, 16000, sizes.shard_clips_16k)
    out = work / f"{name}.json"
    batch_size = max(1, int(ranks * sizes.max_batch_seconds // sizes.max_seconds))
    cmd = [sys.executable, str(BASELINE_SCRIPT), "--manifest", str(manifest), "--backbone-config", str(config_dir),
           "--batch-size", str(batch_size), "--max-seconds", str(sizes.max_seconds),
           "--steps", str(sizes.warmup_steps + sizes.measured_steps),
           "--lora-targets", ",".join(PIPELINE_LORA_TARGETS), "--precision", precision,
           "--threads", str(os.cpu_count() or 1), "--out", str(out)]
    # One process using every core, whatever OMP_NUM_THREADS the caller has set.
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(os.cpu_count() or 1))
    log_path = work / f"{name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as f:
        rc = subprocess.call(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if rc != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise BenchError(f"baseline run {name} failed (exit {rc}); log {log_path}:\n{tail}")
    data = json.loads(out.read_text())
    measured = [s for s in data["steps"] if s["step"] > sizes.warmup_steps]
    seconds = sum(s["seconds"] for s in measured)
    result = {
        "samples_per_s": sum(s["samples"] for s in measured) / seconds,
        "audio_seconds_per_s": sum(s["audio_seconds"] for s in measured) / seconds,
        "real_fraction": (sum(s["audio_seconds"] for s in data["steps"])
                          / sum(s["padded_seconds"] for s in data["steps"])),
        "batch_size": batch_size, "precision": precision, "threads": data["threads"],
        "trainable_params": data["trainable_params"],
        "lora_b_tensors": data["lora_b_tensors"], "lora_b_tensors_with_grad": data["lora_b_tensors_with_grad"],
        "layerdrop": data["layerdrop"], "mask_time_prob": data["mask_time_prob"],
        "wall_seconds": wall,
    }
    log(f"  {name}: {result['samples_per_s']:.2f} samples/s, {result['audio_seconds_per_s']:.1f} audio-s/s, "
        f"run {wall:.0f} s")
    return result


# ----------------------------------------------------------------------------------------
# 4. PEFT vs full, 5. dser vs the usual pipeline
# ----------------------------------------------------------------------------------------

def saved_activation_bytes(backbone: str, adaptors: list[str], seconds: float = 3.0, clips: int = 2,
                           backbone_options: dict | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """Bytes autograd keeps for backward in one training forward in ``dtype``, in all and in the
    CNN front end.

    Counted with ``torch.autograd.graph.saved_tensors_hooks``: every tensor saved for backward,
    once per storage, parameters left out (they exist anyway). A frozen front end that runs
    without building a graph keeps 0 bytes.

    Args:
        backbone: ``model.backbone.name`` of a waveform family (CNN front end, then ``feature_projection``).
        adaptors: ``model.adaptors``.
        seconds, clips: the batch, ``clips`` × ``seconds`` of noise.
        backbone_options: other ``model.backbone`` keys (e.g. ``freeze_feature_encoder``).
        dtype: the model's and the batch's dtype (the training runs' precision).

    Returns:
        ``{"saved_activation_bytes": int, "front_end_saved_activation_bytes": int}``.
    """
    from dser.config import from_dict
    from dser.model.build import ModelConfig, build_model

    torch.manual_seed(0)
    backbone_cfg = {"name": backbone, **(backbone_options or {})}
    model = build_model(from_dict(ModelConfig, {"backbone": backbone_cfg, "adaptors": list(adaptors)}),
                        num_classes=len(CLASSES)).to(dtype).train()
    params = {p.data_ptr() for p in model.parameters()}
    seen: set[tuple[int, int]] = set()
    where = {"front_end": False}
    totals = {"saved_activation_bytes": 0, "front_end_saved_activation_bytes": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.data_ptr() not in params and key not in seen:
            seen.add(key)
            totals["saved_activation_bytes"] += key[1]
            if where["front_end"]:
                totals["front_end_saved_activation_bytes"] += key[1]
        return t

    # The backbone runs the CNN layer by layer (not through feature_extractor's forward), so the
    # front end is everything from the model's start to the feature projection's.
    hooks = [model.register_forward_pre_hook(lambda *_: where.update(front_end=True)),
             model.backbone.hf_model.feature_projection.register_forward_pre_hook(
                 lambda *_: where.update(front_end=False))]
    audio = torch.randn(clips, int(seconds * SAMPLE_RATE), generator=torch.Generator().manual_seed(0)) * 0.1
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(audio.to(dtype), torch.ones(audio.shape, dtype=torch.bool))
    finally:
        for h in hooks:
            h.remove()
    return totals


def _precision_label(runs: list[dict]) -> str:
    """The precision a set of training runs trained in (``bf16``; ``bf16/fp32`` if they differ)."""
    return "/".join(dict.fromkeys(r["precision"] for r in runs))


def bench_peft(work: Path, sizes: BenchSizes, ranks: int, log: Callable[[str], None]) -> dict:
    """full, lora and the paper's combination through the recipe; ratios to full."""
    from dser.precision import Precision

    steps = sizes.warmup_steps + sizes.measured_steps
    runs = {"full": ["full"], "lora": ["lora"], "combination": PEFT_COMBINATION}
    result: dict = {"backbone": sizes.backbone, "ranks": ranks, "deepspeed": "zero2",
                    "steps": steps, "warmup_steps": sizes.warmup_steps}
    for key, adaptors in runs.items():
        result[key] = train_run(work, sizes, f"peft-{key}", [f"model.adaptors={json.dumps(adaptors)}",
                                                            f"train.save_every={steps}"], ranks, log)
        del result[key]["rss_series_per_rank"]
        result[key]["adaptors"] = adaptors
        # the activations kept for backward in the dtype this run trained in
        dtype = Precision(result[key]["precision"], "").dtype
        result[key].update(saved_activation_bytes(sizes.backbone, adaptors, seconds=sizes.max_seconds, dtype=dtype))
    result["precision"] = _precision_label([result[k] for k in runs])
    full = result["full"]
    for key in runs:
        r = result[key]
        r["samples_per_s_ratio"] = r["samples_per_s"] / full["samples_per_s"]
        r["peak_rss_ratio"] = r["peak_rss_bytes"] / full["peak_rss_bytes"]
        r["optimizer_state_bytes_ratio"] = r["optimizer_state_bytes"] / full["optimizer_state_bytes"]
        r["checkpoint_bytes_ratio"] = r["checkpoint_bytes"] / full["checkpoint_bytes"]
        r["trainable_params_ratio"] = r["trainable_params"] / full["trainable_params"]
        r["saved_activation_bytes_ratio"] = r["saved_activation_bytes"] / full["saved_activation_bytes"]
    return result


def bench_pipeline(work: Path, sizes: BenchSizes, ranks: int, log: Callable[[str], None]) -> dict:
    """dser's recipe against bench_baseline.py, alternating, same model / data / steps.

    Both train LoRA (rank 8) on the feed-forward projections of every layer and a projector →
    mean-pooling → classifier head on the same architecture and clips, cropped to the same
    ``max_seconds``; dser with ``ranks`` ranks (ZeRO-2, the precision auto picks, duration-capped
    buckets), the baseline as one process using every core, batches of the same worst-case padded
    size, in fp32 (what the plain script does) and, where the hardware has native bf16 (``auto``
    picks bf16 here), also in bf16 autocast, to separate precision from the rest. Without native
    bf16 that variant would only measure bf16's emulation (~60x slower matmuls), so it is left out.
    """
    from dser.precision import decide_precision, detect_hardware

    native_bf16 = decide_precision("auto", detect_hardware()).name == "bf16"
    overrides = ["model.adaptors=[lora]", f"model.lora.target_modules={json.dumps(PIPELINE_LORA_TARGETS)}"]
    result: dict = {"backbone": sizes.backbone, "adaptors": "lora on " + ", ".join(PIPELINE_LORA_TARGETS),
                    "steps": sizes.warmup_steps + sizes.measured_steps, "warmup_steps": sizes.warmup_steps,
                    "rounds": sizes.rounds, "native_bf16": native_bf16, "dser_runs": [], "baseline_runs": []}
    whos = ("dser", "baseline", "baseline_bf16") if native_bf16 else ("dser", "baseline")
    if native_bf16:
        result["baseline_bf16_runs"] = []
    for r in range(sizes.rounds):
        result["dser_runs"].append(train_run(work, sizes, f"pipeline-dser-{r}", overrides, ranks, log))
        del result["dser_runs"][-1]["rss_series_per_rank"]
        result["baseline_runs"].append(baseline_run(work, sizes, f"pipeline-baseline-{r}", ranks, log))
        if native_bf16:
            result["baseline_bf16_runs"].append(baseline_run(work, sizes, f"pipeline-baseline-bf16-{r}", ranks, log,
                                                             precision="bf16-autocast"))
    for who in whos:
        runs = result[f"{who}_runs"]
        result[who] = {k: float(np.mean([x[k] for x in runs])) for k in ("audio_seconds_per_s", "samples_per_s")}
    result["dser"]["precision"] = _precision_label(result["dser_runs"])
    result["baseline"]["real_fraction"] = float(np.mean([x["real_fraction"] for x in result["baseline_runs"]]))
    result["speedup"] = result["dser"]["audio_seconds_per_s"] / result["baseline"]["audio_seconds_per_s"]
    result["samples_speedup"] = result["dser"]["samples_per_s"] / result["baseline"]["samples_per_s"]
    if native_bf16:
        result["speedup_vs_bf16_baseline"] = (result["dser"]["audio_seconds_per_s"]
                                              / result["baseline_bf16"]["audio_seconds_per_s"])
    # Every LoRA module of every baseline run got a gradient on its first step: none was
    # bypassed or skipped (LayerDrop), so both pipelines trained the same thing.
    result["baseline_lora_trains"] = all(b["lora_b_tensors_with_grad"] == b["lora_b_tensors"] > 0
                                         for b in result["baseline_runs"] + result.get("baseline_bf16_runs", []))
    return result


def _step_times(run_dir: Path) -> list[tuple[int, float]]:
    """(step, wall time) of every ``train/loss`` event, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return sorted((e.step, e.wall_time) for e in acc.Scalars("train/loss"))


def bench_soak(work: Path, sizes: BenchSizes, ranks: int, log: Callable[[str], None]) -> dict:
    """A long tiny-model run (evaluating and checkpointing on the way): resident memory of
    each rank after warm-up, at the end and at its highest, so a leak shows as growth."""
    steps, warmup = sizes.soak_steps, sizes.soak_warmup_steps
    overrides = [f"model.backbone.name={sizes.soak_backbone}", f"optim.max_steps={steps}",
                 f"train.log_every={max(1, steps // 100)}", f"train.eval_every={max(1, steps // 4)}",
                 f"train.save_every={max(1, steps // 4)}", "train.keep_last=1"]
    run = train_run(work, sizes, "soak", overrides, ranks, log, warmup_steps=warmup)
    series = run.pop("rss_series_per_rank")
    # TensorBoard's wall times date the warm-up and the steps of the memory readings.
    times = _step_times(work / "runs" / "soak")
    after_warmup = [t for step, t in times if step >= warmup]
    if not after_warmup:
        raise BenchError(f"soak: no train/loss scalar at or after step {warmup}")
    t0 = after_warmup[0]
    at_warmup, at_end, highest, by_step = [], [], [], []
    for readings in series:
        by_step.append([[step, next((b for t, b in readings if t >= when), readings[-1][1])]
                        for step, when in times[:: max(1, len(times) // 20)]])
        after = [b for t, b in readings if t >= t0]
        if len(after) < 2:
            raise BenchError(f"soak: too few memory readings after step {warmup} ({len(after)})")
        at_warmup.append(after[0])
        at_end.append(after[-1])
        highest.append(max(after))
    result = {"backbone": sizes.soak_backbone, "adaptors": PEFT_COMBINATION, "steps": steps, "warmup_steps": warmup,
              "ranks": ranks, "rss_after_warmup_bytes_per_rank": at_warmup, "rss_end_bytes_per_rank": at_end,
              "rss_max_after_warmup_bytes_per_rank": highest,
              "rss_growth": max(h / w for h, w in zip(highest, at_warmup)),
              "rss_end_growth": max(e / w for e, w in zip(at_end, at_warmup)),
              "samples_per_s": run["samples_per_s"], "wall_seconds": run["wall_seconds"],
              "precision": run["precision"],
              "readings_per_rank": min(len(r) for r in series),
              "rss_bytes_by_step_per_rank": by_step}
    log(f"  soak: RSS {_gib(max(at_warmup))} after step {warmup}, at most {_gib(max(highest))} after it, "
        f"{_gib(max(at_end))} at step {steps} (growth {result['rss_growth']:.3f}x)")
    return result


# ----------------------------------------------------------------------------------------
# the whole bench
# ----------------------------------------------------------------------------------------

def machine_info() -> dict:
    """CPU, cores, memory, GPU and load of this machine."""
    from dser.precision import cpu_model, decide_precision, detect_hardware

    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    auto = decide_precision("auto", detect_hardware())
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_bytes": memory, "platform": platform.platform(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "auto_precision": auto.name, "auto_precision_reason": auto.reason,
            "load_average": list(os.getloadavg())}


def versions() -> dict:
    """Versions of dser and of the libraries on the measured paths."""
    import deepspeed
    import peft
    import soxr
    import transformers
    import webdataset

    return {"dser": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "webdataset": getattr(webdataset, "__version__", "?"), "numpy": np.__version__,
            "soundfile": sf.__version__, "libsndfile": sf.__libsndfile_version__, "soxr": soxr.__version__}


def _get(results: dict, dotted: str):
    node = results
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_goals(results: dict) -> list[dict]:
    """Each goal with its measured value and whether it is met (None: not measured)."""
    out = []
    for name, path, op, threshold in GOALS:
        value = _get(results, path)
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        out.append({"goal": name, "field": path, "target": f"{op} {threshold:g}", "value": value, "met": met})
    return out


def run_bench(out: Path | None = None, *, quick: bool = False, sections: Sequence[str] = SECTIONS,
              backbone: str | None = None, ranks: int = 2, workdir: Path | None = None, keep: bool = False,
              log: Callable[[str], None] = print) -> dict:
    """Run the benchmark and return (and with ``out``, write) its results.

    Args:
        out: JSON file to write (None: only return).
        quick: ``QUICK`` sizes (minutes on 2 cores) instead of ``FULL``.
        sections: which of ``SECTIONS`` to run.
        backbone: replace the training runs' backbone (e.g. ``tiny-wavlm`` for a smoke test).
        ranks: ranks of the dser training runs.
        workdir: where corpora, shards and runs go (default: a temporary directory).
        keep: keep the working directory (logs, run directories) instead of deleting it.
        log: progress lines.

    Returns:
        The results dict: ``format``, ``quick``, ``command``, ``sizes``, ``machine``,
        ``versions``, one entry per section, ``goals``, ``seconds``.

    Raises:
        BenchError: an unknown section, or a step that failed (naming its log).
    """
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise BenchError(f"unknown bench section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    sizes = QUICK if quick else FULL
    if backbone:
        sizes = replace(sizes, backbone=backbone)
    temporary = workdir is None
    work = Path(tempfile.mkdtemp(prefix="dser-bench-")) if temporary else Path(workdir).absolute()
    if work.exists() and not work.is_dir():
        from dser.paths import found

        raise BenchError(f"--workdir {workdir}: expected a directory for the bench's corpora, shards and runs, "
                         f"found {found(work)}")
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"--workdir {workdir}: cannot make it ({e.strerror}); give a writable directory") from None
    command = "dser bench" + (" --quick" if quick else "") + (f" --backbone {backbone}" if backbone else "") \
        + "".join(f" --only {s}" for s in sections if tuple(sections) != SECTIONS) + (f" --out {out}" if out else "")
    results: dict = {"format": FORMAT, "quick": quick, "command": command, "sizes": asdict(sizes),
                     "machine": machine_info(), "versions": versions(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    start = time.perf_counter()
    steps = {"sharding": lambda: bench_sharding(work, sizes, log),
             "loading": lambda: bench_loading(work, sizes, log),
             "padding": lambda: bench_padding(work, sizes, log),
             "peft": lambda: bench_peft(work, sizes, ranks, log),
             "pipeline": lambda: bench_pipeline(work, sizes, ranks, log),
             "soak": lambda: bench_soak(work, sizes, ranks, log)}
    try:
        for section in SECTIONS:
            if section in sections:
                log(f"[{section}]")
                t = time.perf_counter()
                results[section] = steps[section]()
                results[section]["bench_seconds"] = time.perf_counter() - t
    finally:
        if temporary and not keep:
            shutil.rmtree(work, ignore_errors=True)
        elif keep:
            log(f"working directory kept: {work}")
    results["goals"] = check_goals(results)
    results["seconds"] = time.perf_counter() - start
    results["machine"]["load_average_end"] = list(os.getloadavg())
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
    return results


# ----------------------------------------------------------------------------------------
# the console table
# ----------------------------------------------------------------------------------------

def _gib(n) -> str:
    return "-" if n is None else f"{n / 2 ** 30:.2f} GiB"


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2 ** 20:.1f} MiB"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _table(title: str, header: list[str], rows: list[list]) -> list[str]:
    """A title and left-aligned first column, right-aligned others."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["", title] + ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                           for i, (c, w) in enumerate(zip(r, widths))) for r in cells]


def format_table(results: dict) -> str:
    """The results as fixed-width text tables, one per section, then the goals."""
    m, v = results["machine"], results["versions"]
    lines = [f"dser bench{' --quick' if results.get('quick') else ''}: {m['cpu']}, {m['cores']} cores; "
             f"torch {v['torch']}, deepspeed {v['deepspeed']}, transformers {v['transformers']}"]
    if m.get("auto_precision"):
        lines.append(f"precision auto here: {m['auto_precision']} ({m['auto_precision_reason']})")
    if "sharding" in results:
        rows = [[f"{e['input_sample_rate'] // 1000} kHz WAV", e["clips"], f"{e['workers1_x_realtime']:.0f}x",
                 f"{e['workers2_x_realtime']:.0f}x", f"{e['workers2_speedup']:.2f}x"]
                for e in results["sharding"].values() if isinstance(e, dict)]
        lines += _table("1. sharding (dser shard), x real time",
                        ["input", "clips", "1 worker", "2 workers", "2 / 1"], rows)
    if "loading" in results:
        ld = results["loading"]
        plain = f"plain WAV Dataset, {ld['plain_batch_size']} clips"
        rows = [[name, f"{ld[k]['workers0_x_realtime']:.0f}x", f"{ld[k]['workers2_x_realtime']:.0f}x",
                 f"{ld[k]['per_worker_x_realtime']:.0f}x", _pct(ld[k]["real_fraction"])]
                for name, k in (("dser shards", "dser"), (plain, "plain"))]
        rows.append(["ratio dser / plain", f"{ld['ratio_dser_to_plain']:.2f}x",
                     f"{ld['ratio_dser_to_plain_2_workers']:.2f}x", "", ""])
        lines += _table("2. loading (decode + batch), x real time",
                        ["loader", "in-process", "2 workers", "per worker", "real audio"], rows)
    if "padding" in results:
        p = results["padding"]
        rows = []
        for case in ("cropped", "whole"):
            c = p[case]
            crop = f"<= {c['max_seconds']:g} s" if c["max_seconds"] else "whole clips"
            for name, key in (("dser buckets", "dser"), (f"random, {c['random']['clips_per_batch']} clips", "random")):
                b = c[key]
                rows.append([f"{crop}: {name}", _pct(b["real_fraction"]), _pct(b["min_batch_real_fraction"]),
                             f"{100 * b['batches_at_least_90']:.0f}%", f"{b['mean_clips_per_batch']:.1f}"])
        lines += _table(f"3. padding: real audio in batches ({p['clips']} IEMOCAP-like lengths, "
                        f"median {p['median_seconds']:.1f} s)",
                        ["batches", "real", "worst batch", ">= 90%", "clips/batch"], rows)
    if "peft" in results:
        pf = results["peft"]
        rows = []
        for key in ("full", "lora", "combination"):
            r = pf[key]
            rows.append(["+".join(r["adaptors"]), f"{r['trainable_params']:,}",
                         f"{r['samples_per_s']:.2f} ({r['samples_per_s_ratio']:.2f}x)",
                         f"{_gib(r['peak_rss_bytes'])} ({r['peak_rss_ratio']:.2f}x)",
                         f"{_mib(r['optimizer_state_bytes'])} ({r['optimizer_state_bytes_ratio']:.3f}x)",
                         f"{_mib(r['checkpoint_bytes'])} ({r['checkpoint_bytes_ratio']:.3f}x)",
                         f"{_mib(r['saved_activation_bytes'])} / {_mib(r['front_end_saved_activation_bytes'])}"])
        lines += _table(f"4. PEFT vs full: {pf['backbone']}, {pf['ranks']} ranks, ZeRO-2 {pf['precision']}",
                        ["adaptors", "trainable", "samples/s", "peak RSS/rank", "optimizer state", "checkpoint",
                         "kept for backward / in CNN"], rows)
    if "pipeline" in results:
        pl = results["pipeline"]
        who = [(f"dser (recipe, 2 ranks, ZeRO-2 {pl['dser']['precision']}, buckets)", "dser"),
               ("usual (transformers + peft, random batches, fp32)", "baseline")]
        if "baseline_bf16" in pl:
            who.append(("usual, bf16 autocast", "baseline_bf16"))
        rows = [[name, f"{pl[k]['audio_seconds_per_s']:.2f}", f"{pl[k]['samples_per_s']:.2f}"] for name, k in who]
        rows.append(["ratio dser / usual (fp32)", f"{pl['speedup']:.2f}x", f"{pl['samples_speedup']:.2f}x"])
        if "baseline_bf16" in pl:
            rows.append(["ratio dser / usual (bf16 autocast)", f"{pl['speedup_vs_bf16_baseline']:.2f}x", ""])
        else:
            rows.append(["(no bf16-autocast baseline: this hardware has no native bf16)", "", ""])
        lines += _table(f"5. dser vs the usual pipeline: {pl['backbone']}, {pl['adaptors']}, "
                        f"{pl['steps']} steps, {pl['rounds']} round(s)", ["pipeline", "audio-s/s", "samples/s"], rows)
    if "soak" in results:
        sk = results["soak"]
        rows = [[f"rank {r}", _gib(w), _gib(h), _gib(e), f"{h / w:.3f}x"]
                for r, (w, h, e) in enumerate(zip(sk["rss_after_warmup_bytes_per_rank"],
                                                  sk["rss_max_after_warmup_bytes_per_rank"],
                                                  sk["rss_end_bytes_per_rank"]))]
        lines += _table(f"6. soak: {sk['backbone']}, {sk['steps']} steps ({sk['warmup_steps']} warm-up), "
                        f"{sk['precision']}, resident memory per rank", ["rank", "after warm-up", "highest after", "at the end",
                                                      "growth"], rows)
    goals = [g for g in results.get("goals", []) if g["value"] is not None]
    if goals:
        lines += _table("goals", ["goal", "target", "measured", "met"],
                        [[g["goal"], g["target"], f"{g['value']:.3g}", "yes" if g["met"] else "NO"] for g in goals])
    return "\n".join(lines)
