"""Long clips are decoded, resampled and encoded block by block (``shard_encoding.BLOCK_FRAMES``):
the same audio as the one-shot path, in memory that does not grow with the clip."""

from __future__ import annotations

import io
import json
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from dser import shard_encoding
from dser.cli import main
from dser.shards import ShardIndex
from fixtures_corpora import write_manifest


def _clip(path, seconds, sample_rate, channels, subtype, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t)[:, None] + 0.05 * rng.standard_normal((len(t), channels))
    sf.write(path, x, sample_rate, subtype=subtype)
    return str(path)


def _decode(flac: bytes) -> np.ndarray:
    return sf.read(io.BytesIO(flac), dtype="int16")[0]


@pytest.mark.parametrize("sample_rate, channels, subtype", [
    (44100, 2, "PCM_24"),   # down-mix + resample
    (8000, 1, "FLOAT"),     # upsample, float input
    (16000, 2, "PCM_16"),   # down-mix, no resampling
    (16000, 1, "PCM_16"),   # the bit-exact path
])
def test_the_streamed_path_gives_the_one_shot_audio(tmp_path, monkeypatch, sample_rate, channels, subtype):
    path = _clip(tmp_path / "long.wav", 1.3, sample_rate, channels, subtype)
    one_shot = shard_encoding.encode_clip((path, 16000, 0.25, 0.01))
    monkeypatch.setattr(shard_encoding, "BLOCK_FRAMES", 4096)  # about a dozen blocks
    streamed = shard_encoding.encode_clip((path, 16000, 0.25, 0.01))
    a, b = _decode(one_shot[0]), _decode(streamed[0])
    assert len(a) == len(b) and streamed[1] == one_shot[1] and streamed[2] == one_shot[2]
    if subtype == "PCM_16" and channels == 1:
        assert np.array_equal(a, b)
    else:  # soxr's streaming filter state vs one call: rounding may differ by a step
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_the_streamed_path_keeps_its_checks(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_encoding, "BLOCK_FRAMES", 1024)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(20000), 16000, subtype="FLOAT")
    assert shard_encoding.encode_clip((str(silent), 16000, 0.25, 0.01)) == "silent audio: every sample is zero"
    loud = tmp_path / "loud.wav"
    sf.write(loud, np.full(20000, 1.5), 16000, subtype="FLOAT")
    assert shard_encoding.encode_clip((str(loud), 16000, 0.25, 0.01)).startswith("clipped: 20000 of 20000")
    nan = tmp_path / "nan.wav"
    x = np.zeros(20000)
    x[15000] = np.nan
    sf.write(nan, x, 16000, subtype="FLOAT")
    assert "non-finite" in shard_encoding.encode_clip((str(nan), 16000, 0.25, 0.01))
    cut = tmp_path / "cut.wav"
    _clip(cut, 1.5, 16000, 1, "PCM_16")
    cut.write_bytes(cut.read_bytes()[:30000])
    assert shard_encoding.encode_clip((str(cut), 16000, 0.25, 0.01)).startswith("truncated audio")


def test_streaming_memory_does_not_grow_with_the_clip(tmp_path, monkeypatch):
    path = _clip(tmp_path / "long.wav", 40, 48000, 2, "PCM_16")
    float64_bytes = 40 * 48000 * 2 * 8  # what the one-shot path holds at once: 30 MB

    def peak(block):
        monkeypatch.setattr(shard_encoding, "BLOCK_FRAMES", block)
        tracemalloc.start()
        try:
            result = shard_encoding.encode_clip((path, 16000, 0.25, 0.01))
            return tracemalloc.get_traced_memory()[1], result
        finally:
            tracemalloc.stop()

    one_shot, a = peak(1 << 30)
    streamed, b = peak(1 << 14)
    assert one_shot > float64_bytes  # tracemalloc sees numpy's buffers, so the bound below means something
    assert streamed < float64_bytes / 5, (streamed, len(b[0]))
    assert streamed < 2 * len(b[0]) + 4 * (1 << 20)  # about two FLACs plus a few blocks


def test_max_duration_skips_long_clips_by_their_header(tmp_path):
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, [{"path": "short.wav", "emotion": "happy"}, {"path": "long.wav", "emotion": "sad"}],
                   seconds=0.5)
    _clip(tmp_path / "long.wav", 3.0, 16000, 1, "PCM_16")
    result = CliRunner().invoke(main, ["shard", "manifest", str(manifest), str(tmp_path / "out"),
                                       "--max-duration", "2"])
    assert result.exit_code == 0, result.output
    index = ShardIndex.load(tmp_path / "out")
    assert index.totals["samples"] == 1
    (skip,) = index.data["skipped"]
    assert skip["input"].endswith("long.wav") and skip["reason"].startswith("too long: 3.0 s")
    assert json.loads((tmp_path / "out" / "index.json").read_text())["options"]["max_duration"] == 2.0
    bad = CliRunner().invoke(main, ["shard", "manifest", str(manifest), str(tmp_path / "o2"), "--max-duration", "0"])
    assert bad.exit_code != 0 and "--max-duration must be a positive" in bad.output
