"""Fault injection on the real recipe: the DeepSpeed launcher, 2 CPU ranks, the demo corpora.

Each test breaks one thing the way a cluster breaks it and checks that dser carries on or
stops the way it promises:

- damaged training data (a corrupt FLAC inside a shard, a truncated shard): skipped, counted
  in TensorBoard and metrics.json; past ``train.max_bad_samples`` a one-line error;
- a non-finite loss or gradient on one rank: that step is skipped on every rank and counted;
  too many in a row stop the run naming the step;
- ``kill -9`` of one rank: the job ends non-zero within a bound, naming the rank, and
  ``--resume`` finishes the run;
- SIGUSR1 (Slurm's preemption warning) to one rank only: every rank checkpoints at the same
  step and exits 0; ``--resume`` continues;
- a kill during a checkpoint save: the previous checkpoint is still ``latest`` and resumes;
- bad configurations: one line naming the key, before any process group or run directory.

Faults come from ``faulty_train.py`` (the unchanged recipe with one fault patched in) or from
signals sent to the rank processes from here.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from fixtures_shards import write_demo_shards
from safetensors.torch import load_file

from dser.launch import launch_command
from dser.runconfig import default_config_path

pytestmark = pytest.mark.integration

FAULTY = Path(__file__).resolve().parent / "faulty_train.py"
SHORT = ["optim.max_steps=12", "optim.warmup_steps=2", "train.eval_every=12", "train.save_every=4",
         "train.log_every=2", "train.progress=false", "train.keep_last=3", "data.shuffle_buffer=50"]
# A long run to break in the middle: checkpoints every 5 steps, so resume has one to start from.
# Long enough that a signal sent once the first checkpoint (step 5) exists lands mid-run, with
# tens of steps to spare; each resumed run trains the rest, so no longer than that.
LONG_STEPS = 50
LONG = [f"optim.max_steps={LONG_STEPS}", "optim.warmup_steps=2", f"train.eval_every={LONG_STEPS}", "train.save_every=5",
        "train.log_every=5", "train.progress=false", "data.shuffle_buffer=50"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return write_demo_shards(tmp_path_factory.mktemp("faults"))


def command(*args: str, sets=SHORT, script: Path = FAULTY, fault: str | None = None,
            fault_rank: int | None = None) -> tuple[list[str], dict]:
    cli = [a for s in sets for a in ("--set", s)]
    cmd, env = launch_command([*args, *cli] if "--resume" not in args else list(args), ranks=2, script=script)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("DSER_FAULT", None)
    env.pop("DSER_FAULT_RANK", None)
    if fault:
        env["DSER_FAULT"] = fault
    if fault_rank is not None:
        env["DSER_FAULT_RANK"] = str(fault_rank)
    return cmd, env


def train(cwd: Path, *args: str, expect: int | None = 0, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    cmd, env = command(*args, **kw)
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if expect is not None:
        assert r.returncode == expect, f"exit {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def stage1_args(run: str) -> list[str]:
    return ["--stage", "1", "--config", str(default_config_path(1)), "--run-dir", f"runs/{run}"]


def rank_pids(launcher: subprocess.Popen, deadline: float = 120) -> dict[int, int]:
    """{local rank: pid} of the launcher's rank processes (``--local_rank=N`` on their command line)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        ranks = {}
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                args = child.cmdline()
            except psutil.NoSuchProcess:
                continue
            for a in args:
                if a.startswith("--local_rank="):
                    ranks[int(a.split("=")[1])] = child.pid
        if len(ranks) == 2:
            return ranks
        assert launcher.poll() is None, "the launcher ended before its ranks started"
        time.sleep(0.2)
    raise AssertionError("the rank processes did not start")


def wait_for(path: Path, proc: subprocess.Popen, deadline: float = 300) -> None:
    end = time.monotonic() + deadline
    while not path.exists():
        assert proc.poll() is None, f"ended before {path} appeared:\n{proc.communicate()[0][-4000:]}"
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.2)


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def assert_finite_export(run: Path) -> None:
    for rel in ("adaptors.safetensors", "lora/adapter_model.safetensors"):
        for k, v in load_file(run / "export" / rel).items():
            assert v.float().isfinite().all(), f"{rel}: {k} is not finite"


def scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# ----------------------------------------------------------------------------------------
# damaged data
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def damaged(workdir) -> Path:
    """A copy of the acted training shards with one FLAC replaced by garbage (the tar stays
    valid) and another shard cut in half."""
    src = workdir / "shards" / "demo-acted" / "train"
    dst = workdir / "shards" / "damaged" / "train"
    dst.mkdir(parents=True)
    tars = sorted(src.glob("*.tar"))
    for t in tars:
        (dst / t.name).write_bytes(t.read_bytes())
    with tarfile.open(tars[0]) as tin, tarfile.open(dst / tars[0].name, "w") as tout:
        flacs = 0
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name.endswith(".flac") and flacs == 1:
                data = b"garbage, not FLAC " * 40
                m.size = len(data)
            flacs += m.name.endswith(".flac")
            tout.addfile(m, io.BytesIO(data))
    cut = dst / tars[3].name
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    # No index lists these (a directory would be refused), so they are named as loose tars.
    return dst / "*.tar"


def test_damaged_training_shards_are_skipped_counted_and_training_goes_on(workdir, damaged):
    train(workdir, *stage1_args("damaged"), sets=[*SHORT, f"data.train=[{damaged}]"], script=FAULTY)
    run = workdir / "runs" / "damaged"
    m = metrics(run)
    assert m["steps"] == 12
    bad = m["bad_samples"]
    assert bad["count"] == len(bad["samples"]) >= 2, bad
    assert any("undecodable FLAC" in s for s in bad["samples"]), bad
    assert any("damaged shard" in s and "damaged/train" in s for s in bad["samples"]), bad
    logged = scalars(run, "train/bad_samples")
    assert logged[-1][1] == bad["count"] and logged[0][1] <= logged[-1][1]
    assert_finite_export(run)


def test_more_bad_samples_than_the_limit_stop_with_one_line(workdir, damaged):
    r = train(workdir, *stage1_args("too-damaged"), sets=[*SHORT, f"data.train=[{damaged}]",
                                                           "train.max_bad_samples=0"], expect=2)
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("dser train: error:")]
    assert "corrupt training samples skipped, more than train.max_bad_samples=0" in line
    assert "dser verify" in line and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------
# non-finite loss and gradients
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", [pytest.param("bf16", marks=pytest.mark.bf16), "fp32"])
def test_a_nan_loss_on_one_rank_skips_that_step_on_every_rank(workdir, precision):
    name = f"nan-loss-{precision}"
    train(workdir, *stage1_args(name), sets=[*SHORT, f"deepspeed.precision={precision}"], fault="nan_loss:3",
          fault_rank=1)
    run = workdir / "runs" / name
    m = metrics(run)
    assert m["steps"] == 12 and m["precision"] == precision
    assert m["skipped_steps"] == {"count": 1, "steps": [{"step": 3, "why": "non-finite loss"}]}
    assert scalars(run, "train/skipped_steps")[-1][1] == 1
    from dser.safeload import safe_load  # as the recipe reads it: weights_only, DeepSpeed's classes only
    ds_state = safe_load(run / "checkpoints" / "step00000012" / "mp_rank_00_model_states.pt", map_location="cpu")
    # bf16: DeepSpeed's overflow check dropped the whole update (moments and schedule too);
    # fp32 has no such check: the batch is dropped (a zero gradient) and the step counts
    assert ds_state["skipped_steps"] == (1 if precision == "bf16" else 0) and ds_state["global_steps"] == 12
    assert all(math.isfinite(v) for _, v in scalars(run, "train/loss"))
    assert_finite_export(run)


def test_a_nan_gradient_skips_the_update(workdir):
    train(workdir, *stage1_args("nan-grad"), fault="nan_grad:5", fault_rank=0)
    run = workdir / "runs" / "nan-grad"
    m = metrics(run)
    assert m["skipped_steps"] == {"count": 1, "steps": [{"step": 5, "why": "non-finite gradient"}]}
    assert_finite_export(run)


def test_too_many_nonfinite_steps_in_a_row_stop_the_run_naming_the_step(workdir):
    r = train(workdir, *stage1_args("nan-forever"), sets=[*SHORT, "train.max_nonfinite_steps=2"],
              fault="nan_loss_from:4", expect=2)
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("dser train: error:")]
    assert "non-finite loss for 3 steps in a row at step 6" in line, line


# ----------------------------------------------------------------------------------------
# dead, preempted and killed ranks
# ----------------------------------------------------------------------------------------

def signal_rank_mid_run(workdir: Path, name: str, sig: int, rank: int,
                        sets: list[str] = ()) -> tuple[int, str, int, float]:
    """Start a LONG run (plus ``sets``), send ``sig`` to one rank once the first checkpoint exists.

    Returns:
        (launcher exit status, its output, the pid signalled, seconds from the signal to the end)
    """
    cmd, env = command(*stage1_args(name), sets=[*LONG, *sets])
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pids = rank_pids(proc)
        wait_for(workdir / "runs" / name / "checkpoints" / "latest", proc)
        os.kill(pids[rank], sig)
        sent = time.monotonic()
        out, _ = proc.communicate(timeout=120)
        return proc.returncode, out, pids[rank], time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()


def test_kill_9_of_one_rank_ends_the_job_within_a_bound_naming_it_and_resume_finishes(workdir):
    run = workdir / "runs" / "killed"
    rc, out, pid, took = signal_rank_mid_run(workdir, "killed", signal.SIGKILL, rank=1)
    assert rc != 0
    assert took < 60, f"the job took {took:.0f} s to end after a rank died"
    assert f"rank 1 (pid {pid}" in out and "is gone" in out, out[-3000:]
    assert not (run / "metrics.json").exists()

    r = train(workdir, "--resume", str(run), sets=[])
    assert "resumed from" in r.stdout
    assert metrics(run)["steps"] == LONG_STEPS


def test_a_hung_rank_ends_the_job_after_the_collective_timeout(workdir):
    # SIGSTOP: the rank is alive but never answers; deepspeed.timeout_minutes bounds the wait.
    rc, out, _, took = signal_rank_mid_run(workdir, "hung", signal.SIGSTOP, rank=1,
                                           sets=["deepspeed.timeout_minutes=0.1"])
    assert rc != 0
    assert "rank 0: a collective failed" in out and "another rank (on another host, or hung)" in out, out[-3000:]
    assert took < 90, f"the job took {took:.0f} s to end after a rank hung"


def test_sigusr1_to_one_rank_checkpoints_every_rank_and_resume_continues(workdir):
    run = workdir / "runs" / "preempted"
    # Slurm signals every rank; the others must follow a signal that reached only one anyway.
    rc, out, _, _ = signal_rank_mid_run(workdir, "preempted", signal.SIGUSR1, rank=1)
    assert rc == 128 + signal.SIGUSR1, out[-4000:]  # stopped, not finished: 138
    tag = (run / "checkpoints" / "latest").read_text().strip()
    step = int(tag.removeprefix("step"))
    assert f"stopped at step {step} by SIGUSR1 (sent to another rank); resume with dser train --resume " \
           f"runs/preempted" in out, out[-3000:]
    assert 5 <= step < LONG_STEPS  # stopped mid-run
    ckpt = run / "checkpoints" / tag
    assert sorted(p.name for p in ckpt.glob("dser_rank*.pt")) == ["dser_rank0.pt", "dser_rank1.pt"]
    assert not (run / "metrics.json").exists()

    r = train(workdir, "--resume", str(run), sets=[])
    assert f"at step {step}" in r.stdout
    m = metrics(run)
    assert m["steps"] == LONG_STEPS


def test_sigterm_to_dser_train_checkpoints_and_exits_143_never_looking_finished(workdir):
    # as `timeout` and a shell's kill of a job send it: to dser train's whole process group (the
    # DeepSpeed launcher, if it were in it, would kill the ranks with no checkpoint and exit 1)
    run = workdir / "runs" / "terminated"
    cmd, env = command(*stage1_args("terminated"), sets=LONG)
    script = cmd.index(str(FAULTY))
    cli = [sys.executable, "-m", "dser.cli", "train", *cmd[script + 1:], "--ranks", "2"]
    env.pop("DSER_FAULT", None)
    proc = subprocess.Popen(cli, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        rank_pids(proc)
        wait_for(run / "checkpoints" / "latest", proc)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, f"{out[-3000:]}\n{err[-3000:]}"
    tag = (run / "checkpoints" / "latest").read_text().strip()
    step = int(tag.removeprefix("step"))
    assert 5 <= step < LONG_STEPS
    assert out.strip().splitlines()[-1] == f"stopped at step {step} by SIGTERM; resume with dser train --resume " \
                                           f"runs/terminated", out[-2000:]
    ckpt = run / "checkpoints" / tag
    assert sorted(p.name for p in ckpt.glob("dser_rank*.pt")) == ["dser_rank0.pt", "dser_rank1.pt"]
    assert not (run / "metrics.json").exists() and not (run / "export").exists()
    assert not [p for p in psutil.process_iter(["cmdline"]) if "runs/terminated" in " ".join(p.info["cmdline"] or [])]

    # it never looks finished: dser report leaves it out saying so, stage 2 refuses it in one line
    rep = subprocess.run([sys.executable, "-m", "dser.cli", "report", "runs/terminated"], cwd=workdir, env=env,
                         capture_output=True, text=True, timeout=120)
    assert f"last checkpoint {tag} (stopped before its end? resume it with dser train --resume" in \
        rep.stdout + rep.stderr, rep.stdout + rep.stderr
    r = train(workdir, "--stage", "2", "--config", str(default_config_path(2)), "--init-from", str(run),
              "--run-dir", "runs/terminated-s2", expect=2, timeout=120)
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("dser train: error:")]
    assert f"that stage-1 run stopped before its end (last checkpoint {tag}); finish it first with " \
           f"dser train --resume {run}" in line, line


def test_stop_after_steps_exits_75_not_finished(workdir):
    # (its resume to the end, exit 0, is test_train's test_resume_matches_uninterrupted_run…)
    run = workdir / "runs" / "time-boxed"
    r = train(workdir, *stage1_args("time-boxed"), sets=[*SHORT, "train.stop_after_steps=4"], expect=75)
    # the launcher's own lines follow it here; dser train prints it last (the SIGTERM test)
    assert "stopped at step 4 by train.stop_after_steps=4; resume with dser train --resume runs/time-boxed" \
        in r.stdout.splitlines()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000004"
    assert not (run / "metrics.json").exists() and not (run / "export").exists()


def test_a_kill_during_a_checkpoint_save_leaves_the_previous_one_usable(workdir):
    run = workdir / "runs" / "killed-in-save"
    r = train(workdir, *stage1_args("killed-in-save"), fault="kill_in_save:2", fault_rank=0, expect=None)
    assert r.returncode != 0 and "SIGKILL in checkpoint save 2" in r.stdout + r.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000004"
    assert not (run / "checkpoints" / "step00000008").exists()  # never published

    r = train(workdir, "--resume", str(run), sets=[])
    assert "resumed from" in r.stdout and "at step 4" in r.stdout
    assert metrics(run)["steps"] == 12
    assert not (run / "checkpoints" / ".incoming" / "step00000008").exists()
    assert_finite_export(run)


# ----------------------------------------------------------------------------------------
# bad configurations: one line, before any compute
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stage1_run(workdir) -> Path:
    train(workdir, *stage1_args("for-stage2"), script=FAULTY)
    return workdir / "runs" / "for-stage2"


@pytest.mark.parametrize("name, sets, expected", [
    ("unknown-key", ["optim.lrr=1"], ["unknown key config.optim.lrr", "allowed keys in config.optim"]),
    ("missing-valid", ["data.valid=[shards/no-such-group]"],
     ["config.data.valid: shard spec 'shards/no-such-group': no such file or directory"]),
    ("missing-test", ["data.test={acted: [shards/demo-acted/tset], natural: [shards/demo-natural/test]}"],
     ["config.data.test.acted: shard spec 'shards/demo-acted/tset'"]),
    ("no-backbone", ["model.backbone.name=/nonexistent/wavlm"],
     ["config.model.backbone.name:", "does not exist"]),
    ("hub-backbone", ["model.backbone.name=someone/no-such-model"],
     ["config.model.backbone.name:", "download it first"]),
    ("fp16-on-cpu", ["deepspeed.precision=fp16"],
     ["config.deepspeed.precision: fp16 needs a GPU and this machine has none", "--set deepspeed.precision=auto"]),
    ("no-ds-config", ["deepspeed.config=zero9"],
     ["config.deepspeed.config: 'zero9' is neither a JSON file nor one of zero0, zero1, zero2"]),
])
def test_bad_stage1_configs_fail_in_one_line_before_anything_runs(workdir, name, sets, expected):
    r = train(workdir, *stage1_args(f"bad-{name}"), sets=[*SHORT, *sets], expect=2, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("dser train: error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    for e in expected:
        assert e in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert not (workdir / "runs" / f"bad-{name}").exists()  # nothing created, nothing computed


def test_resuming_an_fp16_run_without_a_gpu_refuses_in_one_line(workdir, stage1_run):
    # a run that started on a GPU without bf16, moved here: its config.yaml as the recipe wrote it
    import yaml
    moved = workdir / "runs" / "from-a-v100"
    moved.mkdir()
    meta = yaml.safe_load((stage1_run / "config.yaml").read_text())
    meta["precision"] = {"name": "fp16", "reason": "auto: Tesla V100 has no native bf16; fp16 with DeepSpeed's "
                                                   "dynamic loss scaling", "requested": "auto"}
    (moved / "config.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    r = train(workdir, "--resume", str(moved), sets=[], expect=2, timeout=120)
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("dser train: error:")]
    assert "this run trained in fp16 (auto: Tesla V100" in line and "resume it on a GPU" in line, line
    assert "Traceback" not in r.stderr and sorted(p.name for p in moved.iterdir()) == ["config.yaml"]


def test_stage2_with_another_label_set_needs_new_head(workdir, stage1_run):
    args = ["--stage", "2", "--config", str(default_config_path(2)), "--init-from", str(stage1_run),
            "--run-dir", "runs/bad-labels"]
    r = train(workdir, *args, sets=[*SHORT, "data.label_set=[neutral, angry]"], expect=2, timeout=120)
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("dser train: error:")]
    assert "differs from stage 1's" in line and "stage2.new_head=true" in line
    assert not (workdir / "runs" / "bad-labels").exists()
    # …and with new_head it trains
    train(workdir, *args[:-1], "runs/new-head", sets=[*SHORT, "data.label_set=[neutral, angry]",
                                                      "stage2.new_head=true", "optim.max_steps=4"])
    m = metrics(workdir / "runs" / "new-head")
    assert np.asarray(m["eval"]["natural"]["confusion"]).shape == (2, 2)
