"""dser.runconfig.check_schedule: step counts that cannot work are errors naming the key;
intervals longer than the run are clamped, with a note."""

import pytest

from dser.config import ConfigError
from dser.runconfig import CONFIGS_DIR, check_schedule, resolve_config

CONFIGS = sorted(CONFIGS_DIR.glob("*.yaml"))


def demo(*overrides):
    return resolve_config(CONFIGS_DIR / "demo_stage1.yaml", list(overrides), 1)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_passes_unchanged(path):
    cfg = resolve_config(path, [], 2 if "stage2" in path.stem else 1)
    assert check_schedule(cfg) == (cfg, [])


@pytest.mark.parametrize("override, message", [
    ("optim.max_steps=0", "config.optim.max_steps is 0: it must be at least 1 (optimizer steps in this stage)"),
    ("optim.max_steps=-3", "config.optim.max_steps is -3: it must be at least 1"),
    ("optim.warmup_steps=-1", "config.optim.warmup_steps is -1: it must be at least 0"),
    ("optim.grad_accum=0", "config.optim.grad_accum is 0: it must be at least 1"),
    ("train.log_every=0", "config.train.log_every is 0: it must be at least 1"),
    ("train.eval_every=-10", "config.train.eval_every is -10: it must be at least 1"),
    ("train.save_every=-1", "config.train.save_every is -1: it must be at least 1"),
    ("train.keep_last=-1", "config.train.keep_last is -1: it must be at least 0"),
    ("train.early_stopping=-2", "config.train.early_stopping is -2: it must be at least 0"),
    ("train.stop_after_steps=-1", "config.train.stop_after_steps is -1: it must be at least 0"),
    ("optim.min_lr_ratio=1.5", "config.optim.min_lr_ratio is 1.5: it must be in [0, 1]"),
])
def test_impossible_step_counts_name_their_key(override, message):
    with pytest.raises(ConfigError) as e:
        check_schedule(demo(override))
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_intervals_longer_than_the_run_are_clamped_with_a_note():
    cfg, notes = check_schedule(demo("optim.max_steps=12", "optim.warmup_steps=2", "train.log_every=5",
                                     "train.eval_every=100", "train.save_every=13"))
    assert (cfg.train.log_every, cfg.train.eval_every, cfg.train.save_every) == (5, 12, 12)
    assert notes == [
        "note: config.train.eval_every=100 is longer than the run (optim.max_steps=12): clamped to 12",
        "note: config.train.save_every=13 is longer than the run (optim.max_steps=12): clamped to 12",
    ]
    assert cfg.optim == demo("optim.max_steps=12", "optim.warmup_steps=2").optim  # nothing else changes


def test_a_warmup_longer_than_the_run_is_noted_and_kept():
    cfg, notes = check_schedule(demo("optim.max_steps=10", "optim.warmup_steps=30", "train.log_every=10",
                                     "train.eval_every=10", "train.save_every=10"))
    assert cfg.optim.warmup_steps == 30
    assert notes == ["note: config.optim.warmup_steps=30 is longer than the run (optim.max_steps=10): "
                     "the learning rate never reaches optim.lr"]
