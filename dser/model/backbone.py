"""Speech encoder backbones: load a ``transformers`` encoder and return every hidden state.

The data path stays waveform-only: every backbone takes 16 kHz audio ``(B, T)`` with a sample
mask, and the filterbank families compute their features inside the model, on the device::

    backbone = load_backbone("microsoft/wavlm-base-plus")      # hub id (or its local cache)
    backbone = load_backbone("/models/wavlm-large")            # a directory from save_pretrained
    backbone = load_backbone("tiny-wavlm")                     # tiny preset, fixed-seed random weights
    backbone = load_backbone("random:wavlm-large")             # real architecture, random weights
    out = backbone(audio, attention_mask)                      # audio (B, T), mask (B, T) bool
    out.hidden_states                                          # num_layers + 1 tensors (B, F, H)
    out.frame_mask                                             # (B, F) bool, True on valid frames

Families (``Backbone.family``) and what ``hidden_states`` holds:

- ``wavlm``, ``hubert``, ``wav2vec2``, ``data2vec-audio`` (waveform in, CNN front end, 50 frames/s):
  ``hidden_states[0]`` is the input of the first transformer layer (feature projection +
  convolutional position embedding, layer-normed for post-LN encoders); ``hidden_states[i]`` is
  layer ``i``'s output. For "stable layer norm" (pre-LN) encoders such as WavLM Large and
  wav2vec 2.0 Large, ``hidden_states[-1]`` is the last layer's output *after* the encoder's final
  layer norm (the model's ``last_hidden_state``) and ``hidden_states[0]`` is not normed.
- ``whisper`` (Whisper's encoder; 80-bin log-mel, 100 frames/s, conv stride 2 → 50 frames/s):
  ``hidden_states[0]`` is conv front end + positional embedding, ``hidden_states[-1]`` has the
  encoder's final layer norm applied.
- ``w2v-bert`` (w2v-BERT 2.0; SeamlessM4T 80-bin Kaldi fbank stacked in pairs → 160 dims,
  50 frames/s): ``hidden_states[0]`` is the feature projection, then each conformer layer's
  output. The HF model's optional adapter / intermediate FFN after the encoder is not used.

How the families' quirks are handled:

- **Whisper on short clips.** Whisper's encoder is trained on 30 s windows and in transformers
  5.23 ``WhisperEncoder.forward`` refuses any other length. dser does not call that forward: it
  runs the same modules itself (conv1, conv2, positional embedding, layers, final layer norm) and
  adds only the first ``F`` rows of ``embed_positions`` (trimmed positional embeddings), so a 3 s
  clip costs 150 frames, not 1500. Whisper's own encoder has no attention mask (the pretrained
  model attends over its 30 s of padding); dser passes a padding mask to every layer (the layers
  accept one), so padded frames are never attended to, and pooling masks them out as well. The
  log-mel matches ``WhisperFeatureExtractor`` on the valid frames (reflect pad at the start, zeros
  after the clip, exactly as its 30 s zero padding does). Clips longer than 30 s are refused.
- **LoRA on WavLM.** transformers 5.23's ``WavLMAttention`` hands ``q_proj.weight`` … straight to
  ``F.multi_head_attention_forward``, so ``peft``'s LoRA wrappers on those modules would be
  silently bypassed. Every WavLM attention is switched to ``WavLMModuleAttention``, which keeps
  the stock gated relative position bias and calls ``q_proj``/``k_proj``/``v_proj``/``out_proj``
  as modules (tested equal to the stock forward). The other families already call their
  projection modules.
- **Padding never leaks in.** Audio beyond each clip's length is zeroed; GroupNorm front ends
  (WavLM Base+, HuBERT Base, wav2vec 2.0 Base) normalise over each clip's valid samples only
  (``ValidGroupNorm``; the stock GroupNorm also averages over the batch padding); data2vec's
  stacked position convolutions re-zero padding between layers; every layer gets a padding mask.
- **ZeRO-3.** Every parameter is read through a call of the module that owns it (so DeepSpeed
  gathers it), except the SpecAugment embedding: ``mask_time_prob > 0`` is refused under ZeRO-3.
- **Frozen front end.** With ``freeze_feature_encoder`` (default) the CNN front end (Whisper: conv1
  and conv2) has ``requires_grad=False`` and runs under ``torch.no_grad()``, so no graph is kept
  for it. Whenever any of its parameters requires grad (e.g. full finetuning), it runs with grad.
- **Feature normalisation** (filterbank families): ``feature_norm="utterance"`` is the family's
  stock scaling (Whisper: clamp at max − 8, then (x + 4) / 4; w2v-BERT: per-utterance mean/var per
  bin); ``"global"`` standardises each bin with mean/std fitted on training audio by
  ``fit_feature_stats`` and kept in the persistent buffers ``feature_mean``, ``feature_std`` and
  ``feature_frames`` (part of ``state_dict``, so checkpoints and exports must carry them). Global
  statistics keep the absolute loudness that per-utterance normalisation throws away.

Hook points for adaptors: ``attn_module(i)`` and ``ffn_module(i)`` return the modules whose output
is the attention / feed-forward block output before its residual add; ``layers[i]`` returns a
tensor (a tuple ``(hidden, position_bias)`` for WavLM), and the layer outputs collected in
``hidden_states`` are the hooked outputs, so a hook that rewrites a layer's output changes both the
next layer's input and the collected state.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    Data2VecAudioConfig,
    Data2VecAudioModel,
    HubertConfig,
    HubertModel,
    PretrainedConfig,
    Wav2Vec2BertConfig,
    Wav2Vec2BertModel,
    Wav2Vec2Config,
    Wav2Vec2Model,
    WavLMConfig,
    WavLMModel,
    WhisperConfig,
)
from transformers.audio_utils import mel_filter_bank
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices
from transformers.models.wavlm.modeling_wavlm import WavLMAttention
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from dser.config import knob

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000


class BackboneError(ValueError):
    """A backbone name, directory or input the user must fix; the message says what to do."""


@dataclass
class BackboneConfig:
    """Which speech encoder to load and how it runs."""

    name: str = knob(
        "tiny-wavlm",
        "hub id (microsoft/wavlm-base-plus), local directory, tiny preset (tiny-wavlm …) or "
        "random:<architecture> (random:wavlm-large) for random weights",
    )
    freeze_feature_encoder: bool = knob(True, "freeze the CNN front end (Whisper: conv1/conv2)")
    gradient_checkpointing: bool = knob(False, "recompute each transformer layer in backward to save memory")
    layerdrop: float = knob(0.0, "probability of skipping a transformer layer in training (LayerDrop)")
    mask_time_prob: float = knob(0.0, "SpecAugment time-masking probability in training (0 = off)")
    feature_norm: Literal["utterance", "global"] = knob(
        "utterance",
        "filterbank families only: 'utterance' = the family's stock per-utterance scaling, 'global' = "
        "per-bin mean/std fitted on training audio (fit_feature_stats), keeps absolute loudness",
    )
    attn_implementation: Literal["eager", "sdpa"] = knob(
        "eager", "attention kernel: 'eager' (plain matmuls) or 'sdpa' (torch scaled_dot_product_attention)"
    )
    seed: int = knob(0, "seed for the random weights of tiny presets and random: architectures")

    def __post_init__(self):
        if self.feature_norm not in ("utterance", "global"):
            raise ValueError(f"feature_norm must be 'utterance' or 'global', got {self.feature_norm!r}")
        if self.attn_implementation not in ("eager", "sdpa"):
            raise ValueError(f"attn_implementation must be 'eager' or 'sdpa', got {self.attn_implementation!r}")
        for key in ("layerdrop", "mask_time_prob"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)!r}")


@dataclass
class BackboneOutput:
    """What ``Backbone.forward`` returns.

    Attributes:
        hidden_states: ``num_layers + 1`` tensors ``(B, F, H)``: the front-end output, then each
            transformer layer's output (see the module docstring for the exact tensors).
        frame_mask: ``(B, F)`` bool, True on valid (non-padding) frames.
    """

    hidden_states: tuple[torch.Tensor, ...]
    frame_mask: torch.Tensor


# --------------------------------------------------------------------------------------------
# Architectures: tiny presets (tests, demo) and real ones (parameter counts, benchmark)
# --------------------------------------------------------------------------------------------

# The waveform presets keep the real 7-layer CNN's kernels and strides (320× downsampling, 50
# frames/s, so frame lengths map exactly as for the real models) with narrow channels for speed.
_CNN = dict(conv_dim=(32,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2))
_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=32)


def _tiny_wavlm() -> WavLMConfig:
    return WavLMConfig(
        **_TINY, **_CNN, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        num_buckets=32, max_bucket_distance=64, feat_extract_norm="group", do_stable_layer_norm=False,
    )


def _tiny_hubert() -> HubertConfig:
    return HubertConfig(
        **_TINY, **_CNN, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        feat_extract_norm="group", do_stable_layer_norm=False,
    )


def _tiny_wav2vec2() -> Wav2Vec2Config:
    # Layer-norm CNN + pre-LN ("stable layer norm") encoder, like wav2vec 2.0 Large.
    return Wav2Vec2Config(
        **_TINY, **_CNN, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer", do_stable_layer_norm=True,
    )


def _tiny_data2vec() -> Data2VecAudioConfig:
    return Data2VecAudioConfig(
        **_TINY, **_CNN, num_conv_pos_embeddings=2, conv_pos_kernel_size=5, num_conv_pos_embedding_groups=4,
    )


def _tiny_whisper() -> WhisperConfig:
    # d_model 96 / 4 heads: the demo's CPU backbone (log-mel at 100 fps → 50 frames/s).
    return WhisperConfig(
        d_model=96, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=192,
        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=192, vocab_size=64,
        num_mel_bins=80, max_source_positions=1500, max_target_positions=32,
        pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2,
    )


def _tiny_w2v_bert() -> Wav2Vec2BertConfig:
    return Wav2Vec2BertConfig(
        **_TINY, feature_projection_input_dim=160, position_embeddings_type="relative_key",
        left_max_position_embeddings=16, right_max_position_embeddings=4, conv_depthwise_kernel_size=5,
        add_adapter=False, use_intermediate_ffn_before_adapter=False,
    )


TINY_PRESETS: dict[str, Callable[[], PretrainedConfig]] = {
    "tiny-wavlm": _tiny_wavlm,
    "tiny-hubert": _tiny_hubert,
    "tiny-wav2vec2": _tiny_wav2vec2,
    "tiny-data2vec": _tiny_data2vec,
    "tiny-whisper": _tiny_whisper,
    "tiny-w2v-bert": _tiny_w2v_bert,
}

# The published configs of the real checkpoints, written out so parameter counts and benchmarks
# need no download (microsoft/wavlm-base-plus, microsoft/wavlm-large, facebook/hubert-large-ll60k).
_REAL_CNN = dict(conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2))


def _wavlm_base_plus() -> WavLMConfig:
    return WavLMConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, **_REAL_CNN,
        conv_bias=False, feat_extract_norm="group", do_stable_layer_norm=False, num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16, num_buckets=320, max_bucket_distance=800, layer_norm_eps=1e-5,
    )


def _wavlm_large() -> WavLMConfig:
    return WavLMConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, **_REAL_CNN,
        conv_bias=False, feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16, num_buckets=320, max_bucket_distance=800, layer_norm_eps=1e-5,
    )


def _hubert_large() -> HubertConfig:
    return HubertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, **_REAL_CNN,
        conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True, feat_proj_layer_norm=True,
        num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, layer_norm_eps=1e-5,
    )


REAL_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "wavlm-base-plus": _wavlm_base_plus,
    "wavlm-large": _wavlm_large,
    "hubert-large": _hubert_large,
}

# transformers model_type → (dser family, model class)
_FAMILIES: dict[str, tuple[str, type]] = {
    "wavlm": ("wavlm", WavLMModel),
    "hubert": ("hubert", HubertModel),
    "wav2vec2": ("wav2vec2", Wav2Vec2Model),
    "data2vec-audio": ("data2vec-audio", Data2VecAudioModel),
    "whisper": ("whisper", WhisperEncoder),
    "wav2vec2-bert": ("w2v-bert", Wav2Vec2BertModel),
}
WAVEFORM_FAMILIES = ("wavlm", "hubert", "wav2vec2", "data2vec-audio")
FILTERBANK_FAMILIES = ("whisper", "w2v-bert")

# Whisper log-mel (WhisperFeatureExtractor) and SeamlessM4T Kaldi fbank constants.
_WHISPER_N_FFT, _WHISPER_HOP = 400, 160
_FBANK_FRAME, _FBANK_HOP, _FBANK_FFT, _FBANK_STACK = 400, 160, 512, 2
_FBANK_PREEMPHASIS, _FBANK_FLOOR = 0.97, 1.192092955078125e-07


# --------------------------------------------------------------------------------------------
# WavLM attention that LoRA can see
# --------------------------------------------------------------------------------------------


class WavLMModuleAttention(WavLMAttention):
    """``WavLMAttention`` whose projections are module calls, so LoRA wrappers on them take effect.

    The stock 5.23 code passes ``q_proj.weight`` … to ``F.multi_head_attention_forward``, which
    bypasses any module wrapping them. Only that inner step is replaced; the gated relative
    position bias (``forward``) is the stock code. Installed by swapping ``__class__`` on every
    ``WavLMAttention`` instance (``install_module_attention``), so weights and names are unchanged.
    """

    def torch_multi_head_self_attention(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        gated_position_bias: torch.Tensor,
    ) -> tuple[torch.Tensor, None]:
        batch, length, _ = hidden_states.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, L, E) → (B, h, L, d)
            return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        query = heads(self.q_proj(hidden_states))
        key = heads(self.k_proj(hidden_states))
        value = heads(self.v_proj(hidden_states))
        # The stock bias is (B*h, L, L), batch-major, added to the scaled scores unscaled.
        bias = gated_position_bias.view(batch, self.num_heads, length, length).to(query.dtype)
        if attention_mask is not None:  # (B, L), 1 on valid frames, as the stock key_padding_mask
            padding = attention_mask.ne(1)[:, None, None, :]  # (B, 1, 1, L)
            bias = bias.masked_fill(padding, float("-inf"))
        attn = F.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0, scale=self.scaling
        )  # (B, h, L, d)
        attn = attn.transpose(1, 2).reshape(batch, length, self.embed_dim)
        return self.out_proj(attn), None


def install_module_attention(model: nn.Module) -> int:
    """Switch every stock ``WavLMAttention`` in ``model`` to ``WavLMModuleAttention``.

    Returns:
        How many attention modules were switched.
    """
    switched = 0
    for module in model.modules():
        if type(module) is WavLMAttention:
            module.__class__ = WavLMModuleAttention
            switched += 1
    return switched


# --------------------------------------------------------------------------------------------
# The backbone module
# --------------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """A ``transformers`` speech encoder that returns every hidden state and a frame mask.

    Attributes:
        family: "wavlm" | "hubert" | "wav2vec2" | "data2vec-audio" | "whisper" | "w2v-bert".
        hidden_size: width H of every hidden state.
        num_layers: transformer layers; ``hidden_states`` has ``num_layers + 1`` entries.
        model: the transformers model (WavLMModel, WhisperEncoder, Wav2Vec2BertModel …), the
            object peft wraps (``PeftModel.from_pretrained(backbone.model, dir)``). If it is
            replaced by a ``PeftModel``, the backbone runs its base model.
        lora_targets: default LoRA target module names for the family.
        cfg: the ``BackboneConfig`` it was loaded with.
    """

    def __init__(self, model: nn.Module, family: str, cfg: BackboneConfig):
        super().__init__()
        self.model = model
        self.family = family
        self.cfg = cfg
        config = model.config
        self.hidden_size = config.d_model if family == "whisper" else config.hidden_size
        self.num_layers = len(self.layers)
        self.lora_targets = (
            ["linear_q", "linear_k", "linear_v", "linear_out"]
            if family == "w2v-bert"
            else ["q_proj", "k_proj", "v_proj", "out_proj"]
        )
        if family == "wavlm":
            install_module_attention(model)
        if family in WAVEFORM_FAMILIES:
            _install_valid_group_norm(model.feature_extractor)
        if family == "whisper":
            # Filters and window are derived from constants: not saved (persistent=False).
            mel = mel_filter_bank(
                num_frequency_bins=1 + _WHISPER_N_FFT // 2, num_mel_filters=config.num_mel_bins,
                min_frequency=0.0, max_frequency=8000.0, sampling_rate=SAMPLE_RATE,
                norm="slaney", mel_scale="slaney",
            )
            self.register_buffer("mel_filters", torch.tensor(mel, dtype=torch.float32), persistent=False)
            self.register_buffer("window", torch.hann_window(_WHISPER_N_FFT), persistent=False)
        elif family == "w2v-bert":
            mel = mel_filter_bank(
                num_frequency_bins=_FBANK_FFT // 2 + 1, num_mel_filters=80, min_frequency=20,
                max_frequency=SAMPLE_RATE // 2, sampling_rate=SAMPLE_RATE, norm=None,
                mel_scale="kaldi", triangularize_in_mel_space=True,
            )
            self.register_buffer("mel_filters", torch.tensor(mel, dtype=torch.float32), persistent=False)
            # Kaldi's "povey" window: a symmetric Hann raised to 0.85.
            self.register_buffer("window", torch.hann_window(_FBANK_FRAME, periodic=False) ** 0.85, persistent=False)
        if family in FILTERBANK_FAMILIES and cfg.feature_norm == "global":
            bins = self.mel_filters.shape[1]
            self.register_buffer("feature_mean", torch.zeros(bins))
            self.register_buffer("feature_std", torch.ones(bins))
            # An integer count: module.half() / bf16 casts leave it exact.
            self.register_buffer("feature_frames", torch.zeros((), dtype=torch.long))
        if cfg.freeze_feature_encoder:
            for p in self.front_end_parameters():
                p.requires_grad_(False)
            if family in WAVEFORM_FAMILIES:
                model.feature_extractor._freeze_parameters()  # HF's own flag, should anyone call model.forward
        if cfg.gradient_checkpointing:
            # Non-reentrant: gradients reach LoRA/adaptor weights even though the (frozen) layer
            # inputs do not require grad.
            self.hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    # ---- structure ----------------------------------------------------------------------

    @property
    def hf_model(self) -> nn.Module:
        """The bare transformers model (unwrapping a ``PeftModel`` put in ``self.model``)."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer layers in order (not registered twice: a view into ``model``)."""
        model = self.hf_model
        return model.layers if self.family == "whisper" else model.encoder.layers

    def attn_module(self, i: int) -> nn.Module:
        """Layer ``i``'s attention; its output[0] is the attention block output before the residual add."""
        layer = self.layers[i]
        return layer.attention if self.family in WAVEFORM_FAMILIES else layer.self_attn

    def ffn_module(self, i: int) -> nn.Module:
        """Layer ``i``'s feed-forward hook point: output (B, F, H) before the residual add.

        Whisper has no feed-forward submodule, so this is ``fc2`` (its output then gets dropout and
        the residual). For w2v-BERT's conformer it is the second (macaron) FFN, whose output is
        then halved and added to the residual.
        """
        layer = self.layers[i]
        if self.family == "whisper":
            return layer.fc2
        if self.family == "w2v-bert":
            return layer.ffn2
        return layer.feed_forward

    def front_end_parameters(self) -> list[nn.Parameter]:
        """Parameters of the CNN front end (Whisper: conv1, conv2; w2v-BERT has none)."""
        model = self.hf_model
        if self.family in WAVEFORM_FAMILIES:
            return list(model.feature_extractor.parameters())
        if self.family == "whisper":
            return [*model.conv1.parameters(), *model.conv2.parameters()]
        return []

    def _front_end_context(self):
        """``no_grad`` for a frozen front end, so no autograd graph is kept for it."""
        if any(p.requires_grad for p in self.front_end_parameters()):
            return contextlib.nullcontext()
        return torch.no_grad()

    def _dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    # ---- lengths --------------------------------------------------------------------------

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Map clip lengths in samples to valid output frames.

        Args:
            lengths: (B,) long, samples per clip.

        Returns:
            (B,) long, frames per clip (at least 1, so no clip has an empty mask).
        """
        lengths = lengths.long()
        if self.family in WAVEFORM_FAMILIES:
            config = self.hf_model.config
            for kernel, stride in zip(config.conv_kernel, config.conv_stride):
                lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        elif self.family == "whisper":
            mel = lengths // _WHISPER_HOP  # frames whose window centre lies inside the clip
            lengths = (mel + 1) // 2  # conv2: kernel 3, stride 2, padding 1
        else:
            frames = torch.where(lengths >= _FBANK_FRAME, (lengths - _FBANK_FRAME) // _FBANK_HOP + 1, 0)
            lengths = frames // _FBANK_STACK
        return lengths.clamp(min=1)

    # ---- forward --------------------------------------------------------------------------

    def forward(self, audio: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BackboneOutput:
        """Run the encoder.

        Args:
            audio: (B, T) float, 16 kHz waveforms, padded at the end.
            attention_mask: (B, T) bool, True on real samples; None means no padding.

        Returns:
            ``BackboneOutput`` with ``num_layers + 1`` hidden states (B, F, H) and the (B, F) frame mask.
        """
        if audio.dim() != 2:
            raise BackboneError(f"backbone input must be (batch, samples) audio, got shape {tuple(audio.shape)}")
        batch, samples = audio.shape
        if attention_mask is None:
            lengths = torch.full((batch,), samples, dtype=torch.long, device=audio.device)
        else:
            attention_mask = attention_mask.bool()
            lengths = attention_mask.sum(-1)
            audio = audio.masked_fill(~attention_mask, 0.0)  # padding content must never matter
        if self.family in WAVEFORM_FAMILIES:
            return self._forward_waveform(audio, lengths)
        if self.family == "whisper":
            return self._forward_whisper(audio, lengths)
        return self._forward_w2v_bert(audio, lengths)

    def _frame_mask(self, lengths: torch.Tensor, frames: int) -> torch.Tensor:
        valid = self.frame_lengths(lengths)  # (B,)
        return torch.arange(frames, device=lengths.device)[None, :] < valid[:, None]  # (B, F)

    def _skip_layer(self, i: int) -> bool:
        # LayerDrop; under ZeRO-3 every rank must run every layer (parameters are gathered per layer).
        if not (self.training and self.cfg.layerdrop > 0.0) or is_deepspeed_zero3_enabled():
            return False
        if self.family == "wavlm" and i == 0:
            return False  # WavLM's first layer computes the relative position bias the others reuse
        return bool(torch.rand([]) < self.cfg.layerdrop)

    def _run_layers(self, hidden: torch.Tensor, **layer_kwargs) -> list[torch.Tensor]:
        states = [hidden]  # each (B, F, H)
        position_bias = None
        for i, layer in enumerate(self.layers):
            if not self._skip_layer(i):
                if self.family == "wavlm":
                    output = layer(hidden, position_bias=position_bias, index=i, **layer_kwargs)
                    hidden, position_bias = output[0], output[1]
                else:
                    output = layer(hidden, **layer_kwargs)
                    hidden = output[0] if isinstance(output, tuple) else output
            states.append(hidden)
        return states

    def _mask_time(self, hidden: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """SpecAugment time masking (training only), via the model's own masked embedding."""
        if not (self.training and self.cfg.mask_time_prob > 0.0):
            return hidden
        model = self.hf_model
        if model.masked_spec_embed.numel() == 0:
            # ZeRO-3 gathers a module's own parameters only when that module is called, and the
            # masked embedding belongs to the model whose forward dser does not call.
            raise BackboneError(
                "SpecAugment time masking cannot run under ZeRO-3 (masked_spec_embed is partitioned); "
                "set model.backbone.mask_time_prob to 0 or use ZeRO stage 0-2"
            )
        if "attention_mask" in inspect.signature(model._mask_hidden_states).parameters:
            return model._mask_hidden_states(hidden, attention_mask=frame_mask)
        return model._mask_hidden_states(hidden)  # HuBERT's variant takes no mask

    def _forward_waveform(self, audio: torch.Tensor, lengths: torch.Tensor) -> BackboneOutput:
        model = self.hf_model
        with self._front_end_context():
            features = _conv_features(model.feature_extractor, audio.to(self._dtype()), lengths)  # (B, C, F)
        features = features.transpose(1, 2)  # (B, F, C)
        frame_mask = self._frame_mask(lengths, features.shape[1])  # (B, F)
        projected = model.feature_projection(features)
        hidden = projected[0] if isinstance(projected, tuple) else projected  # (B, F, H)
        hidden = self._mask_time(hidden, frame_mask)

        encoder = model.encoder
        stable = getattr(model.config, "do_stable_layer_norm", False)
        hidden = hidden.masked_fill(~frame_mask[..., None], 0.0)
        hidden = hidden + _position_embedding(encoder.pos_conv_embed, hidden, frame_mask)
        if not stable:
            hidden = encoder.layer_norm(hidden)
        hidden = encoder.dropout(hidden)
        if self.family == "wavlm":
            layer_mask = frame_mask  # WavLM attention takes the (B, F) mask
        else:
            layer_mask = create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=frame_mask)
        states = self._run_layers(hidden, attention_mask=layer_mask)
        if stable:
            states[-1] = encoder.layer_norm(states[-1])
        return BackboneOutput(hidden_states=tuple(states), frame_mask=frame_mask)

    def _forward_whisper(self, audio: torch.Tensor, lengths: torch.Tensor) -> BackboneOutput:
        encoder = self.hf_model
        mel, mel_mask = self._filterbank(audio, lengths)  # (B, Fm, 80), (B, Fm)
        mel = self._mask_filterbank_time(mel, mel_mask)
        padding = ~mel_mask[:, None, :]  # (B, 1, Fm)
        with self._front_end_context():
            # Frames past the clip are zeroed before each conv, exactly what the convs' own zero
            # padding gives an unpadded clip, so batch padding cannot reach the valid frames.
            x = mel.transpose(1, 2).to(self._dtype()).masked_fill(padding, 0.0)  # (B, 80, Fm)
            x = F.gelu(encoder.conv1(x)).masked_fill(padding, 0.0)
            x = F.gelu(encoder.conv2(x))  # (B, H, F)
        x = x.transpose(1, 2)  # (B, F, H)
        frames = x.shape[1]
        max_frames = encoder.embed_positions.num_embeddings
        if frames > max_frames:
            seconds = max_frames * 2 * _WHISPER_HOP / SAMPLE_RATE
            raise BackboneError(
                f"Whisper's encoder covers at most {seconds:.0f} s but the batch holds "
                f"{audio.shape[1] / SAMPLE_RATE:.1f} s clips; crop clips (data max_seconds) to {seconds:.0f} s or less"
            )
        # Trimmed positional embeddings: the first F rows (a module call, so ZeRO-3 gathers them).
        hidden = x + encoder.embed_positions(torch.arange(frames, device=x.device))
        hidden = F.dropout(hidden, p=encoder.dropout, training=self.training)
        frame_mask = self._frame_mask(lengths, frames)  # (B, F)
        layer_mask = create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=frame_mask)
        states = self._run_layers(hidden, attention_mask=layer_mask)
        states[-1] = encoder.layer_norm(states[-1])
        return BackboneOutput(hidden_states=tuple(states), frame_mask=frame_mask)

    def _forward_w2v_bert(self, audio: torch.Tensor, lengths: torch.Tensor) -> BackboneOutput:
        model = self.hf_model
        fbank, fbank_mask = self._filterbank(audio, lengths)  # (B, Fb, 80), (B, Fb)
        fbank = self._mask_filterbank_time(fbank, fbank_mask)
        batch, frames, bins = fbank.shape
        if frames % _FBANK_STACK:  # pad to a whole number of stacks, as the HF extractor does
            fbank = F.pad(fbank, (0, 0, 0, _FBANK_STACK - frames % _FBANK_STACK))
        stacked = fbank.reshape(batch, -1, bins * _FBANK_STACK)  # (B, F, 160)
        frame_mask = self._frame_mask(lengths, stacked.shape[1])  # (B, F)
        hidden, _ = model.feature_projection(stacked.to(self._dtype()))  # (B, F, H)
        hidden = self._mask_time(hidden, frame_mask)

        encoder = model.encoder
        hidden = hidden.masked_fill(~frame_mask[..., None], 0.0)
        layer_mask = create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=frame_mask)
        hidden = encoder.dropout(hidden)
        positions = encoder.embed_positions(hidden) if encoder.embed_positions is not None else None
        states = self._run_layers(
            hidden, attention_mask=layer_mask, relative_position_embeddings=positions, conv_attention_mask=frame_mask
        )
        return BackboneOutput(hidden_states=tuple(states), frame_mask=frame_mask)

    # ---- filterbank features ----------------------------------------------------------------

    def _raw_filterbank(self, audio: torch.Tensor) -> torch.Tensor:
        """Log-mel / log-fbank before any normalisation, (B, Fm, 80) float32."""
        if self.family == "whisper":
            return _whisper_log_mel(audio, self.mel_filters.float(), self.window.float())
        return _kaldi_log_fbank(audio, self.mel_filters.float(), self.window.float())

    def _filterbank_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        if self.family == "whisper":
            return (lengths // _WHISPER_HOP).clamp(min=1)
        return torch.where(lengths >= _FBANK_FRAME, (lengths - _FBANK_FRAME) // _FBANK_HOP + 1, 1).clamp(min=1)

    def _filterbank(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised filterbank features and their valid-frame mask: (B, Fm, 80), (B, Fm)."""
        minimum = _WHISPER_N_FFT // 2 + 1 if self.family == "whisper" else _FBANK_FRAME
        if audio.shape[1] < minimum:
            raise BackboneError(
                f"{self.family} needs clips of at least {minimum} samples; the batch holds {audio.shape[1]}"
            )
        feats = self._raw_filterbank(audio)  # (B, Fm, 80)
        valid = torch.arange(feats.shape[1], device=feats.device)[None, :] < self._filterbank_lengths(lengths)[:, None]
        if self.cfg.feature_norm == "global":
            if int(self.feature_frames) == 0:
                raise BackboneError(
                    "feature_norm is 'global' but the feature statistics were never fitted; call "
                    "Backbone.fit_feature_stats on training audio (or load a checkpoint that has them)"
                )
            feats = (feats - self.feature_mean.float()) / self.feature_std.float()
        elif self.family == "whisper":
            feats = (feats + 4.0) / 4.0  # Whisper's fixed scaling (the max − 8 clamp is in the log-mel)
        else:
            # SeamlessM4T: per-utterance, per-bin mean and unbiased variance over valid frames.
            weight = valid[..., None].float()  # (B, Fm, 1)
            count = weight.sum(1, keepdim=True)  # (B, 1, 1)
            mean = (feats * weight).sum(1, keepdim=True) / count
            var = ((feats - mean) ** 2 * weight).sum(1, keepdim=True) / (count - 1).clamp(min=1)
            feats = (feats - mean) / torch.sqrt(var + 1e-7)
        if self.family == "w2v-bert":
            feats = feats.masked_fill(~valid[..., None], 0.0)  # the HF extractor pads with zeros
        return feats, valid

    def filterbank(
        self, audio: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised filterbank features the encoder sees (filterbank families only).

        Args:
            audio: (B, T) float, 16 kHz.
            attention_mask: (B, T) bool, True on real samples; None means no padding.

        Returns:
            ``(features (B, Fm, 80), valid (B, Fm) bool)`` at 100 frames/s, before w2v-BERT's
            stacking of frame pairs.
        """
        if self.family not in FILTERBANK_FAMILIES:
            raise BackboneError(f"{self.family} takes the waveform; only whisper and w2v-bert have filterbank features")
        if attention_mask is None:
            attention_mask = torch.ones_like(audio, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        return self._filterbank(audio.masked_fill(~attention_mask, 0.0), attention_mask.sum(-1))

    def _mask_filterbank_time(self, feats: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """SpecAugment time masking on filterbank frames (training only), as WhisperModel does."""
        if not (self.training and self.cfg.mask_time_prob > 0.0):
            return feats
        config = self.hf_model.config
        indices = _compute_mask_indices(
            tuple(feats.shape[:2]), mask_prob=self.cfg.mask_time_prob, mask_length=config.mask_time_length,
            attention_mask=valid.long(), min_masks=config.mask_time_min_masks,
        )
        indices = torch.as_tensor(indices, device=feats.device, dtype=torch.bool)  # (B, Fm)
        return feats.masked_fill(indices[..., None], 0.0)

    @torch.no_grad()
    def fit_feature_stats(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fit the per-bin mean/std that ``feature_norm="global"`` standardises with.

        Args:
            batches: ``(audio (B, T) float, attention_mask (B, T) bool)`` pairs of training audio;
                only valid frames count.

        Raises:
            BackboneError: the backbone is not a filterbank family with ``feature_norm="global"``,
                or the batches held no audio.
        """
        if self.family not in FILTERBANK_FAMILIES or self.cfg.feature_norm != "global":
            raise BackboneError(
                f"fit_feature_stats needs a filterbank backbone (whisper, w2v-bert) with feature_norm "
                f"'global'; this one is {self.family} with feature_norm {self.cfg.feature_norm!r}"
            )
        device = self.mel_filters.device
        total = torch.zeros(self.feature_mean.shape, dtype=torch.float64, device=device)
        squares = torch.zeros_like(total)
        count = 0
        for audio, attention_mask in batches:
            audio, attention_mask = audio.to(device), attention_mask.to(device).bool()
            audio = audio.masked_fill(~attention_mask, 0.0)
            feats = self._raw_filterbank(audio)  # (B, Fm, 80)
            lengths = self._filterbank_lengths(attention_mask.sum(-1))
            valid = torch.arange(feats.shape[1], device=device)[None, :] < lengths[:, None]
            frames = feats[valid].double()  # (N, 80)
            total += frames.sum(0)
            squares += (frames**2).sum(0)
            count += frames.shape[0]
        if count == 0:
            raise BackboneError(
                "fit_feature_stats got no audio; pass (audio, attention_mask) batches of training clips"
            )
        mean = total / count
        std = (squares / count - mean**2).clamp(min=1e-8).sqrt()
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)
        self.feature_frames.fill_(count)
        log.info("fitted global feature statistics on %d frames", count)


class ValidGroupNorm(nn.GroupNorm):
    """GroupNorm with one group per channel whose statistics come from each clip's valid frames.

    The stock first CNN layer of WavLM Base+ / HuBERT Base / wav2vec 2.0 Base normalises each
    channel over the whole padded row, so a clip's features would depend on how much padding its
    batch has. Given ``valid_frames`` (B,), mean and variance are taken over the clip's own frames;
    for an unpadded clip (or ``valid_frames=None``) this is exactly the stock GroupNorm. Installed by
    swapping ``__class__``, so parameter names are unchanged; called as a module, so ZeRO-3 gathers
    its weights.
    """

    def forward(self, x: torch.Tensor, valid_frames: torch.Tensor | None = None) -> torch.Tensor:
        if valid_frames is None:
            return super().forward(x)
        # x: (B, C, L)
        weight = (torch.arange(x.shape[-1], device=x.device)[None, :] < valid_frames[:, None]).to(x.dtype)[:, None]
        count = weight.sum(-1, keepdim=True)  # (B, 1, 1)
        mean = (x * weight).sum(-1, keepdim=True) / count
        var = ((x - mean) ** 2 * weight).sum(-1, keepdim=True) / count
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None] + self.bias[:, None]


def _install_valid_group_norm(feature_extractor: nn.Module) -> None:
    norm = getattr(feature_extractor.conv_layers[0], "layer_norm", None)
    if type(norm) is nn.GroupNorm and norm.num_groups == norm.num_channels and norm.affine:
        norm.__class__ = ValidGroupNorm


def _conv_features(feature_extractor: nn.Module, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Run a wav2vec2-style CNN on (B, T) audio → (B, C, F); a ``ValidGroupNorm`` sees valid frames only."""
    x = audio[:, None]  # (B, 1, T)
    for conv_layer in feature_extractor.conv_layers:
        norm = getattr(conv_layer, "layer_norm", None)
        if isinstance(norm, ValidGroupNorm):
            h = conv_layer.conv(x)  # (B, C, L)
            kernel, stride = conv_layer.conv.kernel_size[0], conv_layer.conv.stride[0]
            valid = (torch.div(lengths - kernel, stride, rounding_mode="floor") + 1).clamp(min=1)  # (B,)
            x = conv_layer.activation(norm(h, valid))
        else:
            x = conv_layer(x)
    return x


def _position_embedding(pos_conv_embed: nn.Module, hidden: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """The convolutional position embedding of (B, F, H) ``hidden``, blind to padding.

    data2vec-audio stacks several conv layers; the stock code lets the first layer's output at
    padded frames reach valid frames through the next layer, so padding is re-zeroed in between.
    """
    if not hasattr(pos_conv_embed, "layers"):  # one conv over zeroed padding: nothing leaks
        return pos_conv_embed(hidden)
    padding = ~frame_mask[:, None, :]  # (B, 1, F)
    x = hidden.transpose(1, 2)  # (B, H, F)
    for layer in pos_conv_embed.layers:
        x = layer(x.masked_fill(padding, 0.0))
    return x.transpose(1, 2)


def _whisper_log_mel(audio: torch.Tensor, mel_filters: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """WhisperFeatureExtractor's log-mel in torch: (B, T) → (B, T // 160, 80), before (x + 4) / 4.

    The extractor pads every clip with zeros to 30 s and then reflect-pads the ends for its centred
    STFT; reflect padding at the start and zeros after the clip reproduce its valid frames.
    """
    x = audio.float()
    half = _WHISPER_N_FFT // 2
    x = torch.cat([x[:, 1 : half + 1].flip(-1), x, x.new_zeros(x.shape[0], half)], dim=-1)  # (B, T + 400)
    spec = torch.stft(x, _WHISPER_N_FFT, _WHISPER_HOP, window=window, center=False, return_complex=True)
    power = spec[..., :-1].abs() ** 2  # (B, 201, T // 160)
    mel = torch.matmul(mel_filters.T, power)  # (B, 80, Fm)
    log_mel = mel.clamp(min=1e-10).log10()
    log_mel = torch.maximum(log_mel, log_mel.amax(dim=(1, 2), keepdim=True) - 8.0)
    return log_mel.transpose(1, 2)  # (B, Fm, 80)


def _kaldi_log_fbank(audio: torch.Tensor, mel_filters: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """SeamlessM4TFeatureExtractor's Kaldi-style log fbank in torch: (B, T) → (B, Fb, 80)."""
    x = audio.float() * 32768.0  # Kaldi works on 16-bit integer scale
    frames = x.unfold(-1, _FBANK_FRAME, _FBANK_HOP)  # (B, Fb, 400), snip edges
    frames = frames - frames.mean(-1, keepdim=True)  # remove DC offset per frame
    frames = torch.cat(
        [frames[..., :1] * (1 - _FBANK_PREEMPHASIS), frames[..., 1:] - _FBANK_PREEMPHASIS * frames[..., :-1]], dim=-1
    )
    power = torch.fft.rfft(frames * window, n=_FBANK_FFT).abs() ** 2  # (B, Fb, 257)
    mel = torch.matmul(power, mel_filters)  # (B, Fb, 80)
    return mel.clamp(min=_FBANK_FLOOR).log()


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _family(config: PretrainedConfig, name: str) -> tuple[str, type]:
    if config.model_type not in _FAMILIES:
        raise BackboneError(
            f"backbone {name!r} is a {config.model_type!r} model; dser supports "
            f"{', '.join(_FAMILIES)} (transformers model types)"
        )
    return _FAMILIES[config.model_type]


def _apply_overrides(config: PretrainedConfig, family: str, cfg: BackboneConfig) -> str:
    """Put the run's layerdrop / masking into the HF config; returns the attention kernel to use."""
    if family == "whisper":
        config.encoder_layerdrop = cfg.layerdrop
    else:
        config.layerdrop = cfg.layerdrop
    config.mask_time_prob = cfg.mask_time_prob
    # WavLM's own attention path is replaced (WavLMModuleAttention uses SDPA either way).
    return "eager" if family == "wavlm" else cfg.attn_implementation


def backbone_from_config(config: PretrainedConfig, cfg: BackboneConfig | None = None) -> Backbone:
    """Build a backbone with random weights (fixed seed ``cfg.seed``) from a transformers config.

    Args:
        config: e.g. ``TINY_PRESETS["tiny-wavlm"]()`` or ``REAL_CONFIGS["wavlm-large"]()``.
        cfg: run options; defaults to ``BackboneConfig()``.

    Returns:
        The ``Backbone``; the global RNG state is left untouched.
    """
    cfg = cfg or BackboneConfig()
    family, model_class = _family(config, type(config).__name__)
    config._attn_implementation = _apply_overrides(config, family, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = model_class(config)
    return Backbone(model, family, cfg)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def _pretrained_config(name: str):
    """``(source, transformers config)`` of a hub id or local directory; reads only the config.

    Raises:
        BackboneError: a missing directory, one without config.json, or a hub id that is not
            in the local cache (offline) or does not exist.
    """
    source = name
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise BackboneError(
                f"backbone directory {name!r} does not exist; set model.backbone.name to a model directory"
            )
        if not (path / "config.json").is_file():
            raise BackboneError(
                f"backbone directory {name!r} has no config.json; point model.backbone.name at a directory "
                "written by save_pretrained (or use tiny_backbone_dir)"
            )
        source = str(path)
    try:
        return source, AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BackboneError(
            f"backbone {name!r} is neither a tiny preset ({', '.join(TINY_PRESETS)}), a local directory, "
            f"nor a model in the local Hugging Face cache; download it first on a machine with network "
            f"(huggingface-cli download {name}) or set model.backbone.name to a model directory ({reason})"
        ) from e


def check_backbone(cfg: BackboneConfig | str) -> None:
    """Fail early, without loading weights, when ``load_backbone(cfg)`` could not find the model.

    Raises:
        BackboneError: as :func:`load_backbone` would, naming the backbone and what to do.
    """
    name = cfg if isinstance(cfg, str) else cfg.name
    if name in TINY_PRESETS:
        return
    if name.startswith("random:"):
        if name.removeprefix("random:") not in REAL_CONFIGS:
            raise BackboneError(f"unknown architecture {name.removeprefix('random:')!r} in {name!r}; "
                                f"known: {', '.join(REAL_CONFIGS)}")
        return
    _, config = _pretrained_config(name)
    _family(config, name)


def _load_pretrained(cfg: BackboneConfig) -> Backbone:
    name = cfg.name
    source, config = _pretrained_config(name)
    family, model_class = _family(config, name)
    attn = _apply_overrides(config, family, cfg)
    kwargs = {}
    if family == "whisper":
        # Full Whisper checkpoints store the encoder under "model.encoder." (or "encoder."); the
        # decoder weights are left unloaded.
        kwargs["key_mapping"] = {r"^(model\.)?encoder\.": ""}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the unused-weights report (Whisper's decoder …)
    try:
        model, info = model_class.from_pretrained(
            source, config=config, attn_implementation=attn, output_loading_info=True, **kwargs
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = sorted(k for k in info["missing_keys"] if "masked_spec_embed" not in k)
    if missing:
        raise BackboneError(
            f"backbone {name!r}: the checkpoint lacks {len(missing)} weights of {model_class.__name__} "
            f"(e.g. {', '.join(missing[:3])}); is it a {family} encoder checkpoint?"
        )
    return Backbone(model, family, cfg)


def load_backbone(cfg: BackboneConfig | str) -> Backbone:
    """Load a backbone by hub id, local directory, tiny preset or ``random:<architecture>``.

    Args:
        cfg: a ``BackboneConfig`` or just its ``name``.

    Returns:
        The ``Backbone`` in train mode (as ``nn.Module`` starts); dropout is whatever the
        checkpoint's config says.

    Raises:
        BackboneError: unknown name (never touches the network when ``HF_HUB_OFFLINE=1``),
            a directory without a model, or an unsupported model type.
    """
    if isinstance(cfg, str):
        cfg = BackboneConfig(name=cfg)
    name = cfg.name
    if name in TINY_PRESETS:
        return backbone_from_config(TINY_PRESETS[name](), cfg)
    if name.startswith("random:"):
        check_backbone(name)
        return backbone_from_config(REAL_CONFIGS[name.removeprefix("random:")](), cfg)
    return _load_pretrained(cfg)


def tiny_backbone_dir(name: str, path: str | Path) -> Path:
    """Save a tiny preset with ``save_pretrained`` so it loads through the local-directory path.

    Args:
        name: a ``TINY_PRESETS`` key.
        path: directory to write (created).

    Returns:
        ``path`` as a ``Path``.
    """
    if name not in TINY_PRESETS:
        raise BackboneError(f"unknown tiny preset {name!r}; known: {', '.join(TINY_PRESETS)}")
    path = Path(path)
    load_backbone(name).hf_model.save_pretrained(path)
    return path
