"""dser.rundir: finished.json is the one marker of a finished run; older runs are read by the old rule."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from dser.cli import main
from dser.rundir import FINISHED, LAYOUT, RunDir, RunDirError


def started(path, layout: bool = True) -> RunDir:
    run = RunDir(path)
    if layout:
        run.write_config({"stage": 1, "config": {}})
    else:  # as dser wrote config.yaml before finished.json existed
        path.mkdir(parents=True)
        (path / "config.yaml").write_text(yaml.safe_dump({"stage": 1, "config": {}}))
    return run


def test_the_states_of_a_run(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.status() == "none" and not run.finished()
    run.write_config({"stage": 1, "config": {"seed": 0}})
    assert yaml.safe_load(run.config_file.read_text()) == {"stage": 1, "config": {"seed": 0}, "layout": LAYOUT}
    assert run.status() == "started"
    run.checkpoints.mkdir()
    (run.checkpoints / "latest").write_text("step00000004\n")
    assert run.status() == "stopped at step00000004" and run.latest_checkpoint() == "step00000004"
    # metrics.json and a whole export are not enough: only finished.json says it finished
    run.metrics_file.write_text("{}")
    run.export.mkdir()
    (run.export / "export.json").write_text("{}")
    (run.export / "config.yaml").write_text("{}")
    assert not run.finished() and run.note() is None
    run.write_finished({"steps": 4})
    assert run.finished() and run.status() == "finished" and run.read_finished() == {"steps": 4}
    assert sorted(p.name for p in run.path.iterdir() if p.name.startswith(".")) == []  # no temporary left
    assert run.require_finished("RUN") == run.export


def test_a_run_of_an_older_dser_is_read_by_the_old_rule_with_a_note(tmp_path):
    run = started(tmp_path / "old", layout=False)
    assert not run.finished()
    run.metrics_file.write_text("{}")
    assert not run.finished()  # metrics.json without export/: it never finished
    run.export.mkdir()
    assert run.finished() and run.legacy() and run.status() == "finished"
    assert run.note() == (f"note: {run.path} is a run of an older dser (no {FINISHED}): read as finished because it "
                          f"has metrics.json and export/")
    r = CliRunner().invoke(main, ["run-status", str(run.path)])
    assert r.exit_code == 0 and r.stdout == "finished\n" and r.stderr == run.note() + "\n"


@pytest.mark.parametrize("state, says", [
    ("none", "expected a finished stage-1 run directory (with export/), found nothing (no such directory)"),
    ("empty", "expected a finished stage-1 run directory (with export/), found an empty directory"),
    ("started", "that stage-1 run has not finished (no finished.json, no checkpoint): it failed or is still running"),
    ("stopped", "that stage-1 run stopped before its end (last checkpoint step00000008); finish it first with "
                "dser train --resume {run}"),
])
def test_require_finished_says_why_not_in_one_line(tmp_path, state, says):
    path = tmp_path / "s1"
    if state == "empty":
        path.mkdir()
    elif state in ("started", "stopped"):
        run = started(path)
        run.metrics_file.write_text(json.dumps({"eval": {}}))
        if state == "stopped":
            run.checkpoints.mkdir()
            (run.checkpoints / "latest").write_text("step00000008")
    with pytest.raises(RunDirError) as e:
        RunDir(path).require_finished("stage2.init_from", "stage-1 run")
    assert str(e.value) == f"stage2.init_from {path}: " + says.format(run=path)
    r = CliRunner().invoke(main, ["run-status", str(path)])
    assert r.output.strip() == {"none": "none", "empty": "none", "started": "started",
                                "stopped": "stopped at step00000008"}[state]
