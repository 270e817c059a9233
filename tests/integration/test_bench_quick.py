"""``dser bench --quick`` end to end: it runs, prints its tables, and writes every field.

Timings are not checked (they depend on the machine and its load); structure and the
quantities that do not depend on speed are: parameter, byte and clip counts, ratios of the
reference run to itself, two peak-memory readings for two ranks, a baseline whose LoRA trains,
the precision of every training figure (the one auto picks here) and a bf16-autocast baseline
only where that precision is bf16.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

SHARDING = ["input_sample_rate", "clips", "audio_seconds", "workers1_x_realtime", "workers2_x_realtime",
            "workers1_seconds", "workers2_seconds", "workers2_speedup"]
LOADER = ["workers0_x_realtime", "workers2_x_realtime", "per_worker_x_realtime", "per_worker_x_realtime_2_workers",
          "real_fraction"]
PADDING = ["real_fraction", "min_batch_real_fraction", "batches_at_least_90", "batches", "mean_clips_per_batch",
           "mean_padded_seconds"]
TRAIN_RUN = ["samples_per_s", "audio_seconds_per_s", "peak_rss_bytes", "checkpoint_bytes", "optimizer_state_bytes",
             "model_state_bytes", "export_bytes", "trainable_params", "total_params", "wall_seconds",
             "saved_activation_bytes", "front_end_saved_activation_bytes", "samples_per_s_ratio", "peak_rss_ratio",
             "optimizer_state_bytes_ratio", "checkpoint_bytes_ratio", "trainable_params_ratio",
             "saved_activation_bytes_ratio"]
PIPELINE_RUN = ["audio_seconds_per_s", "samples_per_s"]
BALANCE = ["step_balance", "busy_fraction", "real_fraction", "steps"]

# Every number the bench promises, as dotted paths.
FIELDS = (
    ["seconds", "machine.cores", "machine.memory_bytes"]
    + [f"sharding.{rate}.{k}" for rate in ("16k", "48k") for k in SHARDING]
    + [f"loading.{who}.{k}" for who in ("dser", "streaming", "plain") for k in LOADER]
    + ["loading.ratio_dser_to_plain", "loading.ratio_dser_to_plain_2_workers", "loading.plain_batch_size",
       "loading.ratio_planned_to_streaming", "loading.ratio_planned_to_streaming_2_workers"]
    + [f"loading.reader.{who}.{cache}_x_realtime" for who in ("streaming", "random_access") for cache in ("warm", "cold")]
    + [f"loading.reader.{k}" for k in ("ratio_random_to_streaming_warm", "ratio_random_to_streaming_cold",
                                       "cold_resident_fraction", "samples", "audio_seconds")]
    + ["padding.clips", "padding.median_seconds", "padding.mean_seconds", "padding.min_seconds", "padding.max_seconds"]
    + [f"padding.{case}.{who}.{k}" for case in ("cropped", "whole") for who in ("dser", "random") for k in PADDING]
    + [f"padding.{case}.ratio_dser_to_random" for case in ("cropped", "whole")]
    + [f"peft.{run}.{k}" for run in ("full", "lora", "combination") for k in TRAIN_RUN]
    + [f"pipeline.{who}.{k}" for who in ("dser", "baseline") for k in PIPELINE_RUN]
    + ["pipeline.speedup", "pipeline.samples_speedup", "pipeline.baseline.real_fraction"]
    + [f"soak.{k}" for k in ("steps", "warmup_steps", "rss_growth", "rss_end_growth", "samples_per_s", "wall_seconds",
                             "readings_per_rank")]
    + ["balance.clips", "balance.shards", "balance.global_plan_seconds_100k"]
    + [f"balance.{batching}.{planner}.ranks_{w}.{k}" for batching in ("recipe", "default")
       for planner in ("per_rank", "global") for w in (2, 4, 8) for k in BALANCE]
    + [f"balance.{batching}.global.ranks_{w}.repeats" for batching in ("recipe", "default") for w in (2, 4, 8)]
)


def get(results: dict, dotted: str):
    node = results
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{dotted}: no {part!r} in the results"
        node = node[part]
    return node


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, str]:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "dser.cli", "bench", "--quick", "--out", str(out)],
                       cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return json.loads(out.read_text()), r.stdout


def test_every_field_is_written(quick):
    results, _ = quick
    assert results["format"] == "dser-bench/1" and results["quick"] is True
    assert results["command"].startswith("dser bench --quick")
    fields = FIELDS
    if results["pipeline"]["native_bf16"]:
        fields = [*FIELDS, *(f"pipeline.baseline_bf16.{k}" for k in PIPELINE_RUN), "pipeline.speedup_vs_bf16_baseline"]
    for dotted in fields:
        value = get(results, dotted)
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{dotted} = {value!r}"
        assert math.isfinite(value) and value >= 0, f"{dotted} = {value!r}"
    for lib in ("dser", "python", "torch", "deepspeed", "transformers", "peft", "webdataset", "soundfile",
                "libsndfile", "soxr"):
        assert results["versions"][lib], lib
    assert results["machine"]["cpu"]
    assert {g["field"] for g in results["goals"]} >= {"pipeline.speedup", "peft.combination.samples_per_s_ratio",
                                                      "loading.dser.per_worker_x_realtime"}
    assert all(g["value"] is not None and g["met"] in (True, False) for g in results["goals"])


def test_quantities_that_do_not_depend_on_speed(quick):
    results, _ = quick
    peft = results["peft"]
    for run in ("full", "lora", "combination"):
        assert len(peft[run]["peak_rss_bytes_per_rank"]) == peft["ranks"] == 2  # one reading per rank, no workers
        assert peft[run]["total_params"] > 90_000_000  # the WavLM Base+ architecture
        assert 0 < peft[run]["optimizer_state_bytes"] < peft[run]["checkpoint_bytes"]
    for k in ("samples_per_s_ratio", "peak_rss_ratio", "checkpoint_bytes_ratio"):
        assert peft["full"][k] == 1.0
    assert peft["lora"]["trainable_params"] < peft["combination"]["trainable_params"] < peft["full"]["trainable_params"]
    assert peft["combination"]["checkpoint_bytes_ratio"] < 0.05  # a byte count, not a timing
    assert peft["full"]["front_end_saved_activation_bytes"] == 0  # the frozen CNN builds no graph
    pipeline = results["pipeline"]
    assert pipeline["baseline_lora_trains"] is True  # the baseline's LoRA is in its graph, every layer
    for run in pipeline["baseline_runs"] + pipeline.get("baseline_bf16_runs", []):
        assert run["layerdrop"] == run["mask_time_prob"] == 0.0  # the config dser's backbone runs
    assert len(pipeline["dser_runs"]) == len(pipeline["baseline_runs"]) == results["sizes"]["rounds"]
    s = results["sharding"]
    assert s["16k"]["clips"] == results["sizes"]["shard_clips_16k"]
    assert s["48k"]["clips"] == results["sizes"]["shard_clips_48k"]
    assert results["padding"]["clips"] == results["sizes"]["padding_clips"]
    assert results["balance"]["clips"] == results["sizes"]["padding_clips"]
    soak = results["soak"]
    assert soak["steps"] == results["sizes"]["soak_steps"]
    for key in ("rss_after_warmup_bytes_per_rank", "rss_max_after_warmup_bytes_per_rank", "rss_end_bytes_per_rank"):
        assert len(soak[key]) == 2 and all(v > 100 * 2 ** 20 for v in soak[key]), key  # two ranks, real readings
    assert soak["rss_growth"] >= soak["rss_end_growth"] > 0


def test_every_training_figure_is_in_the_precision_auto_picks_and_says_so(quick):
    results, stdout = quick
    auto = results["machine"]["auto_precision"]
    assert auto in ("bf16", "fp16", "fp32") and results["machine"]["auto_precision_reason"].startswith("auto: ")
    runs = [results["peft"][k] for k in ("full", "lora", "combination")] + results["pipeline"]["dser_runs"]
    precisions = {r["precision"] for r in runs} | {results["soak"]["precision"]}
    assert len(precisions) == 1 and all(r["precision_reason"].startswith("auto: ") for r in runs), precisions
    (used,) = precisions
    assert results["peft"]["precision"] == results["pipeline"]["dser"]["precision"] == used
    # the side-by-side bf16-autocast baseline exists exactly where the hardware has native bf16
    assert results["pipeline"]["native_bf16"] == (auto == "bf16") == ("baseline_bf16_runs" in results["pipeline"])
    assert f"ZeRO-2 {used}" in stdout and f"precision auto here: {auto} (" in stdout
    assert ("usual, bf16 autocast" in stdout) == (auto == "bf16")


def test_console_tables(quick):
    _, stdout = quick
    for title in ("1. sharding", "2. loading", "3. padding", "4. PEFT vs full", "5. dser vs the usual pipeline",
                  "6. soak", "7. balance", "goals"):
        assert title in stdout, title
    assert "results: " in stdout


def test_every_section_writes_the_measures_it_declares(quick):
    # What the goals table may name (tests/unit/test_bench.py) is what a run really writes.
    from dser.bench import GOALS, SECTION_MODULES

    results, _ = quick
    for module in SECTION_MODULES.values():
        for dotted in module.MEASURES:
            value = get(results, dotted)
            assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{dotted} = {value!r}"
            assert math.isfinite(value) and value >= 0, f"{dotted} = {value!r}"
    assert [g["field"] for g in results["goals"]] == [g.field for g in GOALS]
