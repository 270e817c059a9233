"""dser.bench's measuring parts: the length distribution, the generated corpus, padding
statistics and the loader's planned batches, autograd's saved activations, the peak-memory
monitor, TensorBoard rates, goal checks, the baseline script's Dataset and collate, and the goals
table BENCHMARKS.md's goals part is generated from."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from dser import bench
from dser.bench import (FULL, BenchError, PeakMemory, check_goals, iemocap_like_lengths, saved_activation_bytes,
                        write_bench_corpus)
from dser.bench import balance as balance_section
from dser.bench import padding as padding_section
from dser.bench.baseline import WavDataset, pad_collate, read_manifest
from dser.bench.goals import BEGIN, END, GOALS, read_results, value_at, with_goals
from dser.bench.padding import _padding_stats
from dser.bench.run import SECTION_MODULES
from dser.bench.training import _tensorboard_rate
from dser.corpora import read_corpus


def test_lengths_are_iemocap_like_and_deterministic():
    s = iemocap_like_lengths(20000, seed=3)
    assert 3.3 < np.median(s) < 3.7
    assert 4.2 < s.mean() < 4.8
    assert s.min() >= 0.6 and s.max() <= 30.0
    assert (s > 15).any()  # a real long tail, not just a bump around the median
    assert np.array_equal(s, iemocap_like_lengths(20000, seed=3))
    assert not np.array_equal(s, iemocap_like_lengths(20000, seed=4))


def test_bench_corpus_has_the_requested_lengths_and_reads_as_a_manifest(tmp_path):
    manifest = write_bench_corpus(tmp_path / "c", [0.7, 2.25, 5.0], sample_rate=48000)
    listing = read_corpus("manifest", manifest)
    assert [r.emotion for r in listing.records] == ["neutral", "happy", "angry"]
    for record, seconds in zip(listing.records, [0.7, 2.25, 5.0]):
        info = sf.info(record.path)
        assert info.samplerate == 48000 and info.subtype == "PCM_16"
        assert info.frames == round(seconds * 48000)
        audio, _ = sf.read(record.path)
        assert np.sqrt(np.mean(audio ** 2)) > 1e-3  # speech-like content, not silence


def test_padding_stats():
    stats = _padding_stats([np.array([2, 4]), np.array([3, 3, 3])])
    assert stats["real_fraction"] == pytest.approx(15 / 17)  # (2+4+9) / (2·4 + 3·3)
    assert stats["min_batch_real_fraction"] == pytest.approx(0.75)
    assert stats["batches_at_least_90"] == 0.5
    assert stats["batches"] == 2 and stats["mean_clips_per_batch"] == 2.5


def test_padding_measures_the_loaders_plan(tmp_path):
    sizes = replace(FULL, padding_clips=3000)
    r = bench.bench_padding(tmp_path, sizes, lambda _: None)
    for case in ("cropped", "whole"):
        d, rnd = r[case]["dser"], r[case]["random"]
        # every clip planned once, by both
        assert round(d["batches"] * d["mean_clips_per_batch"]) == 3000
        assert round(rnd["batches"] * rnd["mean_clips_per_batch"]) == 3000
        assert d["mean_padded_seconds"] <= r["max_batch_seconds"]
        assert 0 < rnd["real_fraction"] < d["real_fraction"] <= 1
    assert r["cropped"]["random"]["clips_per_batch"] == int(r["max_batch_seconds"] // r["cropped"]["max_seconds"])
    assert not (tmp_path / "plan-shards").exists()


def test_saved_activations_show_whether_the_cnn_keeps_a_graph():
    frozen = saved_activation_bytes("tiny-wavlm", ["full"], seconds=1.0)
    assert frozen["front_end_saved_activation_bytes"] == 0
    assert frozen["saved_activation_bytes"] > 0
    trained = saved_activation_bytes("tiny-wavlm", ["full"], seconds=1.0,
                                     backbone_options={"freeze_feature_encoder": False})
    assert trained["front_end_saved_activation_bytes"] > 0
    probe = saved_activation_bytes("tiny-wavlm", ["none"], seconds=1.0)
    # head only: nothing in the backbone is saved, far less than with LoRA in every layer
    assert probe["saved_activation_bytes"] < saved_activation_bytes("tiny-wavlm", ["lora"], seconds=1.0)[
        "saved_activation_bytes"] / 4


def test_peak_memory_counts_ranks_not_their_workers(tmp_path):
    rank = tmp_path / "fake_rank.py"
    rank.write_text(textwrap.dedent("""
        import multiprocessing as mp, time
        import numpy as np
        def worker():
            time.sleep(1.5)          # a forked worker: same command line, must be left out
        if __name__ == "__main__":
            mp.set_start_method("fork")
            p = mp.Process(target=worker); p.start()
            big = np.ones(300 * 2**20 // 8)   # ~300 MiB resident
            time.sleep(1.5)
            p.join()
    """))
    launcher = [sys.executable, "-c", f"import subprocess, sys; subprocess.call([sys.executable, '-u', {str(rank)!r}])"]
    proc = subprocess.Popen(launcher)
    with PeakMemory(proc.pid, "fake_rank.py", interval=0.05) as memory:
        proc.wait()
    assert len(memory.peaks) == 1, memory.peaks
    assert next(iter(memory.peaks.values())) > 300 * 2 ** 20


def test_tensorboard_rate_is_total_over_time_after_warmup(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    w = SummaryWriter(str(run / "tensorboard"))
    t0 = time.time()
    # step: (rate, wall time); step 1 is warm-up; steps 2 and 3 took 1 s and 3 s
    for step, rate, wall in ((1, 100.0, t0), (2, 10.0, t0 + 1), (3, 20.0, t0 + 4)):
        w.add_scalar("train/samples_per_s", rate, step, walltime=wall)
    w.close()
    assert _tensorboard_rate(run, "train/samples_per_s", warmup_steps=1) == pytest.approx((10 * 1 + 20 * 3) / 4)
    with pytest.raises(BenchError, match="no train/samples_per_s scalars after step 3"):
        _tensorboard_rate(run, "train/samples_per_s", warmup_steps=3)


def test_goals_are_checked_against_results():
    results = {"pipeline": {"speedup": 1.6}, "peft": {"combination": {"peak_rss_ratio": 0.8}}}
    goals = {g["field"]: g for g in check_goals(results)}
    assert goals["pipeline.speedup"]["met"] is True
    assert goals["peft.combination.peak_rss_ratio"]["met"] is False
    assert goals["loading.dser.per_worker_x_realtime"]["met"] is None  # not measured


def test_unknown_section_is_refused():
    with pytest.raises(BenchError, match="unknown bench section.*choose from sharding"):
        bench.run_bench(None, sections=["speed"])


def test_baseline_dataset_crops_and_pads(tmp_path):
    for name, n in (("a", 8000), ("b", 40000)):
        sf.write(tmp_path / f"{name}.wav", np.full(n, 0.25, dtype=np.float32), 16000, subtype="PCM_16")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"path": f"{n}.wav", "emotion": e}) + "\n"
                                              for n, e in (("a", "sad"), ("b", "neutral"))))
    ds = WavDataset(read_manifest(tmp_path / "m.jsonl"), tmp_path, max_samples=16000)
    items = [ds[0], ds[1]]
    assert [len(a) for a, _ in items] == [8000, 16000]
    assert [y for _, y in items] == [3, 0]
    batch = pad_collate(items)
    assert batch["audio"].shape == (2, 16000) and batch["lengths"].tolist() == [8000, 16000]
    assert batch["attention_mask"].sum(1).tolist() == [8000, 16000]
    assert torch.all(batch["audio"][0, 8000:] == 0)


def test_cli_refuses_an_unknown_section_in_one_line(tmp_path):
    from click.testing import CliRunner

    from dser.cli import main

    r = CliRunner().invoke(main, ["bench", "--only", "speed", "--workdir", str(tmp_path / "w")])
    assert r.exit_code == 1 and "unknown bench section(s) speed" in r.output and "soak" in r.output
    assert "Traceback" not in r.output


def test_a_workdir_holding_files_the_bench_did_not_make_is_refused_and_left_as_it_was(tmp_path):
    # The sections write, overwrite and remove fixed names under --workdir (shards16k, runs/,
    # bench_run.yaml, plan-shards, …): a user's directory of those names must never be touched.
    from click.testing import CliRunner

    from dser.bench.run import WORKDIR_MARKER
    from dser.cli import main

    work = tmp_path / "mine"
    for name in ("shards16k/index.json", "runs/important/metrics.json", "plan-shards/a.tar", "bench_run.yaml",
                 "notes.txt"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(f"the user's {name}")
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    r = CliRunner().invoke(main, ["bench", "--quick", "--only", "padding", "--workdir", str(work)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"--workdir {work}: holds 'bench_run.yaml' and 4 more, which dser bench did not make" in r.output
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before

    # A new directory, an empty one and one an earlier bench made are the bench's to use.
    for fresh in (tmp_path / "new", tmp_path / "empty"):
        if fresh.name == "empty":
            fresh.mkdir()
        r = CliRunner().invoke(main, ["bench", "--quick", "--only", "padding", "--workdir", str(fresh)])
        assert r.exit_code == 0, r.output
        assert (fresh / WORKDIR_MARKER).is_file()
        r = CliRunner().invoke(main, ["bench", "--quick", "--only", "padding", "--workdir", str(fresh)])
        assert r.exit_code == 0, r.output


# ---- the goals table and BENCHMARKS.md ---------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def test_benchmarks_md_goals_part_is_what_the_goals_table_generates():
    # After editing GOALS or BENCHMARKS.json: dser bench --results BENCHMARKS.json --write-goals BENCHMARKS.md
    text = (REPO / "BENCHMARKS.md").read_text()
    results = read_results(REPO / "BENCHMARKS.json")
    assert with_goals(text, results, "BENCHMARKS.json") == text
    for g in GOALS:
        assert g.met(value_at(results, g.field)) is not None, f"BENCHMARKS.json has no {g.field}"


def test_every_goal_names_a_measurement_a_section_produces():
    for name, module in SECTION_MODULES.items():
        assert module.NAME == name and all(f.startswith(name + ".") for f in module.MEASURES), name
    fields = [g.field for g in GOALS]
    assert len(set(fields)) == len(fields) and len({g.name for g in GOALS}) == len(GOALS)
    for g in GOALS:
        section = g.field.split(".")[0]
        assert section in SECTION_MODULES, f"{g.name}: {g.field} is in no section"
        assert g.field in SECTION_MODULES[section].MEASURES, f"{g.name}: section {section} does not measure {g.field}"
        assert g.op in (">=", "<=") and g.unit in ("x", "%", "bytes"), g


def test_padding_writes_the_measures_it_declares(tmp_path):
    r = {"padding": bench.bench_padding(tmp_path, replace(FULL, padding_clips=800), lambda _: None)}
    for field in padding_section.MEASURES:
        value = value_at(r, field)
        assert isinstance(value, float) and value >= 0, (field, value)
        assert value <= 1 or field.endswith("ratio_dser_to_random"), (field, value)  # shares are at most 1


def test_balance_writes_the_measures_it_declares_and_compares_both_planners(tmp_path):
    r = {"balance": bench.bench_balance(tmp_path, replace(FULL, padding_clips=2000), lambda _: None)}
    for field in balance_section.MEASURES:
        value = value_at(r, field)
        if field.endswith(".repeats"):
            assert isinstance(value, int) and value >= 0, (field, value)
        else:
            assert isinstance(value, float) and value > 0, (field, value)
            assert value <= 1 or field.endswith("_seconds_100k"), (field, value)  # shares are at most 1
    b = r["balance"]
    assert b["clips"] == 2000 and b["shards"] == 8 and not (tmp_path / "balance-shards").exists()
    assert (b["recipe"]["max_seconds"], b["recipe"]["max_batch_seconds"]) == (15.0, 160.0)  # iemocap_loso.yaml
    assert (b["default"]["max_seconds"], b["default"]["max_batch_seconds"]) == (6.0, 48.0)  # DataConfig
    for batching in ("recipe", "default"):
        for w in (2, 4, 8):
            old, new = b[batching]["per_rank"][f"ranks_{w}"], b[batching]["global"][f"ranks_{w}"]
            assert new["step_balance"] > old["step_balance"], (batching, w)
    assert "7. balance" in "\n".join(balance_section.table(b))


def test_goals_part_is_regenerated_and_the_rest_kept():
    results = {"command": "dser bench --quick", "pipeline": {"speedup": 1.2},
               "peft": {"combination": {"peak_rss_ratio": 0.5}}}
    text = f"# head\n\nkept\n{BEGIN}\nstale table\n{END}\n\n## after\nkept too\n"
    new = with_goals(text, results)
    assert new.startswith("# head\n\nkept\n" + BEGIN + "\n## Goals\n")
    assert new.endswith(f"{END}\n\n## after\nkept too\n")
    assert "stale" not in new and "`dser bench --quick`" in new
    rows = {line.split(" | ")[0].lstrip("| "): line for line in new.splitlines() if line.startswith("| ")}
    assert rows["dser vs the usual pipeline, audio-seconds/s"] == (
        "| dser vs the usual pipeline, audio-seconds/s | ≥ 1.5× | **1.20×** (fp32 baseline; no bf16-autocast "
        "variant: no native bf16 here) | **no** | `pipeline.speedup` |")
    assert "| ≤ 0.7× | **0.50×** | yes |" in rows["PEFT combination vs full, peak memory per rank"]
    assert "| 0 bytes | not measured | - |" in rows["frozen CNN builds no graph"]
    assert with_goals(new, results) == new  # generating again changes nothing
    for broken in ("no markers\n", f"{END}\n{BEGIN}\n", f"{BEGIN}\nonly the first\n"):
        with pytest.raises(BenchError, match="no generated goals part to replace"):
            with_goals(broken, results)


def test_cli_writes_goals_from_a_results_file(tmp_path):
    from click.testing import CliRunner

    from dser.cli import main

    md, js = tmp_path / "B.md", tmp_path / "b.json"
    md.write_text(f"intro\n{BEGIN}\n{END}\nrest\n")
    js.write_text(json.dumps({"command": "dser bench", "soak": {"rss_growth": 1.2, "rss_growth_per_rank": [1.1, 1.2]}}))
    r = CliRunner().invoke(main, ["bench", "--results", str(js), "--write-goals", str(md)])
    assert r.exit_code == 0, r.output
    assert "| **1.200×** (rank 1; rank 0 1.100×) | **no** | `soak.rss_growth` |" in md.read_text()
    assert md.read_text().startswith("intro\n") and md.read_text().endswith(f"{END}\nrest\n")
    for args, message in ((["--results", str(js)], "only --write-goals reads it"),
                          (["--results", str(tmp_path / "none.json"), "--write-goals", str(md)], "cannot read it"),
                          (["--results", str(md), "--write-goals", str(md)], "not JSON"),
                          (["--results", str(js), "--write-goals", str(js)], "no generated goals part"),
                          (["--results", str(js), "--write-goals", str(md), "--quick", "--only", "padding"],
                           "nothing runs, so --quick, --only would do nothing")):
        r = CliRunner().invoke(main, ["bench", *args])
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, (args, r.output)
