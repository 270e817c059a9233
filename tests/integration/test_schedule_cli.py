"""Schedule keys through ``dser train`` as a user runs it: an impossible step count is one line
naming the key before any process group starts (nothing is created); an interval longer than
the run is clamped, says so, and takes effect."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_shards import write_demo_shards

from dser.runconfig import default_config_path

pytestmark = pytest.mark.integration

DSER = str(Path(sys.executable).with_name("dser"))


def dser_train(cwd: Path, *sets: str, run: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    args = [DSER, "train", "--stage", "1", "--config", str(default_config_path(1)), "--run-dir", f"runs/{run}",
            "--ranks", "2", *[a for s in sets for a in ("--set", s)]]
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory) -> Path:
    """A working directory with the demo configs' shards: the schedule is then all that is wrong."""
    return write_demo_shards(tmp_path_factory.mktemp("schedule"))


@pytest.mark.parametrize("override, message", [
    ("optim.max_steps=0", "config.optim.max_steps is 0: it must be at least 1 (optimizer steps in this stage)"),
    ("train.save_every=-5", "config.train.save_every is -5: it must be at least 1"),
    ("train.eval_every=0", "config.train.eval_every is 0: it must be at least 1"),
])
def test_an_impossible_step_count_fails_in_one_line_before_anything_runs(shards_dir, override, message):
    r = dser_train(shards_dir, override, run="bad")
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("dser train: error:")]
    assert len(lines) == 1 and lines[0].startswith(f"dser train: error: {message}"), r.stderr[-3000:]
    assert "Traceback" not in r.stderr and r.stdout == ""  # not even the launcher's command line
    assert not (shards_dir / "runs").exists()  # no run directory, no process group


def test_an_interval_longer_than_the_run_is_clamped_with_a_note(tmp_path):
    write_demo_shards(tmp_path)
    r = dser_train(tmp_path, "optim.max_steps=3", "optim.warmup_steps=1", "train.log_every=1",
                   "train.eval_every=3", "train.save_every=500", "train.progress=false",
                   "data.shuffle_buffer=50", run="clamped")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("note: config.train.save_every=500 is longer than the run (optim.max_steps=3): "
                          "clamped to 3") == 1
    run = tmp_path / "runs" / "clamped"
    # clamped, the run checkpoints at its end (with 500 it would never have)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000003"
    assert "save_every: 3" in (run / "config.yaml").read_text()  # recorded as it ran
    # DeepSpeed's own lines stay out of a run's output (test_train: --verbose shows them)
    assert "[INFO]" not in r.stdout + r.stderr and "hostfile" not in r.stdout + r.stderr
