"""``--set`` values and config files as a user writes them: a value that is not plain YAML is one
line naming the key (before anything starts), and ``5e-5`` is a number wherever it is written."""

from __future__ import annotations

import pytest

from dser.config import ConfigError, apply_overrides, load_yaml
from dser.train import main as train_main


@pytest.mark.parametrize("raw, value", [("5e-5", 5e-5), ("1e3", 1000.0), ("-2E+4", -20000.0), (".5e-3", 5e-4),
                                        ("1.5", 1.5), ("10", 10), ("1_000", 1000), ("abc", "abc"),
                                        ("'5e-5'", "5e-5"), ("e5", "e5"), ("1e", "1e"), ("[1, 2e-1]", [1, 0.2])])
def test_numbers_in_exponent_form_are_floats(raw, value):
    got = apply_overrides({}, [f"optim.lr={raw}"])["optim"]["lr"]
    assert got == value and type(got) is type(value)


def test_a_config_file_reads_5e_5_as_a_float(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("optim:\n  lr: 5e-5\n  weight_decay: 1e-2\n")
    assert load_yaml(f)["optim"] == {"lr": 5e-5, "weight_decay": 0.01}


@pytest.mark.parametrize("raw, why", [("[1,", "expected the node content"),
                                      ("!!python/object/apply:os.system ['touch PWNED']", "python/object/apply"),
                                      ("{a: 1", "expected ',' or '}'")])
def test_a_value_that_is_not_plain_yaml_is_one_line_naming_the_key(tmp_path, monkeypatch, capsys, raw, why):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        apply_overrides({}, [f"optim.lr={raw}"])
    assert str(e.value).startswith("--set optim.lr: ") and why in str(e.value) and "\n" not in str(e.value)
    # the recipe itself: one line on stderr, exit 2, nothing run
    assert train_main(["--stage", "1", "--set", f"optim.lr={raw}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dser train: error: {e.value}"]
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "runs").exists()


def test_a_config_file_that_is_a_directory_or_not_utf8_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a directory"):
        load_yaml(tmp_path)
    f = tmp_path / "latin1.yaml"
    f.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"{f}: not UTF-8 text"):
        load_yaml(f)


def test_one_value_for_a_list_of_strings_is_that_one_element_list():
    from dser.runconfig import resolve_config
    from dser.submit import CHECKOUT

    cfg = resolve_config(CHECKOUT / "dser" / "configs" / "demo_stage1.yaml",
                         ["data.train=shards/x/train", "data.styles=acted", "model.adaptors=lora"], stage=1)
    assert (cfg.data.train, cfg.data.styles, cfg.model.adaptors) == (["shards/x/train"], ["acted"], ["lora"])
    # a number is not a list of numbers: still one line naming the key
    with pytest.raises(ConfigError, match=r"config\.optim\.betas: expected a list, got 0\.9"):
        resolve_config(CHECKOUT / "dser" / "configs" / "demo_stage1.yaml", ["optim.betas=0.9"], stage=1)
