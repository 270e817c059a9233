"""Every shipped run config resolves strictly; bad keys fail with their names."""

import pytest

from dser.config import ConfigError
from dser.runconfig import CONFIGS_DIR, deepspeed_config, resolve_config

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
    ds = deepspeed_config(cfg, world_size=2, cpu=True)
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
        deepspeed_config(resolve_config(CONFIGS_DIR / "demo_stage1.yaml", ["deepspeed.config=zero2_fp16"], 1),
                         world_size=1, cpu=True)
