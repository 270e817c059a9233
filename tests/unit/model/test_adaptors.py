"""The adaptor table: every tiny backbone × every adaptor alone, the paper's combinations and IA³ under LoRA.

For each case: output shapes; exactly the intended parameters train (checked by name, with
expectations written here, not taken from the implementation) and all of them get non-zero
gradients; a non-zero update of each adaptor changes the output (no silently bypassed adaptor);
at start values the hidden states equal the bare backbone's; save → load into a freshly built
model reproduces the outputs exactly; the export loads back (through peft's own loader for
LoRA, and merged) with the same outputs. No network: tiny presets, generated audio.
"""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch
from fixtures_model import NUM_CLASSES, audio_batch, build, label_batch, outputs, perturb
from peft import PeftModel

from dser.model.backbones import TINY_PRESETS, load_backbone
from dser.model.checkpoint_io import export_model, load_adaptors, load_exported, save_adaptors

PRESETS = list(TINY_PRESETS)  # tiny-wavlm, -hubert, -wav2vec2, -data2vec, -whisper, -w2v-bert
ADAPTOR_SETS = {
    "lora": ["lora"],
    "bottleneck": ["bottleneck"],
    "weighted_sum": ["weighted_sum"],
    "weight_gating": ["weight_gating"],
    "ia3": ["ia3"],
    "full": ["full"],
    "none": ["none"],
    # the paper's combinations: LoRA+BA, LoRA+WS, BA+WS+WG, LoRA+BA+WS+WG
    "lora+bottleneck": ["lora", "bottleneck"],
    "lora+weighted_sum": ["lora", "weighted_sum"],
    "bottleneck+weighted_sum+weight_gating": ["bottleneck", "weighted_sum", "weight_gating"],
    "lora+bottleneck+weighted_sum+weight_gating": ["lora", "bottleneck", "weighted_sum", "weight_gating"],
    # IA³ under LoRA (LoRA beside the rescaled projections; test_ia3.py also has the other order)
    "ia3+lora": ["ia3", "lora"],
}
TABLE = [pytest.param(p, a, id=f"{p}:{name}") for p in PRESETS for name, a in ADAPTOR_SETS.items()]

# What a backbone freezes by default and full finetuning therefore leaves alone: the CNN front end
# (Whisper: conv1/conv2), Whisper's fixed sinusoidal positions, and SpecAugment's mask embedding,
# unused without time masking.
FROZEN_IN_FULL = ("backbone.model.feature_extractor.", "backbone.model.conv1.", "backbone.model.conv2.",
                  "backbone.model.embed_positions.", "backbone.model.masked_spec_embed")


def owner(name: str) -> str:
    """Which adaptor a parameter should belong to, from its name alone."""
    if name.startswith("head."):
        return "head"
    if ".lora_A." in name or ".lora_B." in name:
        return "lora"
    if name.startswith("bneck_adapters."):
        return "bottleneck"
    if name.startswith("wsum_"):
        return "weighted_sum"
    if name.startswith("wgate_"):
        return "weight_gating"
    if name.startswith("ia3_vectors."):
        return "ia3"
    assert name.startswith("backbone."), name
    return "backbone"


def intended_trainable(name: str, adaptors: list[str]) -> bool:
    group = owner(name)
    if group == "backbone":
        return "full" in adaptors and not name.startswith(FROZEN_IN_FULL)
    return group == "head" or group in adaptors


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("preset, adaptors", TABLE)
def test_shapes_trainable_set_and_gradients(preset, adaptors):
    model = build(preset, adaptors)
    audio, mask = audio_batch()
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in names if intended_trainable(n, adaptors)}
    present = {owner(n) for n in trainable}  # every adaptor of the set trains something
    expected_groups = {"head"} | {"backbone" if a == "full" else a for a in adaptors if a != "none"}
    assert present == expected_groups

    perturb(model)  # LoRA B and bottleneck up start at zero: without this, A and down get no gradient
    out = model(audio, mask)
    assert out["logits"].shape == (2, NUM_CLASSES)
    assert out["attributes"] is None
    assert out["pooled"].shape == (2, 256)
    loss, parts = model.loss(out, label_batch())
    assert torch.isfinite(loss) and set(parts) == {"ce"}
    loss.backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"


@pytest.mark.parametrize("preset, adaptors", TABLE)
def test_every_adaptor_update_changes_output(preset, adaptors):
    model = build(preset, adaptors)
    audio, mask = audio_batch()
    perturb(model)
    reference = outputs(model, audio, mask)
    groups = sorted({owner(n) for n, p in model.named_parameters() if p.requires_grad})
    for group in groups:
        saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and owner(n) == group}
        perturb(model, keep=lambda n: n in saved, scale=0.5, seed=7)
        changed = outputs(model, audio, mask)
        assert (changed - reference).abs().max() > 1e-4, f"updating {group} did not change the output"
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
        torch.testing.assert_close(outputs(model, audio, mask), reference, rtol=0, atol=0)


@pytest.mark.parametrize("preset, adaptors", TABLE)
def test_start_values_leave_hidden_states_unchanged(preset, adaptors):
    """LoRA (B = 0), bottleneck (up = 0), weight-gating (2·sigmoid(0) = 1) and IA³ (vectors of ones)
    start as the identity."""
    model = build(preset, adaptors)
    bare = load_backbone(preset).eval()
    audio, mask = audio_batch()
    with torch.no_grad():
        ours = model.backbone(audio, mask)
        theirs = bare(audio, mask)
    assert torch.equal(ours.frame_mask, theirs.frame_mask)
    for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset, adaptors", TABLE)
def test_save_load_reproduces_outputs(preset, adaptors, tmp_path):
    model = build(preset, adaptors)
    perturb(model)
    audio, mask = audio_batch()
    expected = outputs(model, audio, mask)
    save_adaptors(model, tmp_path / "adaptors.safetensors")

    fresh = build(preset, adaptors, seed=123)  # other head / adaptor initialisation
    assert not torch.equal(outputs(fresh, audio, mask), expected)
    load_adaptors(fresh, tmp_path / "adaptors.safetensors")
    assert torch.equal(outputs(fresh, audio, mask), expected)


@pytest.mark.parametrize("preset, adaptors", TABLE)
def test_export_loads_back_with_the_same_outputs(preset, adaptors, tmp_path):
    model = build(preset, adaptors)
    perturb(model)
    audio, mask = audio_batch()
    expected = outputs(model, audio, mask)
    labels = {"name": "4class", "classes": ["neutral", "happy", "angry", "sad"],
              "members": [["neutral"], ["happy", "excited"], ["angry"], ["sad"]]}
    export_model(model, tmp_path / "export", run_config={"task": "categorical"}, label_set=labels)

    loaded, run_config, label_set = load_exported(tmp_path / "export")
    assert run_config == {"task": "categorical"} and label_set.classes == ("neutral", "happy", "angry", "sad")
    assert torch.equal(outputs(loaded, audio, mask), expected)

    if "lora" not in adaptors:
        assert not (tmp_path / "export" / "lora").exists()
        return
    # peft's own loader: a model without LoRA gets the rest from adaptors.safetensors, then
    # PeftModel.from_pretrained puts the exported LoRA into its transformers model.
    others = [a for a in adaptors if a != "lora"] or ["none"]
    plain = build(preset, others, seed=5)
    load_adaptors(plain, tmp_path / "export" / "adaptors.safetensors")
    plain.backbone.model = PeftModel.from_pretrained(plain.backbone.model, tmp_path / "export" / "lora")
    torch.testing.assert_close(outputs(plain, audio, mask), expected, rtol=0, atol=1e-6)

    # merge=True: LoRA folded into a saved backbone, loaded without peft.
    export_model(model, tmp_path / "merged", run_config={"task": "categorical"}, label_set=labels, merge=True)
    assert (tmp_path / "merged" / "backbone" / "config.json").is_file()
    assert not (tmp_path / "merged" / "lora").exists()
    merged, _, _ = load_exported(tmp_path / "merged")
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(outputs(merged, audio, mask), expected, rtol=1e-4, atol=1e-5)
