"""What every backbone family shares: the run options, the output, and the ``Backbone`` base class.

A family is a ``Backbone`` subclass in its own module (``waveform.py``, ``whisper.py``,
``w2v_bert.py``) listed in ``registry.FAMILIES``. The base class owns the parts that do not depend
on the front end:

- **The call.** ``forward(audio, attention_mask)`` checks the input, zeroes the padding (its
  content must never matter) and hands ``(audio (B, T), lengths (B,))`` to the family's
  ``_encode``, which returns the ``BackboneOutput``.
- **The layer loop.** ``_run_layers`` runs the transformer layers one by one and collects each
  output, applying LayerDrop in training (``_skip_layer``); a family changes how one layer is
  called (``_call_layer``: WavLM threads its position bias through).
- **ZeRO-3.** Every parameter is read through a call of the module that owns it (so DeepSpeed
  gathers it), except the SpecAugment embedding: ``mask_time_prob > 0`` is refused under ZeRO-3
  (``_mask_time``). LayerDrop is off under ZeRO-3: every rank must run every layer.
- **Frozen front end.** With ``freeze_feature_encoder`` (default) the family's
  ``front_end_parameters()`` get ``requires_grad=False`` and the front end runs under
  ``torch.no_grad()`` (``_front_end_context``), so no graph is kept for it. Whenever any of its
  parameters requires grad (e.g. full finetuning), it runs with grad.

Hook points for adaptors: ``attn_module(i)`` and ``ffn_module(i)`` return the modules whose output
is the attention / feed-forward block output before its residual add (named per family by
``attn_name`` / ``ffn_name``); ``layers[i]`` returns a tensor (a tuple ``(hidden, position_bias)``
for WavLM), and the layer outputs collected in ``hidden_states`` are the hooked outputs, so a hook
that rewrites a layer's output changes both the next layer's input and the collected state.

What a family declares (class attributes) and implements:

    family                 dser's name ("wavlm", "whisper" …), shown in logs and errors
    model_class            the transformers class built from the config (WavLMModel, WhisperEncoder …)
    default_lora_targets   attention projection names LoRA adapts by default
    default_ia3_targets    key / value projections and feed-forward output layers IA³ rescales by default,
    default_ia3_feedforward  and which of them are feed-forward (their input is rescaled)
    attn_name, ffn_name    the hook-point submodules of a layer
    hidden_size_key        the config field with the width H ("hidden_size"; Whisper "d_model")
    layerdrop_key          the config field LayerDrop goes to ("layerdrop"; Whisper "encoder_layerdrop")
    checkpoint_key_mapping ``from_pretrained``'s key_mapping (Whisper: its encoder in a full checkpoint)
    _encode, frame_lengths, front_end_parameters (and _prepare, to patch modules or add buffers)
"""

from __future__ import annotations

import abc
import contextlib
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.masking_utils import create_bidirectional_mask

from dser.model.config import BackboneConfig  # defined without torch, for config checks; re-exported

SAMPLE_RATE = 16000


class BackboneError(ValueError):
    """A backbone name, directory or input the user must fix; the message says what to do."""


@dataclass
class BackboneOutput:
    """What ``Backbone.forward`` returns.

    Attributes:
        hidden_states: ``num_layers + 1`` tensors ``(B, F, H)``: the front-end output, then each
            transformer layer's output (see the family's module docstring for the exact tensors).
        frame_mask: ``(B, F)`` bool, True on valid (non-padding) frames.
    """

    hidden_states: tuple[torch.Tensor, ...]
    frame_mask: torch.Tensor


class Backbone(nn.Module, abc.ABC):
    """A ``transformers`` speech encoder that returns every hidden state and a frame mask.

    Built by ``dser.model.backbones.load_backbone`` as the registered subclass of the model's type.

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

    family: ClassVar[str]
    model_class: ClassVar[type[nn.Module]]
    default_lora_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")
    default_ia3_targets: ClassVar[tuple[str, ...]] = ("k_proj", "v_proj", "output_dense")
    default_ia3_feedforward: ClassVar[tuple[str, ...]] = ("output_dense",)
    attn_name: ClassVar[str] = "self_attn"
    ffn_name: ClassVar[str]
    hidden_size_key: ClassVar[str] = "hidden_size"
    layerdrop_key: ClassVar[str] = "layerdrop"
    checkpoint_key_mapping: ClassVar[dict[str, str] | None] = None

    def __init__(self, model: nn.Module, cfg: BackboneConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.hidden_size = getattr(model.config, self.hidden_size_key)
        self.num_layers = len(self.layers)
        self.lora_targets = list(self.default_lora_targets)
        self._prepare()
        if cfg.freeze_feature_encoder:
            self._freeze_front_end()
        if cfg.gradient_checkpointing:
            # Non-reentrant: gradients reach LoRA/adaptor weights even though the (frozen) layer
            # inputs do not require grad.
            self.hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    @classmethod
    def configure(cls, config: PretrainedConfig, cfg: BackboneConfig) -> str:
        """Put the run's layerdrop / masking into the HF config; returns the attention kernel to use."""
        setattr(config, cls.layerdrop_key, cfg.layerdrop)
        config.mask_time_prob = cfg.mask_time_prob
        return cfg.attn_implementation

    def _prepare(self) -> None:
        """Patch the family's modules or register its buffers; runs before freezing."""

    def _freeze_front_end(self) -> None:
        for p in self.front_end_parameters():
            p.requires_grad_(False)

    # ---- structure ----------------------------------------------------------------------

    @property
    def hf_model(self) -> nn.Module:
        """The bare transformers model (unwrapping a ``PeftModel`` put in ``self.model``)."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer layers in order (not registered twice: a view into ``model``)."""
        return self.hf_model.encoder.layers

    def attn_module(self, i: int) -> nn.Module:
        """Layer ``i``'s attention; its output[0] is the attention block output before the residual add."""
        return getattr(self.layers[i], self.attn_name)

    def ffn_module(self, i: int) -> nn.Module:
        """Layer ``i``'s feed-forward hook point: output (B, F, H) before the residual add."""
        return getattr(self.layers[i], self.ffn_name)

    @abc.abstractmethod
    def front_end_parameters(self) -> list[nn.Parameter]:
        """Parameters of the front end before the transformer (the ones ``freeze_feature_encoder`` freezes)."""

    def _front_end_context(self):
        """``no_grad`` for a frozen front end, so no autograd graph is kept for it."""
        if any(p.requires_grad for p in self.front_end_parameters()):
            return contextlib.nullcontext()
        return torch.no_grad()

    def _dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    # ---- lengths --------------------------------------------------------------------------

    @abc.abstractmethod
    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Map clip lengths in samples to valid output frames.

        Args:
            lengths: (B,) long, samples per clip.

        Returns:
            (B,) long, frames per clip (at least 1, so no clip has an empty mask).
        """

    def _frame_mask(self, lengths: torch.Tensor, frames: int) -> torch.Tensor:
        valid = self.frame_lengths(lengths)  # (B,)
        return torch.arange(frames, device=lengths.device)[None, :] < valid[:, None]  # (B, F)

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
        return self._encode(audio, lengths)

    @abc.abstractmethod
    def _encode(self, audio: torch.Tensor, lengths: torch.Tensor) -> BackboneOutput:
        """The family's forward on (B, T) audio with zeroed padding and (B,) lengths in samples."""

    def _layer_mask(self, hidden: torch.Tensor, frame_mask: torch.Tensor):
        """The padding mask the layers take, from the (B, F) frame mask."""
        return create_bidirectional_mask(config=self.hf_model.config, inputs_embeds=hidden, attention_mask=frame_mask)

    def _skip_layer(self, i: int) -> bool:
        # LayerDrop; under ZeRO-3 every rank must run every layer (parameters are gathered per layer).
        if not (self.training and self.cfg.layerdrop > 0.0) or is_deepspeed_zero3_enabled():
            return False
        return bool(torch.rand([]) < self.cfg.layerdrop)

    def _call_layer(self, i: int, layer: nn.Module, hidden: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
        """Run layer ``i`` on (B, F, H) ``hidden``; returns its (B, F, H) output."""
        output = layer(hidden, **layer_kwargs)
        return output[0] if isinstance(output, tuple) else output

    def _run_layers(self, hidden: torch.Tensor, **layer_kwargs) -> list[torch.Tensor]:
        states = [hidden]  # each (B, F, H)
        for i, layer in enumerate(self.layers):
            if not self._skip_layer(i):
                hidden = self._call_layer(i, layer, hidden, layer_kwargs)
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

    # ---- filterbank features (filterbank families override these) ----------------------

    def filterbank(
        self, audio: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised filterbank features the encoder sees; only filterbank families have them.

        Raises:
            BackboneError: always, for a family that takes the waveform.
        """
        raise BackboneError(f"{self.family} takes the waveform; only whisper and w2v-bert have filterbank features")

    def fit_feature_stats(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fit the statistics of ``feature_norm="global"``; only filterbank families have them.

        Raises:
            BackboneError: always, for a family that takes the waveform.
        """
        raise self._no_feature_stats()

    def _no_feature_stats(self) -> BackboneError:
        return BackboneError(
            f"fit_feature_stats needs a filterbank backbone (whisper, w2v-bert) with feature_norm "
            f"'global'; this one is {self.family} with feature_norm {self.cfg.feature_norm!r}"
        )
