"""``dser predict`` as a user runs it on a mixed bag of files: every file that cannot be predicted
is one line naming it, the others are still predicted, the exit status says a file failed, and
``--json`` is JSON Lines with an ``error`` field on the failed ones."""

from __future__ import annotations

import json

import huggingface_hub.constants
import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from fixtures_model import finished_run

from dser.cli import main
from dser.labels import get_label_set

@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return finished_run(tmp_path_factory.mktemp("run"))


def _clip(path, seconds, sr=16000, fmt=None):
    rng = np.random.default_rng(0)
    sf.write(path, 0.1 * rng.standard_normal(int(seconds * sr)).astype(np.float32), sr, format=fmt)
    return path


def _flac_saying_0_samples(src, dst):
    """``src`` (a FLAC) with STREAMINFO's total-samples field set to 0, which FLAC reads as
    "unknown": libsndfile then reports a length of 2**63 - 1 frames."""
    data = bytearray(src.read_bytes())
    assert data[:4] == b"fLaC"
    data[8 + 13] &= 0xF0  # the field's 36 bits: the low nibble of STREAMINFO byte 13 and bytes 14..17
    data[8 + 14:8 + 18] = bytes(4)
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture
def files(tmp_path):
    """(good files, {bad file: words its error line must hold})."""
    good = [_clip(tmp_path / "a.wav", 1.0), _clip(tmp_path / "b.flac", 0.8, sr=44100)]
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(100))
    unknown = _flac_saying_0_samples(_clip(tmp_path / "unknown.flac", 3.0), tmp_path / "unknown.flac")
    empty = tmp_path / "empty.flac"  # STREAMINFO alone, marked the last block: no audio at all
    empty.write_bytes(b"fLaC" + bytes([0x80]) + unknown.read_bytes()[5:8 + 34])
    (tmp_path / "a_dir").mkdir()
    bad = {
        _clip(tmp_path / "tiny.wav", 0.01): "too short",
        tmp_path / "corrupt.wav": "cannot read audio",
        empty: "its header gives no length",
        unknown: "its header gives no length",
        tmp_path / "a_dir": "is a directory",
        tmp_path / "missing.wav": "no such file",
        _clip(tmp_path / "long.wav", 3.0): "longer than --max-seconds 2",
    }
    return good, bad


def test_every_bad_file_is_one_line_and_the_rest_are_predicted(run_dir, files):
    good, bad = files
    args = ["predict", str(run_dir), str(good[0]), *map(str, bad), str(good[1]), "--max-seconds", "2"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)
    out_lines = r.stdout.splitlines()
    assert [line.split("  ")[0] for line in out_lines] == [str(good[0]), str(good[1])]
    errors = r.stderr.splitlines()
    assert len(errors) == len(bad) + 1 and all(e.startswith("Error: ") for e in errors)
    for (path, words), line in zip(bad.items(), errors):
        assert str(path) in line and words in line, line
    assert errors[-1] == f"Error: {len(bad)} of {len(bad) + 2} file(s) could not be predicted"


def test_json_is_one_object_per_line_with_an_error_field(run_dir, files):
    good, bad = files
    args = ["predict", str(run_dir), str(good[0]), *map(str, bad), "--json", "--max-seconds", "2"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["file"] for row in rows] == [str(good[0]), *map(str, bad)]
    assert "error" not in rows[0] and set(rows[0]["probabilities"]) == set(get_label_set("4class").classes)
    assert abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-5 and rows[0]["duration"] == 1.0
    for row, words in zip(rows[1:], bad.values()):
        assert set(row) == {"file", "error"} and row["file"] in row["error"] and words in row["error"]


def test_all_good_files_exit_zero(run_dir, files):
    good, _ = files
    r = CliRunner().invoke(main, ["predict", str(run_dir), *map(str, good), "--json"])
    assert r.exit_code == 0 and r.stderr == ""
    assert len(r.stdout.splitlines()) == 2


@pytest.mark.parametrize("kind", ["missing", "file", "shards", "empty", "corrupt"])
def test_a_run_directory_that_is_not_one_is_one_line(tmp_path, run_dir, files, kind):
    good, _ = files
    target = tmp_path / "target"
    if kind == "file":
        target.write_text("x")
    elif kind == "shards":
        target.mkdir()
        (target / "index.json").write_text("{}")
    elif kind == "empty":
        target.mkdir()
    elif kind == "corrupt":
        export = target / "export"
        export.mkdir(parents=True)
        for f in (run_dir / "export").iterdir():
            if f.is_file():
                (export / f.name).write_bytes(f.read_bytes())
        (export / "adaptors.safetensors").write_bytes(b"not safetensors")
    r = CliRunner().invoke(main, ["predict", str(target), str(good[0])])
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(target) in lines[0], r.stderr


@pytest.mark.parametrize("name", ["export.json", "labels.json", "config.yaml", "lora/adapter_config.json"])
@pytest.mark.parametrize("damage, says", [
    (b"\xff\xfe", "cannot be read as"),            # not UTF-8
    (b"{bad", "cannot be read as"),                # not JSON / YAML
    (b"[1, 2]", "should be a"),                    # a list where an object belongs
    (None, "missing"),                             # deleted
])
def test_a_damaged_export_is_one_line_naming_the_file(run_dir, tmp_path, files, name, damage, says):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir / "export", run / "export")
    target = run / "export" / name
    assert target.is_file()
    if damage is None:
        target.unlink()
    else:
        target.write_bytes(damage)
    r = CliRunner().invoke(main, ["predict", str(run), str(files[0][0])])
    assert r.exit_code == 1 and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    if name == "config.yaml" and damage is None:  # no export/config.yaml: not a finished run at all
        assert lines[0] == f"Error: {run} is no exported model, not a finished run: give a run directory holding " \
                           f"export/config.yaml (written when a run finishes)"
    elif name == "export.json" and damage is None:
        assert f"{run / 'export'} holds no dser export (no export.json)" in lines[0]
    else:
        assert lines[0].startswith(f"Error: {target}: ") and says in lines[0], lines[0]
