"""Section 5, dser vs the usual pipeline: audio-seconds/s of a dser training run side by side
with ``baseline.py`` (transformers + peft + DataLoader over WAV files, random padded batches,
plain AdamW, one process) on the same model, data and number of optimizer steps, run in
alternation; where the hardware has native bf16, also against the script in bf16 autocast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dser.bench.console import text_table
from dser.bench.corpus import bench_corpus
from dser.bench.sizes import SAMPLE_RATE, BenchSizes
from dser.bench.training import failed_run, precision_label, train_run

NAME = "pipeline"
# The feed-forward projections: both dser and a stock transformers WavLM call these as modules,
# so peft's LoRA on them trains in both pipelines (see baseline.py's docstring).
PIPELINE_LORA_TARGETS = ["intermediate_dense", "output_dense"]
BASELINE_SCRIPT = Path(__file__).resolve().parent / "baseline.py"
# The numbers this section writes that goals and readers refer to (dotted, from the results' top).
# speedup_vs_bf16_baseline is left out: it exists only where the hardware has native bf16.
MEASURES = ("pipeline.speedup", "pipeline.samples_speedup", "pipeline.dser.audio_seconds_per_s",
            "pipeline.baseline.audio_seconds_per_s", "pipeline.baseline.real_fraction")


def baseline_run(work: Path, sizes: BenchSizes, name: str, ranks: int, log: Callable[[str], None],
                 precision: str = "fp32") -> dict:
    """One run of ``baseline.py`` on the same clips and architecture, measured."""
    from dser.model.backbones import load_backbone

    # The transformers config exactly as dser's backbone runs it: dser turns the architecture's
    # LayerDrop (0.1) and SpecAugment (0.05) off unless configured, so the baseline must too.
    config_dir = work / "baseline-backbone"
    config_dir.mkdir(exist_ok=True)
    with torch.device("meta"):  # shapes only: no memory, no weights
        load_backbone(sizes.backbone).hf_model.config.to_json_file(str(config_dir / "config.json"))
    manifest = bench_corpus(work, SAMPLE_RATE, sizes.shard_clips_16k)
    out = work / f"{name}.json"
    batch_size = max(1, int(ranks * sizes.max_batch_seconds // sizes.max_seconds))
    cmd = [sys.executable, str(BASELINE_SCRIPT), "--manifest", str(manifest), "--backbone-config", str(config_dir),
           "--batch-size", str(batch_size), "--max-seconds", str(sizes.max_seconds),
           "--steps", str(sizes.warmup_steps + sizes.measured_steps),
           "--lora-targets", ",".join(PIPELINE_LORA_TARGETS), "--precision", precision,
           "--threads", str(os.cpu_count() or 1), "--out", str(out)]
    # One process using every core, whatever OMP_NUM_THREADS the caller has set.
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(os.cpu_count() or 1))
    log_path = work / f"{name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as f:
        rc = subprocess.call(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if rc != 0:
        raise failed_run("baseline", name, rc, log_path)
    data = json.loads(out.read_text())
    measured = [s for s in data["steps"] if s["step"] > sizes.warmup_steps]
    seconds = sum(s["seconds"] for s in measured)
    result = {
        "samples_per_s": sum(s["samples"] for s in measured) / seconds,
        "audio_seconds_per_s": sum(s["audio_seconds"] for s in measured) / seconds,
        "real_fraction": (sum(s["audio_seconds"] for s in data["steps"])
                          / sum(s["padded_seconds"] for s in data["steps"])),
        "batch_size": batch_size, "precision": precision, "threads": data["threads"],
        "trainable_params": data["trainable_params"],
        "lora_b_tensors": data["lora_b_tensors"], "lora_b_tensors_with_grad": data["lora_b_tensors_with_grad"],
        "layerdrop": data["layerdrop"], "mask_time_prob": data["mask_time_prob"],
        "wall_seconds": wall,
    }
    log(f"  {name}: {result['samples_per_s']:.2f} samples/s, {result['audio_seconds_per_s']:.1f} audio-s/s, "
        f"run {wall:.0f} s")
    return result


def bench_pipeline(work: Path, sizes: BenchSizes, ranks: int, log: Callable[[str], None]) -> dict:
    """dser's recipe against baseline.py, alternating, same model / data / steps.

    Both train LoRA (rank 8) on the feed-forward projections of every layer and a projector →
    mean-pooling → classifier head on the same architecture and clips, cropped to the same
    ``max_seconds``; dser with ``ranks`` ranks (ZeRO-2, the precision auto picks, duration-capped
    buckets), the baseline as one process using every core, batches of the same worst-case padded
    size, in fp32 (what the plain script does) and, where the hardware has native bf16 (``auto``
    picks bf16 here), also in bf16 autocast, to separate precision from the rest. Without native
    bf16 that variant would only measure bf16's emulation (~60x slower matmuls), so it is left out.
    """
    from dser.precision import decide_precision, detect_hardware

    native_bf16 = decide_precision("auto", detect_hardware()).name == "bf16"
    overrides = ["model.adaptors=[lora]", f"model.lora.target_modules={json.dumps(PIPELINE_LORA_TARGETS)}"]
    result: dict = {"backbone": sizes.backbone, "adaptors": "lora on " + ", ".join(PIPELINE_LORA_TARGETS),
                    "steps": sizes.warmup_steps + sizes.measured_steps, "warmup_steps": sizes.warmup_steps,
                    "rounds": sizes.rounds, "native_bf16": native_bf16, "dser_runs": [], "baseline_runs": []}
    whos = ("dser", "baseline", "baseline_bf16") if native_bf16 else ("dser", "baseline")
    if native_bf16:
        result["baseline_bf16_runs"] = []
    for r in range(sizes.rounds):
        result["dser_runs"].append(train_run(work, sizes, f"pipeline-dser-{r}", overrides, ranks, log))
        del result["dser_runs"][-1]["rss_series_per_rank"]
        result["baseline_runs"].append(baseline_run(work, sizes, f"pipeline-baseline-{r}", ranks, log))
        if native_bf16:
            result["baseline_bf16_runs"].append(baseline_run(work, sizes, f"pipeline-baseline-bf16-{r}", ranks, log,
                                                             precision="bf16-autocast"))
    for who in whos:
        runs = result[f"{who}_runs"]
        result[who] = {k: float(np.mean([x[k] for x in runs])) for k in ("audio_seconds_per_s", "samples_per_s")}
    result["dser"]["precision"] = precision_label(result["dser_runs"])
    result["baseline"]["real_fraction"] = float(np.mean([x["real_fraction"] for x in result["baseline_runs"]]))
    result["speedup"] = result["dser"]["audio_seconds_per_s"] / result["baseline"]["audio_seconds_per_s"]
    result["samples_speedup"] = result["dser"]["samples_per_s"] / result["baseline"]["samples_per_s"]
    if native_bf16:
        result["speedup_vs_bf16_baseline"] = (result["dser"]["audio_seconds_per_s"]
                                              / result["baseline_bf16"]["audio_seconds_per_s"])
    # Every LoRA module of every baseline run got a gradient on its first step: none was
    # bypassed or skipped (LayerDrop), so both pipelines trained the same thing.
    result["baseline_lora_trains"] = all(b["lora_b_tensors_with_grad"] == b["lora_b_tensors"] > 0
                                         for b in result["baseline_runs"] + result.get("baseline_bf16_runs", []))
    return result


def table(result: dict) -> list[str]:
    """The section's console table."""
    who = [(f"dser (recipe, 2 ranks, ZeRO-2 {result['dser']['precision']}, buckets)", "dser"),
           ("usual (transformers + peft, random batches, fp32)", "baseline")]
    if "baseline_bf16" in result:
        who.append(("usual, bf16 autocast", "baseline_bf16"))
    rows = [[name, f"{result[k]['audio_seconds_per_s']:.2f}", f"{result[k]['samples_per_s']:.2f}"] for name, k in who]
    rows.append(["ratio dser / usual (fp32)", f"{result['speedup']:.2f}x", f"{result['samples_speedup']:.2f}x"])
    if "baseline_bf16" in result:
        rows.append(["ratio dser / usual (bf16 autocast)", f"{result['speedup_vs_bf16_baseline']:.2f}x", ""])
    else:
        rows.append(["(no bf16-autocast baseline: this hardware has no native bf16)", "", ""])
    return text_table(f"5. dser vs the usual pipeline: {result['backbone']}, {result['adaptors']}, "
                      f"{result['steps']} steps, {result['rounds']} round(s)", ["pipeline", "audio-s/s", "samples/s"],
                      rows)
