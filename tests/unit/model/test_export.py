"""Adaptor save/load and export beyond the adaptor table: the export's files, a stage-2 model with
two LoRA and two bottleneck sets (peft's loader with both adapters active, merged), full
finetuning, fitted feature statistics, loading into a built model for stage 2, and the errors a
user sees for files that do not fit."""

from __future__ import annotations

import json

import huggingface_hub.constants
import pytest
import torch
import yaml
from fixtures_model import audio_batch, build, outputs, perturb
from peft import PeftModel
from safetensors.torch import load_file, save_file

from dser.labels import get_label_set
from dser.model.backbones import load_backbone
from dser.model.checkpoint_io import (
    CheckpointError,
    adaptor_state,
    export_labels,
    export_model,
    load_adaptors,
    load_export_weights,
    load_exported,
    read_export,
    save_adaptors,
)

LABELS = get_label_set("4class").to_dict()
RUN = {"name": "demo", "task": "categorical", "model": {"adaptors": ["lora"]}, "optim": {"lr": 0.001}}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_export_directory_contents(tmp_path):
    model = build("tiny-wavlm", ["lora", "bottleneck"])
    perturb(model)
    out = export_model(model, tmp_path / "export", RUN, LABELS)
    assert yaml.safe_load((out / "config.yaml").read_text()) == RUN
    assert json.loads((out / "labels.json").read_text()) == LABELS == export_labels(out)
    meta = read_export(out)
    assert meta["task"] == "categorical" and meta["num_classes"] == 4 and meta["lora"] == {"default": "lora"}
    assert meta["model"]["adaptors"] == ["lora", "bottleneck"] and not meta["merged"]

    adapter_config = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 16
    assert set(adapter_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert adapter_config["base_model_name_or_path"] == "tiny-wavlm"
    lora_keys = set(load_file(out / "lora" / "adapter_model.safetensors"))
    assert len(lora_keys) == 16  # A and B of 4 projections in 2 layers
    assert all(k.startswith("base_model.model.encoder.layers.") and ".default." not in k for k in lora_keys)

    rest = set(load_file(out / "adaptors.safetensors"))
    assert rest == {n for n in adaptor_state(model) if ".lora_" not in n}
    assert any(k.startswith("bneck_adapters.default.") for k in rest) and any(k.startswith("head.") for k in rest)


@pytest.mark.parametrize(
    "preset, lora",
    [("tiny-whisper", {"layers": [1]}), ("tiny-wavlm", {"use_dora": True}),
     ("tiny-w2v-bert", {"rank": 4, "use_rslora": True, "target_modules": ["linear_q", "linear_v"]})],
    ids=["layers", "dora", "rslora-targets"],
)
def test_lora_options_survive_the_peft_export(tmp_path, preset, lora):
    audio, mask = audio_batch()
    model = build(preset, ["lora"], lora=lora)
    perturb(model)
    expected = outputs(model, audio, mask)
    out = export_model(model, tmp_path / "export", RUN, LABELS)
    plain = build(preset, ["none"], seed=3)
    load_adaptors(plain, out / "adaptors.safetensors")
    plain.backbone.model = PeftModel.from_pretrained(plain.backbone.model, out / "lora")
    torch.testing.assert_close(outputs(plain, audio, mask), expected, rtol=0, atol=1e-6)
    loaded, _, _ = load_exported(out)
    assert torch.equal(outputs(loaded, audio, mask), expected)


def test_stage2_model_with_two_lora_and_bottleneck_sets(tmp_path):
    audio, mask = audio_batch()
    model = build("tiny-hubert", ["lora", "bottleneck"])
    perturb(model)
    model.add_fresh_adaptors(["lora", "bottleneck"])
    perturb(model, keep=lambda n: ".stage2." in n, seed=9)
    expected = outputs(model, audio, mask)
    out = export_model(model, tmp_path / "export", RUN, LABELS)
    assert read_export(out)["lora"] == {"default": "lora", "stage2": "lora/stage2"}
    assert read_export(out)["fresh_adaptors"] == ["lora", "bottleneck"]

    loaded, _, _ = load_exported(out)
    assert torch.equal(outputs(loaded, audio, mask), expected)

    # peft's own loader, both adapters active
    plain = build("tiny-hubert", ["bottleneck"], seed=3)
    plain.add_fresh_adaptors(["bottleneck"])
    load_adaptors(plain, out / "adaptors.safetensors")
    peft_model = PeftModel.from_pretrained(plain.backbone.model, out / "lora")
    peft_model.load_adapter(out / "lora" / "stage2", adapter_name="stage2")
    peft_model.base_model.set_adapter(["default", "stage2"])
    plain.backbone.model = peft_model
    torch.testing.assert_close(outputs(plain, audio, mask), expected, rtol=0, atol=1e-6)

    merged_dir = export_model(model, tmp_path / "merged", RUN, LABELS, merge=True)
    merged, _, _ = load_exported(merged_dir)
    assert sorted(merged.bneck_adapters) == ["default", "stage2"]
    torch.testing.assert_close(outputs(merged, audio, mask), expected, rtol=1e-4, atol=1e-5)


def test_merged_backbone_is_a_plain_transformers_directory(tmp_path):
    model = build("tiny-w2v-bert", ["lora", "weighted_sum"])
    perturb(model)
    out = export_model(model, tmp_path / "export", RUN, LABELS, merge=True)
    meta = read_export(out)
    assert meta["merged"] and meta["backbone"] == "backbone" and meta["lora"] == {}
    merged = load_backbone(str(out / "backbone"))  # the local-directory path a hub id takes
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # the merged weight is W + scale · B A
    layer = model.backbone.layers[0].self_attn.linear_q
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(merged.layers[0].self_attn.linear_q.weight,
                               layer.base_layer.weight + delta, rtol=1e-5, atol=1e-6)
    # the live model keeps its LoRA layers
    assert "default" in model.backbone.layers[0].self_attn.linear_q.lora_A


def test_merge_without_lora_writes_the_usual_export(tmp_path):
    model = build("tiny-wavlm", ["bottleneck"])
    out = export_model(model, tmp_path / "export", RUN, None, merge=True)
    assert not read_export(out)["merged"] and not (out / "backbone").exists()
    assert export_labels(out) is None


@pytest.mark.parametrize("merge", [False, True])
def test_full_finetuning_export(tmp_path, merge):
    audio, mask = audio_batch()
    model = build("tiny-wav2vec2", ["full", "weighted_sum"])
    perturb(model)
    expected = outputs(model, audio, mask)
    out = export_model(model, tmp_path / "export", RUN, LABELS, merge=merge)
    saved = set(load_file(out / "adaptors.safetensors"))
    assert any(k.startswith("backbone.model.encoder.") for k in saved) != merge
    loaded, _, _ = load_exported(out)
    torch.testing.assert_close(outputs(loaded, audio, mask), expected, rtol=1e-5, atol=1e-6)


def test_fitted_feature_statistics_travel_with_the_adaptors(tmp_path):
    audio, mask = audio_batch()
    cfg = {"name": "tiny-whisper", "feature_norm": "global"}
    model = build("tiny-whisper", ["bottleneck"], backbone=cfg)
    model.backbone.fit_feature_stats([(audio, mask)])
    expected = outputs(model, audio, mask)
    save_adaptors(model, tmp_path / "a.safetensors")
    assert {"backbone.feature_mean", "backbone.feature_std", "backbone.feature_frames"} <= set(
        load_file(tmp_path / "a.safetensors"))
    fresh = build("tiny-whisper", ["bottleneck"], backbone=cfg)
    load_adaptors(fresh, tmp_path / "a.safetensors")
    assert torch.equal(outputs(fresh, audio, mask), expected)
    out = export_model(model, tmp_path / "export", RUN, LABELS)
    loaded, _, _ = load_exported(out)
    assert torch.equal(outputs(loaded, audio, mask), expected)


def test_stage2_loads_an_export_into_a_built_model(tmp_path):
    audio, mask = audio_batch()
    stage1 = build("tiny-data2vec", ["lora", "weight_gating"])
    perturb(stage1)
    out = export_model(stage1, tmp_path / "export", RUN, LABELS)

    model = build("tiny-data2vec", ["lora", "weight_gating"], seed=42)
    head_before = {n: p.clone() for n, p in model.named_parameters() if n.startswith("head.")}
    load_export_weights(model, out, skip_prefixes=("head.",))
    for n, p in model.named_parameters():
        if n.startswith("head."):
            assert torch.equal(p, head_before[n])  # a new head is left alone
        elif model.is_adaptor_param(n):
            assert torch.equal(p, dict(stage1.named_parameters())[n]), n
    load_export_weights(model, out)
    assert torch.equal(outputs(model, audio, mask), outputs(stage1, audio, mask))


# ---- errors ------------------------------------------------------------------------------


def test_load_refuses_missing_and_unexpected_keys_by_name(tmp_path):
    save_adaptors(build("tiny-wavlm", ["lora", "weighted_sum"]), tmp_path / "a.safetensors")
    other = build("tiny-wavlm", ["lora", "weight_gating"])
    with pytest.raises(CheckpointError) as err:
        load_adaptors(other, tmp_path / "a.safetensors")
    message = str(err.value)
    assert "missing keys: wgate_gates.0.g, wgate_gates.1.g" in message
    assert "unexpected keys: wsum_layers.weights" in message


def test_load_refuses_shape_mismatch_and_bad_files(tmp_path):
    save_adaptors(build("tiny-wavlm", ["bottleneck"], bottleneck={"dim": 32}), tmp_path / "a.safetensors")
    model = build("tiny-wavlm", ["bottleneck"])
    with pytest.raises(CheckpointError, match=r"ffn0.down.weight has shape \(32, 64\) but the model's is \(64, 64\)"):
        load_adaptors(model, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match="no adaptor file there"):
        load_adaptors(model, tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_adaptors(model, tmp_path / "bad.safetensors")


def test_export_errors(tmp_path):
    with pytest.raises(CheckpointError, match="holds no dser export"):
        load_exported(tmp_path)
    model = build("tiny-hubert", ["lora"])
    out = export_model(model, tmp_path / "export", RUN, LABELS)
    with pytest.raises(CheckpointError,
                       match=r"lora/adapter_config.json: r is 8 but the model's LoRA set 'default' has 4"):
        load_export_weights(build("tiny-hubert", ["lora"], lora={"rank": 4}), out)
    with pytest.raises(CheckpointError, match=r"has LoRA sets \['default'\] but the model has none"):
        load_export_weights(build("tiny-hubert", ["bottleneck"]), out)
    state = load_file(out / "lora" / "adapter_model.safetensors")
    dropped = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != dropped}, out / "lora" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=rf"missing keys: {dropped}"):
        load_exported(out)
    merged = export_model(model, tmp_path / "merged", RUN, LABELS, merge=True)
    with pytest.raises(CheckpointError, match="holds its own backbone weights"):
        load_export_weights(build("tiny-hubert", ["none"]), merged)
