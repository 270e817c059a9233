"""Section 2, loading: the streaming loader (decode FLAC, bucket, pad) in × real time per
worker, side by side with the same clips as WAV files through a plain torch Dataset +
DataLoader (``baseline.WavDataset``: one file per clip, random batches padded to the longest).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from dser.bench.console import pct, text_table
from dser.bench.corpus import bench_corpus, train_shards
from dser.bench.sizes import SAMPLE_RATE, BenchSizes

NAME = "loading"
# The numbers this section writes that goals and readers refer to (dotted, from the results' top).
MEASURES = ("loading.dser.per_worker_x_realtime", "loading.plain.per_worker_x_realtime",
            "loading.dser.per_worker_x_realtime_2_workers", "loading.dser.real_fraction",
            "loading.plain.real_fraction", "loading.ratio_dser_to_plain", "loading.ratio_dser_to_plain_2_workers")


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

    from dser.bench.baseline import WavDataset, pad_collate, read_manifest

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

    Returns:
        ``dser`` and ``plain``: ``workers{0,2}_x_realtime``, ``per_worker_x_realtime``,
        ``per_worker_x_realtime_2_workers``, ``real_fraction``; ``ratio_dser_to_plain`` (in-process)
        and ``ratio_dser_to_plain_2_workers``; ``plain_batch_size``, ``passes``.
    """
    shards = train_shards(work, sizes)
    manifest = bench_corpus(work, SAMPLE_RATE, sizes.shard_clips_16k)
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


def table(result: dict) -> list[str]:
    """The section's console table."""
    plain = f"plain WAV Dataset, {result['plain_batch_size']} clips"
    rows = [[name, f"{result[k]['workers0_x_realtime']:.0f}x", f"{result[k]['workers2_x_realtime']:.0f}x",
             f"{result[k]['per_worker_x_realtime']:.0f}x", pct(result[k]["real_fraction"])]
            for name, k in (("dser shards", "dser"), (plain, "plain"))]
    rows.append(["ratio dser / plain", f"{result['ratio_dser_to_plain']:.2f}x",
                 f"{result['ratio_dser_to_plain_2_workers']:.2f}x", "", ""])
    return text_table("2. loading (decode + batch), x real time",
                      ["loader", "in-process", "2 workers", "per worker", "real audio"], rows)
