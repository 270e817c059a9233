"""Every CLI command's path arguments given what a user mistypes: nothing there, an empty
directory, a file, or a directory of the wrong kind (a run directory where shards are expected,
and the reverse). Each must be one line that names the path and says what was expected (or
what was found), with a non-zero exit and no traceback, and must leave the path as it was.

The commands run in-process (click's runner) in a directory laid out as a user's: demo shards
in ``shards/``, a finished run in ``runs/done``, the demo configs' relative paths resolving.
``dser train`` checks its config here before it starts the DeepSpeed launcher, so its rows run
no launcher at all.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import yaml
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
    root = write_demo_shards(tmp_path_factory.mktemp("paths"), utterances=48, speakers=4)
    run = finished_run(root / "runs" / "done")
    (run / "config.yaml").write_text(yaml.safe_dump({"stage": 1, "config": {}}))
    (run / "metrics.json").write_text("{}")
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("a user's file\n")
    shutil.copy(sorted((root / "data" / "acted").rglob("*.wav"))[0], root / "clip.wav")
    return root


# What each kind of path is called in the table, and where it lies in ``work``.
PATHS = {"missing": "no/such/path", "empty": "empty", "file": "notes.txt", "shards": "shards/demo-acted",
         "run": "runs/done"}

# (command with {p} for the path, kind of path, what the one line must hold)
CASES = [
    ("shard emodb {p} out", "missing", "emodb: ROOT no/such/path does not exist"),
    ("shard emodb {p} out", "empty", "expected a directory at empty/wav, found nothing"),
    ("shard emodb {p} out", "file", "emodb: ROOT notes.txt is a file; give the corpus folder"),
    ("shard emodb {p} out", "run", "expected a directory at runs/done/wav, found nothing"),
    ("shard manifest {p} out", "missing", "manifest: ROOT no/such/path does not exist"),
    ("shard manifest {p} out", "empty", "manifest: expected a file at empty, found an empty directory"),
    ("shard manifest {p} out", "shards", "expected a file at shards/demo-acted, found a shard directory"),
    ("shard manifest {p} out", "file", "manifest: notes.txt should be a .csv or .jsonl file (found .txt)"),
    ("shard manifest data/acted/manifest.jsonl {p}", "file", "OUT {abs} is a file, not a directory"),
    ("shard manifest data/acted/manifest.jsonl {p}/sub", "file", "cannot write OUT {abs}/sub: {abs}: Not a directory"),
    ("verify {p}", "missing", "no/such/path: expected a shard directory with index.json, found nothing"),
    ("verify {p}", "empty", "empty: expected a shard directory with index.json, found an empty directory"),
    ("verify {p}", "file", "notes.txt: expected a shard directory with index.json, found a file"),
    ("verify {p}", "run", "runs/done: expected a shard directory with index.json, found a run directory"),
    ("evaluate {p} --shards shards/demo-acted/test", "missing", "no/such/path: no such run directory"),
    ("evaluate {p} --shards shards/demo-acted/test", "empty", "empty is no exported model, not a finished run"),
    ("evaluate {p} --shards shards/demo-acted/test", "file", "notes.txt: is a file; give a run directory"),
    ("evaluate {p} --shards shards/demo-acted/test", "shards", "shards/demo-acted is a shard directory, not a "
                                                               "finished run"),
    ("evaluate runs/done --shards {p}", "missing", "shard spec 'no/such/path': no such file or directory"),
    ("evaluate runs/done --shards {p}", "empty", "shard spec 'empty': empty has no index.json in it or its parent"),
    ("evaluate runs/done --shards {p}", "file", "shard spec 'notes.txt' matches no .tar shards"),
    ("evaluate runs/done --shards {p}", "run", "shard spec 'runs/done': runs/done has no index.json"),
    ("predict {p} clip.wav", "missing", "no/such/path: no such run directory"),
    ("predict {p} clip.wav", "empty", "empty is no exported model, not a finished run"),
    ("predict {p} clip.wav", "file", "notes.txt: is a file; give a run directory"),
    ("predict {p} clip.wav", "shards", "shards/demo-acted is a shard directory, not a finished run"),
    ("report {p}", "missing", "no/such/path: expected the directory that holds your run directories, found nothing"),
    ("report {p}", "file", "notes.txt: expected the directory that holds your run directories, found a file"),
    ("report {p}", "empty", "empty: no run directories (none holds metrics.json or a run config.yaml): found an "
                            "empty directory"),
    ("report {p}", "shards", "shards/demo-acted: no run directories (none holds metrics.json or a run config.yaml): "
                             "found a shard directory"),
    ("grid {p}", "missing", "grid file no/such/path: expected a YAML file, found nothing"),
    ("grid {p}", "empty", "grid file empty: expected a YAML file, found an empty directory"),
    ("grid {p}", "shards", "grid file shards/demo-acted: expected a YAML file, found a shard directory"),
    ("submit --grid {p}", "run", "grid file runs/done: expected a YAML file, found a run directory"),
    ("synth --style acted {p}", "file", "OUT notes.txt is a file; give a directory"),
    ("synth --style acted {p}", "shards", "OUT {abs} is not empty and holds {abs}/index.json, which dser synth did "
                                         "not write"),
    ("bench --quick --workdir {p}", "file", "--workdir notes.txt: expected a directory for the bench's corpora, "
                                            "shards and runs, found a file"),
    ("train --stage 1 --config {p}", "missing", "config file no/such/path not found"),
    ("train --stage 1 --config {p}", "empty", "config file empty is a directory: give a YAML run config file"),
    ("train --stage 1 --config {p}", "file", "notes.txt: expected a mapping of config keys at the top level"),
    ("train --resume {p}", "missing", "--resume no/such/path: expected a run directory with config.yaml, found nothing"),
    ("train --resume {p}", "empty", "--resume empty: expected a run directory with config.yaml, found an empty "
                                    "directory"),
    ("train --resume {p}", "file", "--resume notes.txt: expected a run directory with config.yaml, found a file"),
    ("train --resume {p}", "shards", "--resume shards/demo-acted: expected a run directory with config.yaml, found a "
                                     "shard directory"),
    ("train --stage 2 --init-from {p}", "missing", "stage2.init_from {abs}: expected a finished stage-1 run directory "
                                                   "(with export/), found nothing"),
    ("train --stage 2 --init-from {p}", "empty", "stage2.init_from {abs}: expected a finished stage-1 run directory "
                                                 "(with export/), found an empty directory"),
    ("train --stage 2 --init-from {p}", "file", "stage2.init_from {abs}: expected a finished stage-1 run directory "
                                                "(with export/), found a file"),
    ("train --stage 2 --init-from {p}", "shards", "stage2.init_from {abs}: expected a finished stage-1 run directory "
                                                  "(with export/), found a shard directory"),
    ("train --stage 1 --run-dir {p}", "file", "--run-dir notes.txt: expected a new directory, found a file"),
    ("train --stage 1 --run-dir {p}", "shards", "--run-dir shards/demo-acted: expected a new directory, found a shard "
                                                "directory"),
    ("train --stage 1 --run-dir {p}", "run", "--run-dir runs/done: expected a new directory, found a run directory; "
                                             "continue it with --resume runs/done"),
    ("train --stage 1 --set data.valid=[{p}]", "missing", "config.data.valid: shard spec 'no/such/path': no such file "
                                                          "or directory"),
    ("train --stage 1 --set data.valid=[{p}]", "run", "config.data.valid: shard spec 'runs/done': runs/done has no "
                                                      "index.json"),
]


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("command, kind, says", CASES, ids=[f"{c.split()[0]}-{k}-{i}" for i, (c, k, _) in
                                                              enumerate(CASES)])
def test_a_wrong_path_is_one_line_naming_it(work, monkeypatch, command, kind, says):
    monkeypatch.chdir(work)
    path = PATHS[kind]
    before = tree(work)
    r = CliRunner().invoke(main, command.format(p=path).split())
    assert r.exit_code not in (0, None) and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    assert "Traceback" not in r.output, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    assert says.format(abs=work / path) in lines[0], lines[0]
    assert tree(work) == before  # nothing written, nothing removed
