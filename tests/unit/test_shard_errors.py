"""What a user can get wrong while sharding is one line or a skip with its reason, never a
traceback: non-UTF-8 file names, a manifest that is not UTF-8, an OUT that cannot be written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from dser.cli import main
from dser.corpora import Listing, Record
from dser.shards import ShardError, ShardIndex, build_shards
from fixtures_corpora import EMODB_NAMES, write_emodb, write_manifest, write_wav

BAD_NAME = os.fsdecode(b"caf\xff.wav")  # what os.listdir gives for a non-UTF-8 name


def _shard(*args):
    return CliRunner().invoke(main, ["shard", *map(str, args)])


def _one_line_error(result):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [l for l in result.output.splitlines() if l.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_a_non_utf8_file_name_in_a_corpus_folder_is_skipped_not_fatal(tmp_path):
    root = tmp_path / "emodb"
    write_emodb(root)
    # A name the reader accepts, but with a byte that is not UTF-8 in it.
    os.rename(root / "wav" / EMODB_NAMES[0], root / "wav" / os.fsdecode(b"03a01Fa\xff.wav"))
    result = _shard("emodb", root, tmp_path / "out")
    assert result.exit_code == 0, result.output
    index = ShardIndex.load(tmp_path / "out")
    assert index.totals["samples"] == len(EMODB_NAMES) - 1
    (skip,) = index.data["skipped"]
    assert "\\udcff" in skip["input"] and skip["input"].startswith("'")  # shown with repr


def test_build_shards_skips_a_record_whose_path_is_not_utf8(tmp_path):
    good = write_wav(tmp_path / "good.wav", seconds=0.5, seed=1)
    bad = tmp_path / BAD_NAME
    os.rename(write_wav(tmp_path / "bad.wav", seconds=0.5, seed=2), bad)  # soundfile cannot write that name
    records = [Record(utt_id=p.stem, path=p, corpus="t", group="all", emotion="happy") for p in (good, bad)]
    index = build_shards(Listing(records), tmp_path / "out", corpus="t", root=tmp_path, progress=False)
    assert index.totals["samples"] == 1
    (skip,) = index.data["skipped"]
    assert "not valid UTF-8" in skip["reason"] and repr(str(bad)) in skip["reason"]
    json.loads((tmp_path / "out" / "index.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_manifest_with_a_non_utf8_byte_names_the_file_and_line(tmp_path, suffix):
    manifest = tmp_path / f"m{suffix}"
    write_manifest(manifest, [{"path": "a.wav", "emotion": "happy"}, {"path": "b.wav", "emotion": "sad"}])
    data = manifest.read_bytes().replace(b"sad", b"s\xe9d")
    manifest.write_bytes(data)
    line = data[:data.index(b"\xe9")].count(b"\n") + 1
    error = _one_line_error(_shard("manifest", manifest, tmp_path / "out"))
    assert str(manifest) in error and f"line {line} is not valid UTF-8" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["file_parent", "file_grandparent", "proc"])
def test_an_unwritable_out_is_one_line_with_the_errno_meaning(tmp_path, where):
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, [{"path": "a.wav", "emotion": "happy"}], seconds=0.5)
    (tmp_path / "afile").write_text("not a directory")
    out = {"file_parent": tmp_path / "afile" / "out", "file_grandparent": tmp_path / "afile" / "x" / "out",
           "proc": Path("/proc/self/dser-out")}[where]
    before = sorted(tmp_path.rglob("*"))
    error = _one_line_error(_shard("manifest", manifest, out))
    assert f"cannot write OUT {out}" in error
    assert os.strerror(20) in error if where != "proc" else os.strerror(2) in error
    assert sorted(tmp_path.rglob("*")) == before  # no temporary file left
    assert (tmp_path / "afile").read_text() == "not a directory"
