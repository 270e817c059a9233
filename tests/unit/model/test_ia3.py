"""IA³ beyond the adaptor table (which runs ``ia3`` and ``ia3+lora`` on every tiny preset):

- the trainable-parameter count per family, from each transformers config (two vectors of width H
  per layer for keys and values, one of the feed-forward width per feed-forward block) and the
  modules targeted, written out per family;
- the vectors start at ones and the model is exactly the bare backbone, alone and with LoRA;
- peft's own loader reads the export's ``ia3/`` and computes what dser's model does (so dser
  rescales what peft's IA3 rescales: key / value outputs, feed-forward inputs);
- LoRA in either order: the formula of one projection, gradients, save → load, export, merge;
- a fresh stage-2 set multiplies the loaded one, freezes apart from it and exports for peft;
- settings (layers, targets, feed-forward modules) and the one-line errors naming the key.
"""

from __future__ import annotations

import json

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from fixtures_model import audio_batch, build, label_batch, outputs, perturb, trainable
from peft import PeftModel

from dser.config import ConfigError, from_dict
from dser.model.backbones import TINY_PRESETS, load_backbone
from dser.model.build import ModelConfig
from dser.model.checkpoint_io import export_model, load_adaptors, load_exported, read_export, save_adaptors

PRESETS = list(TINY_PRESETS)
WAVEFORM = ("attention.k_proj", "attention.v_proj", "feed_forward.output_dense")
# What IA³ rescales in each layer, by family: (module inside the layer, its input is rescaled)
TARGETS = {
    "tiny-wavlm": WAVEFORM, "tiny-hubert": WAVEFORM, "tiny-wav2vec2": WAVEFORM, "tiny-data2vec": WAVEFORM,
    "tiny-whisper": ("self_attn.k_proj", "self_attn.v_proj", "fc2"),
    "tiny-w2v-bert": ("self_attn.linear_k", "self_attn.linear_v", "ffn1.output_dense", "ffn2.output_dense"),
}
FEED_FORWARD = ("feed_forward.output_dense", "fc2", "ffn1.output_dense", "ffn2.output_dense")
# One preset per front-end kind: waveform CNN, log-mel, Kaldi fbank
KINDS = ["tiny-wavlm", "tiny-whisper", "tiny-w2v-bert"]
LABELS = {"name": "4class", "classes": ["neutral", "happy", "angry", "sad"],
          "members": [["neutral"], ["happy", "excited"], ["angry"], ["sad"]]}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def hidden_states(backbone, audio, mask) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return backbone(audio, mask).hidden_states


@pytest.mark.parametrize("preset", PRESETS)
def test_trainable_count_and_targets_per_family(preset):
    model = build(preset, ["ia3"])
    config = model.backbone.hf_model.config
    hidden = model.backbone.hidden_size
    ff_width = getattr(config, "encoder_ffn_dim", None) or config.intermediate_size
    blocks = sum(t in FEED_FORWARD for t in TARGETS[preset])
    expected = model.backbone.num_layers * (2 * hidden + blocks * ff_width)
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable(model) and n.startswith("ia3_")) \
        == expected
    rows = {r.group: (r.trainable, r.total) for r in model.parameter_table()}
    assert rows["ia3"] == (expected, expected)
    assert trainable(model) == {n for n, _ in model.named_parameters() if n.startswith(("ia3_vectors.", "head."))}
    layers = model.module_name(model.backbone.layers)
    assert sorted(model.targets["ia3"]) == sorted(f"{layers}.{i}.{t}" for i in range(2) for t in TARGETS[preset])


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("adaptors", [["ia3"], ["ia3", "lora"], ["lora", "ia3"]], ids="+".join)
def test_vectors_start_at_ones_and_the_model_is_the_bare_backbone(preset, adaptors):
    model = build(preset, adaptors)
    vectors = [p for n, p in model.named_parameters() if n.startswith("ia3_vectors.")]
    assert vectors and all(torch.equal(v, torch.ones_like(v)) for v in vectors)
    audio, mask = audio_batch()
    ours = hidden_states(model.backbone, audio, mask)
    bare = hidden_states(load_backbone(preset).eval(), audio, mask)
    assert all(torch.equal(a, b) for a, b in zip(ours, bare, strict=True))


@pytest.mark.parametrize("preset", PRESETS)
def test_peft_loads_the_export_and_computes_the_same(preset, tmp_path):
    model = build(preset, ["ia3"])
    perturb(model)
    audio, mask = audio_batch()
    expected = hidden_states(model.backbone, audio, mask)
    out = export_model(model, tmp_path / "export", {"task": "categorical"}, LABELS)
    assert read_export(out)["ia3"] == {"default": "ia3"}
    config = json.loads((out / "ia3" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["base_model_name_or_path"] == preset
    assert sorted(config["target_modules"]) == sorted(t.removeprefix("backbone.model.") for t in model.targets["ia3"])
    assert sorted(config["feedforward_modules"]) == sorted(t for t in config["target_modules"]
                                                          if t.endswith(FEED_FORWARD))

    theirs = load_backbone(preset).eval()
    theirs.model = PeftModel.from_pretrained(theirs.model, out / "ia3")
    got = hidden_states(theirs, audio, mask)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the vectors moved, so the equality above is not the backbone's
    assert not torch.allclose(expected[-1], hidden_states(load_backbone(preset).eval(), audio, mask)[-1])


@pytest.mark.parametrize("preset", KINDS)
@pytest.mark.parametrize("order", [["lora", "ia3"], ["ia3", "lora"]], ids="+".join)
def test_lora_combines_in_either_order(preset, order, tmp_path):
    model = build(preset, order)
    perturb(model)
    assert {model.parameter_group(n) for n in trainable(model)} == {"lora", "ia3", "head"}

    # one key projection, by hand: IA³ after LoRA rescales W + BA; before it, W alone
    attn = model.backbone.attn_module(0)
    name = "linear_k" if preset == "tiny-w2v-bert" else "k_proj"
    k = getattr(attn, name)
    scale = model.ia3_vectors["default"]["0"][f"{model.backbone.attn_name}_{name}"].scale
    x = torch.randn(2, 5, model.backbone.hidden_size, generator=torch.Generator().manual_seed(0))
    plain = F.linear(x, k.base_layer.weight, k.base_layer.bias)
    update = k.scaling["default"] * x @ k.lora_A["default"].weight.T @ k.lora_B["default"].weight.T
    want = scale * (plain + update) if order == ["lora", "ia3"] else scale * plain + update
    with torch.no_grad():
        torch.testing.assert_close(k(x), want, rtol=1e-5, atol=1e-6)

    audio, mask = audio_batch()
    loss, _ = model.loss(model(audio, mask), label_batch())
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (n in trainable(model)), n
    model.zero_grad()

    expected = outputs(model, audio, mask)
    save_adaptors(model, tmp_path / "a.safetensors")
    fresh = build(preset, order, seed=5)
    load_adaptors(fresh, tmp_path / "a.safetensors")
    assert torch.equal(outputs(fresh, audio, mask), expected)

    export_model(model, tmp_path / "export", {"task": "categorical"}, LABELS)
    loaded, _, _ = load_exported(tmp_path / "export")
    assert loaded.adaptors == order and torch.equal(outputs(loaded, audio, mask), expected)

    merged_dir = export_model(model, tmp_path / "merged", {"task": "categorical"}, LABELS, merge=True)
    assert not (merged_dir / "ia3").exists() and not (merged_dir / "lora").exists()
    merged, _, _ = load_exported(merged_dir)
    assert merged.adaptors == ["none"] and not any(n.startswith("ia3_") or ".lora_" in n
                                                   for n, _ in merged.named_parameters())
    torch.testing.assert_close(outputs(merged, audio, mask), expected, rtol=1e-4, atol=1e-5)


def test_fresh_stage2_set_multiplies_the_loaded_one(tmp_path):
    audio, mask = audio_batch()
    model = build("tiny-hubert", ["ia3", "weighted_sum"])
    perturb(model)  # "loaded" stage-1 weights
    loaded = outputs(model, audio, mask)
    model.add_fresh_adaptors(["ia3"])
    assert model.fresh_adaptors == ["ia3"] and sorted(model.ia3_vectors) == ["default", "stage2"]
    torch.testing.assert_close(outputs(model, audio, mask), loaded, rtol=0, atol=0)  # fresh vectors are ones
    rows = {r.group: r for r in model.parameter_table()}
    assert rows["ia3 (stage2)"].total == rows["ia3"].total
    frozen = model.freeze(["ia3_"])  # the loaded set only: fresh sets always train
    assert frozen and all(n.startswith("ia3_vectors.default.") for n in frozen)
    assert {model.parameter_group(n) for n in trainable(model)} == {"ia3 (stage2)", "weighted_sum", "head"}
    perturb(model, keep=lambda n: n.startswith("ia3_vectors.stage2."), seed=3)
    expected = outputs(model, audio, mask)
    assert (expected - loaded).abs().max() > 1e-4

    out = export_model(model, tmp_path / "export", {"task": "categorical"}, LABELS)
    assert read_export(out)["ia3"] == {"default": "ia3", "stage2": "ia3/stage2"}
    again, _, _ = load_exported(out)
    assert again.fresh_adaptors == ["ia3"] and torch.equal(outputs(again, audio, mask), expected)
    # peft: both sets active, their vectors multiplied
    theirs = load_backbone("tiny-hubert").eval()
    peft_model = PeftModel.from_pretrained(theirs.model, out / "ia3")
    peft_model.load_adapter(out / "ia3" / "stage2", adapter_name="stage2")
    peft_model.base_model.set_adapter(["default", "stage2"])
    theirs.model = peft_model
    for a, b in zip(hidden_states(theirs, audio, mask), hidden_states(model.backbone, audio, mask), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    merged, _, _ = load_exported(export_model(model, tmp_path / "merged", {}, LABELS, merge=True))
    torch.testing.assert_close(outputs(merged, audio, mask), expected, rtol=1e-4, atol=1e-5)


def test_layers_targets_and_feedforward_modules():
    model = build("tiny-whisper", ["ia3"], ia3={"layers": [1], "target_modules": ["v_proj", "fc1", "fc2"],
                                                  "feedforward_modules": ["fc1"]})
    assert model.targets["ia3"] == [f"backbone.model.layers.1.{m}" for m in ("self_attn.v_proj", "fc1", "fc2")]
    vectors = model.ia3_vectors["default"]["1"]
    # fc1 declared feed-forward: its input (d_model 96) is rescaled; fc2 not: its output (96)
    assert {k: v.scale.shape[0] for k, v in vectors.items()} == {"self_attn_v_proj": 96, "fc1": 96, "fc2": 96}
    audio, mask = audio_batch()
    before = outputs(model, audio, mask)
    perturb(model, keep=lambda n: ".fc1." in n)
    assert (outputs(model, audio, mask) - before).abs().max() > 1e-4


@pytest.mark.parametrize(
    "adaptors, sections, message",
    [
        (["ia3"], {"ia3": {"target_modules": ["query"]}},
         r"model.ia3.target_modules \['query'\] match no module .* wavlm backbone; its linear modules are .*k_proj"),
        (["ia3"], {"ia3": {"layers": [0, 5]}}, r"model.ia3.layers: \[5\] outside 0..1 \(wavlm\)"),
        (["ia3"], {"ia3": {"feedforward_modules": ["fc2"]}},
         r"model.ia3.feedforward_modules \['fc2'\] match none of the targeted modules"),
        (["ia3"], {"ia3": {"target_modules": ["feed_forward"]}},
         r"model.ia3.target_modules: .*layers.0.feed_forward is a WavLMFeedForward; IA³ rescales linear layers"),
    ],
    ids=["no-match", "layers", "feedforward", "not-linear"],
)
def test_bad_settings_fail_in_one_line_naming_the_key(adaptors, sections, message):
    with pytest.raises(ConfigError, match=message) as e:
        build("tiny-wavlm", adaptors, **sections)
    assert "\n" not in str(e.value)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^model.ia3: ia3.feedforward_modules \['fc2'\] are not in "):
        from_dict(ModelConfig, {"ia3": {"target_modules": ["k_proj"], "feedforward_modules": ["fc2"]}}, where="model")
    with pytest.raises(ConfigError, match="unknown key model.ia3.target; allowed keys in model.ia3: target_modules"):
        from_dict(ModelConfig, {"ia3": {"target": ["k_proj"]}}, where="model")
    with pytest.raises(ConfigError, match="model.ia3.target_modules: is an empty list|ia3.target_modules is an empty"):
        from_dict(ModelConfig, {"ia3": {"target_modules": []}}, where="model")
    with pytest.raises(ConfigError, match=r"^model: .*full finetuning already trains the weights ia3"):
        from_dict(ModelConfig, {"adaptors": ["full", "ia3"]}, where="model")


def test_merge_refuses_ia3_under_dora_and_folds_it_over_dora(tmp_path):
    """[ia3, lora] with DoRA: DoRA normalises the base weight IA³ would rescale, so no exact merge."""
    model = build("tiny-wavlm", ["ia3", "lora"], lora={"use_dora": True})
    perturb(model)
    with pytest.raises(ConfigError, match="under a DoRA layer, which cannot be folded exactly"):
        export_model(model, tmp_path / "merged", {}, LABELS, merge=True)
    model = build("tiny-wavlm", ["lora", "ia3"], lora={"use_dora": True})
    perturb(model)
    audio, mask = audio_batch()
    merged, _, _ = load_exported(export_model(model, tmp_path / "merged", {}, LABELS, merge=True))
    torch.testing.assert_close(outputs(merged, audio, mask), outputs(model, audio, mask), rtol=1e-4, atol=1e-5)
