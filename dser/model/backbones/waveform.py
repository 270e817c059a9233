"""The waveform-CNN families: WavLM, HuBERT, wav2vec 2.0 and data2vec-audio.

All four take the 16 kHz waveform through wav2vec 2.0's 7-layer CNN (320× downsampling, 50
frames/s), a feature projection and a convolutional position embedding, then a transformer.
``WaveformBackbone`` runs that path itself (the model's own ``forward`` is not called); the four
classes below it differ only in their transformers class and, for WavLM, in how a layer is called.

What ``hidden_states`` holds: ``hidden_states[0]`` is the input of the first transformer layer
(feature projection + convolutional position embedding, layer-normed for post-LN encoders);
``hidden_states[i]`` is layer ``i``'s output. For "stable layer norm" (pre-LN) encoders such as
WavLM Large and wav2vec 2.0 Large, ``hidden_states[-1]`` is the last layer's output *after* the
encoder's final layer norm (the model's ``last_hidden_state``) and ``hidden_states[0]`` is not normed.

How the families' quirks are handled:

- **Padding never leaks in.** GroupNorm front ends (WavLM Base+, HuBERT Base, wav2vec 2.0 Base)
  normalise over each clip's valid samples only (``ValidGroupNorm``; the stock GroupNorm also
  averages over the batch padding); data2vec's stacked position convolutions re-zero padding
  between layers (``_position_embedding``); every layer gets a padding mask.
- **LoRA on WavLM.** transformers 5.23's ``WavLMAttention`` hands ``q_proj.weight`` … straight to
  ``F.multi_head_attention_forward``, so ``peft``'s LoRA wrappers on those modules would be
  silently bypassed. Every WavLM attention is switched to ``WavLMModuleAttention``, which keeps
  the stock gated relative position bias and calls ``q_proj``/``k_proj``/``v_proj``/``out_proj``
  as modules (tested equal to the stock forward). The other families already call their
  projection modules.
- **WavLM's position bias.** Its first layer computes the relative position bias and the others
  reuse it, so layer 0 is never dropped by LayerDrop and the bias is threaded through the layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    Data2VecAudioModel,
    HubertModel,
    PretrainedConfig,
    Wav2Vec2Model,
    WavLMModel,
)
from transformers.models.wavlm.modeling_wavlm import WavLMAttention

from dser.model.backbones.base import Backbone, BackboneConfig, BackboneOutput


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


class WaveformBackbone(Backbone):
    """A wav2vec 2.0-style encoder: CNN front end on the waveform, projection, position conv, layers."""

    attn_name = "attention"
    ffn_name = "feed_forward"

    def _prepare(self) -> None:
        _install_valid_group_norm(self.model.feature_extractor)

    def _freeze_front_end(self) -> None:
        super()._freeze_front_end()
        self.model.feature_extractor._freeze_parameters()  # HF's own flag, should anyone call model.forward

    def front_end_parameters(self) -> list[nn.Parameter]:
        """Parameters of the CNN front end (``feature_extractor``)."""
        return list(self.hf_model.feature_extractor.parameters())

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        lengths = lengths.long()
        config = self.hf_model.config
        for kernel, stride in zip(config.conv_kernel, config.conv_stride):
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return lengths.clamp(min=1)

    def _encode(self, audio: torch.Tensor, lengths: torch.Tensor) -> BackboneOutput:
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
        states = self._run_layers(hidden, attention_mask=self._layer_mask(hidden, frame_mask))
        if stable:
            states[-1] = encoder.layer_norm(states[-1])
        return BackboneOutput(hidden_states=tuple(states), frame_mask=frame_mask)


# --------------------------------------------------------------------------------------------
# WavLM, with an attention that LoRA can see
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


class WavLMBackbone(WaveformBackbone):
    """WavLM: gated relative position bias, computed by layer 0 and reused by every later layer."""

    family = "wavlm"
    model_class = WavLMModel

    @classmethod
    def configure(cls, config: PretrainedConfig, cfg: BackboneConfig) -> str:
        super().configure(config, cfg)
        return "eager"  # WavLM's own attention path is replaced (WavLMModuleAttention uses SDPA either way)

    def _prepare(self) -> None:
        install_module_attention(self.model)
        super()._prepare()

    def _layer_mask(self, hidden: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        return frame_mask  # WavLM attention takes the (B, F) mask

    def _skip_layer(self, i: int) -> bool:
        if i == 0:
            return False  # WavLM's first layer computes the relative position bias the others reuse
        return super()._skip_layer(i)

    def _call_layer(self, i: int, layer: nn.Module, hidden: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
        # layer_kwargs is this forward's own dict: it carries the bias from layer to layer.
        output = layer(hidden, position_bias=layer_kwargs.pop("position_bias", None), index=i, **layer_kwargs)
        layer_kwargs["position_bias"] = output[1]
        return output[0]


class HubertBackbone(WaveformBackbone):
    family = "hubert"
    model_class = HubertModel


class Wav2Vec2Backbone(WaveformBackbone):
    family = "wav2vec2"
    model_class = Wav2Vec2Model


class Data2VecAudioBackbone(WaveformBackbone):
    """data2vec-audio: several stacked position convolutions (``_position_embedding`` re-zeroes padding)."""

    family = "data2vec-audio"
    model_class = Data2VecAudioModel
