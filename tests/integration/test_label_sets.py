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


@pytest.fixture(scope="module")
def warned_run(workdir) -> tuple[Path, str]:
    """A real (tiny) run trained without sad, tested on a set without sad: (run dir, its output)."""
    from dser.launch import launch_command

    args = ["--stage", "1", "--config", str(default_config_path(1)), *TINY, "--run-dir", "runs/warned",
            "--set", "data.train=[shards/odd/three]", "--set", "data.valid=[shards/demo-acted/valid]",
            "--set", "data.test={acted: [shards/demo-acted/test], natural: [shards/demo-natural/test], "
                     "three: [shards/odd/three]}"]
    cmd, env = launch_command(args, ranks=1)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    r = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return workdir / "runs" / "warned", r.stdout + r.stderr


def test_missing_and_unseen_classes_are_warned_and_recorded(warned_run):
    """Printed at the start, and in metrics.json's warnings."""
    run, out = warned_run
    want = ["config.data.train has no clips of class sad (label set 4class): the model never learns it",
            "config.data.test.three has no clips of class sad: its UA and macro-F1 average over the classes it has",
            "config.data.test.acted has clips of class sad (",
            "config.data.test.natural has clips of class sad ("]
    for w in want:
        assert f"warning: {w}" in out, out[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["warnings"]) == 4
    for w in want:
        assert any(m.startswith(w) for m in metrics["warnings"]), metrics["warnings"]


def test_evaluate_reads_exactly_what_the_index_lists(workdir, warned_run):
    """`dser evaluate`: a stray backup tar in a test group is an error naming it (it once turned 12
    clips into 20 silently), and a duplicate copy given explicitly is one line, not a traceback."""
    import shutil

    from click.testing import CliRunner

    from dser.cli import main

    run, _ = warned_run
    copy = workdir / "shards" / "copy"
    shutil.copytree(workdir / "shards" / "demo-acted", copy)
    ok = CliRunner().invoke(main, ["evaluate", str(run), "--shards", str(copy / "test"), "--json"])
    assert ok.exit_code == 0, ok.output
    assert sum(map(sum, json.loads(ok.output)["confusion"])) == 16
    first = sorted((copy / "test").glob("*.tar"))[0]
    stray = copy / "test" / "test-backup.tar"
    shutil.copy(first, stray)
    bad = CliRunner().invoke(main, ["evaluate", str(run), "--shards", str(copy / "test")])
    assert bad.exit_code != 0 and "Traceback" not in bad.output
    assert bad.output.strip().splitlines()[-1] == (
        f"Error: {stray}: a .tar that {copy / 'index.json'} does not list; move it out of {copy / 'test'} "
        f"(dser reads exactly the shards its index lists), or re-shard")
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    stray.rename(elsewhere / "dup.tar")
    dup = CliRunner().invoke(main, ["evaluate", str(run), "--shards", str(copy / "test"),
                                    "--shards", str(elsewhere / "dup.tar")])
    assert dup.exit_code != 0 and isinstance(dup.exception, SystemExit)  # a click error, not a crash
    assert "more than once" in dup.output and "give each shard once" in dup.output


def test_a_run_on_old_format_shards_names_the_upgrade_command(workdir, capsys):
    write_test_shards(workdir / "shards" / "old", 6, 2, group="train", old_format=True)
    rc, text = check(workdir, "data.train=[shards/old/train]", capsys=capsys)
    (line,) = [t for t in text.splitlines() if "error" in t]
    assert rc == 2 and line.startswith("dser train: error: config.data.train: shard spec 'shards/old/train': ")
    assert "old format 'dser-shards/1'" in line
    old = workdir / 'shards' / 'old'
    assert f"`dser shard testcorpus {old} {old} --overwrite`" in line
