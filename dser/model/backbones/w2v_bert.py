"""w2v-BERT 2.0 as a backbone: SeamlessM4T's 80-bin Kaldi fbank, frame pairs stacked → 160 dims, 50 frames/s.

What ``hidden_states`` holds: ``hidden_states[0]`` is the feature projection, then each conformer
layer's output. The HF model's optional adapter / intermediate FFN after the encoder is not used.

The fbank matches ``SeamlessM4TFeatureExtractor`` on the valid frames: Kaldi framing (25 ms
windows, 10 ms hop, snip edges) on 16-bit scale, DC removal, pre-emphasis, the "povey" window, a
512-point FFT and Kaldi's mel filters; per-utterance mean/variance normalisation over the clip's
own frames; features past the clip are zeros, as the extractor pads them; odd frame counts are
padded to a whole number of pairs before stacking. The fbank front end has no parameters, so
``freeze_feature_encoder`` has nothing to freeze.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Wav2Vec2BertModel
from transformers.audio_utils import mel_filter_bank

from dser.model.backbones.base import SAMPLE_RATE, BackboneOutput
from dser.model.backbones.filterbank import FilterbankBackbone

# SeamlessM4T Kaldi fbank constants.
_FBANK_FRAME, _FBANK_HOP, _FBANK_FFT, _FBANK_STACK = 400, 160, 512, 2
_FBANK_PREEMPHASIS, _FBANK_FLOOR = 0.97, 1.192092955078125e-07


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


class W2VBertBackbone(FilterbankBackbone):
    """w2v-BERT 2.0's conformer encoder on stacked fbank frames."""

    family = "w2v-bert"
    model_class = Wav2Vec2BertModel
    default_lora_targets = ("linear_q", "linear_k", "linear_v", "linear_out")
    default_ia3_targets = ("linear_k", "linear_v", "output_dense")  # output_dense: ffn1's and ffn2's
    # The second (macaron) FFN of the conformer layer; its output is then halved and added to
    # the residual.
    ffn_name = "ffn2"
    min_samples = _FBANK_FRAME  # one Kaldi frame
    zero_padding_frames = True

    def front_end_parameters(self) -> list[nn.Parameter]:
        """None: the fbank front end has no parameters."""
        return []

    def _filter_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        mel = mel_filter_bank(
            num_frequency_bins=_FBANK_FFT // 2 + 1, num_mel_filters=80, min_frequency=20,
            max_frequency=SAMPLE_RATE // 2, sampling_rate=SAMPLE_RATE, norm=None,
            mel_scale="kaldi", triangularize_in_mel_space=True,
        )
        # Kaldi's "povey" window: a symmetric Hann raised to 0.85.
        return torch.tensor(mel, dtype=torch.float32), torch.hann_window(_FBANK_FRAME, periodic=False) ** 0.85

    def _raw_filterbank(self, audio: torch.Tensor) -> torch.Tensor:
        return _kaldi_log_fbank(audio, self.mel_filters.float(), self.window.float())

    def _filterbank_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.where(lengths >= _FBANK_FRAME, (lengths - _FBANK_FRAME) // _FBANK_HOP + 1, 1).clamp(min=1)

    def _utterance_norm(self, feats: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # SeamlessM4T: per-utterance, per-bin mean and unbiased variance over valid frames.
        weight = valid[..., None].float()  # (B, Fm, 1)
        count = weight.sum(1, keepdim=True)  # (B, 1, 1)
        mean = (feats * weight).sum(1, keepdim=True) / count
        var = ((feats - mean) ** 2 * weight).sum(1, keepdim=True) / (count - 1).clamp(min=1)
        return (feats - mean) / torch.sqrt(var + 1e-7)

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        lengths = lengths.long()
        frames = torch.where(lengths >= _FBANK_FRAME, (lengths - _FBANK_FRAME) // _FBANK_HOP + 1, 0)
        return (frames // _FBANK_STACK).clamp(min=1)

    def _encode(self, audio: torch.Tensor, lengths: torch.Tensor) -> BackboneOutput:
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
        layer_mask = self._layer_mask(hidden, frame_mask)
        hidden = encoder.dropout(hidden)
        positions = encoder.embed_positions(hidden) if encoder.embed_positions is not None else None
        states = self._run_layers(
            hidden, attention_mask=layer_mask, relative_position_embeddings=positions, conv_attention_mask=frame_mask
        )
        return BackboneOutput(hidden_states=tuple(states), frame_mask=frame_mask)
