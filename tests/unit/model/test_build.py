"""Model building: config validation, adaptor options, freezing by pattern, fresh stage-2 sets,
the weight-gating variants, the weighted sum, and the logged summary."""

from __future__ import annotations

import math

import huggingface_hub.constants
import pytest
import torch
from fixtures_model import audio_batch, build, label_batch, model_config, outputs, perturb, trainable
from peft.tuners.lora import LoraLayer

from dser.config import ConfigError, from_dict
from dser.model.adaptors.weighted_sum import WeightedLayerSum
from dser.model.backbones import load_backbone
from dser.model.build import ModelConfig, build_model, format_parameter_table, summarize_module_names

PAPER = ["lora", "bottleneck", "weighted_sum", "weight_gating"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# ---- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "adaptors, message",
    [
        (["lorra"], "unknown adaptor 'lorra'.*choose from lora, bottleneck"),
        (["none", "lora"], "none .* does not combine"),
        (["full", "lora"], "full finetuning already trains"),
        (["lora", "lora"], "twice"),
        ([], "empty"),
    ],
)
def test_bad_adaptor_lists_fail_with_the_key(adaptors, message):
    with pytest.raises(ConfigError, match=rf"^model: .*{message}"):
        from_dict(ModelConfig, {"adaptors": adaptors}, where="model")


def test_unknown_and_mistyped_keys_are_named():
    with pytest.raises(ConfigError, match="unknown key model.lora.rnk; allowed keys in model.lora: rank"):
        from_dict(ModelConfig, {"lora": {"rnk": 4}}, where="model")
    with pytest.raises(ConfigError, match="model.bottleneck.activation"):
        from_dict(ModelConfig, {"bottleneck": {"activation": "tanh"}}, where="model")
    with pytest.raises(ConfigError, match="model.weight_gating.variant"):
        from_dict(ModelConfig, {"weight_gating": {"variant": "sigmoid"}}, where="model")
    with pytest.raises(ConfigError, match="model.lora.layers"):
        from_dict(ModelConfig, {"lora": {"layers": "all"}}, where="model")


def test_bad_task_and_layer_indices():
    with pytest.raises(ConfigError, match="task 'regression'"):
        build_model(model_config("tiny-wavlm", ["none"]), 4, task="regression")
    for section in ("lora", "bottleneck", "weight_gating"):
        adaptor = {"lora": "lora", "bottleneck": "bottleneck", "weight_gating": "weight_gating"}[section]
        with pytest.raises(ConfigError, match=rf"model.{section}.layers: \[5\] outside 0..1"):
            build("tiny-wavlm", [adaptor], **{section: {"layers": [0, 5]}})


def test_dimensional_and_both_tasks():
    audio, mask = audio_batch()
    model = build("tiny-hubert", ["lora"], task="dimensional")
    out = model(audio, mask)
    assert out["logits"] is None and out["attributes"].shape == (2, 3)
    batch = label_batch()
    batch["attributes"][0, 1] = float("nan")
    loss, parts = model.loss(out, batch)
    assert torch.isfinite(loss) and set(parts) == {"ccc_loss"}
    both = build("tiny-hubert", ["lora"], task="both")
    out = both(audio, mask)
    assert out["logits"].shape == (2, 4) and out["attributes"].shape == (2, 3)
    assert set(both.loss(out, label_batch())[1]) == {"ce", "ccc_loss"}


# ---- adaptor options ---------------------------------------------------------------------


def test_lora_layers_and_target_modules():
    model = build("tiny-wavlm", ["lora"], lora={"layers": [1], "target_modules": ["k_proj", "v_proj"]})
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))
    assert adapted == [f"backbone.model.encoder.layers.1.attention.{p}" for p in ("k_proj", "v_proj")]
    assert model.targets["lora"] == adapted


def test_lora_unknown_target_lists_the_linear_modules():
    with pytest.raises(ConfigError, match=r"match no module of the wavlm backbone; its linear modules are .*q_proj"):
        build("tiny-wavlm", ["lora"], lora={"target_modules": ["query"]})


def test_lora_rank_alpha_rslora_and_dora():
    model = build("tiny-w2v-bert", ["lora"], lora={"rank": 4, "alpha": 8, "use_rslora": True})
    layer = model.backbone.layers[0].self_attn.linear_q
    assert layer.lora_A["default"].weight.shape == (4, 64)
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))

    dora = build("tiny-wavlm", ["lora"], lora={"use_dora": True})
    magnitudes = [n for n in trainable(dora) if "lora_magnitude_vector" in n]
    assert len(magnitudes) == 8  # 4 projections × 2 layers
    audio, mask = audio_batch()
    before = outputs(dora, audio, mask)
    perturb(dora, keep=lambda n: "lora_magnitude_vector" in n)
    assert (outputs(dora, audio, mask) - before).abs().max() > 1e-4


def test_bottleneck_layers_after_attention_and_activation():
    model = build("tiny-wav2vec2", ["bottleneck"], bottleneck={"layers": [1], "after_attention": True,
                                                                "activation": "gelu", "dim": 16})
    adapters = model.bneck_adapters["default"]
    assert sorted(adapters) == ["attn1", "ffn1"]
    assert adapters["ffn1"].down.weight.shape == (16, 64)
    assert isinstance(adapters["ffn1"].act, torch.nn.GELU)
    assert model.targets["bottleneck"] == ["backbone.model.encoder.layers.1.feed_forward",
                                           "backbone.model.encoder.layers.1.attention"]
    audio, mask = audio_batch()
    before = outputs(model, audio, mask)
    perturb(model, keep=lambda n: ".attn1." in n)  # the attention adapter alone takes effect
    assert (outputs(model, audio, mask) - before).abs().max() > 1e-4


@pytest.mark.parametrize("preset", ["tiny-wavlm", "tiny-whisper"])
def test_weight_gating_variants(preset):
    bare = load_backbone(preset).eval()
    audio, mask = audio_batch()
    with torch.no_grad():
        reference = bare(audio, mask).hidden_states
        identity = build(preset, ["weight_gating"]).backbone(audio, mask).hidden_states
        paper_model = build(preset, ["weight_gating"], weight_gating={"variant": "paper"})
        paper = paper_model.backbone(audio, mask).hidden_states
    assert all(torch.equal(g.g, torch.ones_like(g.g)) for g in paper_model.wgate_gates.values())
    torch.testing.assert_close(identity[1], reference[1], rtol=0, atol=0)
    # paper: layer 0's output is shrunk by sigmoid(1) ≈ 0.73 on every channel (not the identity)
    torch.testing.assert_close(paper[1], reference[1] * torch.sigmoid(torch.tensor(1.0)), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(paper[-1], reference[-1])


def test_weighted_sum_starts_uniform_and_can_layer_norm():
    g = torch.Generator().manual_seed(0)
    states = tuple(torch.randn(2, 5, 8, generator=g) * (i + 1) for i in range(3))
    torch.testing.assert_close(WeightedLayerSum(3)(states), torch.stack(states).mean(0))
    normed = [torch.nn.functional.layer_norm(s, (8,)) for s in states]
    torch.testing.assert_close(WeightedLayerSum(3, layer_norm=True)(states), torch.stack(normed).mean(0))

    model = build("tiny-data2vec", ["weighted_sum"])
    audio, mask = audio_batch()
    with torch.no_grad():
        hidden = model.backbone(audio, mask)
        pooled = model.head(torch.stack(hidden.hidden_states).mean(0), hidden.frame_mask)["pooled"]
        torch.testing.assert_close(model(audio, mask)["pooled"], pooled)


def test_full_finetuning_follows_the_backbone_options():
    default = build("tiny-hubert", ["full"])
    assert not any("feature_extractor" in n or "masked_spec_embed" in n for n in trainable(default))
    unfrozen = build("tiny-hubert", ["full"], backbone={"name": "tiny-hubert", "freeze_feature_encoder": False,
                                                        "mask_time_prob": 0.1})
    assert any("feature_extractor" in n for n in trainable(unfrozen))
    assert "backbone.model.masked_spec_embed" in trainable(unfrozen)


# ---- freezing and fresh sets -------------------------------------------------------------


def test_freeze_patterns():
    model = build("tiny-wavlm", PAPER)
    frozen = model.freeze(["lora_A", "wgate_"])
    assert frozen and all("lora_A" in n or n.startswith("wgate_") for n in frozen)
    left = trainable(model)
    assert not any("lora_A" in n or n.startswith("wgate_") for n in left)
    assert any("lora_B" in n for n in left) and any(n.startswith("bneck_") for n in left)
    with pytest.raises(ConfigError, match=r"stage2.freeze: 'bneck_ad\[' is not a valid regular expression"):
        model.freeze(["bneck_ad["])
    with pytest.raises(ConfigError, match="stage2.freeze: 'adapterz' matches no trainable parameter; the model trains"):
        model.freeze(["adapterz"])


def test_freeze_from_the_model_config():
    model = build("tiny-wavlm", ["lora", "bottleneck"], freeze=["head", "bneck_"])
    assert {model.parameter_group(n) for n in trainable(model)} == {"lora"}
    with pytest.raises(ConfigError, match="model.freeze: 'wsum_'"):
        build("tiny-wavlm", ["lora"], freeze=["wsum_"])


@pytest.mark.parametrize("preset", ["tiny-wavlm", "tiny-w2v-bert"])
def test_fresh_lora_set_trains_beside_the_loaded_one(preset):
    model = build(preset, ["lora"])
    perturb(model)  # "loaded" stage-1 weights
    audio, mask = audio_batch()
    loaded = outputs(model, audio, mask)
    model.add_fresh_adaptors(["lora"])
    assert model.fresh_adaptors == ["lora"] and "lora (stage2)" in model.targets
    torch.testing.assert_close(outputs(model, audio, mask), loaded, rtol=0, atol=0)  # fresh B = 0

    frozen = model.freeze(["lora_"])  # freezes the loaded set only: fresh sets always train
    assert frozen and all(".default." in n for n in frozen)
    fresh = {n for n in trainable(model) if ".stage2." in n}
    assert fresh and trainable(model) == fresh | {n for n in trainable(model) if n.startswith("head.")}

    # both sets are active: changing either changes the output
    perturb(model, keep=lambda n: ".stage2." in n, seed=3)
    both = outputs(model, audio, mask)
    assert (both - loaded).abs().max() > 1e-4
    perturb(model, keep=lambda n: ".lora_B.default." in n, seed=4)
    assert (outputs(model, audio, mask) - both).abs().max() > 1e-4

    loss, _ = model.loss(model(audio, mask), label_batch())
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (name in fresh or name.startswith("head.")), name


def test_fresh_bottleneck_set_and_errors():
    model = build("tiny-hubert", ["bottleneck", "weighted_sum"])
    model.add_fresh_adaptors(["bottleneck"])
    assert sorted(model.bneck_adapters) == ["default", "stage2"]
    rows = {r.group: r for r in model.parameter_table()}
    assert rows["bottleneck (stage2)"].total == rows["bottleneck"].total
    model.freeze(["bneck_"])
    assert {model.parameter_group(n) for n in trainable(model)} == {"bottleneck (stage2)", "weighted_sum", "head"}
    audio, mask = audio_batch()
    before = outputs(model, audio, mask)
    perturb(model, keep=lambda n: n.startswith("bneck_adapters.stage2."))
    assert (outputs(model, audio, mask) - before).abs().max() > 1e-4
    with pytest.raises(ConfigError, match="'weighted_sum' cannot be added fresh; choose from lora, bottleneck"):
        model.add_fresh_adaptors(["weighted_sum"])
    with pytest.raises(ConfigError, match="twice"):
        model.add_fresh_adaptors(["bottleneck"])


# ---- accounting and summary --------------------------------------------------------------


def test_parameter_table_adds_up():
    model = build("tiny-whisper", PAPER)
    rows = model.parameter_table()
    assert [r.group for r in rows] == ["backbone", *PAPER, "head", "all"]
    assert rows[-1].total == sum(p.numel() for p in model.parameters())
    assert rows[-1].trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rows[0].trainable == 0
    counts = model.parameter_counts()
    assert counts["all"] == {"trainable": rows[-1].trainable, "total": rows[-1].total}


def test_log_summary_names_targets_and_prints_the_table():
    lines: list[str] = []
    model = build("tiny-wavlm", PAPER)
    model.add_fresh_adaptors(["lora"])
    model.log_summary(print_fn=lines.append)
    text = "\n".join(lines)
    assert "adaptors lora, bottleneck, weighted_sum, weight_gating + fresh lora" in text
    assert "lora: 8 targeted" in text and "lora (stage2): 8 targeted" in text
    assert "  backbone.model.encoder.layers.{0-1}.attention.q_proj" in text
    assert "  backbone.model.encoder.layers.{0-1}.feed_forward" in text
    assert format_parameter_table(model.parameter_table()) in text


def test_summarize_module_names():
    names = ["m.layers.0.q", "m.layers.2.q", "m.layers.3.q", "m.layers.1.k", "m.layers.2.k", "wsum"]
    assert summarize_module_names(names) == ["m.layers.{0,2,3}.q", "m.layers.{1-2}.k", "wsum"]
