"""What a run prints about its precision beyond its first line (dser.startup.precision_notes)."""

from __future__ import annotations

import yaml

from dser.precision import Precision
from dser.runconfig import CONFIGS_DIR, resolve_config
from dser.startup import precision_notes

AUTO_FP32 = Precision("fp32", "auto: this CPU has no native bf16, capability AVX2")


def cfg(*overrides: str, stage: int = 1):
    return resolve_config(CONFIGS_DIR / f"demo_stage{stage}.yaml", list(overrides), stage)


def test_nothing_more_when_nothing_is_surprising():
    assert precision_notes(cfg(), AUTO_FP32, stage=1) == []


def test_the_slow_choice_warning_comes_first():
    p = Precision("bf16", "deepspeed.precision: bf16 in the run config", "bf16", warning="bf16 is slow here")
    assert precision_notes(cfg("deepspeed.precision=bf16"), p, stage=1) == ["warning: bf16 is slow here"]


def test_an_old_per_precision_file_name_that_no_longer_decides_says_how_to_keep_it():
    (note,) = precision_notes(cfg("deepspeed.config=zero2_bf16"), AUTO_FP32, stage=1)
    assert note == ("note: deepspeed.config zero2_bf16 names bf16, but the precision is deepspeed.precision's "
                    "(auto: fp32); set deepspeed.precision=bf16 to train in bf16")
    # an explicit precision is the user's choice: no note
    forced = Precision("fp32", "deepspeed.precision: fp32 in the run config", "fp32")
    assert precision_notes(cfg("deepspeed.config=zero2_bf16", "deepspeed.precision=fp32"), forced, stage=1) == []


def write_stage1(run, precision: dict | None):
    run.mkdir()
    meta = {"stage": 1, "config": {"deepspeed": {"config": "zero2_bf16", "precision": "auto"}}}
    if precision:
        meta["precision"] = precision
    (run / "config.yaml").write_text(yaml.safe_dump(meta))


def test_stage2_in_another_precision_than_its_stage1_says_so(tmp_path):
    s1 = tmp_path / "s1"
    write_stage1(s1, {"name": "bf16", "reason": "auto: this CPU has native bf16", "requested": "auto"})
    c = cfg(f"stage2.init_from={s1}", stage=2)
    assert precision_notes(c, AUTO_FP32, stage=2) == [
        f"note: stage 2 trains in fp32; its stage-1 run {s1} trained in bf16 (auto: this CPU has native bf16)"]
    same = Precision("bf16", "auto: this CPU has native bf16")
    assert precision_notes(c, same, stage=2) == []


def test_a_stage1_run_from_before_the_record_counts_as_its_deepspeed_file_said(tmp_path):
    s1 = tmp_path / "old"
    write_stage1(s1, None)
    (note,) = precision_notes(cfg(f"stage2.init_from={s1}", stage=2), AUTO_FP32, stage=2)
    assert note.startswith(f"note: stage 2 trains in fp32; its stage-1 run {s1} trained in bf16 (as its "
                           f"DeepSpeed config zero2_bf16 said")


def test_an_unreadable_stage1_record_is_a_note_never_a_stop(tmp_path):
    s1 = tmp_path / "broken"
    s1.mkdir()
    (s1 / "config.yaml").write_text("precision: {name: fp64}\n")
    (note,) = precision_notes(cfg(f"stage2.init_from={s1}", stage=2), AUTO_FP32, stage=2)
    assert note.startswith(f"note: the precision of stage-1 run {s1} is unknown (")
