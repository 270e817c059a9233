"""dser.submit without a cluster: grids in the job plan, sbatch command lines, --dry-run.

Grid files themselves (checks, `dser grid`, the slurm/ scripts reading them) are
tests/unit/test_grid.py; submitting to a real Slurm is tests/integration/test_slurm.py.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
from fixtures_shards import write_demo_shards

from dser.config import ConfigError
from dser.grid import load_grid
from dser.submit import (CHECKOUT, SLURM_DIR, Resources, format_dry_run, format_submitted, plan_jobs, runs_root,
                         sbatch_command)

CFG1 = CHECKOUT / "dser" / "configs" / "demo_stage1.yaml"
CFG2 = CHECKOUT / "dser" / "configs" / "demo_stage2.yaml"

GRID = """\
corpora:
  crema-d:     {reader: crema-d, root: /data/CREMA-D, train: [fold0, fold1, fold2], valid: [fold3], test: [fold4],
                shard: {max-shard-mb: 64}}
  ravdess:     {reader: ravdess, root: /data/RAVDESS, train: [fold0, fold1, fold2], valid: [fold3], test: [fold4]}
  msp-podcast: {reader: msp-podcast, root: /data/MSP, train: [Train], valid: [Development], test: [Test1]}
sources: [crema-d, ravdess]
targets: [msp-podcast, crema-d]
stage1_config: dser/configs/demo_stage1.yaml
stage2_config: dser/configs/demo_stage2.yaml
set: [optim.max_steps=50, seed=3]
name: paper
"""


def set_values(args: list[str]) -> dict[str, str]:
    """--set KEY=VALUE pairs of a script's arguments (last one wins)."""
    return dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")


def test_resources_become_sbatch_options():
    assert Resources(gpus_per_node=0, ntasks_per_node=2, cpus_per_task=1).training_options() == \
        ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]
    opts = Resources(nodes=2, gpus_per_node=4, time="12:00:00", partition="gpu", account="ser",
                     extra=["--qos=high"]).training_options()
    assert opts == ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=12:00:00",
                    "--partition=gpu", "--account=ser", "--qos=high"]
    assert Resources(cpus_per_task=16, partition="cpu").shard_options() == ["--cpus-per-task=16", "--partition=cpu"]
    with pytest.raises(ValueError, match="one rank per GPU"):
        Resources(gpus_per_node=4, ntasks_per_node=2)
    with pytest.raises(ValueError, match="--nodes"):
        Resources(nodes=0)
    # nothing given: the scripts' #SBATCH defaults; per-kind extras come last, on their kind only
    assert Resources().training_options() == Resources().shard_options() == []
    both = Resources(time="1:00:00", stage_extra=["--gpus-per-node=4", "--ntasks-per-node=4"],
                     shard_extra=["--cpus-per-task=32"])
    assert both.training_options() == ["--time=1:00:00", "--gpus-per-node=4", "--ntasks-per-node=4"]
    assert both.shard_options() == ["--time=1:00:00", "--cpus-per-task=32"]
    with pytest.raises(ValueError, match="one rank per GPU"):
        Resources(ntasks_per_node=2)  # stage1.sh's one GPU per node


def test_two_stages_stage2_after_stage1_from_its_run_dir(tmp_path):
    jobs = plan_jobs(CFG1, CFG2, resources=Resources(gpus_per_node=2), overrides=["optim.lr=0.0001"],
                     logs_dir=tmp_path, stamp="20261124-010203")
    s1, s2 = jobs
    assert (s1.key, s1.after, s2.key, s2.after) == ("stage1", [], "stage2", ["stage1"])
    assert s1.script == SLURM_DIR / "stage1.sh" and s2.script == SLURM_DIR / "stage2.sh"
    assert s1.output == Path("runs/demo-stage1-20261124-010203")
    assert s2.output == Path("runs/demo-stage2-20261124-010203")
    assert s1.args == [str(s1.output), str(CFG1), "--set", "optim.lr=0.0001"]
    assert s2.args == [str(s2.output), str(CFG2), str(s1.output), "--set", "optim.lr=0.0001"]
    assert "--ntasks-per-node=2" in s1.options and "--gpus-per-node=2" in s2.options
    assert f"--output={tmp_path}/%x-%j.out" in s1.options and "--job-name=dser-s1-demo-stage1" in s1.options
    assert s1.log == f"{tmp_path}/dser-s1-demo-stage1-%j.out"

    cmd = sbatch_command(s2, {"stage1": "4711"})
    assert cmd[:3] == ["sbatch", "--parsable", "--dependency=afterok:4711"]
    assert cmd[-len(s2.args) - 1:] == [str(SLURM_DIR / "stage2.sh"), *s2.args]
    assert sbatch_command(s1, {})[:2] == ["sbatch", "--parsable"] and not any(
        a.startswith("--dependency") for a in sbatch_command(s1, {}))

    named = plan_jobs(CFG1, CFG2, runs_dir=tmp_path / "r", name="exp1")
    assert [j.output for j in named] == [tmp_path / "r" / "exp1" / "stage1", tmp_path / "r" / "exp1" / "stage2"]
    assert runs_root(named) == tmp_path / "r" / "exp1"


def test_config_errors_surface_before_anything_is_queued():
    with pytest.raises(ConfigError, match="optim.lrr"):
        plan_jobs(CFG1, CFG2, overrides=["optim.lrr=1"])
    with pytest.raises(ConfigError, match="not found"):
        plan_jobs(Path("no/such.yaml"), CFG2)
    with pytest.raises(ValueError, match="--stage2"):
        plan_jobs(CFG1, None)


def test_dry_run_is_a_script_that_submits_in_order_with_dependencies(tmp_path):
    jobs = plan_jobs(CFG1, CFG2, resources=Resources(gpus_per_node=0, ntasks_per_node=2), logs_dir=tmp_path,
                     overrides=["data.test={acted: [shards/demo-acted/test], natural: [shards/demo-natural/test]}"])
    script = format_dry_run(jobs)
    # Run it with an sbatch that records its arguments and answers with ids 101, 102, …
    record = tmp_path / "calls.jsonl"
    fake = f"""
sbatch() {{ python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> {shlex.quote(str(record))}
           echo "$((100 + $(wc -l < {shlex.quote(str(record))})));cluster"; }}
{script}
echo "$stage1 $stage2"
"""
    r = subprocess.run(["bash", "-c", fake], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["101;cluster", "102;cluster"]
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert calls[0] == sbatch_command(jobs[0], {})[1:]
    assert calls[1] == sbatch_command(jobs[1], {"stage1": "101"})[1:]
    assert set_values(calls[1])["data.test"].startswith("{acted:")


def test_repository_grid_is_the_demo(monkeypatch, tmp_path):
    grid = load_grid(SLURM_DIR / "grid.yaml")
    assert list(grid.corpora) == ["demo-acted", "demo-natural"]
    assert (grid.sources, grid.targets) == (["demo-acted"], ["demo-natural"])
    assert grid.corpora["demo-acted"].reader == "synth-acted"
    assert grid.corpora["demo-natural"].test == ["test"]
    monkeypatch.chdir(tmp_path)  # configs named relative to the checkout still resolve
    jobs = plan_jobs(None, None, grid=grid, shards_dir=tmp_path / "shards", runs_dir=tmp_path / "runs")
    assert [j.key for j in jobs] == ["shard", "stage1_demo_acted", "stage2_demo_acted_to_demo_natural"]


def test_grid_plan_shards_then_every_source_then_every_pair(tmp_path):
    (tmp_path / "grid.yaml").write_text(GRID)
    grid = load_grid(tmp_path / "grid.yaml")
    shards = tmp_path / "shards"
    (shards / "ravdess").mkdir(parents=True)
    (shards / "ravdess" / "index.json").write_text("{}")  # already sharded: no task for it
    jobs = plan_jobs(CFG1, CFG2, grid=grid, shards_dir=shards, runs_dir=tmp_path / "runs",
                     overrides=["optim.lr=0.0001"], resources=Resources(gpus_per_node=4, cpus_per_task=8))
    by_key = {j.key: j for j in jobs}
    assert list(by_key) == ["shard", "stage1_crema_d", "stage1_ravdess", "stage2_crema_d_to_msp_podcast",
                            "stage2_ravdess_to_msp_podcast", "stage2_ravdess_to_crema_d"]  # no crema-d -> crema-d

    shard = by_key["shard"]
    assert "--array=0,2" in shard.options and shard.args == [str(grid.path)]
    assert grid.corpora["crema-d"].shard_args == ["--max-shard-mb=64"]
    assert "--cpus-per-task=8" in shard.options and not any("gpus" in o for o in shard.options)

    s1 = by_key["stage1_ravdess"]
    assert s1.after == ["shard"] and s1.output == tmp_path / "runs" / "paper" / "stage1-ravdess"
    sets = set_values(s1.args)
    assert json.loads(sets["data.train"]) == [f"{shards}/ravdess/{g}" for g in ("fold0", "fold1", "fold2")]
    assert json.loads(sets["data.valid"]) == [f"{shards}/ravdess/fold3"]
    assert sets["source"] == "ravdess" and sets["target"] == "null"
    assert (sets["optim.max_steps"], sets["seed"], sets["optim.lr"]) == ("50", "3", "0.0001")
    tests = json.loads(sets["data.test"])  # JSON is the YAML flow mapping the recipe parses
    assert tests == {"crema-d": [f"{shards}/crema-d/fold4"], "ravdess": [f"{shards}/ravdess/fold4"],
                     "msp-podcast": [f"{shards}/msp-podcast/Test1"]}

    s2 = by_key["stage2_ravdess_to_crema_d"]
    assert s2.after == ["stage1_ravdess"] and s2.args[2] == str(s1.output)
    sets = set_values(s2.args)
    assert json.loads(sets["data.train"]) == [f"{shards}/crema-d/{g}" for g in ("fold0", "fold1", "fold2")]
    assert (sets["source"], sets["target"]) == ("ravdess", "crema-d")
    assert json.loads(sets["data.rehearsal.shards"]) == json.loads(set_values(s1.args)["data.train"])
    assert "--ntasks-per-node=4" in s2.options

    # with every corpus sharded there is no shard job and stage 1 waits for nothing
    for c in ("crema-d", "msp-podcast"):
        (shards / c).mkdir()
        (shards / c / "index.json").write_text("{}")
    jobs = plan_jobs(CFG1, CFG2, grid=grid, shards_dir=shards, runs_dir=tmp_path / "runs")
    assert jobs[0].key == "stage1_crema_d" and jobs[0].after == []


def test_submitted_table_names_ids_dependencies_runs_and_logs(tmp_path):
    jobs = plan_jobs(CFG1, CFG2, logs_dir=tmp_path, stamp="20261124-010203")
    text = format_submitted(jobs, {"stage1": "11", "stage2": "12"})
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["JOB", "WHAT", "AFTER", "WRITES"]
    assert lines[1].split()[0] == "11" and f"{tmp_path}/dser-s1-demo-stage1-11.out" in lines[1]
    assert lines[2].split()[:5] == ["12", "stage", "2", "demo-stage2", "11"]
    assert "runs/demo-stage2-20261124-010203" in lines[2]


def test_cli_dry_run_and_errors(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from dser.cli import main

    monkeypatch.setenv("LOGS_DIR", str(tmp_path / "logs"))
    monkeypatch.chdir(write_demo_shards(tmp_path))  # the shards the demo configs name, which submit checks
    runner = CliRunner()
    r = runner.invoke(main, ["submit", "--stage1", str(CFG1), "--stage2", str(CFG2), "--gpus-per-node", "0",
                             "--ntasks-per-node", "2", "--time", "1:00:00", "--name", "pair", "--dry-run"])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith(("stage1=", "stage2="))]
    assert len(lines) == 2 and "--dependency=afterok:${stage1%%;*}" in lines[1]
    assert "--time=1:00:00" in lines[0] and "--ntasks-per-node=2" in lines[0]
    assert not (tmp_path / "logs").exists()  # a dry run submits and creates nothing

    r = runner.invoke(main, ["submit", "--grid", str(tmp_path / "missing.yaml"), "--dry-run"])
    assert r.exit_code == 1 and "grid file" in r.output and "expected a YAML file, found nothing" in r.output
    r = runner.invoke(main, ["submit", "--stage1", str(CFG1), "--dry-run"])
    assert r.exit_code == 1 and "--stage2" in r.output
    r = runner.invoke(main, ["submit", "--stage1", str(CFG1), "--stage2", str(CFG2), "--set", "optim.lrr=1",
                             "--dry-run"])
    assert r.exit_code == 1 and "optim.lrr" in r.output and "Traceback" not in r.output
