"""Whisper's encoder as a backbone: 80-bin log-mel at 100 frames/s, conv stride 2 → 50 frames/s.

What ``hidden_states`` holds: ``hidden_states[0]`` is the conv front end + positional embedding,
then each layer's output; ``hidden_states[-1]`` has the encoder's final layer norm applied.

**Whisper on short clips.** Whisper's encoder is trained on 30 s windows and in transformers 5.23
``WhisperEncoder.forward`` refuses any other length. dser does not call that forward: it runs the
same modules itself (conv1, conv2, positional embedding, layers, final layer norm) and adds only
the first ``F`` rows of ``embed_positions`` (trimmed positional embeddings), so a 3 s clip costs
150 frames, not 1500. Whisper's own encoder has no attention mask (the pretrained model attends
over its 30 s of padding); dser passes a padding mask to every layer (the layers accept one), so
padded frames are never attended to, and pooling masks them out as well. The log-mel matches
``WhisperFeatureExtractor`` on the valid frames (reflect pad at the start, zeros after the clip,
exactly as its 30 s zero padding does). Clips longer than 30 s are refused.

Full Whisper checkpoints (``WhisperForConditionalGeneration``) load too: their encoder weights
are read from ``model.encoder.*`` and the decoder is left unloaded (``checkpoint_key_mapping``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.audio_utils import mel_filter_bank
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from dser.model.backbones.base import SAMPLE_RATE, BackboneError, BackboneOutput
from dser.model.backbones.filterbank import FilterbankBackbone

# WhisperFeatureExtractor's STFT.
_WHISPER_N_FFT, _WHISPER_HOP = 400, 160


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


class WhisperBackbone(FilterbankBackbone):
    """Whisper's encoder run module by module on trimmed positions, with a padding mask."""

    family = "whisper"
    model_class = WhisperEncoder
    # Whisper has no feed-forward submodule, so the FFN hook point is fc2 (its output then gets
    # dropout and the residual).
    ffn_name = "fc2"
    default_ia3_targets = ("k_proj", "v_proj", "fc2")  # fc2: the feed-forward output layer
    default_ia3_feedforward = ("fc2",)
    hidden_size_key = "d_model"
    layerdrop_key = "encoder_layerdrop"
    # Full Whisper checkpoints store the encoder under "model.encoder." (or "encoder."); the
    # decoder weights are left unloaded.
    checkpoint_key_mapping: ClassVar[dict[str, str] | None] = {r"^(model\.)?encoder\.": ""}
    min_samples = _WHISPER_N_FFT // 2 + 1  # the start's reflect padding needs 201 samples

    @property
    def layers(self) -> nn.ModuleList:
        return self.hf_model.layers

    def front_end_parameters(self) -> list[nn.Parameter]:
        """Parameters of the conv front end: conv1, conv2."""
        model = self.hf_model
        return [*model.conv1.parameters(), *model.conv2.parameters()]

    def _filter_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        mel = mel_filter_bank(
            num_frequency_bins=1 + _WHISPER_N_FFT // 2, num_mel_filters=self.model.config.num_mel_bins,
            min_frequency=0.0, max_frequency=8000.0, sampling_rate=SAMPLE_RATE,
            norm="slaney", mel_scale="slaney",
        )
        return torch.tensor(mel, dtype=torch.float32), torch.hann_window(_WHISPER_N_FFT)

    def _raw_filterbank(self, audio: torch.Tensor) -> torch.Tensor:
        return _whisper_log_mel(audio, self.mel_filters.float(), self.window.float())

    def _filterbank_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return (lengths // _WHISPER_HOP).clamp(min=1)

    def _utterance_norm(self, feats: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return (feats + 4.0) / 4.0  # Whisper's fixed scaling (the max − 8 clamp is in the log-mel)

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        mel = lengths.long() // _WHISPER_HOP  # frames whose window centre lies inside the clip
        lengths = (mel + 1) // 2  # conv2: kernel 3, stride 2, padding 1
        return lengths.clamp(min=1)

    def _encode(self, audio: torch.Tensor, lengths: torch.Tensor) -> BackboneOutput:
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
        states = self._run_layers(hidden, attention_mask=self._layer_mask(hidden, frame_mask))
        states[-1] = encoder.layer_norm(states[-1])
        return BackboneOutput(hidden_states=tuple(states), frame_mask=frame_mask)
