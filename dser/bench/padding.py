"""Section 3, padding: the real (non-padded) share of the samples in training batches, dser's
plan (the loader's own ``ShardStream.plan`` with the default run config's batching) side by
side with random batches of a fixed clip count, on IEMOCAP-like lengths (20 000 in a full run).

No audio is decoded: the plan reads only the clips' JSON, so the shards here carry the
durations and a one-byte stub for each FLAC.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np

from dser.bench.console import pct, text_table
from dser.bench.corpus import iemocap_like_lengths
from dser.bench.sizes import CLASSES, SAMPLE_RATE, BenchSizes

NAME = "padding"
# The numbers this section writes that goals and readers refer to (dotted, from the results' top).
MEASURES = tuple(f"padding.{case}.{who}.{k}" for case in ("cropped", "whole") for who in ("dser", "random")
                 for k in ("real_fraction", "min_batch_real_fraction", "batches_at_least_90")) \
    + ("padding.cropped.ratio_dser_to_random", "padding.whole.ratio_dser_to_random")


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
    """Real share of padded samples: overall, worst batch, share of batches at >= 90 %.

    Args:
        batches: each batch's clip lengths in samples, (clips,) ints.
    """
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

    Returns:
        The lengths' statistics, the batching settings, and per case ``dser`` and ``random``
        (``_padding_stats``) and ``ratio_dser_to_random`` (of the overall real shares).
    """
    from dser.data import LoaderConfig, ShardStream
    from dser.shardfiles import resolve_shards
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


def table(result: dict) -> list[str]:
    """The section's console table."""
    rows = []
    for case in ("cropped", "whole"):
        c = result[case]
        crop = f"<= {c['max_seconds']:g} s" if c["max_seconds"] else "whole clips"
        for name, key in (("dser buckets", "dser"), (f"random, {c['random']['clips_per_batch']} clips", "random")):
            b = c[key]
            rows.append([f"{crop}: {name}", pct(b["real_fraction"]), pct(b["min_batch_real_fraction"]),
                         f"{100 * b['batches_at_least_90']:.0f}%", f"{b['mean_clips_per_batch']:.1f}"])
    return text_table(f"3. padding: real audio in batches ({result['clips']} IEMOCAP-like lengths, "
                      f"median {result['median_seconds']:.1f} s)",
                      ["batches", "real", "worst batch", ">= 90%", "clips/batch"], rows)
