"""``dser evaluate`` as a user runs it on damaged or misplaced inputs: one line naming the path
and what is wrong, never a Python tuple or a traceback."""

from __future__ import annotations

import os
import shutil

import huggingface_hub.constants
import pytest
from click.testing import CliRunner
from fixtures_model import finished_run
from fixtures_shards import write_demo_shards

from dser.cli import main


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = write_demo_shards(tmp_path_factory.mktemp("evaluate"), utterances=48, speakers=4)
    finished_run(root / "run")
    return root


def one_error_line(r) -> str:
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1, r.output
    return lines[0]


def test_a_truncated_loose_shard_is_one_line_naming_it(work, tmp_path, monkeypatch):
    loose = tmp_path / "loose"
    shutil.copytree(work / "shards" / "demo-acted" / "test", loose)
    tar = sorted(loose.glob("*.tar"))[0]
    os.truncate(tar, tar.stat().st_size // 2)
    r = CliRunner().invoke(main, ["evaluate", str(work / "run"), "--shards", f"{loose}/*.tar"])
    line = one_error_line(r)
    assert line == f"Error: {tar}: unreadable shard (ReadError: unexpected end of data); re-create it with " \
                   f"`dser shard`", line


def test_a_truncated_indexed_shard_is_one_line_naming_it_and_the_check(work, tmp_path):
    shards = tmp_path / "demo-acted"
    shutil.copytree(work / "shards" / "demo-acted", shards)
    tar = sorted((shards / "test").glob("*.tar"))[0]
    size = tar.stat().st_size
    os.truncate(tar, size // 2)
    line = one_error_line(CliRunner().invoke(main, ["evaluate", str(work / "run"), "--shards", str(shards / "test")]))
    assert line == f"Error: {tar}: {size // 2} bytes, {shards / 'index.json'} says {size}; run `dser verify {shards}`"


@pytest.mark.parametrize("run, shards, says", [
    ("missing", "shards/demo-acted/test", "no such run directory"),
    ("shards/demo-acted", "shards/demo-acted/test", "is a shard directory, not a finished run"),
    ("run", "missing", "no such file or directory"),
    ("run", "run", "no index.json in it or its parent"),
])
def test_a_path_of_the_wrong_kind_is_one_line_naming_it(work, monkeypatch, run, shards, says):
    monkeypatch.chdir(work)
    line = one_error_line(CliRunner().invoke(main, ["evaluate", run, "--shards", shards]))
    assert says in line and (run if "run" in says else shards) in line, line
