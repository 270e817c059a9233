"""The start-up checks as a user meets them: ``dser train``, ``dser submit`` and ``dser demo`` with a
mistyped key, a missing shard group, a bad backbone, several problems at once, more ranks than
the data feeds. Each problem is one exact line, the exit status is 2, and nothing else is
printed: no launcher (not even its command line), no DeepSpeed line, no traceback. Then the
checks' rules one by one (``dser.startup``): the ranks a training set feeds, groups a shard job
writes later, stage 2 against its stage-1 config, a hub id nothing here can check.

The commands run as subprocesses in a directory laid out as a user's (small demo shards in
``shards/``); none of them starts the DeepSpeed launcher.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fixtures_shards import write_demo_shards, write_test_shards

from dser.runconfig import CONFIGS_DIR, resolve_config
from dser.startup import SHOWN_PROBLEMS, ConfigProblems, check_planned_run, data_checks

DSER = str(Path(sys.executable).with_name("dser"))
CFG1, CFG2 = CONFIGS_DIR / "demo_stage1.yaml", CONFIGS_DIR / "demo_stage2.yaml"
OPTIM_KEYS = ("lr, weight_decay, betas, eps, max_steps, warmup_steps, schedule, min_lr_ratio, grad_accum, grad_clip, "
              "class_weighted_loss")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Demo shards (acted train: 24 clips in 3 shards), a model directory of an unsupported type."""
    root = write_demo_shards(tmp_path_factory.mktemp("startup"), utterances=48, speakers=4)
    (root / "models" / "bert").mkdir(parents=True)
    (root / "models" / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return root


def dser(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run([DSER, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def train(cwd: Path, *sets: str, ranks: int | None = None) -> subprocess.CompletedProcess:
    return dser(cwd, "train", "--stage", "1", *(["--ranks", str(ranks)] if ranks else []),
                *[a for s in sets for a in ("--set", s)])


def refused(r: subprocess.CompletedProcess) -> list[str]:
    """The lines a refused command printed (asserting it was refused before anything started)."""
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == "", r.stdout  # no launcher: not even its command line
    lines = r.stderr.splitlines()
    assert "Traceback" not in r.stderr and not [ln for ln in lines if re.match(r"\[\d{4}-\d\d-\d\d ", ln)]
    return lines  # (DeepSpeed's log lines begin with their time: "[2026-12-08 01:55:44,043] [INFO] …")


MISSING = "config.data.train: shard spec 'shards/demo-acted/trian': no such file or directory (give shard group " \
          "directories, .tar files or globs; make shards with `dser shard`)"
NO_MODEL = "config.model.backbone.name: backbone directory './models/wavlm' does not exist; set " \
           "model.backbone.name to a model directory"


def test_a_mistyped_key_is_one_line(work):
    assert refused(train(work, "optim.lrr=1")) == [
        f"dser train: error: unknown key config.optim.lrr; allowed keys in config.optim: {OPTIM_KEYS}"]


@pytest.mark.parametrize("sets, line", [
    (["data.train=shards/demo-acted/trian"], MISSING),
    (["model.backbone.name=./models/wavlm"], NO_MODEL),
    (["model.backbone.name=./models/bert"],
     "config.model.backbone.name: backbone './models/bert' is a 'bert' model; dser supports wavlm, hubert, wav2vec2, "
     "data2vec-audio, whisper, wav2vec2-bert (transformers model types)"),
    (["data.valid=[]"], "config.data.valid is empty: name the shard groups to valid on"),
])
def test_a_bad_shard_group_or_backbone_is_one_line(work, sets, line):
    assert refused(train(work, *sets)) == [f"dser train: error: {line}"]


def test_independent_problems_are_one_line_each_and_a_few_at_most(work):
    assert refused(train(work, "data.train=shards/demo-acted/trian", "model.backbone.name=./models/wavlm")) == [
        f"dser train: error: {MISSING}", f"dser train: error: {NO_MODEL}"]
    many = ["optim.max_steps=0", "deepspeed.config=zero9", "data.test={acted: [shards/x], natural: [shards/y]}",
            "data.valid=[shards/z]", "data.train=shards/demo-acted/trian", "model.backbone.name=./models/wavlm"]
    lines = refused(train(work, *many))  # 7 problems
    assert len(lines) == SHOWN_PROBLEMS + 1 and lines[-1] == "dser train: error: … and 2 more"
    assert lines[0].startswith("dser train: error: config.optim.max_steps is 0: it must be at least 1")
    assert lines[1].startswith("dser train: error: config.deepspeed.config: 'zero9' is neither a JSON file")


def test_more_ranks_than_loose_tars_can_feed(work):
    tars = "data.train=[shards/demo-acted/train/train-000000.tar, shards/demo-acted/train/train-000001.tar]"
    assert refused(train(work, tars, ranks=3)) == [
        "shard spec 'shards/demo-acted/train/train-000000.tar': 1 loose .tar file(s) read as they are (no index: no "
        "listed counts, no size checks, no balance guarantees)",
        "shard spec 'shards/demo-acted/train/train-000001.tar': 1 loose .tar file(s) read as they are (no index: no "
        "listed counts, no size checks, no balance guarantees)",
        "dser train: error: config.data.train: 2 shard(s), 2 of them loose .tar files (no index), for 3 ranks: a set "
        "with loose tars streams them split across ranks, at least one each; give the directories `dser shard` wrote "
        "instead (read through their index, any number of ranks works), or run on at most 2 rank(s)"]
    # the same groups through their index feed more ranks than they have shards: a clip per rank
    assert refused(train(work, ranks=25)) == [
        "dser train: error: config.data.train: 24 clip(s) for 25 ranks, and every rank needs a clip each step; add "
        "groups to data.train or run on at most 24 rank(s)"]


def test_a_rank_refuses_what_cannot_feed_its_world_before_any_process_group(work, monkeypatch, capsys):
    from dser.train import main as train_main

    monkeypatch.chdir(work)
    monkeypatch.setenv("WORLD_SIZE", "3")  # as the launcher sets it for each rank
    rc = train_main(["--stage", "1", "--set", "data.train=[shards/demo-acted/train/train-000000.tar]"])
    err = capsys.readouterr().err
    assert rc == 2 and "dser train: error: config.data.train: 1 shard(s), 1 of them loose .tar files (no index), " \
                       "for 3 ranks" in err
    assert not (work / "runs").exists()


def test_dser_submit_checks_every_run_as_far_as_files_tell(work, tmp_path):
    pair = ["submit", "--stage1", str(CFG1), "--stage2", str(CFG2), "--dry-run", "--runs-dir", str(tmp_path)]
    assert refused(dser(work, *pair, "--set", "data.valid=[shards/demo-acted/valdi]", "--set",
                        "model.backbone.name=./models/wavlm")) == [
        "Error: stage 1 demo-stage1 (and 1 more): config.data.valid: shard spec 'shards/demo-acted/valdi': no such file "
        "or directory (give shard group directories, .tar files or globs; make shards with `dser shard`)",
        f"Error: stage 1 demo-stage1 (and 1 more): {NO_MODEL}"]
    # the ranks the options ask for: 2 nodes x 13 CPU ranks for 24 clips
    lines = refused(dser(work, *pair, "--nodes", "2", "--gpus-per-node", "0", "--ntasks-per-node", "13"))
    assert lines == ["Error: stage 1 demo-stage1 (and 1 more): config.data.train: 24 clip(s) for 26 ranks, and every "
                     "rank needs a clip each step; add groups to data.train or run on at most 24 rank(s)",
                     "Error: stage 2 demo-stage2: config.data.rehearsal.shards: 24 clip(s) for 26 ranks, and every rank "
                     "needs a clip each step; add groups to data.rehearsal.shards or run on at most 24 rank(s)"]
    # stage 2's head against its stage-1 config, and a precision its CPU jobs cannot train in
    cfg2 = yaml.safe_load(CFG2.read_text())
    cfg2["data"]["label_set"] = ["neutral", "angry"]
    (tmp_path / "s2.yaml").write_text(yaml.safe_dump(cfg2))
    lines = refused(dser(work, *pair[:4], str(tmp_path / "s2.yaml"), *pair[5:], "--gpus-per-node", "0",
                         "--set", "deepspeed.precision=fp16"))
    assert lines == [
        "Error: stage 1 demo-stage1 (and 1 more): config.deepspeed.precision: fp16 needs a GPU and the jobs have none "
        "(--gpus-per-node 0); use auto, bf16 or fp32 (--set deepspeed.precision=auto)",
        "Error: stage 2 demo-stage2: stage 2 label set ['neutral', 'angry'] differs from stage 1's ['neutral', 'happy', "
        "'angry', 'sad'] (its stage-1 config): set stage2.new_head: true (--set stage2.new_head=true) to train a new head"]
    # a hub id this machine's cache lacks cannot be checked here: a note, and the jobs are planned
    r = dser(work, *pair, "--set", "model.backbone.name=no-such-org/no-such-model")
    assert r.returncode == 0 and r.stdout.startswith("# dser submit --dry-run"), r.stderr
    assert r.stderr.splitlines() == [
        "note: config.model.backbone.name: 'no-such-org/no-such-model' is a Hugging Face hub id that this machine's "
        "cache does not hold, so it is not checked here; the jobs load it from theirs (huggingface-cli download "
        "no-such-org/no-such-model where there is network)"]


GRID = f"""\
corpora:
  acted: {{reader: synth-acted, root: data/acted, train: [train], valid: [valid], test: [test]}}
  natural: {{reader: synth-natural, root: data/natural, train: [train], valid: [valid], test: [tset]}}
sources: [acted]
targets: [natural]
stage1_config: {CFG1}
stage2_config: {CFG2}
"""


def test_a_grid_is_checked_where_its_shards_exist_and_trusted_where_its_shard_job_makes_them(tmp_path):
    # "natural" is sharded already, with a typo in its test group; "acted" is the shard job's
    for group in ("train", "valid", "test"):
        write_test_shards(tmp_path / "shards" / "natural", 8, 2, group=group, prefix=group)
    (tmp_path / "grid.yaml").write_text(GRID)
    lines = refused(dser(tmp_path, "submit", "--grid", "grid.yaml", "--dry-run"))
    assert lines == [f"Error: stage 1 acted (and 1 more): config.data.test.natural: shard spec "
                     f"'shards/natural/tset': no such file or directory (give shard group directories, .tar files or "
                     f"globs; make shards with `dser shard`)"]
    assert refused(dser(tmp_path, "grid", "grid.yaml")) == lines  # dser grid checks the same
    (tmp_path / "grid.yaml").write_text(GRID.replace("[tset]", "[test]"))
    r = dser(tmp_path, "submit", "--grid", "grid.yaml", "--dry-run")
    assert r.returncode == 0 and "--array=0 " in r.stdout, r.stderr  # acted's groups: not there yet, not refused


def test_dser_demo_refuses_a_mistyped_key_before_making_anything(tmp_path):
    assert refused(dser(tmp_path, "demo", "--set", "optim.lrr=1")) == [
        f"dser demo: error: stage {s}: unknown key config.optim.lrr; allowed keys in config.optim: {OPTIM_KEYS}"
        for s in (1, 2)]
    assert list(tmp_path.iterdir()) == []  # no corpus synthesized, no shards, no run


def test_dser_demo_checks_both_stages_before_it_launches_the_first(tmp_path):
    r = dser(tmp_path, "demo", "--utterances", "40", "--set", "model.backbone.name=./models/wavlm")
    assert r.returncode == 2 and (tmp_path / "shards" / "demo-acted" / "index.json").is_file(), r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("dser demo")] == [
        f"dser demo: error: stage {s}: {NO_MODEL}" for s in (1, 2)]
    assert "+ " not in r.stdout and "Traceback" not in r.stderr and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------
# the rules
# ------------------------------------------------------------------------------------------

def test_indexed_groups_feed_more_ranks_than_shards_as_iemocap_loso_launches_them(tmp_path, monkeypatch):
    # dser/configs/iemocap_loso.yaml opens with `deepspeed --num_accelerators 8`: its three
    # training sessions are three shards here, 10 clips each
    for s in range(1, 6):
        write_test_shards(tmp_path / "shards" / "iemocap", 10, 1, group=f"Session{s}", prefix=f"s{s}",
                          emotions=("neutral", "happy", "angry", "sad"))
    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(CONFIGS_DIR / "iemocap_loso.yaml", [], stage=1)
    assert data_checks(cfg, world_size=8)[0] == []
    assert data_checks(cfg, world_size=31)[0] == [
        "config.data.train: 30 clip(s) for 31 ranks, and every rank needs a clip each step; add groups to data.train "
        "or run on at most 30 rank(s)"]
    asked = []
    assert data_checks(cfg, world_size=lambda: asked.append(1) or 8)[0] == [] and asked == [1]
    loose = resolve_config(CONFIGS_DIR / "iemocap_loso.yaml", ["data.train=shards/iemocap/Session[1-3]/*.tar"], stage=1)
    assert data_checks(loose, world_size=3)[0] == [] and data_checks(loose, world_size=4)[0][0].startswith(
        "config.data.train: 3 shard(s), 3 of them loose .tar files (no index), for 4 ranks")


def test_a_planned_run_skips_what_a_job_before_it_writes_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg1 = resolve_config(CFG1, [], stage=1)
    cfg2 = resolve_config(CFG2, [], stage=2)
    assert check_planned_run(cfg2, 2, stage1=cfg1, pending=[tmp_path / "shards"]) == []
    with pytest.raises(ConfigProblems) as e:
        check_planned_run(cfg2, 2, stage1=cfg1, pending=[tmp_path / "shards" / "demo-acted"])
    assert [p.split(":")[0] for p in e.value.problems] == ["config.data.train", "config.data.valid",
                                                           "config.data.test.natural"]
