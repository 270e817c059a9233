"""``dser params``: parses its options, forwards them to ``parameter_counts`` and prints the table;
bad input is one ``Error:`` line. Counts are checked against the WavLM Base+ formulas
(H = 768, 12 layers, LoRA r = 8 on q/k/v/out, bottleneck 64, projector 256)."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
from click.testing import CliRunner

from dser.cli import main
from dser.model.build import format_parameter_table, parameter_counts

H, L, P = 768, 12, 256


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def params(*args: str):
    return CliRunner().invoke(main, ["params", *args])


def table(output: str) -> dict[str, tuple[str, str]]:
    """group → (trainable, total) as printed."""
    lines = output.strip().splitlines()
    assert lines[0].split()[:3] == ["group", "trainable", "total"]
    return {line.split()[0]: tuple(line.split()[1:3]) for line in lines[1:]}


def n(count: int) -> str:
    return f"{count:,}"


def test_prints_the_parameter_table():
    result = params("--backbone-config", "wavlm-base-plus", "--adaptors", "lora,bottleneck")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == format_parameter_table(parameter_counts("wavlm-base-plus", ["lora", "bottleneck"]))
    rows = table(result.output)
    assert list(rows) == ["backbone", "lora", "bottleneck", "head", "all"]
    assert rows["lora"] == (n(L * 4 * (8 * H + H * 8)),) * 2
    assert rows["bottleneck"] == (n(L * (H * 64 + 64 + 64 * H + H)),) * 2
    assert rows["head"] == (n(H * P + P + P * 4 + 4),) * 2
    assert rows["backbone"][0] == "0"


def test_num_classes_task_and_spaces_in_the_adaptor_list():
    result = params("--backbone-config", "wavlm-base-plus", "--adaptors", " weighted_sum , weight_gating ",
                    "--num-classes", "6")
    assert result.exit_code == 0, result.output
    rows = table(result.output)
    assert rows["weighted_sum"] == (n(L + 1),) * 2
    assert rows["weight_gating"] == (n(L * H),) * 2
    assert rows["head"] == (n(H * P + P + P * 6 + 6),) * 2

    result = params("--backbone-config", "wavlm-base-plus", "--adaptors", "none", "--task", "dimensional")
    assert result.exit_code == 0, result.output
    assert table(result.output)["head"] == (n(H * P + P + P * 3 + 3),) * 2  # regressor: valence, arousal, dominance


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backbone-config", "wavlm-huge", "--adaptors", "lora"],
         "Error: --backbone-config 'wavlm-huge' is not a known architecture; choose from wavlm-base-plus"),
        (["--backbone-config", "wavlm-large", "--adaptors", "lora,lorra"],
         "Error: --adaptors: unknown adaptor 'lorra'"),
        (["--backbone-config", "wavlm-large", "--adaptors", ","], "Error: --adaptors: adaptors is empty"),
        (["--backbone-config", "wavlm-large", "--adaptors", "full,lora"],
         "Error: --adaptors: adaptors ['full', 'lora']"),
    ],
)
def test_bad_input_is_one_error_line(args, message):
    result = params(*args)
    assert result.exit_code == 1
    assert result.output.startswith(message), result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_required_options():
    result = params("--adaptors", "lora")
    assert result.exit_code == 2 and "--backbone-config" in result.output
