"""Grid files are data: dser.grid's checks, ``dser grid``, and the slurm/ scripts reading them.

Grids holding ``$(touch PWNED)``, backticks, ``;`` and spaces go through ``dser submit --grid
--dry-run`` (and the script it prints), ``slurm/shard.sh`` (a real shard task, outside Slurm)
and ``slurm/cross_corpus.sh`` (outside Slurm, with an ``sbatch`` that records its arguments):
every value arrives as the same text, and no PWNED file appears. Bash grids are refused
without being run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_shards import write_test_shards

from dser.grid import GridError, grid_values, load_grid, run_overrides
from dser.submit import CHECKOUT, SLURM_DIR, plan_jobs

DSER = [sys.executable, "-m", "dser.cli"]
CFG1 = CHECKOUT / "dser" / "configs" / "demo_stage1.yaml"
CFG2 = CHECKOUT / "dser" / "configs" / "demo_stage2.yaml"

# Text a shell would run, were it ever evaluated. Each piece, if run, creates a file named PWNED*.
EVIL = "$(touch PWNED1) `touch PWNED2`; touch PWNED3 && echo 'q\"uote' \\$HOME"

GOOD = f"""\
name: g1
corpora:
  acted:
    reader: synth-acted
    root: data/acted
    train: [train]
    valid: [valid]
    test: [test]
    shard: {{max-shard-samples: 8}}
  natural:
    reader: synth-natural
    root: data/natural
    train: [train]
    valid: [valid]
    test: [test]
sources: [acted]
targets: [natural]
stage1_config: {CFG1}
stage2_config: {CFG2}
set: [optim.max_steps=5]
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def no_pwned(*dirs: Path) -> list[Path]:
    return [p for d in dirs for p in Path(d).rglob("PWNED*")]


def evil_grid(tmp_path: Path) -> tuple[Path, dict]:
    """A valid grid whose free-text values (root, configs' paths, set, a shard option) hold EVIL."""
    cfgdir = tmp_path / f"cfg {EVIL}"
    cfgdir.mkdir()
    cfg1, cfg2 = cfgdir / f"s1 {EVIL}.yaml", cfgdir / "s2;x.yaml"
    shutil.copy(CFG1, cfg1)
    shutil.copy(CFG2, cfg2)
    values = {"root": f"data/acted {EVIL}", "set": f"name=run {EVIL}", "option": f"attribute_scale={EVIL}",
              "cfg1": str(cfg1), "cfg2": str(cfg2)}
    text = GOOD.replace("root: data/acted", f"root: {json.dumps(values['root'])}")
    text = text.replace("set: [optim.max_steps=5]", f"set: [optim.max_steps=5, {json.dumps(values['set'])}]")
    text = text.replace(f"stage1_config: {CFG1}", f"stage1_config: {json.dumps(str(cfg1))}")
    text = text.replace(f"stage2_config: {CFG2}", f"stage2_config: {json.dumps(str(cfg2))}")
    option = f"    shard: {{option: [{json.dumps(values['option'])}]}}"
    text = text.replace("    test: [test]\nsources", f"    test: [test]\n{option}\nsources")
    return write(tmp_path / "evil.yaml", text), values


def script_env(tmp_path: Path, **extra: str) -> dict:
    """Environment for the slurm/ scripts outside Slurm: this checkout and venv, a recording sbatch."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"""#!/bin/bash
{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$SBATCH_RECORD"
echo "$((100 + $(wc -l < "$SBATCH_RECORD")))"
""")
    sbatch.chmod(0o755)
    env.update(DSER_HOME=str(CHECKOUT), DSER_VENV=sys.prefix, LOGS_DIR=str(tmp_path / "logs"),
               SHARDS_DIR="shards", RUNS_DIR="runs", SBATCH_RECORD=str(tmp_path / "sbatch.jsonl"),
               PATH=f"{bin_dir}:{env['PATH']}", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------
# load_grid: the checks
# ------------------------------------------------------------------------------------------

def test_shipped_grid_is_the_demo_and_every_value_is_read():
    grid = load_grid(SLURM_DIR / "grid.yaml")
    assert grid.name == "cross-corpus"
    assert list(grid.corpora) == ["demo-acted", "demo-natural"]
    acted = grid.corpora["demo-acted"]
    assert (acted.reader, acted.root, acted.train, acted.valid, acted.test, acted.shard_args) == \
        ("synth-acted", "data/demo/acted", ["train"], ["valid"], ["test"], ["--max-shard-samples=64"])
    assert (grid.sources, grid.targets, grid.overrides) == (["demo-acted"], ["demo-natural"], [])
    assert grid.stage1_config == "dser/configs/demo_stage1.yaml"
    assert grid.stage2_config == "dser/configs/demo_stage2.yaml"
    assert not (SLURM_DIR / "grid.sh").exists()


@pytest.mark.parametrize("edit, key, message", [
    (lambda t: t + "gpus: 4\n", "gpus", "unknown key; allowed: name, corpora"),
    (lambda t: t.replace("    reader: synth-natural\n", ""), "corpora.natural.reader", "missing"),
    (lambda t: t.replace("    root: data/acted\n", "    root: data/acted\n    roots: x\n"), "corpora.acted.roots",
     "unknown key; allowed: reader, root"),
    (lambda t: t.replace("reader: synth-acted", "reader: cremad"), "corpora.acted.reader", "unknown reader 'cremad'"),
    (lambda t: t.replace("targets: [natural]", "targets: [natural, msp]"), "targets[1]",
     "'msp' is not in corpora (acted, natural)"),
    (lambda t: t.replace("sources: [acted]", "sources: []"), "sources", "non-empty list of corpus names"),
    (lambda t: t.replace("sources: [acted]", "sources: acted"), "sources", "non-empty list of corpus names"),
    (lambda t: t.replace("    train: [train]\n    valid: [valid]\n    test: [test]\n    shard",
                         "    train: train,valid\n    valid: [valid]\n    test: [test]\n    shard"),
     "corpora.acted.train", "non-empty list of shard groups"),
    (lambda t: t.replace("    valid: [valid]\n    test: [test]\nsources", "    valid: []\n    test: [test]\nsources"),
     "corpora.natural.valid", "non-empty list of shard groups"),
    (lambda t: t.replace("test: [test]\n    shard", "test: [../test]\n    shard"), "corpora.acted.test[0]",
     "cannot name a directory"),
    (lambda t: t.replace("test: [test]\n    shard", "test: [1]\n    shard"), "corpora.acted.test[0]", "(quote it)"),
    (lambda t: t.replace("train: [train]\n    valid: [valid]\n    test: [test]\n    shard",
                         "train: [a, a]\n    valid: [valid]\n    test: [test]\n    shard"),
     "corpora.acted.train", "'a' is listed twice"),
    (lambda t: t.replace("  acted:\n", "  \"$(touch PWNED)\":\n").replace("[acted]", '["$(touch PWNED)"]'),
     "corpora.$(touch PWNED)", "cannot name a directory"),
    (lambda t: t.replace("root: data/acted", 'root: "data/acted\\nrm -rf /"'), "corpora.acted.root",
     "control character"),
    (lambda t: t.replace("name: g1", "name: ../up"), "name", "cannot name a directory"),
    (lambda t: t.replace("set: [optim.max_steps=5]", "set: [--config=x.yaml]"), "set[0]", "is not KEY=VALUE"),
    (lambda t: t.replace("set: [optim.max_steps=5]", "set: optim.max_steps=5"), "set", "must be a list"),
    (lambda t: t.replace("{max-shard-samples: 8}", "{max-shard-sample: 8}"), "corpora.acted.shard.max-shard-sample",
     "not a dser shard option here"),
    (lambda t: t.replace("{max-shard-samples: 8}", "{workers: 8}"), "corpora.acted.shard.workers",
     "slurm/shard.sh sets it"),
    (lambda t: t.replace("{max-shard-samples: 8}", "{max-shard-samples: many}"), "corpora.acted.shard",
     "dser shard refuses it"),
    (lambda t: t.replace("{max-shard-samples: 8}", "{strict: 1}"), "corpora.acted.shard.strict", "a flag"),
    (lambda t: t.replace("name: g1\n", "name: g1\nname: g2\n"), "not valid YAML", "key 'name' given twice (line 2"),
    (lambda t: t.replace("sources: [acted]", "sources: [acted"), "not valid YAML", "(line"),
    (lambda t: t.replace("name: g1", "name: !!python/object/apply:os.system ['touch PWNED']"), "not valid YAML",
     "could not determine a constructor"),
])
def test_bad_grid_is_one_line_naming_the_file_and_key(tmp_path, edit, key, message):
    good = write(tmp_path / "good.yaml", GOOD)
    load_grid(good)  # the unedited grid is fine: each failure below is the edit's
    path = write(tmp_path / "my_grid.yaml", edit(GOOD))
    with pytest.raises(GridError) as e:
        load_grid(path)
    text = str(e.value)
    assert text.startswith(f"{path}: {key}") and message in text and "\n" not in text, text
    assert not no_pwned(tmp_path, Path.cwd())


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just text\n"])
def test_a_grid_is_a_mapping(tmp_path, text):
    with pytest.raises(GridError, match=r"a grid is a YAML mapping with keys name, corpora"):
        load_grid(write(tmp_path / "g.yaml", text))


BASH_GRID = """\
touch PWNED
CORPORA=("demo-acted synth-acted data/demo/acted train valid test")
SOURCES=(demo-acted)
TARGETS=(demo-acted)
"""


@pytest.mark.parametrize("name", ["grid.sh", "grid.yaml", "grid"])
def test_bash_grid_is_refused_with_how_to_convert_and_never_run(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / name, BASH_GRID)
    with pytest.raises(GridError) as e:
        load_grid(path)
    assert str(e.value) == (f"{path} is a bash grid, which dser no longer executes; write it as YAML like "
                            "slurm/grid.yaml (keys: name, corpora: {NAME: {reader, root, train, valid, test, "
                            "shard}}, sources, targets, stage1_config, stage2_config, set)")
    assert not no_pwned(tmp_path)
    with pytest.raises(GridError, match="not found"):
        load_grid(tmp_path / "missing.yaml")


def test_queries_return_the_values_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, v = evil_grid(tmp_path)
    grid = load_grid(path)
    assert grid_values(grid, ["corpus", "acted", "root"]) == [v["root"]]
    assert grid_values(grid, ["corpus", "natural", "shard"]) == [f"--option={v['option']}"]
    assert grid_values(grid, ["set"]) == ["optim.max_steps=5", v["set"]]
    assert grid_values(grid, ["stage1_config"]) == [v["cfg1"]]
    assert grid_values(grid, ["corpora"]) == ["acted", "natural"]
    sets = grid_values(grid, ["sets", "acted", "natural"], shards_dir=Path("sh"))
    assert sets == run_overrides(grid, Path("sh"), "acted", "natural")
    assert sets[0] == 'data.train=["sh/natural/train"]' and sets[-1] == v["set"]
    assert 'data.rehearsal.shards=["sh/acted/train"]' in sets and "target=natural" in sets
    for bad, message in [(["corpus", "nope", "root"], "'nope' is not in corpora"),
                         (["corpus", "acted", "rooot"], "unknown corpus field"),
                         (["sets", "natural"], "'natural' is not in sources"), (["stuff"], "unknown query")]:
        with pytest.raises(GridError, match=message):
            grid_values(grid, bad)
    assert not no_pwned(tmp_path)


# ------------------------------------------------------------------------------------------
# the command line: dser grid, dser submit --grid
# ------------------------------------------------------------------------------------------

def test_dser_grid_prints_values_nul_separated_and_checks_configs(tmp_path):
    path, v = evil_grid(tmp_path)
    r = subprocess.run([*DSER, "grid", "--null", str(path), "corpus", "acted", "root"], cwd=tmp_path,
                       capture_output=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == v["root"].encode() + b"\0"
    r = subprocess.run([*DSER, "grid", str(path), "set"], cwd=tmp_path, capture_output=True, text=True)
    assert r.stdout == f"optim.max_steps=5\n{v['set']}\n"

    r = subprocess.run([*DSER, "grid", str(path)], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "checked: the grid and the config of each of its 2 runs" in r.stdout and v["root"] in r.stdout
    # a config key the grid's set gets wrong: one line naming the file and the key
    bad = write(tmp_path / "bad.yaml", path.read_text().replace("optim.max_steps=5", "optim.max_stepz=5"))
    r = subprocess.run([*DSER, "grid", str(bad)], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith(f"Error: {bad}:") and "optim.max_stepz" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = subprocess.run([*DSER, "grid", str(path), "corpus", "x", "root"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == f"Error: {path}: 'x' is not in corpora (acted, natural)"
    assert not no_pwned(tmp_path)


def test_submit_dry_run_of_an_evil_grid_runs_nothing_and_passes_text_as_text(tmp_path, monkeypatch):
    path, v = evil_grid(tmp_path)
    env = script_env(tmp_path)
    r = subprocess.run([*DSER, "submit", "--grid", str(path), "--gpus-per-node", "0", "--dry-run"], cwd=tmp_path,
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not no_pwned(tmp_path) and not (tmp_path / "logs").exists()
    # the printed script submits exactly the planned jobs, the evil text as plain arguments
    monkeypatch.chdir(tmp_path)
    jobs = plan_jobs(None, None, grid=load_grid(path), shards_dir=Path("shards"), runs_dir=Path("runs"))
    run = subprocess.run(["bash", "-c", r.stdout], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    calls = [json.loads(line) for line in (tmp_path / "sbatch.jsonl").read_text().splitlines()]
    assert [c[c.index(str(j.script)) + 1:] for c, j in zip(calls, jobs)] == [j.args for j in jobs]
    stage1 = calls[1][calls[1].index(str(SLURM_DIR / "stage1.sh")) + 1:]
    assert stage1[1] == v["cfg1"] and stage1[-1] == v["set"]
    assert not no_pwned(tmp_path)


def test_submit_refuses_a_bash_grid_in_one_line(tmp_path):
    path = write(tmp_path / "grid.sh", BASH_GRID)
    r = subprocess.run([*DSER, "submit", "--grid", str(path), "--dry-run"], cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"Error: {path} is a bash grid, which dser no longer executes; write it "
                                             "as YAML like slurm/grid.yaml (keys: name, corpora: {NAME: {reader, "
                                             "root, train, valid, test, shard}}, sources, targets, stage1_config, "
                                             "stage2_config, set)"]
    assert not no_pwned(tmp_path)


# ------------------------------------------------------------------------------------------
# the slurm/ scripts, run outside Slurm
# ------------------------------------------------------------------------------------------

def test_shard_script_shards_a_corpus_whose_root_holds_shell_text(tmp_path):
    path, v = evil_grid(tmp_path)
    env = script_env(tmp_path, SLURM_ARRAY_TASK_ID="0", SYNTH_ARGS="--utterances 24 --speakers 4")
    r = subprocess.run(["bash", str(SLURM_DIR / "shard.sh"), str(path)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / v["root"] / "manifest.jsonl").is_file()  # dser synth wrote into that very directory
    index = json.loads((tmp_path / "shards" / "acted" / "index.json").read_text())
    assert sorted(index["groups"]) == ["test", "train", "valid"]
    assert max(len(g["shards"]) for g in index["groups"].values()) >= 2  # the grid's max-shard-samples: 8
    assert not no_pwned(tmp_path)

    # a task past the grid's corpora, and a bash grid: one line each, nothing run
    env["SLURM_ARRAY_TASK_ID"] = "2"
    r = subprocess.run(["bash", str(SLURM_DIR / "shard.sh"), str(path)], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "array task 2 but" in r.stderr and "2 corpora" in r.stderr
    env["SLURM_ARRAY_TASK_ID"] = "0"
    sh = write(tmp_path / "grid.sh", BASH_GRID)
    r = subprocess.run(["bash", str(SLURM_DIR / "shard.sh"), str(sh)], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith(f"Error: {sh} is a bash grid")
    assert len(r.stderr.strip().splitlines()) == 1 and not no_pwned(tmp_path)


def test_cross_corpus_script_submits_what_dser_submit_plans_text_as_text(tmp_path, monkeypatch):
    path, v = evil_grid(tmp_path)
    for group in ("train", "valid", "test"):  # sharded already: no task for it
        write_test_shards(tmp_path / "shards" / "natural", 8, 2, group=group, prefix=group)
    env = script_env(tmp_path, GRID_WAIT="0", STAGE_SBATCH="--gpus-per-node=0 --ntasks-per-node=2")
    r = subprocess.run(["bash", str(SLURM_DIR / "cross_corpus.sh"), str(path)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dser: submitted 3 jobs" in r.stdout
    calls = [json.loads(line) for line in (tmp_path / "sbatch.jsonl").read_text().splitlines()]
    monkeypatch.chdir(tmp_path)
    jobs = plan_jobs(None, None, grid=load_grid(path), shards_dir=Path("shards"), runs_dir=Path("runs"))
    assert [j.key for j in jobs] == ["shard", "stage1_acted", "stage2_acted_to_natural"]
    assert "--array=0" in calls[0] and calls[0][-2:] == [str(SLURM_DIR / "shard.sh"), str(path)]
    assert "--dependency=afterok:101" in calls[1] and "--dependency=afterok:102" in calls[2]
    assert "--ntasks-per-node=2" in calls[1]
    # the script's stage jobs get exactly the arguments dser submit plans, the evil text intact
    for call, job in zip(calls[1:], jobs[1:]):
        assert call[call.index(str(job.script)) + 1:] == job.args
    assert calls[2][-1] == v["set"] and v["cfg2"] in calls[2]
    assert not no_pwned(tmp_path)


def test_cross_corpus_script_and_dser_submit_dry_run_plan_the_same_jobs(tmp_path):
    """One planner: what ``slurm/cross_corpus.sh`` submits is, argument for argument and in the
    same order, what the script ``dser submit --grid … --dry-run`` prints submits."""
    path, _ = evil_grid(tmp_path)
    stage, shard = "--gpus-per-node=0 --ntasks-per-node=2 --comment='two words'", "--cpus-per-task=2"
    env = script_env(tmp_path, GRID_WAIT="0", STAGE_SBATCH=stage, SHARD_SBATCH=shard)
    record = tmp_path / "sbatch.jsonl"
    r = subprocess.run(["bash", str(SLURM_DIR / "cross_corpus.sh"), str(path)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    by_script = [json.loads(line) for line in record.read_text().splitlines()]
    record.unlink()

    dry = subprocess.run([*DSER, "submit", "--grid", str(path), "--stage-sbatch", stage, "--shard-sbatch", shard,
                          "--dry-run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    run = subprocess.run(["bash", "-c", dry.stdout], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    by_dry_run = [json.loads(line) for line in record.read_text().splitlines()]

    assert by_script == by_dry_run
    shard_job, stage1, stage2 = by_script
    assert "--array=0,1" in shard_job and "--cpus-per-task=2" in shard_job
    assert "--comment=two words" in stage1 and "--ntasks-per-node=2" in stage2 and "--cpus-per-task=2" not in stage1
    assert "--dependency=afterok:101" in stage1 and "--dependency=afterok:102" in stage2
    assert not no_pwned(tmp_path)


def test_cross_corpus_script_refuses_bad_and_bash_grids_before_submitting(tmp_path):
    env = script_env(tmp_path, GRID_WAIT="0")
    sh = write(tmp_path / "grid.sh", BASH_GRID)
    bad = write(tmp_path / "bad.yaml", GOOD.replace("targets: [natural]", "targets: [msp]"))
    for grid, line in [(sh, f"Error: {sh} is a bash grid, which dser no longer executes; write it as YAML"),
                       (bad, f"Error: {bad}: targets[0]: 'msp' is not in corpora (acted, natural)")]:
        r = subprocess.run(["bash", str(SLURM_DIR / "cross_corpus.sh"), str(grid)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.strip().startswith(line), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "sbatch.jsonl").exists() and not no_pwned(tmp_path)
