"""Section 2, loading: dser's training loader (plan, read, decode FLAC, pad) in × real time per
worker, side by side with the same clips as WAV files through a plain torch Dataset +
DataLoader (``baseline.WavDataset``: one file per clip, random batches padded to the longest),
and with dser's own streaming path over the same shards named as loose tars (webdataset, the
rank's tars front to back, the per-rank planner): what the global plan and random access cost.

Beside it, how one worker reads a sample: webdataset's streaming reader (every shard front to
back) against random access by the per-sample table's offsets (``dser.shard_reader``, the
samples in a random order), decoding included as the loader decodes, on a warm and on a cold
page cache (the shards' pages dropped with ``posix_fadvise(DONTNEED)`` before each cold pass).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import time
from pathlib import Path
from typing import Callable

from dser.bench.console import pct, text_table
from dser.bench.corpus import bench_corpus, train_shards
from dser.bench.sizes import SAMPLE_RATE, BenchError, BenchSizes

NAME = "loading"
# The numbers this section writes that goals and readers refer to (dotted, from the results' top).
MEASURES = ("loading.dser.per_worker_x_realtime", "loading.plain.per_worker_x_realtime",
            "loading.streaming.per_worker_x_realtime", "loading.streaming.per_worker_x_realtime_2_workers",
            "loading.ratio_planned_to_streaming", "loading.ratio_planned_to_streaming_2_workers",
            "loading.dser.per_worker_x_realtime_2_workers", "loading.dser.real_fraction",
            "loading.plain.real_fraction", "loading.ratio_dser_to_plain", "loading.ratio_dser_to_plain_2_workers",
            "loading.reader.streaming.warm_x_realtime", "loading.reader.random_access.warm_x_realtime",
            "loading.reader.streaming.cold_x_realtime", "loading.reader.random_access.cold_x_realtime",
            "loading.reader.ratio_random_to_streaming_warm", "loading.reader.ratio_random_to_streaming_cold",
            "loading.reader.cold_resident_fraction")


def _run_dser_loader(shards: Path | str, workers: int, passes: int) -> dict:
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


def _drop_page_cache(paths: list[Path]) -> None:
    """Ask the kernel to drop the files' cached pages (clean pages go; dser fsyncs its shards)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _resident_fraction(paths: list[Path]) -> float:
    """The share of the files' pages in the page cache now (``mincore``): how cold a cold pass
    really starts (tmpfs, for one, cannot drop its pages)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    resident = total = 0
    for path in paths:
        size = path.stat().st_size
        pages = -(-size // page)
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                continue
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) == 0:
                resident += sum(v & 1 for v in vec)
                total += pages
            libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    return resident / total if total else 0.0


def _stream_pass(paths: list[Path], rate: int) -> tuple[float, float]:
    """webdataset's streaming reader over every shard, each sample checked and decoded as the
    loader does; (audio seconds, wall seconds)."""
    import webdataset as wds

    from dser.data import decode_flac
    from dser.schema import LABEL_KEYS, Sample, duration_matches

    audio = 0.0
    start = time.perf_counter()
    for s in wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False):
        meta = Sample.from_json(s["json"], required=LABEL_KEYS)
        pcm = decode_flac(s["flac"], rate)
        if not duration_matches(len(pcm), meta.duration, rate):
            raise BenchError(f"{s['__url__']}: {s['__key__']}: the FLAC is not its JSON's duration; run dser verify")
        audio += len(pcm) / rate
    return audio, time.perf_counter() - start


def _random_pass(group: Path, rate: int, seed: int) -> tuple[float, float]:
    """Random access by the table's offsets (a fresh ``ShardReader``, so its files are opened
    in the pass), the group's samples in a random order, decoded as the loader does."""
    from dser.data import decode_flac
    from dser.schema import duration_matches
    from dser.shard_reader import ShardReader

    audio = 0.0
    start = time.perf_counter()
    with ShardReader(group) as reader:
        rows = list(reader.rows)
        random.Random(seed).shuffle(rows)
        for row in rows:
            flac, meta = reader.read(row)
            pcm = decode_flac(flac, rate)
            if not duration_matches(len(pcm), meta.duration, rate):
                raise BenchError(f"{group / row.shard}: {row.key}: the FLAC is not its JSON's duration; run dser verify")
            audio += len(pcm) / rate
    return audio, time.perf_counter() - start


def bench_reader(shards: Path, passes: int, log: Callable[[str], None]) -> dict:
    """One worker reading a shard group: streaming against random access, warm and cold.

    Warm: one unmeasured pass of each, then ``passes`` of each in alternation. Cold: before each
    of ``passes`` passes of each (in alternation) the shards' pages are dropped.

    Returns:
        ``streaming`` and ``random_access``: ``warm_x_realtime``, ``cold_x_realtime``;
        ``ratio_random_to_streaming_warm`` and ``_cold``; ``cold_resident_fraction`` (the most
        of the shards' pages still cached right after a drop); ``samples``, ``audio_seconds``,
        ``shards``, ``passes``.
    """
    from dser.schema import ShardIndex

    index = ShardIndex.load(shards)
    group = index.groups[0]
    paths = index.shard_paths(group)
    rate = index.sample_rate
    runs = {"streaming": lambda k: _stream_pass(paths, rate),
            "random_access": lambda k: _random_pass(shards / group, rate, seed=k)}
    for run in runs.values():
        run(-1)
    totals = {(name, cache): [0.0, 0.0] for name in runs for cache in ("warm", "cold")}
    resident = 0.0
    for k in range(passes):
        for name, run in runs.items():
            audio, wall = run(k)
            totals[name, "warm"][0] += audio
            totals[name, "warm"][1] += wall
    for k in range(passes):
        for name, run in runs.items():
            _drop_page_cache(paths)
            resident = max(resident, _resident_fraction(paths))
            audio, wall = run(k)
            totals[name, "cold"][0] += audio
            totals[name, "cold"][1] += wall
    result: dict = {name: {f"{cache}_x_realtime": totals[name, cache][0] / totals[name, cache][1]
                           for cache in ("warm", "cold")} for name in runs}
    for cache in ("warm", "cold"):
        result[f"ratio_random_to_streaming_{cache}"] = (result["random_access"][f"{cache}_x_realtime"]
                                                        / result["streaming"][f"{cache}_x_realtime"])
        log(f"  reading, {cache} cache: streaming {result['streaming'][f'{cache}_x_realtime']:.0f}x, random access "
            f"{result['random_access'][f'{cache}_x_realtime']:.0f}x real time per worker")
    result.update(cold_resident_fraction=resident, samples=len(index.table(group)), shards=len(paths),
                  audio_seconds=totals["streaming", "warm"][0] / passes, passes=passes)
    return result


def bench_loading(work: Path, sizes: BenchSizes, log: Callable[[str], None]) -> dict:
    """The streaming loader against a plain Dataset over the same clips as WAV files.

    Whole clips (no crop) so every decoded second is delivered; 0 workers (all in this
    process: the per-worker rate) and 2 workers (per worker = total / 2), measured in
    alternation after one warm-up pass of each at each worker count (the page cache, and the
    forkserver dser's workers start from, which the first loader with workers would otherwise
    pay for).

    Returns:
        ``dser`` and ``plain``: ``workers{0,2}_x_realtime``, ``per_worker_x_realtime``,
        ``per_worker_x_realtime_2_workers``, ``real_fraction``; ``ratio_dser_to_plain`` (in-process)
        and ``ratio_dser_to_plain_2_workers``; ``plain_batch_size``, ``passes``; ``reader``:
        streaming against random access per worker (``bench_reader``).
    """
    shards = train_shards(work, sizes)
    # The same shards named as loose tars: no index, so the loader streams them (its path before the global plan).
    loose = str(shards / "*" / "*.tar")
    manifest = bench_corpus(work, SAMPLE_RATE, sizes.shard_clips_16k)
    batch_size = 8  # the plain loader's clip count: 48 s (dser's batch cap) / 6 s (its crop)
    for workers in (0, 2):  # warm-up: the page cache, and the workers' forkserver (started once a process)
        _run_dser_loader(shards, workers, 1)
        _run_dser_loader(loose, workers, 1)
        _run_plain_loader(manifest, workers, 1, batch_size)
    result: dict = {"dser": {}, "streaming": {}, "plain": {}, "plain_batch_size": batch_size,
                    "passes": sizes.loader_passes}
    for workers in (0, 2):
        d = _run_dser_loader(shards, workers, sizes.loader_passes)
        st = _run_dser_loader(loose, workers, sizes.loader_passes)
        p = _run_plain_loader(manifest, workers, sizes.loader_passes, batch_size)
        for name, r in (("dser", d), ("streaming", st), ("plain", p)):
            rate = r["audio_seconds"] / r["wall_seconds"]
            result[name][f"workers{workers}_x_realtime"] = rate
            result[name]["real_fraction"] = r["real_fraction"]
            log(f"  {name:5s} loader, {workers} workers: {rate:.0f}x real time "
                f"({r['batches']} batches, {100 * r['real_fraction']:.0f}% real audio)")
    for name in ("dser", "streaming", "plain"):
        r = result[name]
        # 0 workers: decoding and batching in this one process, i.e. one worker's rate.
        r["per_worker_x_realtime"] = r["workers0_x_realtime"]
        r["per_worker_x_realtime_2_workers"] = r["workers2_x_realtime"] / 2
    result["ratio_dser_to_plain"] = result["dser"]["workers0_x_realtime"] / result["plain"]["workers0_x_realtime"]
    result["ratio_dser_to_plain_2_workers"] = (result["dser"]["workers2_x_realtime"]
                                               / result["plain"]["workers2_x_realtime"])
    result["ratio_planned_to_streaming"] = (result["dser"]["workers0_x_realtime"]
                                            / result["streaming"]["workers0_x_realtime"])
    result["ratio_planned_to_streaming_2_workers"] = (result["dser"]["workers2_x_realtime"]
                                                      / result["streaming"]["workers2_x_realtime"])
    result["reader"] = bench_reader(shards, sizes.loader_passes, log)
    return result


def table(result: dict) -> list[str]:
    """The section's console table."""
    plain = f"plain WAV Dataset, {result['plain_batch_size']} clips"
    rows = [[name, f"{result[k]['workers0_x_realtime']:.0f}x", f"{result[k]['workers2_x_realtime']:.0f}x",
             f"{result[k]['per_worker_x_realtime']:.0f}x", pct(result[k]["real_fraction"])]
            for name, k in (("dser: global plan, random access", "dser"),
                            ("dser: loose tars, streaming", "streaming"), (plain, "plain")) if k in result]
    rows.append(["ratio dser / plain", f"{result['ratio_dser_to_plain']:.2f}x",
                 f"{result['ratio_dser_to_plain_2_workers']:.2f}x", "", ""])
    if "ratio_planned_to_streaming" in result:
        rows.append(["ratio global plan / streaming", f"{result['ratio_planned_to_streaming']:.2f}x",
                     f"{result['ratio_planned_to_streaming_2_workers']:.2f}x", "", ""])
    lines = text_table("2. loading (decode + batch), x real time",
                       ["loader", "in-process", "2 workers", "per worker", "real audio"], rows)
    reader = result.get("reader")
    if reader:
        rows = [[name, f"{reader[k]['warm_x_realtime']:.0f}x", f"{reader[k]['cold_x_realtime']:.0f}x"]
                for name, k in (("webdataset streaming", "streaming"), ("random access by offset", "random_access"))]
        rows.append(["ratio random / streaming", f"{reader['ratio_random_to_streaming_warm']:.2f}x",
                     f"{reader['ratio_random_to_streaming_cold']:.2f}x"])
        lines += text_table(f"2. loading: reading a sample (decode included), x real time per worker; "
                            f"{pct(reader['cold_resident_fraction'])} of the shards cached after the drop",
                            ["reader", "warm cache", "cold cache"], rows)
    return lines
