"""Backbone tests: every tiny preset loads, runs, masks padding, freezes its front end, reloads
from a saved directory, matches the stock transformers forward, and lets LoRA take effect;
filterbank features match the HF feature extractors; the family registry and the presets agree.
No network (HF_HUB_OFFLINE)."""

import copy
import math

import huggingface_hub.constants
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from transformers import SeamlessM4TFeatureExtractor, WavLMModel, WhisperFeatureExtractor
from transformers import WhisperForConditionalGeneration
from transformers.models.wavlm.modeling_wavlm import WavLMAttention

from dser.config import ConfigError, from_dict
from dser.model.backbones import (
    FAMILIES,
    REAL_CONFIGS,
    TINY_PRESETS,
    Backbone,
    BackboneConfig,
    BackboneError,
    backbone_from_config,
    check_backbone,
    load_backbone,
    tiny_backbone_dir,
)
from dser.model.backbones.presets import _CNN, _TINY
from dser.model.backbones.waveform import WaveformBackbone, WavLMModuleAttention

PRESETS = list(TINY_PRESETS)
SR = 16000


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any hub lookup must fail fast instead of reaching for the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def tone(seconds: float, freq: float = 220.0, amp: float = 0.3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR)) / SR
    return (amp * torch.sin(2 * math.pi * freq * t) + 0.05 * torch.randn(len(t), generator=g)).float()


def pad_batch(clips: list[torch.Tensor], total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    total = total or max(len(c) for c in clips)
    audio = torch.zeros(len(clips), total)
    mask = torch.zeros(len(clips), total, dtype=torch.bool)
    for i, c in enumerate(clips):
        audio[i, : len(c)] = c
        mask[i, : len(c)] = True
    return audio, mask


def no_dropout(backbone: Backbone) -> Backbone:
    """Switch off every dropout (modules and the float rates some layers keep) for exact comparisons."""
    for m in backbone.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("dropout", "activation_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    return backbone


@pytest.fixture(scope="module")
def backbones():
    """One eval-mode backbone per preset, shared by the read-only tests."""
    return {name: load_backbone(name).eval() for name in PRESETS}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_forward_shapes_and_frame_mask(backbones, name):
    backbone = backbones[name]
    audio, mask = pad_batch([tone(1.0), tone(0.55, seed=1)])
    with torch.no_grad():
        out = backbone(audio, mask)
    assert len(out.hidden_states) == backbone.num_layers + 1 == 3
    frames = out.frame_mask.shape[1]
    for h in out.hidden_states:
        assert h.shape == (2, frames, backbone.hidden_size)
        assert torch.isfinite(h).all()
    assert frames in (49, 50)  # 50 frames/s for every family
    lengths = backbone.frame_lengths(mask.sum(-1))
    assert out.frame_mask.sum(-1).tolist() == lengths.tolist()
    assert lengths[1] < lengths[0]
    assert out.frame_mask[1, : lengths[1]].all() and not out.frame_mask[1, lengths[1] :].any()


@pytest.mark.parametrize("name", PRESETS)
def test_padding_does_not_change_valid_frames(backbones, name):
    backbone = backbones[name]
    clip = tone(0.7, seed=2)
    with torch.no_grad():
        alone = backbone(clip[None]).hidden_states
        audio, mask = pad_batch([clip, tone(1.3, freq=330, seed=3)])
        audio[0, len(clip) :] = 0.7  # garbage in the padding must not matter either
        batched = backbone(audio, mask)
    n = int(batched.frame_mask[0].sum())
    assert n == alone[0].shape[1]
    for a, b in zip(alone, batched.hidden_states):
        torch.testing.assert_close(b[0, :n], a[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", PRESETS)
def test_matches_stock_transformers_forward(backbones, name):
    """The hand-run encoder equals the model's own forward on an unpadded clip."""
    backbone = backbones[name]
    model = backbone.hf_model
    with torch.no_grad():
        if backbone.family == "whisper":
            # The stock encoder only takes 30 s; end in silence so the extractor's reflect
            # padding at the 30 s boundary sees zeros, as ours does.
            clip = torch.cat([tone(29.5), torch.zeros(SR // 2)])
            features = WhisperFeatureExtractor()(clip.numpy(), sampling_rate=SR, return_tensors="pt")
            ref = model(features.input_features).last_hidden_state
        elif backbone.family == "w2v-bert":
            clip = tone(1.37)
            features = SeamlessM4TFeatureExtractor()(clip.numpy(), sampling_rate=SR, return_tensors="pt")
            ref = model(features.input_features, attention_mask=features.attention_mask).last_hidden_state
        else:
            clip = tone(1.37)
            ref = model(clip[None]).last_hidden_state
        out = backbone(clip[None])
    n = int(out.frame_mask.sum())
    torch.testing.assert_close(out.hidden_states[-1][:, :n], ref[:, :n], atol=5e-5, rtol=1e-4)


def _variant(preset: str, **changes):
    config = TINY_PRESETS[preset]()
    for key, value in changes.items():
        setattr(config, key, value)
    return config


@pytest.mark.parametrize(
    "config",
    [
        _variant("tiny-wavlm", feat_extract_norm="layer", do_stable_layer_norm=True),  # WavLM Large layout
        _variant("tiny-hubert", feat_extract_norm="layer", do_stable_layer_norm=True, feat_proj_layer_norm=True),
        _variant("tiny-wav2vec2", feat_extract_norm="group", do_stable_layer_norm=False),  # wav2vec 2.0 Base
    ],
    ids=["wavlm-stable", "hubert-stable", "wav2vec2-group"],
)
def test_other_layouts_match_stock_and_ignore_padding(config):
    backbone = backbone_from_config(config).eval()
    clip = tone(0.9)
    with torch.no_grad():
        ref = backbone.hf_model(clip[None]).last_hidden_state
        alone = backbone(clip[None]).hidden_states
        audio, mask = pad_batch([clip, tone(1.4, seed=14)])
        batched = backbone(audio, mask)
    torch.testing.assert_close(alone[-1], ref, atol=5e-5, rtol=1e-4)
    n = alone[0].shape[1]
    for a, b in zip(alone, batched.hidden_states):
        torch.testing.assert_close(b[0, :n], a[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", PRESETS)
def test_saved_preset_loads_through_directory_path(tmp_path, backbones, name):
    path = tiny_backbone_dir(name, tmp_path / name)
    assert (path / "config.json").is_file()
    loaded = load_backbone(str(path)).eval()
    assert type(loaded.hf_model) is type(backbones[name].hf_model)
    audio, mask = pad_batch([tone(0.8), tone(0.5, seed=4)])
    with torch.no_grad():
        a = backbones[name](audio, mask)
        b = loaded(audio, mask)
    assert torch.equal(a.frame_mask, b.frame_mask)
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert torch.equal(x, y)


def test_full_whisper_checkpoint_loads_its_encoder(tmp_path):
    """Hub Whisper checkpoints hold the whole seq2seq model (keys model.encoder.*)."""
    config = TINY_PRESETS["tiny-whisper"]()
    full = WhisperForConditionalGeneration(config)
    full.save_pretrained(tmp_path)
    backbone = load_backbone(str(tmp_path))
    assert backbone.family == "whisper"
    for key, value in full.model.encoder.state_dict().items():
        assert torch.equal(backbone.hf_model.state_dict()[key], value), key


def test_loaded_config_turns_off_layerdrop_and_masking(tmp_path):
    config = TINY_PRESETS["tiny-wavlm"]()
    config.layerdrop, config.mask_time_prob = 0.1, 0.05  # the published checkpoints' values
    WavLMModel(config).save_pretrained(tmp_path)
    backbone = load_backbone(str(tmp_path))
    assert backbone.hf_model.config.layerdrop == 0.0
    assert backbone.hf_model.config.mask_time_prob == 0.0
    backbone = load_backbone(BackboneConfig(name=str(tmp_path), layerdrop=0.2, mask_time_prob=0.1))
    assert backbone.hf_model.config.layerdrop == 0.2


def test_presets_are_seeded_and_leave_global_rng_alone():
    state = torch.get_rng_state()
    a, b = load_backbone("tiny-wavlm"), load_backbone("tiny-wavlm")
    assert torch.equal(torch.get_rng_state(), state)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    c = load_backbone(BackboneConfig(name="tiny-wavlm", seed=1))
    assert not torch.equal(c.layers[0].attention.q_proj.weight, a.layers[0].attention.q_proj.weight)


@pytest.mark.parametrize("name", ["tiny-wavlm", "tiny-wav2vec2", "tiny-whisper"])
def test_front_end_frozen_by_default_and_runs_without_graph(name):
    backbone = load_backbone(name).train()
    front = backbone.front_end_parameters()
    assert front and not any(p.requires_grad for p in front)
    model = backbone.hf_model
    last_conv = model.conv2 if backbone.family == "whisper" else model.feature_extractor.conv_layers[-1]
    seen = []
    handle = last_conv.register_forward_hook(lambda m, i, o: seen.append(o))
    audio, mask = pad_batch([tone(0.5), tone(0.3, seed=5)])
    out = backbone(audio, mask)
    handle.remove()
    assert seen and seen[0].grad_fn is None and not seen[0].requires_grad
    assert out.hidden_states[-1].requires_grad  # the transformer is not frozen by the backbone

    trainable = load_backbone(BackboneConfig(name=name, freeze_feature_encoder=False)).train()
    trainable(audio, mask).hidden_states[-1].sum().backward()
    assert all(p.grad is not None for p in trainable.front_end_parameters())


def test_w2v_bert_has_no_front_end_to_freeze(backbones):
    assert backbones["tiny-w2v-bert"].front_end_parameters() == []


# ---- WavLM attention that LoRA can see ---------------------------------------------------


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # the stock code's own warning
def test_wavlm_module_attention_equals_stock():
    backbone = load_backbone("tiny-wavlm").eval()
    attentions = [m for m in backbone.modules() if isinstance(m, WavLMAttention)]
    assert len(attentions) == 2 and all(type(m) is WavLMModuleAttention for m in attentions)

    stock = copy.deepcopy(backbone)
    for m in stock.modules():
        if type(m) is WavLMModuleAttention:
            m.__class__ = WavLMAttention
    audio, mask = pad_batch([tone(1.0), tone(0.6, seed=6)])
    with torch.no_grad():
        ours, theirs = backbone(audio, mask), stock(audio, mask)
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        valid = ours.frame_mask
        torch.testing.assert_close(a[valid], b[valid], atol=1e-6, rtol=1e-5)

    # And module for module, on random input with a padding mask and a position bias.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 64, generator=g)
    frame_mask = torch.ones(2, 30, dtype=torch.bool)
    frame_mask[1, 17:] = False
    for module in attentions:
        bias = module.compute_bias(30, 30) if hasattr(module, "rel_attn_embed") else torch.randn(4, 30, 30, generator=g)
        bias = bias.unsqueeze(0).repeat(2, 1, 1, 1).view(8, 30, 30)
        with torch.no_grad():
            ours = module(x, attention_mask=frame_mask, position_bias=bias)[0]
            theirs = WavLMAttention.forward(_as_stock(module), x, attention_mask=frame_mask, position_bias=bias)[0]
        torch.testing.assert_close(ours[frame_mask], theirs[frame_mask], atol=1e-6, rtol=1e-5)


def _as_stock(module: WavLMModuleAttention) -> WavLMAttention:
    stock = copy.deepcopy(module)
    stock.__class__ = WavLMAttention
    return stock


@pytest.mark.parametrize("name", PRESETS)
def test_lora_update_changes_output_and_gets_gradients(name):
    backbone = load_backbone(name).eval()
    audio, mask = pad_batch([tone(0.6), tone(0.4, seed=7)])
    with torch.no_grad():
        before = backbone(audio, mask).hidden_states[-1]
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=backbone.lora_targets), backbone.model)
    lora_b = [p for n, p in backbone.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 4 * backbone.num_layers  # q, k, v, out in every layer
    with torch.no_grad():
        same = backbone(audio, mask).hidden_states[-1]
    torch.testing.assert_close(same, before)  # LoRA starts as the identity (B = 0)
    with torch.no_grad():
        for p in lora_b:
            p.normal_(std=0.5)
    out = backbone(audio, mask)
    valid = out.frame_mask
    assert (out.hidden_states[-1][valid] - before[valid]).abs().max() > 1e-3
    out.hidden_states[-1][valid].pow(2).mean().backward()
    for n, p in backbone.named_parameters():
        if "lora_A" in n or "lora_B" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", ["tiny-wavlm", "tiny-whisper", "tiny-w2v-bert"])
def test_gradient_checkpointing_gives_same_outputs_and_lora_grads(name):
    grads = []
    for checkpointing in (False, True):
        backbone = load_backbone(BackboneConfig(name=name, gradient_checkpointing=checkpointing))
        assert all(layer.gradient_checkpointing == checkpointing for layer in backbone.layers)
        inject_adapter_in_model(LoraConfig(r=2, target_modules=backbone.lora_targets), backbone.model)
        g = torch.Generator().manual_seed(1)
        for n, p in backbone.named_parameters():
            p.requires_grad_("lora_" in n)
            if "lora_" in n:  # the same LoRA weights in both runs
                with torch.no_grad():
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        no_dropout(backbone.train())  # so both runs compute the same thing
        audio, mask = pad_batch([tone(0.5), tone(0.3, seed=8)])
        hidden = backbone(audio, mask).hidden_states[-1]
        weight = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))
        (hidden * weight).sum().backward()  # (a plain sum of layer-normed states has ~0 gradient)
        grads.append({n: p.grad.clone() for n, p in backbone.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", PRESETS)
def test_backbone_runs_inside_a_peft_model(backbones, name):
    """build/export may put a PeftModel in backbone.model; the backbone then runs its base model."""
    from peft import get_peft_model

    backbone = load_backbone(name).eval()
    audio, mask = pad_batch([tone(0.5), tone(0.4, seed=11)])
    with torch.no_grad():
        before = backbone(audio, mask).hidden_states[-1]
    backbone.model = get_peft_model(backbone.model, LoraConfig(r=2, target_modules=backbone.lora_targets))
    assert backbone.hf_model is backbone.model.get_base_model()
    with torch.no_grad():
        torch.testing.assert_close(backbone(audio, mask).hidden_states[-1], before)
        for n, p in backbone.named_parameters():
            if "lora_B" in n:
                p.fill_(0.2)
        assert not torch.allclose(backbone(audio, mask).hidden_states[-1], before, atol=1e-3)


@pytest.mark.parametrize("name", PRESETS)
def test_time_masking_only_when_configured_and_training(name):
    audio, mask = pad_batch([tone(1.0), tone(0.8, seed=12)])
    plain = no_dropout(load_backbone(name))
    masked = no_dropout(load_backbone(BackboneConfig(name=name, mask_time_prob=0.5)))
    masked.load_state_dict(plain.state_dict(), strict=False)  # + its masked_spec_embed, if any
    with torch.no_grad():
        reference = plain.eval()(audio, mask).hidden_states[-1]
        torch.testing.assert_close(plain.train()(audio, mask).hidden_states[-1], reference)  # prob 0: off
        torch.testing.assert_close(masked.eval()(audio, mask).hidden_states[-1], reference)  # eval: off
        torch.manual_seed(0)
        assert not torch.allclose(masked.train()(audio, mask).hidden_states[-1], reference, atol=1e-3)


@pytest.mark.bf16
@pytest.mark.parametrize("name", PRESETS)
def test_bfloat16_backbone_takes_float32_audio(backbones, name):
    """DeepSpeed bf16 casts the module (buffers included) but the batch audio stays float32."""
    backbone = copy.deepcopy(backbones[name]).to(torch.bfloat16)
    audio, mask = pad_batch([tone(0.6), tone(0.4, seed=13)])
    with torch.no_grad():
        out = backbone(audio, mask)
        reference = backbones[name](audio, mask)
    last = out.hidden_states[-1]
    assert last.dtype == torch.bfloat16 and torch.isfinite(last).all()
    valid = out.frame_mask
    error = (last.float()[valid] - reference.hidden_states[-1][valid]).abs().mean()
    assert error < 0.1 * reference.hidden_states[-1][valid].abs().mean()


# ---- filterbank features ----------------------------------------------------------------


def test_whisper_log_mel_matches_feature_extractor(backbones):
    backbone = backbones["tiny-whisper"]
    clip = tone(1.3698)
    reference = WhisperFeatureExtractor()(clip.numpy(), sampling_rate=SR, return_tensors="pt").input_features[0]
    audio, mask = pad_batch([clip, tone(2.0, seed=9)])
    features, valid = backbone.filterbank(audio, mask)  # (B, Fm, 80)
    n = int(valid[0].sum())
    assert n == len(clip) // 160
    torch.testing.assert_close(features[0, :n].T, reference[:, :n], atol=1e-4, rtol=1e-4)


def test_w2v_bert_fbank_matches_feature_extractor(backbones):
    backbone = backbones["tiny-w2v-bert"]
    clip = tone(1.3698)
    reference = SeamlessM4TFeatureExtractor()(clip.numpy(), sampling_rate=SR, return_tensors="pt")
    frames = reference.input_features[0].reshape(-1, 80)  # undo the stacking of frame pairs
    audio, mask = pad_batch([clip, tone(2.0, seed=9)])
    features, valid = backbone.filterbank(audio, mask)
    n = int(valid[0].sum())
    assert n == (len(clip) - 400) // 160 + 1
    torch.testing.assert_close(features[0, :n], frames[:n], atol=2e-3, rtol=1e-3)
    # Stacked frames the model sees ↔ the extractor's attention mask.
    assert backbone.frame_lengths(mask.sum(-1))[0] == reference.attention_mask.sum()


@pytest.mark.parametrize("name", ["tiny-whisper", "tiny-w2v-bert"])
def test_global_feature_norm_fits_buffers_and_keeps_loudness(name):
    backbone = load_backbone(BackboneConfig(name=name, feature_norm="global")).eval()
    clips = [tone(0.8, amp=a, seed=s) for s, a in enumerate((0.05, 0.2, 0.5, 0.9))]
    with pytest.raises(BackboneError, match="fit_feature_stats"):
        backbone(*pad_batch(clips))
    backbone.fit_feature_stats([pad_batch(clips[:2]), pad_batch(clips[2:])])
    state = backbone.state_dict()
    assert {"feature_mean", "feature_std", "feature_frames"} <= state.keys()
    features, valid = backbone.filterbank(*pad_batch(clips))
    frames = features[valid]  # (N, 80)
    torch.testing.assert_close(frames.mean(0), torch.zeros(80), atol=1e-3, rtol=0)
    torch.testing.assert_close(frames.std(0, unbiased=False), torch.ones(80), atol=1e-3, rtol=0)

    quiet, loud = tone(0.8, amp=0.1, seed=9), tone(0.8, amp=0.1, seed=9) * 4
    with torch.no_grad():
        q, lo = backbone.filterbank(torch.stack([quiet, loud]))[0]
    assert (lo - q).mean() > 0.5  # a 4× louder clip reads louder after global normalisation

    fresh = load_backbone(BackboneConfig(name=name, feature_norm="global")).eval()
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(quiet[None]).hidden_states[-1], backbone(quiet[None]).hidden_states[-1])


def test_fit_feature_stats_refuses_waveform_families(backbones):
    with pytest.raises(BackboneError, match="filterbank"):
        backbones["tiny-wavlm"].fit_feature_stats([pad_batch([tone(0.5)])])


def test_whisper_refuses_clips_longer_than_30_seconds(backbones):
    with pytest.raises(BackboneError, match="30 s"):
        backbones["tiny-whisper"](torch.zeros(1, 30 * SR + 800))


# ---- the family registry -------------------------------------------------------------------


def test_registry_and_presets_agree(backbones):
    """Every tiny preset is of a registered family and every registered family has a tiny preset,
    so each family runs through every per-preset test here; the real architectures are registered."""
    preset_types = {name: TINY_PRESETS[name]().model_type for name in PRESETS}
    unregistered = {name: t for name, t in preset_types.items() if t not in FAMILIES}
    assert not unregistered, f"presets of model types missing from registry.FAMILIES: {unregistered}"
    untested = set(FAMILIES) - set(preset_types.values())
    assert not untested, f"registered families without a tiny preset in presets.TINY_PRESETS: {untested}"
    assert all(REAL_CONFIGS[name]().model_type in FAMILIES for name in REAL_CONFIGS)
    for model_type, backbone_class in FAMILIES.items():
        assert issubclass(backbone_class, Backbone)
        assert backbone_class.model_class.config_class.model_type == model_type
    names = [backbone_class.family for backbone_class in FAMILIES.values()]
    assert len(set(names)) == len(names)
    for name, model_type in preset_types.items():
        assert type(backbones[name]) is FAMILIES[model_type], name


def test_the_torch_free_name_tables_copy_the_registry_and_presets():
    """``dser.model.backbone_names`` (what dser submit checks backbones by) holds the same names
    as the tables that build models; a family or preset added there must be added here too."""
    from dser.model import backbone_names

    assert backbone_names.MODEL_TYPES == tuple(FAMILIES)
    assert backbone_names.TINY_PRESET_NAMES == tuple(TINY_PRESETS)
    assert backbone_names.REAL_ARCHITECTURES == tuple(REAL_CONFIGS)


def test_a_backbone_directory_is_judged_by_its_config_json(tmp_path):
    from dser.model.backbone_names import backbone_problem

    tiny_backbone_dir("tiny-hubert", tmp_path / "hubert")
    assert backbone_problem(str(tmp_path / "hubert")) is None
    check_backbone(str(tmp_path / "hubert"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    (tmp_path / "untyped").mkdir()
    (tmp_path / "untyped" / "config.json").write_text('{"hidden_size": 8}')
    for name, message in (("broken", "config.json cannot be read as JSON"), ("untyped", "config.json names no model_type")):
        with pytest.raises(BackboneError, match=message):
            check_backbone(str(tmp_path / name))
    assert "names no model_type; point model.backbone.name at a directory written by save_pretrained" in \
        backbone_problem(str(tmp_path / "untyped"))


def test_a_new_family_is_one_class_and_one_registry_line(monkeypatch, tmp_path):
    """UniSpeech-SAT has wav2vec 2.0's layout: a three-line class and one FAMILIES entry make it
    load (from a config and from a saved directory) and match its stock forward."""
    from transformers import UniSpeechSatConfig, UniSpeechSatModel

    class UniSpeechSatBackbone(WaveformBackbone):
        family = "unispeech-sat"
        model_class = UniSpeechSatModel

    config = UniSpeechSatConfig(
        **_TINY, **_CNN, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        feat_extract_norm="group", do_stable_layer_norm=False,
    )
    with pytest.raises(BackboneError, match="'unispeech-sat' model"):
        backbone_from_config(config)
    monkeypatch.setitem(FAMILIES, "unispeech-sat", UniSpeechSatBackbone)
    backbone = backbone_from_config(config).eval()
    backbone.hf_model.save_pretrained(tmp_path)
    loaded = load_backbone(str(tmp_path)).eval()
    assert type(loaded) is UniSpeechSatBackbone and loaded.family == "unispeech-sat"
    clip = tone(0.9)
    with torch.no_grad():
        ref = backbone.hf_model(clip[None]).last_hidden_state
        out = loaded(clip[None])
    torch.testing.assert_close(out.hidden_states[-1], ref, atol=5e-5, rtol=1e-4)


# ---- names and errors ---------------------------------------------------------------------


def test_unknown_backbone_is_one_clear_error_without_network():
    with pytest.raises(BackboneError) as e:
        load_backbone("no-such-org/no-such-backbone")
    message = str(e.value)
    assert "neither a tiny preset" in message and "tiny-wavlm" in message and "\n" not in message


def test_missing_directory_and_directory_without_config(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone(str(tmp_path / "nope"))
    with pytest.raises(BackboneError, match="no config.json"):
        load_backbone(str(tmp_path))


def test_unsupported_model_type(tmp_path):
    from transformers import BertConfig

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config.save_pretrained(tmp_path)
    with pytest.raises(BackboneError, match="'bert' model"):
        load_backbone(str(tmp_path))


def test_checkpoint_missing_encoder_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_backbone_dir("tiny-hubert", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.1." not in k}, tmp_path / "model.safetensors")
    with pytest.raises(BackboneError, match="lacks .* weights"):
        load_backbone(str(tmp_path))


def test_backbone_config_is_strict():
    with pytest.raises(ConfigError, match="feature_norm"):
        from_dict(BackboneConfig, {"feature_norm": "per-speaker"}, where="model.backbone")
    with pytest.raises(ConfigError, match="layerdrop"):
        from_dict(BackboneConfig, {"layerdrop": 1.5}, where="model.backbone")
    with pytest.raises(BackboneError, match="unknown architecture"):
        load_backbone("random:wavlm-huge")


def _wavlm_parameters(config) -> int:
    """WavLMModel's parameter count from the architecture, term by term."""
    h, i, heads, k = config.hidden_size, config.intermediate_size, config.num_attention_heads, config.conv_kernel
    c = config.conv_dim[0]  # all 7 conv layers are c wide, no conv bias
    cnn = 1 * c * k[0] + sum(c * c * kk for kk in k[1:])
    cnn += 2 * c * (1 if config.feat_extract_norm == "group" else 7)  # GroupNorm on layer 0 | LayerNorm on all
    projection = 2 * c + c * h + h  # LayerNorm + Linear
    kernel = config.num_conv_pos_embeddings
    position = kernel + h * (h // config.num_conv_pos_embedding_groups) * kernel + h  # weight-norm g, v + bias
    attention = 4 * (h * h + h) + heads + (h // heads) * 8 + 8  # q k v out, GRU gate constant and linear
    layer = attention + 2 * h + (h * i + i + i * h + h) + 2 * h  # + LayerNorm, FFN, final LayerNorm
    relative = config.num_buckets * heads  # first layer only
    masked = h if config.mask_time_prob > 0 else 0
    return cnn + projection + position + 2 * h + config.num_hidden_layers * layer + relative + masked


@pytest.mark.parametrize(
    "name, hidden, layers, norm, millions",
    [("wavlm-base-plus", 768, 12, "group", 94.4), ("wavlm-large", 1024, 24, "layer", 315.5)],
)
def test_real_architectures_match_published_configs(name, hidden, layers, norm, millions):
    """WavLM Base+ / Large from the written-out configs, on the meta device (no memory, no init)."""
    config = REAL_CONFIGS[name]()
    assert (config.hidden_size, config.num_hidden_layers, config.feat_extract_norm) == (hidden, layers, norm)
    assert config.do_stable_layer_norm == (norm == "layer")
    with torch.device("meta"):
        model = WavLMModel(config)
    total = sum(p.numel() for p in model.parameters())
    assert total == _wavlm_parameters(config)
    assert round(total / 1e6, 1) == millions  # the Hub's model-size figures


@pytest.mark.parametrize("name", PRESETS)
def test_sdpa_attention_matches_eager(backbones, name):
    sdpa = load_backbone(BackboneConfig(name=name, attn_implementation="sdpa")).eval()
    audio, mask = pad_batch([tone(0.9), tone(0.5, seed=10)])
    with torch.no_grad():
        eager, fast = backbones[name](audio, mask), sdpa(audio, mask)
    for a, b in zip(eager.hidden_states, fast.hidden_states):
        torch.testing.assert_close(b[eager.frame_mask], a[eager.frame_mask], atol=1e-5, rtol=1e-4)
