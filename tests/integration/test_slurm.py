"""dser on a real one-node Slurm cluster: slurm/*.sh, ``dser submit`` and ``dser report``.

The session fixture ``slurm`` (slurm_cluster.py) installs Debian's slurm-wlm and munge if they
are missing, starts munged, slurmctld and slurmd on this machine and stops them at the end.
Every job runs the real recipe on the demo corpora (small) with the tiny backbone: 2 CPU
ranks per training job (``--gpus-per-node=0 --ntasks-per-node=2``), a few steps.

1. ``sbatch --wait slurm/cross_corpus.sh GRID`` (a YAML grid): shard array job, stage 1,
   stage 2 after it, the report; every run's metrics.json; ``dser report`` from the command line.
1b. ``sbatch slurm/cross_corpus.sh`` with no argument from a fresh ``git clone``: the driver logs
   to the clone's slurm/logs, the shipped slurm/grid.yaml is read and checked, its shard tasks
   run (logging there too) and its stage-1 and stage-2 jobs are queued (held, then cancelled).
2. ``dser submit`` (stage 1 + dependent stage 2), with stage 1 preempted by SIGUSR1 halfway:
   it checkpoints, requeues itself and resumes; stage 2 starts only after it has finished.
3. ``dser submit`` whose stage 1 fails: stage 2 never starts (cancelled, no run directory).
3b. ``dser submit`` whose rank 0 cannot start (its rendezvous port is taken): the job fails at
   once, with the error, instead of requeueing itself as if preempted.
4. ``dser submit`` that sbatch refuses: one line naming the job, nothing queued.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures_shards import write_demo_shards, write_test_shards

from slurm_cluster import FINAL_STATES, slurm  # noqa: F401  (the session fixture: a started cluster)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "slurm"
CPU_JOB = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"]
SHORT = ["optim.max_steps=10", "optim.warmup_steps=2", "train.eval_every=10", "train.save_every=5",
         "train.progress=false"]

GRID = f"""\
name: grid
corpora:
  demo-acted:   {{reader: synth-acted, root: data/acted, train: [train], valid: [valid], test: [test],
                 shard: {{max-shard-samples: 8}}}}
  demo-natural: {{reader: synth-natural, root: data/natural, train: [train], valid: [valid], test: [test],
                 shard: {{max-shard-samples: 8}}}}
sources: [demo-acted]
targets: [demo-natural]
stage1_config: dser/configs/demo_stage1.yaml
stage2_config: dser/configs/demo_stage2.yaml
set: [{', '.join(SHORT)}]
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The jobs' working directory: shards/, data/, runs/ and logs/ go here, not into the repo."""
    root = tmp_path_factory.mktemp("slurm_work")
    (root / "logs").mkdir()
    (root / "grid.yaml").write_text(GRID)
    return root


@pytest.fixture(scope="module")
def demo_shards(workdir) -> Path:
    """shards/demo-{acted,natural} in workdir (made by test 1's shard jobs, else here)."""
    return write_demo_shards(workdir) / "shards"


def job_env(slurm, workdir: Path, **extra: str) -> dict:
    """Environment for sbatch/dser submit: this cluster, this checkout and venv, logs in workdir."""
    env = slurm.env()
    env.update(HF_HUB_OFFLINE="1", LOGS_DIR=str(workdir / "logs"), PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + (f":{env['PYTHONPATH']}" if env.get("PYTHONPATH") else ""))
    if (Path(sys.prefix) / "bin" / "python").exists():
        env["DSER_VENV"] = sys.prefix  # the jobs use this test's Python
    env.update(extra)
    return env


def dser(*args: str, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dser.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def logs(workdir: Path, lines: int = 40) -> str:
    """The tails of every job log (for failure messages)."""
    out = []
    for f in sorted((workdir / "logs").glob("*.out")):
        text = [ln for ln in f.read_text(errors="replace").splitlines() if "Warning" not in ln]
        out.append(f"--- {f.name}\n" + "\n".join(text[-lines:]))
    return "\n".join(out)


def when(info: dict, key: str) -> dt.datetime:
    return dt.datetime.fromisoformat(info[key])


def assert_started_after_success(child: dict, parent: dict) -> None:
    """``child`` was queued while ``parent`` still ran, yet started only after it succeeded."""
    assert parent["JobState"] == "COMPLETED" and parent["ExitCode"] == "0:0", parent
    assert when(child, "SubmitTime") < when(parent, "EndTime"), (child, parent)
    assert when(child, "StartTime") >= when(parent, "EndTime"), (child, parent)


def submitted_ids(stdout: str) -> dict[str, str]:
    """``dser submit``'s table → {"stage 1 …": job id, "stage 2 …": job id}."""
    ids = {}
    for line in stdout.splitlines():
        parts = line.split()
        if parts and parts[0].isdigit() and len(parts) > 2 and parts[1] == "stage":
            ids[f"stage {parts[2]}"] = parts[0]
    return ids


def test_cross_corpus_grid_with_sbatch_wait(slurm, workdir):
    env = job_env(slurm, workdir, SYNTH_ARGS="--utterances 96 --speakers 6", STAGE_SBATCH=" ".join(CPU_JOB),
                  SHARD_SBATCH="--cpus-per-task=1", GRID_POLL="2")
    r = subprocess.run(["sbatch", "--parsable", "--wait", f"--output={workdir / 'logs' / 'grid-%j.out'}",
                        str(SLURM_DIR / "cross_corpus.sh"), "grid.yaml"],
                       cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    driver = r.stdout.strip().split(";")[0]
    log = (workdir / "logs" / f"grid-{driver}.out").read_text()
    assert r.returncode == 0, f"{r.stderr}\n{log}\n{logs(workdir)}"

    # each job waited for the one it depends on, and only started once that one succeeded
    jobs = slurm.jobs()
    shard_tasks = [j for j in jobs if j["JobName"] == "dser-shard"]
    (s1,) = [j for j in jobs if j["JobName"] == "dser-s1-demo-acted"]
    (s2,) = [j for j in jobs if j["JobName"] == "dser-s2-demo-acted-to-demo-natural"]
    assert sorted(t["ArrayTaskId"] for t in shard_tasks) == ["0", "1"]
    for task in shard_tasks:
        assert_started_after_success(s1, task)
    assert_started_after_success(s2, s1)
    assert s2["JobState"] == "COMPLETED"

    # every run wrote metrics.json, trained on its corpus, evaluated on every test set
    runs = workdir / "runs" / "grid"
    m1 = json.loads((runs / "stage1-demo-acted" / "metrics.json").read_text())
    m2 = json.loads((runs / "stage2-demo-acted-to-demo-natural" / "metrics.json").read_text())
    assert (m1["stage"], m1["steps"], m2["stage"], m2["steps"]) == (1, 10, 2, 10)
    assert m1["config"]["data"]["train"] == ["shards/demo-acted/train"]
    assert m2["config"]["data"]["train"] == ["shards/demo-natural/train"]
    assert (workdir / m2["init_from"]).resolve() == (runs / "stage1-demo-acted").resolve()
    assert set(m1["eval"]) == set(m2["eval"]) == {"demo-acted", "demo-natural"}
    assert (m2["config"]["source"], m2["config"]["target"]) == ("demo-acted", "demo-natural")
    for m in (m1, m2):
        assert all(e["samples"] == 16 for e in m["eval"].values())
        # srun starts the ranks with no parent process resolving anything: rank 0 decided
        assert m["precision_reason"].startswith("auto: ") and m["precision"] == m1["precision"]

    # the grid job printed the report; dser report writes the table and the heatmap
    assert "| demo-acted | demo-natural |" in log and "dser: grid complete" in log
    rep = dser("report", "runs/grid", "--out", "report", cwd=workdir, env=env)
    assert rep.returncode == 0, rep.stderr
    assert "| demo-acted | demo-natural |" in rep.stdout
    (row,) = list(csv.DictReader((workdir / "report" / "report.csv").read_text().splitlines()))
    ua = {(stage, name): m["eval"][name]["ua"] for stage, m in ((1, m1), (2, m2)) for name in m["eval"]}
    assert float(row["stage1_source_ua"]) == pytest.approx(ua[1, "demo-acted"], abs=1e-6)
    assert float(row["stage2_target_ua"]) == pytest.approx(ua[2, "demo-natural"], abs=1e-6)
    assert float(row["target_gain_ua"]) == pytest.approx(ua[2, "demo-natural"] - ua[1, "demo-natural"], abs=1e-6)
    assert row["stage1_precision"] == row["stage2_precision"] == m1["precision"]
    assert "target_gain.png" in (workdir / "report" / "report.md").read_text()
    import matplotlib.image
    img = matplotlib.image.imread(workdir / "report" / "target_gain.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_cross_corpus_without_arguments_from_a_fresh_clone(slurm, tmp_path):
    """``git clone …; sbatch slurm/cross_corpus.sh``: committed work only, no LOGS_DIR, no
    --output; the driver logs to the clone's slurm/logs (its #SBATCH line), reads the shipped
    grid and queues its jobs; the shard tasks run and log there too (training jobs held, then
    cancelled: training is test 1's)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, capture_output=True, timeout=120)
    assert not list((clone / "slurm" / "logs").glob("*.out"))
    env = job_env(slurm, tmp_path, GRID_WAIT="0", SYNTH_ARGS="--utterances 48 --speakers 4",
                  STAGE_SBATCH=" ".join(["--hold", *CPU_JOB]), SHARD_SBATCH="--cpus-per-task=1")
    for var in ("LOGS_DIR", "PYTHONPATH"):  # as a user submits it: the clone's own paths and code
        env.pop(var)
    r = subprocess.run(["sbatch", "--parsable", "--wait", "slurm/cross_corpus.sh"], cwd=clone, env=env,
                       capture_output=True, text=True, timeout=300)
    driver = r.stdout.strip().split(";")[0]
    logs_dir = clone / "slurm" / "logs"
    driver_log = logs_dir / f"dser-grid-{driver}.out"
    assert driver_log.is_file(), f"{r.returncode} {r.stderr}\n{slurm.job(driver) if driver else ''}"
    log = driver_log.read_text()
    ids = {" ".join(line.split()[1:3]): line.split()[0] for line in log.splitlines()
           if line.split() and line.split()[0].isdigit()}
    try:
        assert r.returncode == 0, f"{r.stderr}\n{log}"
        assert f"grid cross-corpus ({clone / 'slurm' / 'grid.yaml'})" in log and "checked: the grid and the config" in log
        assert "dser: submitted 3 jobs; afterwards: dser report runs/cross-corpus" in log
        shard, s1, s2 = (slurm.job(ids[k]) for k in ("shard demo-acted", "stage 1", "stage 2"))
        assert shard["JobName"] == "dser-shard"  # an array: its two tasks are checked below
        assert s1["JobName"] == "dser-s1-demo-acted" and f"afterok:{ids['shard demo-acted']}" in s1["Dependency"]
        assert s2["JobName"] == "dser-s2-demo-acted-to-demo-natural" and f"afterok:{ids['stage 1']}" in s2["Dependency"]
        assert s1["JobState"] == s2["JobState"] == "PENDING"
        deadline = time.monotonic() + 300
        while True:  # the array's tasks, once each has ended
            done = {j["JobId"]: j for j in slurm.jobs() if j.get("ArrayJobId") == ids["shard demo-acted"]}
            if len(done) == 2 and all(j["JobState"] in FINAL_STATES for j in done.values()):
                break
            assert time.monotonic() < deadline, done
            time.sleep(2)
        shard_logs = sorted(p.name for p in logs_dir.glob(f"dser-shard-{ids['shard demo-acted']}_*.out"))
        assert all(j["JobState"] == "COMPLETED" for j in done.values()), f"{done}\n{logs(clone / 'slurm')}"
        assert shard_logs == [f"dser-shard-{ids['shard demo-acted']}_{i}.out" for i in (0, 1)]
        for corpus in ("demo-acted", "demo-natural"):
            assert json.loads((clone / "shards" / corpus / "index.json").read_text())["format"] == "dser-shards/2"
    finally:
        if ids:
            slurm.run(["scancel", *ids.values()], check=False)
    assert not list((clone / "runs" / "cross-corpus").iterdir())
    # the logs are the user's, not the repository's
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    assert "slurm/logs" not in status, status


def test_dser_submit_stage2_after_stage1_which_resumes_after_preemption(slurm, workdir, demo_shards):
    env = job_env(slurm, workdir)
    sets = [a for o in [*SHORT, "optim.max_steps=20"] for a in ("--set", o)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dser.cli", "submit", "--stage1", str(REPO / "dser/configs/demo_stage1.yaml"),
         "--stage2", str(REPO / "dser/configs/demo_stage2.yaml"), "--gpus-per-node", "0", "--ntasks-per-node", "2",
         "--cpus-per-task", "1", "--runs-dir", "runs", "--name", "submitted", *sets, "--wait", "--poll", "1"],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        head = []
        while len(submitted_ids("\n".join(head))) < 2:
            line = proc.stdout.readline()
            assert line, "dser submit ended before printing its jobs:\n" + "\n".join(head)
            head.append(line)
        ids = submitted_ids("\n".join(head))
        run1 = workdir / "runs" / "submitted" / "stage1"

        # preempt stage 1 once its first checkpoint exists: the ranks get SIGUSR1, as from --signal
        deadline = time.monotonic() + 300
        while not (run1 / "checkpoints" / "latest").is_file():
            assert time.monotonic() < deadline and proc.poll() is None, logs(workdir)
            time.sleep(0.5)
        slurm.run(["scancel", "--signal=USR1", ids["stage 1"]])
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(head) + out
    assert proc.returncode == 0, f"{out}\n{logs(workdir)}"

    s1, s2 = slurm.job(ids["stage 1"]), slurm.job(ids["stage 2"])
    assert s1["Restarts"] == "1", s1
    assert_started_after_success(s2, s1)
    log1 = (workdir / "logs" / f"dser-s1-demo-stage1-{ids['stage 1']}.out").read_text()
    assert "requeueing job" in log1 and "restart 1" in log1
    assert f"resumed from {run1.relative_to(workdir)}" in log1
    m1 = json.loads((run1 / "metrics.json").read_text())
    # the requeued job kept the precision the run started in
    assert m1["precision_reason"].startswith("kept from the run's start: auto: ")
    assert f"precision: {m1['precision']} (auto: " in log1 and f"precision: {m1['precision']} (kept from" in log1
    m2 = json.loads((workdir / "runs" / "submitted" / "stage2" / "metrics.json").read_text())
    assert m1["steps"] == m2["steps"] == 20
    assert (workdir / m2["init_from"]).resolve() == run1.resolve()

    rep = dser("report", "runs/submitted", cwd=workdir, env=env)
    assert rep.returncode == 0, rep.stderr
    assert "| acted | natural |" in rep.stdout
    assert (workdir / "runs" / "submitted" / "target_gain.png").is_file()


def test_stage2_never_starts_when_stage1_fails(slurm, workdir, demo_shards):
    env = job_env(slurm, workdir)
    # Training clips that are not FLAC, and no bad sample allowed: the run starts (its directory
    # exists) and fails on its first batch. (What files tell, dser submit checks: a missing shard
    # group, or one shard for two ranks, would never be queued.)
    write_test_shards(workdir / "shards" / "corrupt", 16, 2, group="train", corrupt={3, 11})
    sets = [a for o in [*SHORT, f"data.train=[{workdir / 'shards' / 'corrupt' / 'train'}]",
                        "train.max_bad_samples=0"] for a in ("--set", o)]
    r = dser("submit", "--stage1", str(REPO / "dser/configs/demo_stage1.yaml"),
             "--stage2", str(REPO / "dser/configs/demo_stage2.yaml"), *CPU_JOB, "--runs-dir", "runs",
             "--name", "broken", *sets, "--wait", "--poll", "1", cwd=workdir, env=env)
    assert r.returncode == 1, f"{r.stdout}\n{r.stderr}\n{logs(workdir)}"
    ids = submitted_ids(r.stdout)
    s1, s2 = slurm.job(ids["stage 1"]), slurm.job(ids["stage 2"])
    assert s1["JobState"] == "FAILED"
    (log1,) = (workdir / "logs").glob(f"*-{ids['stage 1']}.out")
    assert "corrupt training samples skipped, more than train.max_bad_samples=0" in log1.read_text()
    assert s2["JobState"] == "CANCELLED" and "can never start" in r.stdout
    assert not (workdir / "runs" / "broken" / "stage2").exists()
    assert not list((workdir / "logs").glob(f"*-{ids['stage 2']}.out"))

    rep = dser("report", "runs/broken", cwd=workdir, env=env)
    assert rep.returncode == 0, rep.stderr
    assert "runs not in the table (1)" in rep.stdout and "no metrics.json" in rep.stdout


def test_a_rank_that_cannot_start_fails_the_job_at_once(slurm, workdir, demo_shards):
    # Rank 0 cannot listen on the rendezvous port (held here): it exits 1 and srun ends rank 1
    # with SIGTERM, which srun may report as 143, a preemption's status. No rank stopped at a
    # checkpoint, so the job fails at once instead of requeueing itself until
    # DSER_MAX_REQUEUES (kept low here so that a regression ends soon).
    with socket.create_server(("", 0)) as held:
        port = held.getsockname()[1]
        env = job_env(slurm, workdir, MASTER_PORT=str(port), DSER_MAX_REQUEUES="2")
        r = dser("submit", "--stage1", str(REPO / "dser/configs/demo_stage1.yaml"),
                 "--stage2", str(REPO / "dser/configs/demo_stage2.yaml"), *CPU_JOB, "--runs-dir", "runs",
                 "--name", "no-port", *[a for o in SHORT for a in ("--set", o)], "--wait", "--poll", "1",
                 cwd=workdir, env=env)
    assert r.returncode == 1, f"{r.stdout}\n{r.stderr}\n{logs(workdir)}"
    ids = submitted_ids(r.stdout)
    s1 = slurm.job(ids["stage 1"])
    (log1,) = (workdir / "logs").glob(f"*-{ids['stage 1']}.out")
    text = log1.read_text()
    assert s1["JobState"] == "FAILED" and s1["Restarts"] == "0", (s1, text)
    assert "EADDRINUSE" in text and "no rank stopped at a checkpoint" in text, text
    assert "requeueing" not in text, text
    assert slurm.job(ids["stage 2"])["JobState"] == "CANCELLED"


def test_sbatch_refusal_is_one_line_naming_the_job(slurm, workdir, demo_shards):  # the shards submit checks
    r = dser("submit", "--stage1", str(REPO / "dser/configs/demo_stage1.yaml"),
             "--stage2", str(REPO / "dser/configs/demo_stage2.yaml"), *CPU_JOB, "--partition", "no-such-partition",
             "--runs-dir", "runs", "--name", "refused", cwd=workdir, env=job_env(slurm, workdir))
    assert r.returncode != 0
    assert r.stderr.startswith("Error: sbatch failed for stage 1 demo-stage1:") and "partition" in r.stderr
    assert "Traceback" not in r.stderr
