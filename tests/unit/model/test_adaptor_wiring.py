"""Adaptor wiring, at a finer grain than the table in test_adaptors.py: every single adapted
module (each LoRA-wrapped projection, each bottleneck adapter, each layer's gate) acts on the
output; ``full`` trains the backbone wherever it sits in the adaptor list; the peft export holds
exactly the model's LoRA tensors; ``parameter_counts`` builds on the meta device; stage 2's
``skip_prefixes=("head.",)`` loads adaptors into a model with another head."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch
from fixtures_model import audio_batch, build, label_batch, model_config, outputs, perturb
from peft import PeftModel

import dser.model.build
from dser.model.backbones import TINY_PRESETS, load_backbone
from dser.model.build import build_model, parameter_counts
from dser.model.checkpoint_io import CheckpointError, export_model, load_adaptors, save_adaptors

PRESETS = list(TINY_PRESETS)
PAPER = ["lora", "bottleneck", "weighted_sum", "weight_gating"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def unit(name: str) -> str:
    """The independently applied piece a parameter belongs to: one LoRA-wrapped module, one
    bottleneck adapter, one layer's gate; the weighted sum and the head as wholes."""
    if ".lora_" in name:
        return name.split(".lora_")[0]
    if name.startswith("bneck_"):
        return ".".join(name.split(".")[:3])  # bneck_adapters.<set>.<ffn|attn><layer>
    if name.startswith("wgate_"):
        return ".".join(name.split(".")[:2])  # wgate_gates.<layer>
    return name.split(".")[0]


@pytest.mark.parametrize("preset", PRESETS)
def test_no_single_adapted_module_is_bypassed(preset):
    model = build(preset, PAPER, bottleneck={"after_attention": True})
    perturb(model)
    audio, mask = audio_batch()
    reference = outputs(model, audio, mask)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    units = sorted({unit(n) for n in params})
    layers = model.backbone.num_layers
    # 4 projections + 2 adapters (ffn, attention) + 1 gate per layer, the weighted sum, the head
    assert len(units) == 7 * layers + 2
    for i, u in enumerate(units):
        saved = {n: p.detach().clone() for n, p in params.items() if unit(n) == u}
        perturb(model, keep=lambda n: n in saved, scale=0.5, seed=10 + i)
        assert (outputs(model, audio, mask) - reference).abs().max() > 1e-4, f"updating {u} did not change the output"
        with torch.no_grad():
            for n, value in saved.items():
                params[n].copy_(value)


@pytest.mark.parametrize("adaptors", [["weighted_sum", "full"], ["bottleneck", "weight_gating", "full"]])
def test_full_trains_the_backbone_wherever_it_is_listed(adaptors):
    alone = build("tiny-whisper", ["full"])
    model = build("tiny-whisper", adaptors)
    assert model.adaptors == adaptors

    def backbone_trainable(m):
        return {n for n, p in m.named_parameters() if p.requires_grad and n.startswith("backbone.")}

    assert backbone_trainable(model) == backbone_trainable(alone) != set()
    perturb(model)
    audio, mask = audio_batch()
    loss, _ = model.loss(model(audio, mask), label_batch())
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == p.requires_grad, name

    # WavLM Base+: every backbone weight but the CNN front end (7 bias-free convolutions of 512
    # channels, kernels 10, 3, 3, 3, 3, 2, 2, and GroupNorm(512) on the first).
    front_end = 512 * 10 + 4 * 512 * 512 * 3 + 2 * 512 * 512 * 2 + 2 * 512
    rows = {r.group: (r.trainable, r.total) for r in parameter_counts("wavlm-base-plus", adaptors)}
    assert rows["backbone"][0] == rows["backbone"][1] - front_end


@pytest.mark.parametrize("preset", ["tiny-wavlm", "tiny-whisper", "tiny-w2v-bert"])
def test_peft_export_holds_exactly_the_model_lora_tensors(tmp_path, preset):
    model = build(preset, ["lora", "bottleneck"])
    perturb(model)
    export_model(model, tmp_path / "export", run_config={}, label_set=None)
    loaded = PeftModel.from_pretrained(load_backbone(preset).model, tmp_path / "export" / "lora")
    theirs = {n: p for n, p in loaded.named_parameters() if ".lora_" in n}
    ours = {"base_model.model." + n.removeprefix("backbone.model."): p
            for n, p in model.named_parameters() if ".lora_" in n}
    assert theirs.keys() == ours.keys() and len(ours) == 2 * 4 * model.backbone.num_layers
    for name, p in ours.items():
        assert torch.equal(theirs[name], p), name


def test_parameter_counts_builds_on_the_meta_device(monkeypatch):
    built = []
    real = dser.model.build.build_model

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(dser.model.build, "build_model", spy)
    parameter_counts("wavlm-large", PAPER)
    assert len(built) == 1
    assert all(p.is_meta for p in built[0].parameters())


def test_skip_head_loads_adaptors_into_a_model_with_another_head_size(tmp_path):
    """Stage 2 on another label set: the adaptors load, the new 6-class head is left alone."""
    source = build("tiny-wavlm", PAPER)
    perturb(source)
    save_adaptors(source, tmp_path / "a.safetensors")
    target = build_model(model_config("tiny-wavlm", PAPER), num_classes=6)
    head_before = {n: p.detach().clone() for n, p in target.named_parameters() if n.startswith("head.")}
    mismatch = r"head\.classifier\.weight has shape \(4, 256\) but the model's is \(6, 256\)"
    with pytest.raises(CheckpointError, match=mismatch):
        load_adaptors(target, tmp_path / "a.safetensors")
    load_adaptors(target, tmp_path / "a.safetensors", skip_prefixes=("head.",))
    theirs = dict(source.named_parameters())
    for name, p in target.named_parameters():
        if name.startswith("head."):
            assert torch.equal(p, head_before[name]), name
        elif target.is_adaptor_param(name):
            assert torch.equal(p, theirs[name]), name
