"""Section 1, sharding: ``dser shard`` (``build_shards``) in × real time on 16 kHz and 48 kHz
(soxr-resampled) WAV input, with 1 and 2 encoding workers side by side.

Leaves ``work/shards16k`` (the 16 kHz corpus, 1 worker) for the loading and training sections.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from dser.bench.console import text_table
from dser.bench.corpus import bench_corpus, shard_manifest, shard_size
from dser.bench.sizes import BenchSizes

NAME = "sharding"
# The numbers this section writes that goals and readers refer to (dotted, from the results' top).
MEASURES = tuple(f"sharding.{tag}.{k}" for tag in ("16k", "48k")
                 for k in ("workers1_x_realtime", "workers2_x_realtime", "workers2_speedup"))


def bench_sharding(work: Path, sizes: BenchSizes, log: Callable[[str], None]) -> dict:
    """``dser shard`` throughput on 16 kHz and 48 kHz WAV input, 1 and 2 workers.

    Returns:
        Per input rate (``16k``, ``48k``): ``input_sample_rate``, ``clips``, ``audio_seconds``,
        ``workers{1,2}_x_realtime``, ``workers{1,2}_seconds`` and ``workers2_speedup``.
    """
    result = {}
    for rate, clips in ((16000, sizes.shard_clips_16k), (48000, sizes.shard_clips_48k)):
        tag = f"{rate // 1000}k"
        log(f"sharding: writing {clips} clips at {rate} Hz")
        manifest = bench_corpus(work, rate, clips)
        entry = {"input_sample_rate": rate, "clips": clips}
        for workers in (1, 2):
            out = work / f"shards{tag}" if workers == 1 else work / f"shards{tag}-w{workers}"
            wall, seconds, _ = shard_manifest(manifest, out, workers, shard_size(clips))
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


def table(result: dict) -> list[str]:
    """The section's console table."""
    rows = [[f"{e['input_sample_rate'] // 1000} kHz WAV", e["clips"], f"{e['workers1_x_realtime']:.0f}x",
             f"{e['workers2_x_realtime']:.0f}x", f"{e['workers2_speedup']:.2f}x"]
            for e in result.values() if isinstance(e, dict)]
    return text_table("1. sharding (dser shard), x real time", ["input", "clips", "1 worker", "2 workers", "2 / 1"],
                      rows)
