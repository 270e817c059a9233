"""Bad label sets stop a run before training, in one line; missing classes are warned about and
recorded. Each case is `dser train` as a user runs it, on shards written to disk."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from fixtures_shards import write_demo_shards, write_test_shards

from dser.runconfig import default_config_path
from dser.train import main as train_main

pytestmark = pytest.mark.integration

TINY = ["--set", "optim.max_steps=2", "--set", "optim.warmup_steps=1", "--set", "train.eval_every=2",
        "--set", "train.save_every=2", "--set", "train.log_every=1", "--set", "train.progress=false",
        "--set", "data.max_batch_seconds=40", "--set", "data.shuffle_buffer=10"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The demo shards, plus shard groups whose emotions fall outside 4class or miss a class."""
    root = write_demo_shards(tmp_path_factory.mktemp("labelsets"))
    write_test_shards(root / "shards" / "odd", 8, 2, group="outside", emotions=("fear", "disgust"))
    write_test_shards(root / "shards" / "odd", 8, 2, group="three", emotions=("neutral", "happy", "angry"),
                      prefix="t", styles=("acted",))
    return root


def check(workdir: Path, *overrides: str, capsys) -> tuple[int, str]:
    """``dser train``'s recipe entry point in this process: (exit status, what it printed)."""
    old = Path.cwd()
    os.chdir(workdir)
    try:
        rc = train_main(["--stage", "1", "--config", str(default_config_path(1)), *TINY,
                         *[a for o in overrides for a in ("--set", o)]])
    finally:
        os.chdir(old)
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_a_validation_set_outside_the_label_set_stops_before_training(workdir, capsys):
    rc, text = check(workdir, "data.valid=[shards/odd/outside]", capsys=capsys)
    assert rc == 2
    (line,) = [t for t in text.splitlines() if "error" in t]
    assert line.startswith("dser train: error: config.data.valid: no clip with a class of label set 4class "
                           "(neutral, happy, angry, sad)")
    assert f"{workdir / 'shards' / 'odd'}/outside" in line and "; they hold " in line and "fear/acted 4" in line
    assert "fix data.label_set, data.styles or the groups" in line
    assert not (workdir / "runs").exists()  # nothing started


def test_a_training_set_outside_the_label_set_stops_before_training(workdir, capsys):
    rc, text = check(workdir, "data.train=[shards/odd/outside]", capsys=capsys)
    assert rc == 2 and "error: config.data.train: no clip with a class of label set 4class" in text
    assert "fit_feature_stats" not in text and "Traceback" not in text


def test_an_empty_test_set_and_a_style_filter_that_leaves_nothing(workdir, capsys):
    rc, text = check(workdir, "data.test={acted: [shards/demo-acted/test], natural: [shards/demo-natural/test], "
                              "odd: [shards/odd/outside]}", capsys=capsys)
    assert rc == 2 and "error: config.data.test.odd: no clip with a class of label set 4class" in text
    rc, text = check(workdir, "data.styles=[natural]", capsys=capsys)
    assert rc == 2 and "error: config.data.train: no clip with a class of label set 4class (neutral, happy, " \
                       "angry, sad) in styles ['natural'] (data.styles)" in text


def test_missing_and_unseen_classes_are_warned_and_recorded(workdir):
    """A test set without sad and a training set without sad: printed at the start, and in
    metrics.json's warnings, from a real (tiny) run."""
    from dser.launch import launch_command

    args = ["--stage", "1", "--config", str(default_config_path(1)), *TINY, "--run-dir", "runs/warned",
            "--set", "data.train=[shards/odd/three]", "--set", "data.valid=[shards/demo-acted/valid]",
            "--set", "data.test={acted: [shards/demo-acted/test], natural: [shards/demo-natural/test], "
                     "three: [shards/odd/three]}"]
    cmd, env = launch_command(args, ranks=1)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    r = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    want = ["config.data.train has no clips of class sad (label set 4class): the model never learns it",
            "config.data.test.three has no clips of class sad: its UA and macro-F1 average over the classes it has",
            "config.data.test.acted has clips of class sad (",
            "config.data.test.natural has clips of class sad ("]
    for w in want:
        assert f"warning: {w}" in out, out[-3000:]
    metrics = json.loads((workdir / "runs" / "warned" / "metrics.json").read_text())
    assert len(metrics["warnings"]) == 4
    for w in want:
        assert any(m.startswith(w) for m in metrics["warnings"]), metrics["warnings"]
