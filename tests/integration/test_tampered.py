"""Tampered run directories through the CLI as a user runs it: a pickle payload planted in each
kind of file a run holds never runs.

A ``__reduce__`` payload (``os.system("touch MARKER")``) is added to a file of one finished
2-rank stage-1 run (the rest of the file's content kept), in a copy of the run per test. Each
payload is first shown to be live (``torch.load(weights_only=False)``, what DeepSpeed's own
engine does, runs it). Then:

- ``dser train --resume`` refuses a tampered DeepSpeed model state, a DeepSpeed optimizer state
  or dser's rank state that only rank 1 reads, in one line naming the file and the global;
- stage 2 (``--init-from``), ``dser evaluate`` and ``dser predict`` never read the checkpoints
  (they work with every checkpoint file tampered); a tampered export (a pickle in place of
  adaptors.safetensors, a pickled backbone in export/backbone/) is one line, never unpickled;
- every ds_configs/ file, in fp32 and bf16, writes only the DeepSpeed classes dser allows, and
  its checkpoint loads back through dser's checkpoint engine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures_shards import write_demo_shards

from dser.runconfig import DS_CONFIGS_DIR, default_config_path
from dser.safeload import DEEPSPEED_GLOBALS

pytestmark = pytest.mark.integration

DSER = [str(Path(sys.executable).with_name("dser"))]
SHORT = ["optim.max_steps=12", "optim.warmup_steps=2", "train.eval_every=12", "train.save_every=6",
         "train.log_every=6", "train.progress=false", "data.shuffle_buffer=50"]
REFUSED = ("refusing to load: it needs the global 'posix.system', which is not a tensor or a DeepSpeed class "
           "dser allows; the checkpoint was not written by dser or was tampered with")


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    """Add a live payload to the pickled dict in ``path``, keeping the rest of its content.

    Through file objects: torch.load of a path ending in .safetensors reads it as safetensors,
    not as a pickle.
    """
    with open(path, "rb") as fh:
        state = torch.load(fh, map_location="cpu", weights_only=False)  # dser's own file, before tampering
    state["payload"] = Payload(marker)
    with open(path, "wb") as fh:
        torch.save(state, fh)
    with open(path, "rb") as fh:
        torch.load(fh, map_location="cpu", weights_only=False)  # what DeepSpeed's TorchCheckpointEngine does
    assert marker.exists(), f"the payload in {path} is not live"
    marker.unlink()


def dser(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*DSER, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def sets(*overrides: str) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def error_lines(r: subprocess.CompletedProcess, prefix: str) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.startswith(prefix)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return write_demo_shards(tmp_path_factory.mktemp("tampered"))


@pytest.fixture(scope="module")
def victim(workdir) -> Path:
    """A finished 2-rank stage-1 run (ZeRO-2, what auto picks): checkpoints step6 and step12, an export."""
    ok(dser(workdir, "train", "--stage", "1", "--config", str(default_config_path(1)), "--run-dir", "runs/victim",
            "--ranks", "2", *sets(*SHORT)))
    run = workdir / "runs" / "victim"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000012"
    return run


@pytest.fixture
def copy(workdir, victim, request):
    """A copy of the victim run to tamper with, and the marker its payloads would create."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", f"copy-{request.node.name.removeprefix('test_')}").strip("-")
    run = workdir / "runs" / name
    shutil.copytree(victim, run)
    marker = workdir / f"MARKER-{name}"
    yield Path("runs") / name, marker
    assert not marker.exists(), "the payload ran"


def checkpoint_files(run: Path) -> list[Path]:
    return sorted(run.glob("checkpoints/step*/*.pt"))


# ----------------------------------------------------------------------------------------
# resume: refused in one line, on every rank, whichever rank reads the file
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", [
    pytest.param("mp_rank_00_model_states.pt", id="deepspeed-model-states"),  # read by every rank
    pytest.param("*zero_pp_rank_1_mp_rank_00_optim_states.pt", id="deepspeed-optim-states-rank1"),  # rank 1 only
    pytest.param("dser_rank1.pt", id="dser-rank-state-rank1"),  # rank 1 only
])
def test_resume_refuses_a_tampered_checkpoint_file_in_one_line(workdir, copy, pattern):
    run, marker = copy
    (target,) = (workdir / run / "checkpoints" / "step00000012").glob(pattern)
    plant(target, marker)
    r = dser(workdir, "train", "--resume", str(run), "--ranks", "2")
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    lines = error_lines(r, "dser train: error:")
    assert lines == [f"dser train: error: {run / 'checkpoints' / 'step00000012' / target.name}: {REFUSED}"], \
        r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "resumed from" not in r.stdout
    assert not marker.exists()


def test_resume_of_an_untampered_copy_works(workdir, copy):
    # the control: the copy itself resumes (a finished run: it evaluates and exports again)
    run, _ = copy
    r = ok(dser(workdir, "train", "--resume", str(run), "--ranks", "2"))
    assert f"resumed from {run / 'checkpoints' / 'step00000012'} at step 12" in r.stdout


# ----------------------------------------------------------------------------------------
# stage 2, evaluate, predict: checkpoints never read; a tampered export refused, never unpickled
# ----------------------------------------------------------------------------------------

def test_stage2_never_reads_the_stage1_checkpoints(workdir, copy):
    run, marker = copy
    for f in checkpoint_files(workdir / run):
        plant(f, marker)
    ok(dser(workdir, "train", "--stage", "2", "--config", str(default_config_path(2)), "--init-from", str(run),
            "--run-dir", f"{run}-stage2", "--ranks", "2",
            *sets(*SHORT, "optim.max_steps=4", "train.eval_every=4", "train.save_every=4")))
    assert json.loads((workdir / f"{run}-stage2" / "metrics.json").read_text())["steps"] == 4
    assert not marker.exists()


def pickle_for_adaptors(run: Path, marker: Path) -> str:
    """export/adaptors.safetensors replaced by a torch pickle of its own tensors and a payload.

    Returns:
        What the error line says after the run directory's name.
    """
    from safetensors.torch import load
    f = run / "export" / "adaptors.safetensors"
    tensors = load(f.read_bytes())  # not load_file: its tensors would map the file overwritten here
    with open(f, "wb") as fh:
        torch.save(tensors, fh)  # a torch pickle where safetensors belong
    plant(f, marker)
    return f"{run.name}/export/adaptors.safetensors: not a readable safetensors file"


def pickled_backbone(run: Path, marker: Path) -> str:
    """export.json pointed at an export/backbone/ (as a merged export has) whose pytorch_model.bin
    holds the backbone's weights and a payload."""
    from safetensors.torch import load_file

    from dser.model.backbones import tiny_backbone_dir
    export = run / "export"
    meta = json.loads((export / "export.json").read_text())
    d = tiny_backbone_dir(meta["model"]["backbone"]["name"], export / "backbone")
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    plant(d / "pytorch_model.bin", marker)
    meta["backbone"] = "backbone"
    (export / "export.json").write_text(json.dumps(meta, indent=2))
    return f"{run.name}/export/backbone/pytorch_model.bin: {REFUSED}"


def test_stage2_refuses_a_tampered_export_in_one_line(workdir, copy):
    run, marker = copy
    expected = pickle_for_adaptors(workdir / run, marker)
    r = dser(workdir, "train", "--stage", "2", "--config", str(default_config_path(2)), "--init-from", str(run),
             "--run-dir", f"{run}-stage2", "--ranks", "2", *sets(*SHORT, "optim.max_steps=4"))
    assert r.returncode == 2, r.stderr[-3000:]
    (line,) = error_lines(r, "dser train: error:")
    assert line.startswith("dser train: error: /") and f"/{expected}" in line, line  # init_from is resolved
    assert "Traceback" not in r.stderr and not marker.exists()


@pytest.fixture(scope="module")
def clip(workdir) -> Path:
    rows = [json.loads(line) for line in (workdir / "data/acted/manifest.jsonl").read_text().splitlines()]
    return workdir / "data/acted" / rows[0]["path"]


def run_command(workdir: Path, command: str, run: Path, clip: Path) -> subprocess.CompletedProcess:
    if command == "evaluate":
        return dser(workdir, "evaluate", str(run), "--shards", "shards/demo-acted/test")
    return dser(workdir, "predict", str(run), str(clip))


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_evaluate_and_predict_never_read_the_checkpoints(workdir, copy, clip, command):
    run, marker = copy
    for f in checkpoint_files(workdir / run):
        plant(f, marker)
    r = ok(run_command(workdir, command, run, clip))
    assert ("ua=" in r.stdout) if command == "evaluate" else (str(clip) in r.stdout)
    assert not marker.exists()


@pytest.mark.parametrize("tamper", [pickle_for_adaptors, pickled_backbone], ids=["adaptors-pickle", "backbone-bin"])
@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_evaluate_and_predict_refuse_a_tampered_export_in_one_line(workdir, copy, clip, command, tamper):
    run, marker = copy
    expected = tamper(workdir / run, marker)
    r = run_command(workdir, command, run, clip)
    assert r.returncode != 0
    (line,) = error_lines(r, "Error:")
    assert f"/{expected}" in line, line
    assert "Traceback" not in r.stderr and not marker.exists()


# ----------------------------------------------------------------------------------------
# the allow-list is exactly what DeepSpeed's files need
# ----------------------------------------------------------------------------------------

def test_every_zero_stage_and_precision_writes_only_allowed_globals_and_loads_back():
    configs = sorted(p.stem for p in DS_CONFIGS_DIR.glob("*.json"))
    assert configs == ["zero0", "zero1", "zero2", "zero3", "zero3_offload"]
    script = Path(__file__).resolve().parent / "checkpoint_globals_script.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(script), ",".join(configs), "fp32,bf16"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(configs) * 2
    needed = set()
    for res in results:
        assert set(res["globals"]) <= set(DEEPSPEED_GLOBALS), res
        assert res["global_steps"] == 3 and res["lr_steps"] == 3, res
        needed |= set(res["globals"])
    # every entry but the fp16 scaler (GPU only; test_safeload round-trips it) is needed here
    assert needed == set(DEEPSPEED_GLOBALS) - {"deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"}
