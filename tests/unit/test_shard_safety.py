"""`dser shard` never deletes what it did not write, and says what it clipped.

Each test runs the CLI (click's runner, in this process) on real files and checks the user's
files byte for byte afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from dser.cli import main
from fixtures_shards import write_test_shards

SR = 16000


def tree(root: Path) -> dict[str, str]:
    """Relative path → sha256 of every file below ``root`` (symlinks by their target)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = ("link:" + os.readlink(p)) if p.is_symlink() else \
                hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def manifest_corpus(root: Path, n: int = 4, *, level: float = 0.3, base: Path | None = None) -> Path:
    """``n`` clips as WAV (float, so levels above 0 dBFS are possible) and a JSONL manifest in ``root``;
    the audio goes to ``base`` (default ``root/wav``)."""
    wav = base or root / "wav"
    wav.mkdir(parents=True, exist_ok=True)
    rows = []
    rng = np.random.default_rng(0)
    for i in range(n):
        path = wav / f"clip{i}.wav"
        sf.write(path, (level * np.sin(np.linspace(0, 400 * np.pi, SR)) + 0.01 * rng.standard_normal(SR))
                 .astype(np.float32), SR, subtype="FLOAT")
        rows.append({"path": str(path), "utt_id": f"clip{i}", "emotion": "happy", "speaker": f"s{i % 2}",
                     "group": "train"})
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def shard(*args: str | Path, cwd: Path | None = None):
    old = Path.cwd()
    os.chdir(cwd or old)
    try:
        return CliRunner().invoke(main, ["shard", *map(str, args)])
    finally:
        os.chdir(old)


def test_overwrite_refuses_a_foreign_index_json(tmp_path):
    """A web app's index.json is not dser's: nothing in that directory is touched."""
    app = tmp_path / "webapp"
    app.mkdir()
    (app / "index.json").write_text('{"name": "my web app"}')
    (app / "main.js").write_text("console.log('hi')")
    before = tree(app)
    manifest = manifest_corpus(tmp_path / "corpus")
    result = shard("manifest", manifest, app, "--overwrite")
    assert result.exit_code != 0
    assert "is not a dser shard directory" in result.output and "refusing to replace it" in result.output
    assert tree(app) == before


def test_overwrite_refuses_a_shard_directory_holding_anything_else(tmp_path):
    manifest = manifest_corpus(tmp_path / "corpus")
    out = tmp_path / "shards"
    assert shard("manifest", manifest, out).exit_code == 0
    (out / "notes.txt").write_text("my notes on this corpus")
    before = tree(out)
    result = shard("manifest", manifest, out, "--overwrite")
    assert result.exit_code != 0 and f"{out / 'notes.txt'}, which its index.json does not list" in result.output
    assert tree(out) == before
    # A stray tar in a group and a foreign folder are just as foreign.
    (out / "notes.txt").unlink()
    (out / "train" / "backup-000000.tar").write_bytes(b"old copy")
    result = shard("manifest", manifest, out, "--overwrite")
    assert result.exit_code != 0 and "backup-000000.tar, which its index.json does not list" in result.output
    (out / "train" / "backup-000000.tar").unlink()
    (out / "photos").mkdir()
    result = shard("manifest", manifest, out, "--overwrite")
    assert result.exit_code != 0 and f"{out / 'photos'}, which its index.json does not list" in result.output
    (out / "photos").rmdir()
    # What dser wrote, and only that, is replaced.
    assert shard("manifest", manifest, out, "--overwrite").exit_code == 0


def test_out_never_is_or_contains_the_corpus(tmp_path):
    """ROOT inside OUT, with a real dser index in OUT: refused, the corpus intact."""
    project = tmp_path / "project"
    manifest_corpus(tmp_path / "elsewhere")
    assert shard("manifest", tmp_path / "elsewhere" / "manifest.jsonl", project).exit_code == 0
    manifest = manifest_corpus(project / "corpus")
    before = tree(project)
    result = shard("manifest", manifest, project, "--overwrite")
    assert result.exit_code != 0 and "is or contains ROOT" in result.output
    assert tree(project) == before
    # A manifest elsewhere listing audio inside OUT.
    other = tmp_path / "other"
    manifest = manifest_corpus(other, base=project / "audio")
    before = tree(project)
    result = shard("manifest", manifest, project, "--overwrite")
    assert result.exit_code != 0 and "is or contains the corpus file" in result.output
    assert tree(project) == before


def test_out_never_is_the_current_or_home_directory(tmp_path, monkeypatch):
    manifest = manifest_corpus(tmp_path / "corpus")
    work = tmp_path / "work"
    assert shard("manifest", manifest, work).exit_code == 0
    (work / "mine.txt").write_text("x")
    before = tree(work)
    for out in (".", str(work)):
        result = shard("manifest", manifest, out, "--overwrite", cwd=work)
        assert result.exit_code != 0 and "is or contains the current directory" in result.output
    sub = work / "sub"
    sub.mkdir()
    result = shard("manifest", manifest, "..", "--overwrite", cwd=sub)
    assert result.exit_code != 0 and "is or contains the current directory" in result.output
    sub.rmdir()
    monkeypatch.setenv("HOME", str(work))
    result = shard("manifest", manifest, work, "--overwrite", cwd=tmp_path)
    assert result.exit_code != 0 and "is or contains your home directory" in result.output
    assert tree(work) == before
    # OUT inside the current directory is fine: the default shards/CORPUS.
    result = shard("manifest", manifest, cwd=work)
    assert result.exit_code == 0, result.output
    assert (work / "shards" / "manifest" / "index.json").is_file()


def test_out_that_is_a_symlink_is_refused(tmp_path):
    manifest = manifest_corpus(tmp_path / "corpus")
    real = tmp_path / "real"
    assert shard("manifest", manifest, real).exit_code == 0
    link = tmp_path / "link"
    link.symlink_to(real)
    before = tree(real)
    result = shard("manifest", manifest, link, "--overwrite")
    assert result.exit_code != 0 and "is a symbolic link" in result.output
    assert tree(real) == before and link.is_symlink()


def test_old_format_directories_are_replaced_with_overwrite(tmp_path):
    """A format-1 shard directory (what the upgrade message tells users to replace) is dser's own."""
    out = tmp_path / "shards"
    write_test_shards(out, n_samples=4, n_shards=2, old_format=True)
    assert json.loads((out / "index.json").read_text())["format"] == "dser-shards/1"
    manifest = manifest_corpus(tmp_path / "corpus")
    result = shard("manifest", manifest, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "index.json").read_text())["format"] == "dser-shards/2"
    assert not (out / "fold0").exists()


def test_clipping_is_counted_and_past_the_threshold_skipped(tmp_path):
    """Float audio above 0 dBFS: clipped samples counted per clip, in the index and printed; a clip
    clipped beyond --max-clipped is skipped with its reason."""
    root = tmp_path / "corpus"
    wav = root / "wav"
    wav.mkdir(parents=True)
    t = np.arange(SR) / SR
    clips = {"quiet": 0.5 * np.sin(2 * np.pi * 200 * t),
             "hot": 0.5 * np.sin(2 * np.pi * 200 * t),
             "loud": 2.0 * np.sin(2 * np.pi * 200 * t)}  # about 2/3 of it past full scale
    clips["hot"][:50] = 1.5  # 50 of 16000 samples past full scale: 0.3 %, under the 1 % default
    rows = []
    for name, x in clips.items():
        sf.write(wav / f"{name}.wav", x.astype(np.float32), SR, subtype="FLOAT")
        rows.append({"path": f"wav/{name}.wav", "emotion": "angry", "group": "g"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "shards"
    result = shard("manifest", root / "manifest.jsonl", out)
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index.json").read_text())
    assert index["groups"]["g"]["clipped"] == {"samples": 50, "clips": 1}
    assert index["totals"]["clipped"] == {"samples": 50, "clips": 1}
    rows = [json.loads(line) for line in (out / "g" / "samples.jsonl").read_text().splitlines()]
    assert {r["utt_id"]: r["clipped"] for r in rows} == {"quiet": 0, "hot": 50}
    (skip,) = index["skipped"]
    assert skip["input"].endswith("loud.wav") and skip["reason"].startswith("clipped: ")
    assert "past full scale (> --max-clipped 0.01)" in skip["reason"]
    assert "clipped: 1 clip(s) kept with samples past full scale (50 samples in all" in result.output
    assert "1 skipped over --max-clipped 0.01" in result.output
    # Raising the threshold keeps the loud clip, its clipping counted.
    result = shard("manifest", root / "manifest.jsonl", out, "--overwrite", "--max-clipped", "1")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "g" / "samples.jsonl").read_text().splitlines()]
    loud = next(r for r in rows if r["utt_id"] == "loud")
    assert 9000 < loud["clipped"] < 12000
    result = shard("manifest", root / "manifest.jsonl", tmp_path / "x", "--max-clipped", "2")
    assert result.exit_code != 0 and "--max-clipped must be a fraction in [0, 1]" in result.output


@pytest.mark.parametrize("workers", [1, 2])
def test_format_2_shards_are_byte_identical_run_to_run(tmp_path, workers):
    """Same inputs and options: every shard and table byte-identical; index.json differs only in
    its created time (and the workers option when that differs)."""
    manifest = manifest_corpus(tmp_path / "corpus", n=6)
    a, b = tmp_path / "a", tmp_path / "b"
    assert shard("manifest", manifest, a, "--max-shard-samples", "2").exit_code == 0
    assert shard("manifest", manifest, b, "--max-shard-samples", "2", "--workers", str(workers)).exit_code == 0
    ta, tb = tree(a), tree(b)
    assert set(ta) == set(tb) and "train/samples.jsonl" in ta
    assert {k: v for k, v in ta.items() if k != "index.json"} == {k: v for k, v in tb.items() if k != "index.json"}
    ia, ib = (json.loads((d / "index.json").read_text()) for d in (a, b))
    for i in (ia, ib):
        i.pop("created")
        i["options"].pop("workers")
    assert ia == ib
