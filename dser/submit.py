"""Submit dser's two stages, or a whole cross-corpus grid, to Slurm: what ``dser submit`` does.

It builds the jobs from the scripts in ``slurm/``, with resources from options (those not
given: the scripts' ``#SBATCH`` defaults):

    [dser-shard]   slurm/shard.sh, an array job over grid corpora whose shards are missing
    dser-s1-…      slurm/stage1.sh RUN_DIR CONFIG --set …                  (after the shards)
    dser-s2-…      slurm/stage2.sh RUN_DIR CONFIG STAGE1_RUN_DIR --set …   --dependency=afterok:<stage 1>

submits them with ``sbatch`` in that order, and prints each job's id, run directory and log.
Configs are resolved (their keys checked) by ``plan_jobs``, and ``check_plan`` checks every run
as far as files tell before anything is queued (``dser.startup.check_planned_run``: shard groups
that exist, label sets, the backbone, stage 2 against its stage-1 config, the ranks the options
ask for), each problem one line. ``--dry-run`` prints the sbatch commands instead, as a shell
script that would submit the same jobs.

Usage::

    resources = Resources(gpus_per_node=0, ntasks_per_node=2, cpus_per_task=1)
    jobs = plan_jobs(Path("dser/configs/demo_stage1.yaml"), Path("dser/configs/demo_stage2.yaml"),
                     resources=resources)
    notes = check_plan(jobs, resources)      # raises ConfigProblems, one line each
    print(format_dry_run(jobs))              # or:
    ids = submit_jobs(jobs)                  # job key -> Slurm job id
    print(format_submitted(jobs, ids))

    grid = load_grid(Path("slurm/grid.yaml"))  # the grid file cross_corpus.sh reads
    jobs = plan_jobs(None, None, grid=grid)  # its stage1_config and stage2_config

A grid file is data (YAML), never executed: :mod:`dser.grid` reads and checks it. This is the
one Slurm planner: ``slurm/cross_corpus.sh`` calls ``dser submit --grid`` (its STAGE_SBATCH
and SHARD_SBATCH become ``Resources.stage_extra`` / ``shard_extra``), so the script and
``--dry-run`` submit the same jobs. ``--wait`` ends with :func:`job_results`: each job judged
by its outputs.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from dser.grid import Grid, GridError, config_path, load_grid, run_overrides  # noqa: F401  (re-exported too)
from dser.runconfig import RunConfig, resolve_config

CHECKOUT = Path(__file__).resolve().parent.parent  # holds dser/: a checkout, or site-packages
# Package data (pyproject.toml): in a checkout dser/slurm links to the top-level slurm/, so resolve
# it to the scripts users submit (and slurm/cross_corpus.sh names); installed, a real directory.
SLURM_DIR = (Path(__file__).resolve().parent / "slurm").resolve()


class SubmitError(RuntimeError):
    """sbatch failed; the message says which command and why."""


# ------------------------------------------------------------------------------------------
# resources
# ------------------------------------------------------------------------------------------

@dataclass
class Resources:
    """What each job asks Slurm for; None (or empty): the script's ``#SBATCH`` default.

    Without any of nodes, gpus_per_node and ntasks_per_node, a training job takes the
    scripts' defaults (slurm/stage1.sh: one node, one GPU, one rank); with any of them, all
    three are passed (nodes 1 and one GPU unless given, one rank per GPU).

    Attributes:
        nodes: nodes per training job.
        gpus_per_node: GPUs per node; 0 trains on CPUs (ranks = tasks).
        ntasks_per_node: ranks per node; default one per GPU, or 1 without GPUs.
        cpus_per_task: CPUs per rank (data-loader workers, OpenMP threads).
        time: time limit per job (``HH:MM:SS``, ``D-HH:MM:SS``).
        partition: Slurm partition.
        account: Slurm account.
        extra: further sbatch options for every job, verbatim (``--qos=high``).
        stage_extra: further sbatch options for the training jobs only (cross_corpus.sh's
            ``STAGE_SBATCH``), after all the others.
        shard_extra: the same for the shard tasks (``SHARD_SBATCH``).
    """

    nodes: int | None = None
    gpus_per_node: int | None = None
    ntasks_per_node: int | None = None
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    extra: list[str] = field(default_factory=list)
    stage_extra: list[str] = field(default_factory=list)
    shard_extra: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.nodes is not None and self.nodes < 1:
            raise ValueError(f"--nodes {self.nodes}: needs at least 1")
        if self.gpus_per_node is not None and self.gpus_per_node < 0:
            raise ValueError(f"--gpus-per-node {self.gpus_per_node}: must be 0 (CPU) or more")
        gpus = 1 if self.gpus_per_node is None else self.gpus_per_node  # stage1.sh's default
        if self.ntasks_per_node is not None and gpus and self.ntasks_per_node != gpus:
            raise ValueError(f"--ntasks-per-node {self.ntasks_per_node} with --gpus-per-node {gpus}: "
                             f"dser runs one rank per GPU; leave --ntasks-per-node out (or give --gpus-per-node 0 "
                             f"to train on CPUs)")

    def common_options(self) -> list[str]:
        """Options every job gets (time, partition, account, extras)."""
        out = []
        for flag, value in (("--time", self.time), ("--partition", self.partition), ("--account", self.account)):
            if value:
                out.append(f"{flag}={value}")
        return out + list(self.extra)

    def training_options(self) -> list[str]:
        """sbatch options of a training job: nodes, one rank per GPU (or tasks), CPUs, …"""
        out = []
        if (self.nodes, self.gpus_per_node, self.ntasks_per_node) != (None, None, None):
            gpus = 1 if self.gpus_per_node is None else self.gpus_per_node
            tasks = self.ntasks_per_node or gpus or 1
            out = [f"--nodes={self.nodes or 1}", f"--ntasks-per-node={tasks}", f"--gpus-per-node={gpus}"]
        if self.cpus_per_task:
            out.append(f"--cpus-per-task={self.cpus_per_task}")
        return out + self.common_options() + list(self.stage_extra)

    def training_shape(self) -> tuple[int | None, int | None]:
        """How many ranks a training job has and how many GPUs per node, as far as the options
        say (the start-up checks' world size and device); None where they do not.

        sbatch words (``extra``, ``stage_extra``) win over the fields: they come last on its
        command line. Nodes given nowhere are ``SBATCH_NODES`` or the scripts' one; tasks per node
        given nowhere are the GPUs per node (``slurm/launch.sh`` refuses any other count). With
        no word on tasks or GPUs at all, the ranks are unknown.
        """
        given: dict[str, int | None] = {}
        if (self.nodes, self.gpus_per_node, self.ntasks_per_node) != (None, None, None):
            gpus = 1 if self.gpus_per_node is None else self.gpus_per_node
            given = {"nodes": self.nodes or 1, "gpus-per-node": gpus, "ntasks-per-node": self.ntasks_per_node or gpus or 1}
        words = [*self.extra, *self.stage_extra]
        for i, word in enumerate(words):
            for option in ("nodes", "gpus-per-node", "ntasks-per-node"):
                if word.startswith(f"--{option}="):
                    value = word.split("=", 1)[1]
                elif word in (f"--{option}", *(("-N",) if option == "nodes" else ())) and i + 1 < len(words):
                    value = words[i + 1]
                else:
                    continue
                given[option] = int(value) if value.isdigit() else None  # a range (2-4), a GPU type (a100:4): unknown
        gpus = given.get("gpus-per-node")
        if "ntasks-per-node" not in given and "gpus-per-node" not in given:
            return None, gpus
        tasks = given["ntasks-per-node"] if "ntasks-per-node" in given else (gpus or 1 if gpus is not None else None)
        env_nodes = os.environ.get("SBATCH_NODES", "1")
        nodes = given["nodes"] if "nodes" in given else (int(env_nodes) if env_nodes.isdigit() else None)
        return (nodes * tasks if nodes is not None and tasks is not None else None), gpus

    def shard_options(self) -> list[str]:
        """sbatch options of a shard task (one task; CPUs as for a rank)."""
        out = [f"--cpus-per-task={self.cpus_per_task}"] if self.cpus_per_task else []
        return out + self.common_options() + list(self.shard_extra)


# ------------------------------------------------------------------------------------------
# the plan: which jobs, with which arguments, after which
# ------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One sbatch submission.

    Attributes:
        key: a shell-variable-safe name (``stage1_demo_acted``), also used for dependencies.
        what: one line for people (``stage 2 demo-acted -> demo-natural``).
        script: the slurm/ script.
        args: the script's arguments.
        options: sbatch options, except the dependency.
        after: keys of the jobs that must succeed first (``--dependency=afterok``).
        output: where its run writes (a run directory; the shards directory for sharding).
        log: its Slurm log (with ``%j``/``%A``/``%a`` still in it).
        corpora: for the shard job, the corpora it shards (``output/NAME/index.json`` each).
        stage: a training job's stage (None for the shard job).
        config: a training job's resolved run config, overrides applied (``check_plan`` reads it).
    """

    key: str
    what: str
    script: Path
    args: list[str]
    options: list[str]
    after: list[str]
    output: Path
    log: str
    corpora: list[str] = field(default_factory=list)
    stage: int | None = None
    config: RunConfig | None = None


def _key(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9]+", "_", p).strip("_") for p in parts)


def default_logs_dir(scripts_dir: Path) -> Path:
    """A checkout's ``slurm/logs`` (in the repository), else ``slurm/logs`` in the working
    directory: an installed dser's scripts live in site-packages, no place for logs."""
    logs = Path(scripts_dir) / "logs"
    return logs if logs.is_dir() else Path("slurm/logs")


def plan_jobs(stage1_config: Path | None, stage2_config: Path | None, *, grid: Grid | None = None,
              resources: Resources | None = None, overrides: list[str] = (), runs_dir: Path | None = None,
              name: str | None = None, shards_dir: Path | None = None, scripts_dir: Path = SLURM_DIR,
              logs_dir: Path | None = None, stamp: str | None = None) -> list[Job]:
    """The jobs ``dser submit`` would submit, in submission order; every config is checked.

    Without a grid: one stage-1 job on ``stage1_config`` and one stage-2 job on
    ``stage2_config`` that starts from it. With a grid: shards for corpora that lack them, a
    stage-1 job per source and a stage-2 job per (source, target), each with data, test sets,
    source, target and rehearsal set as ``slurm/cross_corpus.sh`` sets them.

    Args:
        stage1_config: stage-1 run config (with a grid: default the grid's stage1_config).
        stage2_config: stage-2 run config (with a grid: default the grid's stage2_config).
        grid: a grid from :func:`load_grid`, or None.
        resources: what each training job asks for.
        overrides: ``KEY=VALUE`` config overrides for both stages (after the grid's).
        runs_dir: where run directories go (default: the stage-1 config's ``runs_dir``;
            with a grid, ``$RUNS_DIR`` or ``runs``).
        name: the run group: runs go to ``runs_dir/NAME/…`` (default: with a grid its
            name, else ``runs_dir/<config name>-<time>`` per stage).
        shards_dir: where grid corpora are sharded (default ``$SHARDS_DIR`` or ``shards``).
        scripts_dir: the slurm/ directory with the scripts.
        logs_dir: where Slurm logs go (default ``$LOGS_DIR``, else a checkout's
            ``scripts_dir/logs``, else ``slurm/logs`` here; as in slurm/env.sh).
        stamp: the time stamp in run names (default: now).

    Raises:
        ValueError: missing configs, or a config error (``dser.config.ConfigError``) naming the key.
    """
    resources = resources or Resources()
    scripts_dir = Path(scripts_dir)
    logs_dir = Path(logs_dir or os.environ.get("LOGS_DIR") or default_logs_dir(scripts_dir))
    stamp = stamp or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    overrides = list(overrides)
    if grid is not None:
        stage1_config = stage1_config or grid.stage1_config
        stage2_config = stage2_config or grid.stage2_config
    if not stage1_config or not stage2_config:
        raise ValueError("give both --stage1 CONFIG and --stage2 CONFIG (or a --grid whose file sets "
                         "stage1_config and stage2_config)")
    cfg1_path, cfg2_path = config_path(stage1_config), config_path(stage2_config)
    train_opts = resources.training_options()

    def job(key, what, job_name, script, args, after, output, config=None):
        log = str(logs_dir / "%x-%j.out") if script.name != "shard.sh" else str(logs_dir / "%x-%A_%a.out")
        opts = [f"--job-name={job_name}", f"--output={log}"]
        opts += resources.shard_options() if script.name == "shard.sh" else train_opts
        stage = {"stage1.sh": 1, "stage2.sh": 2}.get(script.name)
        return Job(key, what, script, args, opts, after, output, log.replace("%x", job_name), stage=stage,
                   config=config)

    if grid is None:
        cfg1 = resolve_config(cfg1_path, overrides, stage=1)
        cfg2 = resolve_config(cfg2_path, overrides, stage=2)
        root = Path(runs_dir) if runs_dir else Path(cfg1.runs_dir)
        run1 = root / name / "stage1" if name else root / f"{cfg1.name}-{stamp}"
        run2 = root / name / "stage2" if name else Path(runs_dir or cfg2.runs_dir) / f"{cfg2.name}-{stamp}"
        sets = [a for o in overrides for a in ("--set", o)]
        return [
            job("stage1", f"stage 1 {cfg1.name}", f"dser-s1-{cfg1.name}", scripts_dir / "stage1.sh",
                [str(run1), str(cfg1_path), *sets], [], run1, cfg1),
            job("stage2", f"stage 2 {cfg2.name}", f"dser-s2-{cfg2.name}", scripts_dir / "stage2.sh",
                [str(run2), str(cfg2_path), str(run1), *sets], ["stage1"], run2, cfg2),
        ]

    shards = Path(shards_dir or os.environ.get("SHARDS_DIR") or "shards")
    root = Path(runs_dir or os.environ.get("RUNS_DIR") or "runs") / (name or grid.name)

    jobs: list[Job] = []
    names = list(grid.corpora)
    need = [i for i, c in enumerate(names) if not (shards / c / "index.json").is_file()]
    after_shards = []
    if need:
        jobs.append(job("shard", "shard " + " ".join(names[i] for i in need), "dser-shard",
                        scripts_dir / "shard.sh", [str(grid.path.absolute())], [], shards))
        jobs[-1].options.insert(0, "--array=" + ",".join(map(str, need)))
        jobs[-1].corpora = [names[i] for i in need]
        after_shards = ["shard"]
    for s in grid.sources:
        sets = [*run_overrides(grid, shards, s), *overrides]
        cfg1 = resolve_config(cfg1_path, sets, stage=1)
        run1 = root / f"stage1-{s}"
        jobs.append(job(_key("stage1", s), f"stage 1 {s}", f"dser-s1-{s}", scripts_dir / "stage1.sh",
                        [str(run1), str(cfg1_path), *(a for o in sets for a in ("--set", o))], after_shards, run1,
                        cfg1))
    for s in grid.sources:
        for t in grid.targets:
            if s == t:
                continue
            sets = [*run_overrides(grid, shards, s, t), *overrides]
            cfg2 = resolve_config(cfg2_path, sets, stage=2)
            run2 = root / f"stage2-{s}-to-{t}"
            jobs.append(job(_key("stage2", s, "to", t), f"stage 2 {s} -> {t}", f"dser-s2-{s}-to-{t}",
                            scripts_dir / "stage2.sh",
                            [str(run2), str(cfg2_path), str(root / f"stage1-{s}"),
                             *(a for o in sets for a in ("--set", o))], [_key("stage1", s)], run2, cfg2))
    return jobs


def check_plan(jobs: list[Job], resources: Resources | None = None) -> list[str]:
    """Check every run of a plan as far as this machine can, before anything is queued
    (``dser.startup.check_planned_run``: schedule, DeepSpeed file, stage 2's head against its
    stage-1 config, shard groups, label sets, the backbone by its files, and the ranks where
    ``resources`` say how many). Shard groups that the plan's shard job writes are not checked;
    no stage-1 run is required. Imports no torch.

    Returns:
        Lines to print (``warning: …``, ``note: …``), each once.

    Raises:
        ConfigProblems: one line per problem, naming the first run it is found in (and how many
            more have it) and the config key.
    """
    from dser.startup import ConfigProblems, check_planned_run

    world, gpus = (resources or Resources()).training_shape()
    pending = [j.output / c for j in jobs for c in j.corpora]
    configs = {j.key: j.config for j in jobs}
    found: dict[str, list[str]] = {}
    notes: list[str] = []
    for j in jobs:
        if j.config is None:
            continue
        stage1 = configs.get(j.after[0]) if j.stage == 2 and j.after else None
        try:
            lines = check_planned_run(j.config, j.stage, stage1=stage1, world_size=world, gpus=gpus,
                                      pending=pending)
        except ConfigProblems as e:
            for p in e.problems:
                found.setdefault(p, []).append(j.what)
            continue
        notes += [n for n in lines if n not in notes]
    if found:
        raise ConfigProblems([f"{runs[0]}{f' (and {len(runs) - 1} more)' if len(runs) > 1 else ''}: {p}"
                              for p, runs in found.items()])
    return notes


# ------------------------------------------------------------------------------------------
# sbatch
# ------------------------------------------------------------------------------------------

def sbatch_command(job: Job, ids: dict[str, str]) -> list[str]:
    """The sbatch command line of ``job``; ``ids`` maps the keys it waits for to job ids."""
    dep = [f"--dependency=afterok:{':'.join(ids[k] for k in job.after)}"] if job.after else []
    return ["sbatch", "--parsable", *dep, *job.options, str(job.script), *job.args]


def format_dry_run(jobs: list[Job]) -> str:
    """The sbatch commands as a shell script: each job id goes into a variable named by its key."""
    lines = ["# dser submit --dry-run: these commands submit the jobs (each prints its job id)"]
    for j in jobs:
        # ${id%%;*}: `sbatch --parsable` answers "id;cluster" on multi-cluster sites
        cmd = sbatch_command(j, {k: f"${{{k}%%;*}}" for k in j.after})
        quoted = " ".join(a if a.startswith("--dependency=afterok:$") else shlex.quote(a) for a in cmd)
        lines.append(f"# {j.what}: {j.output}")
        lines.append(f"{j.key}=$({quoted})")
    return "\n".join(lines)


def submit_jobs(jobs: list[Job], env: dict | None = None, logs: bool = True) -> dict[str, str]:
    """Submit ``jobs`` in order with sbatch; returns job key -> Slurm job id.

    If one submission fails, the jobs already submitted are cancelled (no half grids).

    Raises:
        SubmitError: sbatch missing or failing (its message included).
    """
    ids: dict[str, str] = {}
    for j in jobs:
        if logs:
            Path(j.log).parent.mkdir(parents=True, exist_ok=True)
        cmd = sbatch_command(j, ids)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        except FileNotFoundError as e:
            raise SubmitError("sbatch not found: run dser submit where Slurm's commands are (a login node)") from e
        if r.returncode != 0:
            if ids:
                subprocess.run(["scancel", *ids.values()], capture_output=True, env=env)
            cancelled = f"; cancelled the {len(ids)} job(s) submitted before it" if ids else ""
            raise SubmitError(f"sbatch failed for {j.what}: {r.stderr.strip() or r.stdout.strip()}{cancelled}")
        ids[j.key] = r.stdout.strip().split(";")[0]
    return ids


def format_submitted(jobs: list[Job], ids: dict[str, str]) -> str:
    """One line per submitted job: id, what, after which job, run directory, log."""
    rows = [("JOB", "WHAT", "AFTER", "WRITES TO", "LOG")]
    for j in jobs:
        jid = ids[j.key]
        log = j.log.replace("%j", jid).replace("%A", jid).replace("%a", "*")
        rows.append((jid, j.what, ",".join(ids[k] for k in j.after) or "-", str(j.output), log))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)


def runs_root(jobs: list[Job]) -> Path:
    """The directory holding every run directory of ``jobs`` (what to give ``dser report``)."""
    runs = [j.output for j in jobs if j.script.name != "shard.sh"]
    return Path(os.path.commonpath([str(r.parent) for r in runs])) if runs else Path(".")


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def job_states(job_id: str, env: dict | None = None) -> list[tuple[str, str, str]]:
    """(job id, state, reason) of a job, one per array task (empty once Slurm forgot it)."""
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, env=env)
    out = []
    for line in r.stdout.splitlines():
        get = dict(re.findall(r"(?:^|\s)(JobId|JobState|Reason|ArrayTaskId)=(\S+)", line))
        if "JobId" in get:
            out.append((get["JobId"], get.get("JobState", "?"), get.get("Reason", "")))
    return out


def wait_for_jobs(ids: dict[str, str], poll: float = 30.0, env: dict | None = None,
                  echo=print) -> dict[str, list[str]]:
    """Wait until every job has ended; cancel those whose dependency failed (they never start).

    Returns:
        job key -> final states (one per array task).
    """
    while True:
        states, live = {}, False
        for key, jid in ids.items():
            states[key] = []
            for task, state, reason in job_states(jid, env):
                if state == "PENDING" and reason == "DependencyNeverSatisfied":
                    echo(f"job {task} can never start (a job it depends on failed): cancelling it")
                    subprocess.run(["scancel", task], capture_output=True, env=env)
                    live = True
                elif state not in FINAL_STATES:
                    live = True
                states[key].append(state)
        if not live:
            return states
        time.sleep(poll)


def job_results(jobs: list[Job], states: dict[str, list[str]]) -> list[tuple[Job, str, str]]:
    """(job, Slurm states, result) per job once they have ended; result is "ok" or what is missing.

    Judged by the outputs, not by Slurm's records (they expire, and sacct needs slurmdbd): a
    shard job succeeded when each of its corpora has ``index.json``, a training job when its
    run finished (``finished.json``, :class:`dser.rundir.RunDir`).
    """
    from dser.rundir import RunDir

    out = []
    for j in jobs:
        if j.corpora:
            missing = [str(j.output / c / "index.json") for c in j.corpora if not (j.output / c / "index.json").is_file()]
            result = f"missing {', '.join(missing)}" if missing else "ok"
        else:
            status = RunDir(j.output).status()
            result = "ok" if status == "finished" else f"not finished: {status} (no {j.output}/finished.json)"
        final = states.get(j.key) or []
        counts = {s: final.count(s) for s in dict.fromkeys(final)}
        shown = " ".join(f"{n}x{s}" if n > 1 else s for s, n in counts.items()) or "gone"
        out.append((j, shown, result))
    return out


def format_results(results: list[tuple[Job, str, str]], ids: dict[str, str]) -> str:
    """The table ``dser submit --wait`` ends with: job, what, Slurm's final state, result."""
    rows = [("JOB", "WHAT", "SLURM STATE", "RESULT")] + [(ids[j.key], j.what, st, res) for j, st, res in results]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows)
