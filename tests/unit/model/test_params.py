"""``dser params``: trainable-parameter counts of the real WavLM Base+ and Large architectures
(built on the meta device from their configs: no weights, no download), checked against
counts derived by hand from each adaptor's formula."""

from __future__ import annotations

import pytest
import torch
from transformers import WavLMModel

from dser.config import ConfigError
from dser.model.backbones import REAL_CONFIGS
from dser.model.build import format_parameter_table, parameter_counts

C = 4  # emotion classes
P = 256  # projector width
R = 8  # LoRA rank
D = 64  # bottleneck width
# (hidden H, transformer layers L)
ARCH = {"wavlm-base-plus": (768, 12), "wavlm-large": (1024, 24)}
# The CNN front end (frozen even under full finetuning): 7 convolutions of 512 channels without
# bias, kernels 10, 3, 3, 3, 3, 2, 2; Base+ normalises the first with GroupNorm(512), Large every
# one with LayerNorm(512) (weight + bias each).
CONV = 1 * 512 * 10 + 4 * 512 * 512 * 3 + 2 * 512 * 512 * 2
FRONT_END = {"wavlm-base-plus": CONV + 2 * 512, "wavlm-large": CONV + 7 * 2 * 512}


def by_hand(arch: str) -> dict[str, int]:
    h, layers = ARCH[arch]
    return {
        "lora": layers * 4 * (R * h + h * R),  # A (r×H) and B (H×r) on q, k, v, out of every layer
        "bottleneck": layers * (h * D + D + D * h + h),  # down and up projection with biases, per layer
        "weighted_sum": layers + 1,  # one weight per hidden state
        "weight_gating": layers * h,  # one gate vector per layer
        "ia3": layers * (h + h + 4 * h),  # key and value vectors (H) + the feed-forward activations' (4H)
        "head": h * P + P + P * C + C,  # projector + classifier
    }


def backbone_total(arch: str) -> int:
    """The plain transformers model's size, counted independently of dser.

    With SpecAugment off (dser's default) transformers creates no mask embedding.
    """
    config = REAL_CONFIGS[arch]()
    config.mask_time_prob = 0.0
    with torch.device("meta"):
        return sum(p.numel() for p in WavLMModel(config).parameters())


def rows(arch: str, adaptors: list[str]) -> dict[str, tuple[int, int]]:
    return {r.group: (r.trainable, r.total) for r in parameter_counts(arch, adaptors, num_classes=C)}


@pytest.mark.parametrize("arch", list(ARCH))
@pytest.mark.parametrize(
    "adaptors",
    [["lora"], ["bottleneck"], ["weighted_sum"], ["weight_gating"], ["ia3"], ["none"], ["ia3", "lora"],
     ["lora", "bottleneck"], ["lora", "weighted_sum"], ["bottleneck", "weighted_sum", "weight_gating"],
     ["lora", "bottleneck", "weighted_sum", "weight_gating"]],
    ids=lambda a: "+".join(a),
)
def test_counts_match_the_formulas(arch, adaptors):
    expected = by_hand(arch)
    got = rows(arch, adaptors)
    groups = [a for a in adaptors if a != "none"] + ["head"]
    assert set(got) == {"backbone", *groups, "all"}
    for group in groups:
        assert got[group] == (expected[group], expected[group]), group
    total = backbone_total(arch)
    assert got["backbone"] == (0, total)
    trainable = sum(expected[g] for g in groups)
    assert got["all"] == (trainable, total + trainable)


@pytest.mark.parametrize("arch", list(ARCH))
def test_full_finetuning_trains_all_but_the_front_end(arch):
    got = rows(arch, ["full"])
    total = backbone_total(arch)
    assert got["backbone"] == (total - FRONT_END[arch], total)
    assert got["head"] == (by_hand(arch)["head"],) * 2


def test_known_sizes_and_the_printed_table():
    # sanity: the familiar sizes of the two encoders, about 94 M and 315 M parameters
    assert backbone_total("wavlm-base-plus") == pytest.approx(94.4e6, rel=1e-2)
    assert backbone_total("wavlm-large") == pytest.approx(315.5e6, rel=1e-2)
    text = format_parameter_table(parameter_counts("wavlm-base-plus", ["lora", "bottleneck"]))
    lines = text.splitlines()
    assert lines[0].split() == ["group", "trainable", "total", "%", "of", "model"]
    assert [line.split()[0] for line in lines[1:]] == ["backbone", "lora", "bottleneck", "head", "all"]
    assert lines[2].split()[1:3] == ["589,824", "589,824"]  # 12 layers · 4 projections · 2 · 8 · 768


def test_other_tasks_and_bad_names():
    dims = {r.group: r.trainable for r in parameter_counts("wavlm-base-plus", ["none"], task="dimensional")}
    assert dims["head"] == 768 * P + P + P * 3 + 3  # projector + regressor (valence, arousal, dominance)
    with pytest.raises(ConfigError, match="'wavlm-huge' is not a known architecture; choose from wavlm-base-plus"):
        parameter_counts("wavlm-huge", ["lora"])
    with pytest.raises(ConfigError, match="unknown adaptor 'lorra'"):
        parameter_counts("wavlm-base-plus", ["lorra"])
