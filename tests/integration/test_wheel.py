"""An installed dser trains: a wheel built from this checkout, installed into a fresh venv, runs
``dser demo`` from an empty directory outside the checkout, and its Slurm scripts find what they
need there.

The wheel is built from a copy of this working tree (tracked and untracked files git does not
ignore: what is being tested, uncommitted edits included). The venv reuses this environment's
packages through a ``.pth`` file naming its site-packages, and pip installs the wheel alone,
offline: nothing is downloaded. Every command runs without PYTHONPATH, with the new venv first
on PATH and this environment's bin/ after it (where another ``deepspeed`` launcher would start
ranks that import another dser).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# A 4-step demo on small corpora: the point is that it runs, not what it learns.
DEMO = ["demo", "--ranks", "1", "--utterances", "80",
        "--set", "optim.max_steps=4", "--set", "optim.warmup_steps=1", "--set", "train.eval_every=4",
        "--set", "train.save_every=4", "--set", "train.log_every=2", "--set", "train.progress=false"]


def copy_working_tree(dst: Path) -> Path:
    """The checkout's files as git sees them (links kept as links): what a clone with these edits
    holds. A copy, since building in the checkout itself would leave build/ and egg-info there."""
    try:
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"{REPO} is not a git checkout: no working tree to build a wheel from")
    for name in filter(None, listed.decode().split("\0")):
        src, out = REPO / name, dst / name
        if not os.path.lexists(src):  # deleted, not yet committed
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), out)
        else:
            shutil.copy2(src, out)
    return dst


def user_env(venv: Path) -> dict:
    """A user's shell with the new venv activated: no PYTHONPATH, no dser settings."""
    dropped = ("PYTHONPATH", "LOGS_DIR", "SHARDS_DIR", "RUNS_DIR")
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith(("DSER_", "SLURM_", "SBATCH_"))}
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}:{Path(sys.executable).parent}:{env.get('PATH', '')}",
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def run(cmd: list, cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The wheel, and a venv with it installed: ``wheel``, ``venv``, ``python``, ``package``
    (the installed dser/ directory) and ``env``."""
    root = tmp_path_factory.mktemp("wheel")
    src = copy_working_tree(root / "src")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", src],
        cwd=root, env=dict(os.environ))
    (wheel,) = (root / "dist").glob("dser-*.whl")

    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root, env=dict(os.environ))
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root,
                    env=dict(os.environ)).stdout.strip())
    here = sysconfig.get_paths()
    (site / "dser_test_base.pth").write_text("".join(f"{p}\n" for p in dict.fromkeys((here["purelib"],
                                                                                       here["platlib"]))))
    env = user_env(venv)
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=root, env=env)
    return {"wheel": wheel, "venv": venv, "python": python, "package": site / "dser", "env": env}


def test_the_wheel_holds_one_copy_of_the_checkouts_run_time_files(installed):
    """ds_configs/*.json, slurm/*.sh and slurm/grid.yaml travel as package data, as the checkout has them."""
    with zipfile.ZipFile(installed["wheel"]) as whl:
        names = set(whl.namelist())
        shipped = {f"dser/ds_configs/{p.name}": p for p in (REPO / "ds_configs").glob("*.json")}
        shipped |= {f"dser/slurm/{p.name}": p for p in [*(REPO / "slurm").glob("*.sh"), REPO / "slurm" / "grid.yaml"]}
        shipped |= {f"dser/configs/{p.name}": p for p in (REPO / "dser" / "configs").glob("*.yaml")}
        assert len(shipped) > 20 and set(shipped) <= names, sorted(set(shipped) - names)
        for name, path in shipped.items():
            assert whl.read(name) == path.read_bytes(), name
    assert not any(n.startswith("dser/slurm/logs") for n in names)  # logs are never package data
    # one source in the checkout: the package's directories are links to the top-level ones users name
    assert (REPO / "dser" / "ds_configs").resolve() == REPO / "ds_configs"
    assert (REPO / "dser" / "slurm").resolve() == REPO / "slurm"


def test_an_installed_dser_runs_the_demo_from_an_empty_directory(installed, tmp_path):
    env, python, package = installed["env"], installed["python"], installed["package"]
    user = tmp_path / "user"
    user.mkdir()
    where = run([python, "-c", "import dser, dser.runconfig as r, dser.submit as s; "
                 "print(dser.__file__, r.DS_CONFIGS_DIR, s.SLURM_DIR, sep='\\n')"], cwd=user, env=env)
    assert where.stdout.split() == [str(package / "__init__.py"), str(package / "ds_configs"), str(package / "slurm")]

    r = run([installed["venv"] / "bin" / "dser", *DEMO], cwd=user, env=env, timeout=600)
    assert f"{package / 'train.py'} --stage 1" in r.stdout  # the launcher ran the installed recipe
    runs = {p.name.rsplit("-", 2)[0]: p for p in (user / "runs").iterdir()}
    assert sorted(runs) == ["demo-stage1", "demo-stage2"], sorted(runs)
    for stage, run_dir in runs.items():
        assert (run_dir / "finished.json").is_file() and (run_dir / "export" / "export.json").is_file(), stage
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["steps"] == 4 and set(metrics["eval"]) == {"acted", "natural"}
        # the ranks imported the installed dser, not a checkout's (that would name its commit)
        assert metrics["provenance"]["git_commit"] is None
    assert Path(json.loads((runs["demo-stage2"] / "metrics.json").read_text())["init_from"]).resolve() == \
        runs["demo-stage1"].resolve()
    assert "UA on the demo test sets" in r.stdout


def test_an_installed_dsers_slurm_scripts_and_grid_are_its_own(installed, tmp_path):
    """``dser submit`` plans the installed scripts on the shipped grid; slurm/env.sh, sourced from
    the package, finds the venv and the recipe; slurm/shard.sh shards a corpus with the installed
    dser (outside Slurm: one array task)."""
    env, python, package = installed["env"], installed["python"], installed["package"]
    user = tmp_path / "user"
    user.mkdir()
    grid = package / "slurm" / "grid.yaml"
    r = run([installed["venv"] / "bin" / "dser", "submit", "--grid", grid, "--gpus-per-node", "0", "--dry-run"],
            cwd=user, env=env)
    for script in ("shard.sh", "stage1.sh", "stage2.sh"):
        assert str(package / "slurm" / script) in r.stdout, script
    assert str(package / "configs" / "demo_stage1.yaml") in r.stdout
    assert "--output=slurm/logs/" in r.stdout  # where the user submits, not into site-packages

    shown = run(["bash", "-c", 'source "$DSER_HOME/slurm/env.sh" && printf "%s\\n" "$DSER_VENV" "$DSER_TRAIN" '
                 '"$LOGS_DIR"'], cwd=user, env={**env, "DSER_HOME": str(package)}).stdout.split("\n")
    assert Path(shown[0]).resolve() == installed["venv"].resolve()
    assert shown[1:3] == [str(package / "train.py"), "slurm/logs"] and Path(shown[1]).is_file()

    r = run(["bash", package / "slurm" / "shard.sh"], cwd=user,
            env={**env, "SLURM_ARRAY_TASK_ID": "0", "SYNTH_ARGS": "--utterances 40"})
    index = json.loads((user / "shards" / "demo-acted" / "index.json").read_text())
    assert sorted(index["groups"]) == ["test", "train", "valid"]
    assert (user / "data" / "demo" / "acted" / "manifest.jsonl").is_file()
