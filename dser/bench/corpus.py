"""The benchmark corpus: IEMOCAP-like clip lengths, speech-like WAV clips of those lengths, and
their shards.

Every section measures on audio made here, once per bench run, under the working directory::

    work/corpus16k/  wav/*.wav + manifest.jsonl   (sizes.shard_clips_16k clips)
    work/corpus48k/  the same at 48 kHz            (sizes.shard_clips_48k clips)
    work/shards16k/  dser shard of corpus16k       (the loading and training sections' data)
    work/shards-valid/  4 one-second clips          (the training runs' validation set)
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf

from dser.bench.sizes import CLASSES, SAMPLE_RATE, BenchSizes


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


def shard_manifest(manifest: Path, out: Path, workers: int = 1, max_shard_samples: int | None = None,
                   corpus: str = "bench") -> tuple[float, float, int]:
    """``dser shard manifest`` through ``build_shards`` into a fresh ``out``.

    Returns:
        (wall seconds, audio seconds written, clips written).
    """
    from dser.corpora import read_corpus
    from dser.shards import build_shards

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        index = build_shards(read_corpus("manifest", manifest), out, corpus=corpus, root=manifest,
                             workers=workers, max_shard_samples=max_shard_samples, progress=False)
    wall = time.perf_counter() - start
    seconds = sum(s["seconds"] for g in index.data["groups"].values() for s in g["shards"])
    return wall, seconds, index.totals["samples"]


def shard_size(clips: int) -> int:
    """Clips per shard of a bench corpus: about 8 shards, at least 4 clips each."""
    return max(4, math.ceil(clips / 8))


def bench_corpus(work: Path, rate: int, clips: int) -> Path:
    """The generated corpus at ``rate`` (made once per bench run); returns its manifest."""
    out = work / f"corpus{rate // 1000}k"
    manifest = out / "manifest.jsonl"
    if not manifest.is_file():
        write_bench_corpus(out, iemocap_like_lengths(clips, seed=rate), rate, seed=1)
    return manifest


def train_shards(work: Path, sizes: BenchSizes) -> Path:
    """The 16 kHz shards (from the sharding section, or made here when it was skipped)."""
    out = work / "shards16k"
    if not (out / "index.json").is_file():
        manifest = bench_corpus(work, SAMPLE_RATE, sizes.shard_clips_16k)
        shard_manifest(manifest, out, 1, shard_size(sizes.shard_clips_16k))
    return out


def valid_shards(work: Path) -> Path:
    """The training runs' validation shards: 4 one-second clips (made once per bench run)."""
    out = work / "shards-valid"
    if not (out / "index.json").is_file():
        manifest = write_bench_corpus(work / "corpus-valid", [1.0] * 4, seed=2, group="valid")
        shard_manifest(manifest, out, corpus="bench-valid")
    return out
