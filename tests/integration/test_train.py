"""The training recipe through the real DeepSpeed launcher on 2 CPU ranks.

Runs from a temporary working directory holding small synthetic demo shards, with the demo
run configs shortened by --set overrides. Covers ZeRO-2 and ZeRO-3 in the precision ``auto``
picks here, stage 2 starting from stage 1 (and in another precision), resume equal to an
uninterrupted run and in the run's own precision on hardware where ``auto`` would pick another,
ranks that agree on rank 0's precision, TensorBoard read back with TensorBoard's own reader,
the peft export, predict vs evaluation, and config errors.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from fixtures_shards import write_demo_shards

from dser.launch import launch_command
from dser.precision import decide_precision, detect_hardware
from dser.runconfig import default_config_path

pytestmark = pytest.mark.integration

FAULTY = Path(__file__).resolve().parent / "faulty_train.py"
# What auto picks on this machine, and the other precision a CPU can train in.
AUTO_HERE = decide_precision("auto", detect_hardware()).name
OTHER_HERE = "fp32" if AUTO_HERE == "bf16" else "bf16"
# The faulty_train.py hardware whose auto decision differs from this machine's.
PRETEND_OTHER = {"bf16": "cpu-no-bf16", "fp32": "cpu-bf16"}

SHORT = ["--set", "optim.max_steps=12", "--set", "optim.warmup_steps=2", "--set", "train.eval_every=6",
         "--set", "train.save_every=6", "--set", "train.log_every=3", "--set", "train.progress=false",
         "--set", "data.max_batch_seconds=40", "--set", "data.shuffle_buffer=50"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working directory with shards/demo-{acted,natural}/{train,valid,test} (small)."""
    return write_demo_shards(tmp_path_factory.mktemp("train"))


def run_train(cwd: Path, *args: str, ranks: int = 2, expect: int = 0, fault: str | None = None,
              fault_rank: int | None = None) -> subprocess.CompletedProcess:
    """The recipe through the launcher; with ``fault``, faulty_train.py with DSER_FAULT set."""
    cmd, env = launch_command(list(args), ranks=ranks, **({"script": FAULTY} if fault else {}))
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    for k in ("DSER_FAULT", "DSER_FAULT_RANK"):
        env.pop(k, None)
    if fault:
        env["DSER_FAULT"] = fault
    if fault_rank is not None:
        env["DSER_FAULT_RANK"] = str(fault_rank)
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == expect, f"exit {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def stage1(cwd: Path, run: str, *extra: str, **kw) -> Path:
    run_train(cwd, "--stage", "1", "--config", str(default_config_path(1)), *SHORT, "--run-dir", f"runs/{run}",
              *extra, **kw)
    return cwd / "runs" / run


def text_summary(acc, tag: str) -> str:
    """The string TensorBoard's text tab shows for ``tag`` (its first event)."""
    from tensorboard.util import tensor_util
    return tensor_util.make_ndarray(acc.Tensors(tag)[0].tensor_proto).item().decode()


def test_stage1_zero2_then_stage2_from_its_weights(workdir):
    run1 = stage1(workdir, "s1-zero2")
    m1 = json.loads((run1 / "metrics.json").read_text())
    assert m1["stage"] == 1 and m1["steps"] == 12
    assert set(m1["eval"]) == {"acted", "natural"}
    for m in m1["eval"].values():
        assert {"ua", "wa", "macro_f1", "confusion"} <= set(m)
        assert np.asarray(m["confusion"]).sum() == 16  # every test clip exactly once
    assert 0 < m1["params"]["all"]["trainable"] < m1["params"]["all"]["total"]
    # the precision auto chose, and why: in metrics.json, the run's config.yaml and TensorBoard
    assert m1["precision"] in ("bf16", "fp32") and m1["precision_reason"].startswith("auto: ")
    if not detect_hardware().cpu_bf16_features():
        assert m1["precision"] == "fp32"
    meta = yaml.safe_load((run1 / "config.yaml").read_text())
    assert meta["precision"] == {"name": m1["precision"], "reason": m1["precision_reason"], "requested": "auto"}

    # TensorBoard, read back with TensorBoard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run1 / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "train/audio_seconds_per_s",
                "valid/ua", "valid/wa", "valid/macro_f1", "test/acted/ua", "test/natural/ua"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in acc.Scalars("valid/ua")] == [6, 12]
    assert "valid/confusion" in tags["images"]
    assert any("config" in t for t in tags["tensors"])
    assert f"precision: {m1['precision']} ({m1['precision_reason']})" in text_summary(acc, "precision/text_summary")

    # stage 2 without --init-from finds the latest stage-1 run; lr 0 keeps the loaded weights
    run_train(workdir, "--stage", "2", "--config", str(default_config_path(2)), *SHORT,
              "--set", "optim.lr=0.0", "--run-dir", "runs/s2")
    m2 = json.loads((workdir / "runs" / "s2" / "metrics.json").read_text())
    assert m2["stage"] == 2 and Path(m2["init_from"]).resolve() == run1.resolve()
    assert m2["precision"] == m1["precision"]
    for rel in ("adaptors.safetensors", "lora/adapter_model.safetensors"):
        w1 = load_file(run1 / "export" / rel)
        w2 = load_file(workdir / "runs" / "s2" / "export" / rel)
        assert w1.keys() == w2.keys() and w1
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=0, msg=k)


def test_stage2_in_another_precision_than_its_stage1_says_so(workdir):
    run1 = workdir / "runs" / "s1-zero2"
    if not (run1 / "export").is_dir():
        run1 = stage1(workdir, "s1-zero2")
    p1 = json.loads((run1 / "metrics.json").read_text())["precision"]
    other = "fp32" if p1 == "bf16" else "bf16"
    r = run_train(workdir, "--stage", "2", "--config", str(default_config_path(2)), *SHORT, "--init-from", str(run1),
                  "--set", "optim.max_steps=2", "--set", f"deepspeed.precision={other}", "--run-dir", "runs/s2-other")
    assert f"precision: {other} (deepspeed.precision: {other} in the run config)" in r.stdout
    assert f"note: stage 2 trains in {other}; its stage-1 run {run1.resolve()} trained in {p1} (auto: " in r.stdout
    assert json.loads((workdir / "runs" / "s2-other" / "metrics.json").read_text())["precision"] == other


if OTHER_HERE == "bf16":  # the stage 2 above forces bf16 on this machine
    test_stage2_in_another_precision_than_its_stage1_says_so = pytest.mark.bf16(
        test_stage2_in_another_precision_than_its_stage1_says_so)


def test_ranks_train_in_rank0s_precision_whatever_their_own_hardware_says(workdir):
    run1 = workdir / "runs" / "s1-zero2"
    if not (run1 / "export").is_dir():
        run1 = stage1(workdir, "s1-zero2")
    # rank 1 alone sees hardware on which auto picks the other precision: only rank 0 decides,
    # so the run is the same run as s1-zero2, to the last weight
    run = stage1(workdir, "agree", fault=f"hardware:{PRETEND_OTHER[AUTO_HERE]}", fault_rank=1)
    m, m1 = (json.loads((r / "metrics.json").read_text()) for r in (run, run1))
    assert m["precision"] == m1["precision"]
    for rel in ("adaptors.safetensors", "lora/adapter_model.safetensors"):
        a, b = load_file(run1 / "export" / rel), load_file(run / "export" / rel)
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_zero3_trains_and_exports_for_peft(workdir):
    run = stage1(workdir, "s1-zero3", "--set", "deepspeed.config=zero3")
    m = json.loads((run / "metrics.json").read_text())
    assert m["eval"]["acted"]["samples"] == 16
    # the LoRA export loads with peft's own loader onto a bare backbone
    from peft import PeftModel

    from dser.model.backbones import load_backbone
    from dser.model.checkpoint_io import load_exported
    model, _, _ = load_exported(run / "export")
    bare = load_backbone(model.cfg.backbone)
    peft_model = PeftModel.from_pretrained(bare.model, str(run / "export" / "lora"))
    ours = {k.split("lora_")[1]: v for k, v in model.backbone.model.state_dict().items() if "lora_" in k}
    theirs = {k.split("lora_")[1]: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert ours.keys() == theirs.keys() and ours
    for k in ours:
        torch.testing.assert_close(theirs[k], ours[k])
    assert any(v.abs().sum() > 0 for k, v in ours.items() if k.startswith("B")), "LoRA B never trained"


def test_resume_matches_uninterrupted_run_and_keeps_its_precision_on_other_hardware(workdir):
    full = stage1(workdir, "full")
    part = stage1(workdir, "part", "--set", "train.stop_after_steps=6", expect=75)
    assert not (part / "metrics.json").exists()
    assert (part / "checkpoints" / "latest").read_text().strip() == "step00000006"
    started = yaml.safe_load((part / "config.yaml").read_text())["precision"]
    assert started["requested"] == "auto" and started["name"] == json.loads((full / "metrics.json").read_text())[
        "precision"]
    # resumed where auto would pick the other precision: it goes on in its own, and says so
    r = run_train(workdir, "--resume", str(part), fault=f"hardware:{PRETEND_OTHER[started['name']]}")
    other = "fp32" if started["name"] == "bf16" else "bf16"
    assert f"precision: {started['name']} (kept from the run's start: {started['reason']})" in r.stdout
    assert f"warning: resuming in {started['name']}, the precision the run started in; on this machine auto " \
           f"would pick {other}" in r.stdout
    m = json.loads((part / "metrics.json").read_text())
    assert m["precision"] == started["name"]
    assert m["precision_reason"] == f"kept from the run's start: {started['reason']}"
    for rel in ("adaptors.safetensors", "lora/adapter_model.safetensors"):
        a = load_file(full / "export" / rel)
        b = load_file(part / "export" / rel)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    ma = json.loads((full / "metrics.json").read_text())["eval"]
    mb = json.loads((part / "metrics.json").read_text())["eval"]
    for name in ma:
        assert mb[name]["ua"] == pytest.approx(ma[name]["ua"])
        assert mb[name]["confusion"] == ma[name]["confusion"]


def test_predict_gives_the_probabilities_of_evaluation(workdir):
    run = workdir / "runs" / "s1-zero2"
    if not (run / "export").is_dir():
        run = stage1(workdir, "s1-zero2")
    from dser.evaluate import evaluate_shards
    from dser.model.checkpoint_io import load_exported
    from dser.predict import predict_files

    model, run_config, label_set = load_exported(run / "export")
    m = evaluate_shards(lambda a, mask: model(a, mask), [str(workdir / "shards/demo-acted/test")], label_set,
                        "categorical", return_predictions=True)
    preds = m["predictions"]
    rows = [json.loads(line) for line in (workdir / "data/acted/manifest.jsonl").read_text().splitlines()]
    path_of = {r["utt_id"]: workdir / "data/acted" / r["path"] for r in rows}
    for i in (0, 5):
        utt = preds["utt_id"][i]
        (p,) = predict_files(run, [path_of[utt]])
        got = np.array([p["probabilities"][c] for c in label_set.classes])
        np.testing.assert_allclose(got, preds["emotion_prob"][i], atol=1e-4)


def test_a_run_leaves_nothing_in_dev_shm(workdir):
    cmd, env = launch_command(["--stage", "1", "--config", str(default_config_path(1)), *SHORT,
                               "--set", "optim.max_steps=2", "--run-dir", "runs/shm"], ranks=2)
    port = cmd[cmd.index("--master_port") + 1]
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    r = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    left = [p.name for p in Path("/dev/shm").glob(f"*_{port}_*")] if Path("/dev/shm").is_dir() else []
    assert left == [], left


def test_bad_config_key_fails_with_its_name(workdir):
    r = run_train(workdir, "--stage", "1", "--set", "optim.lrr=1", expect=2, ranks=1)
    assert "unknown key config.optim.lrr" in r.stderr + r.stdout
    assert "allowed keys in config.optim" in r.stderr + r.stdout


def dser_train(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``dser train`` as a user runs it (the CLI, the launcher's output through dser)."""
    import os
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(Path(sys.executable).with_name("dser")), "train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("verbose", [False, True])
def test_deepspeeds_own_lines_only_with_verbose(workdir, verbose):
    # one step, then stopped with a checkpoint (exit 75): the launcher's failure line is there too
    r = dser_train(workdir, "--stage", "1", "--config", str(default_config_path(1)), *SHORT, "--ranks", "1",
                   "--set", "optim.max_steps=2", "--set", "train.stop_after_steps=1",
                   "--run-dir", f"runs/verbose-{verbose}", *(["--verbose"] if verbose else []))
    out = r.stdout + r.stderr
    assert r.returncode == 75, out[-3000:]
    assert r.stdout.strip().splitlines()[-1] == (f"stopped at step 1 by train.stop_after_steps=1; resume with dser "
                                                 f"train --resume runs/verbose-{verbose}")
    launcher = ["[INFO] [runner.py:", "[INFO] [launch.py:", "Setting CUDA_VISIBLE_DEVICES",
                "Unable to find hostfile", "exits with return code = 75"]
    rank = ["[INFO] [config.py:", "[INFO] [engine.py:"]  # DeepSpeed's engine, inside the rank
    if verbose:
        assert all(line in out for line in launcher + rank), out[-3000:]
    else:
        assert "[INFO]" not in out and not [line for line in launcher if line in out], out[-3000:]
        assert "dser: rank" not in out  # a stop is no failure: its own line says it all
