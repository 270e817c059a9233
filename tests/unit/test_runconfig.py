"""Every shipped run config resolves strictly; bad keys fail with their names; the DeepSpeed
config takes the run's precision whatever its file says."""

import json

import pytest

from dser.config import ConfigError
from dser.precision import PrecisionError
from dser.runconfig import (CONFIGS_DIR, DS_CONFIGS_DIR, deepspeed_config, ds_config_path, ds_file_precision,
                            recorded_precision, resolve_config)

CONFIGS = sorted(CONFIGS_DIR.glob("*.yaml"))


def test_the_configs_the_issue_asks_for_ship():
    names = {p.stem for p in CONFIGS}
    for wanted in ("demo_stage1", "demo_stage2", "iemocap_loso", "iemocap_scripted_stage1",
                   "iemocap_improvised_stage2", "crema_to_msp_stage1", "crema_to_msp_stage2",
                   "ravdess_to_msp_stage1", "emodb_to_msp_stage1", "msp_attributes"):
        assert wanted in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_resolves_and_opens_with_its_launch_command(path):
    stage = 2 if "stage2" in path.stem else 1
    cfg = resolve_config(path, [], stage)
    text = path.read_text()
    assert "dser/train.py" in text.split("\n\n")[0], "the config must open with its launch command"
    assert cfg.deepspeed.precision == "auto"  # the hardware decides, for every shipped config
    ds = deepspeed_config(cfg, world_size=2, precision="fp32", cpu=True)
    assert ds["gradient_accumulation_steps"] == cfg.optim.grad_accum
    assert ds["train_batch_size"] == 2 * cfg.optim.grad_accum
    assert ds["gradient_clipping"] == cfg.optim.grad_clip


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1", "config.optim.lrr"),
    ("modle.adaptors=[lora]", "config.modle"),
    ("model.lora.rnak=4", "config.model.lora.rnak"),
])
def test_unknown_keys_name_themselves_and_the_allowed_keys(override, key):
    with pytest.raises(ConfigError, match=f"unknown key {key}.*allowed keys"):
        resolve_config(CONFIGS_DIR / "demo_stage1.yaml", [override], 1)


def test_wrong_types_and_values_fail_clearly():
    with pytest.raises(ConfigError, match="config.optim.max_steps: expected an integer"):
        resolve_config(CONFIGS_DIR / "demo_stage1.yaml", ["optim.max_steps=many"], 1)
    with pytest.raises(ConfigError, match="unknown adaptor"):
        resolve_config(CONFIGS_DIR / "demo_stage1.yaml", ["model.adaptors=[lorra]"], 1)
    with pytest.raises(ConfigError, match="config.source"):
        resolve_config(CONFIGS_DIR / "demo_stage1.yaml", ["source=nowhere"], 1)
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        deepspeed_config(resolve_config(CONFIGS_DIR / "demo_stage1.yaml", [], 1), world_size=1, precision="fp16",
                         cpu=True)
    with pytest.raises(ConfigError, match="config.deepspeed.precision"):
        resolve_config(CONFIGS_DIR / "demo_stage1.yaml", ["deepspeed.precision=fp64"], 1)


def demo(*overrides):
    return resolve_config(CONFIGS_DIR / "demo_stage1.yaml", list(overrides), 1)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_the_run_precision_enables_exactly_one_deepspeed_section(precision):
    ds = deepspeed_config(demo(), world_size=2, precision=precision, cpu=False)
    assert ds["bf16"]["enabled"] is (precision == "bf16")
    assert ds["fp16"]["enabled"] is (precision == "fp16")
    assert ds["bf16"]["check_grad_overflow"] is True
    assert ds["fp16"]["loss_scale"] == 0 and ds["fp16"]["initial_scale_power"] == 16  # dynamic loss scaling kept


def test_the_shipped_files_leave_the_precision_to_the_run():
    names = sorted(p.stem for p in DS_CONFIGS_DIR.glob("*.json"))
    assert names == ["zero0", "zero1", "zero2", "zero3", "zero3_offload"]
    for name in names:
        ds = json.loads((DS_CONFIGS_DIR / f"{name}.json").read_text())
        assert ds["bf16"]["enabled"] == ds["fp16"]["enabled"] == "auto", name
        assert ds_file_precision(name) is None


@pytest.mark.parametrize("stage", ["zero0", "zero1", "zero2", "zero3", "zero3_offload"])
def test_the_old_per_precision_names_are_aliases_of_their_stage(stage):
    for precision in ("bf16", "fp16"):
        alias = f"{stage}_{precision}"
        assert ds_config_path(alias) == ds_config_path(f"ds_configs/{alias}.json") == DS_CONFIGS_DIR / f"{stage}.json"
        assert ds_file_precision(alias) == precision  # named, for the note a run prints under auto
        assert deepspeed_config(demo(f"deepspeed.config={alias}"), 2, "fp32", cpu=False) == \
            deepspeed_config(demo(f"deepspeed.config={stage}"), 2, "fp32", cpu=False)


def test_a_users_json_is_read_and_its_precision_is_overridden(tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}))
    assert ds_file_precision(str(mine)) == "bf16"
    ds = deepspeed_config(demo(f"deepspeed.config={mine}"), 1, "fp32", cpu=True)
    assert ds["bf16"]["enabled"] is False and ds["zero_optimization"] == {"stage": 1}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=f"config.deepspeed.config: {bad} is not readable JSON"):
        ds_file_precision(str(bad))
    with pytest.raises(ConfigError, match="'zero9' is neither a JSON file nor one of zero0, zero1, zero2"):
        ds_config_path("zero9")


def test_recorded_precision_reads_the_record_or_infers_it_for_older_runs():
    rec = {"name": "bf16", "reason": "auto: this CPU has native bf16", "requested": "auto"}
    p = recorded_precision({"stage": 1, "precision": rec, "config": {}}, "r/config.yaml")
    assert (p.name, p.reason, p.requested) == ("bf16", rec["reason"], "auto")
    # before the record: auto meant "as the DeepSpeed file says", and zero2_bf16 was the default
    for ds, name in (({"config": "zero2_bf16", "precision": "auto"}, "bf16"), ({}, "bf16"),
                     ({"config": "zero3_fp16"}, "fp16"), ({"config": "zero2_bf16", "precision": "fp32"}, "fp32")):
        p = recorded_precision({"stage": 1, "config": {"deepspeed": ds}}, "r/config.yaml")
        assert p.name == name, ds
        assert "predates dser's precision record" in p.reason
    with pytest.raises(PrecisionError, match="r/config.yaml"):
        recorded_precision({"precision": {"name": "fp64"}}, "r/config.yaml")
