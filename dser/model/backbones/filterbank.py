"""What the filterbank families (Whisper, w2v-BERT) share: features computed inside the model.

The data path stays waveform-only: a filterbank backbone takes 16 kHz audio ``(B, T)`` like every
other and computes its log-mel / log-fbank on the device, in float32, from filters and a window
held as non-persistent buffers (``mel_filters``, ``window``: derived from constants, not saved).
``FilterbankBackbone`` owns what comes after the family's raw features:

- **Feature normalisation.** ``feature_norm="utterance"`` is the family's stock scaling
  (``_utterance_norm``; Whisper: clamp at max − 8, then (x + 4) / 4; w2v-BERT: per-utterance
  mean/var per bin); ``"global"`` standardises each bin with mean/std fitted on training audio by
  ``fit_feature_stats`` and kept in the persistent buffers ``feature_mean``, ``feature_std`` and
  ``feature_frames`` (part of ``state_dict``, so checkpoints and exports must carry them). Global
  statistics keep the absolute loudness that per-utterance normalisation throws away.
- **SpecAugment** on feature frames (``_mask_filterbank_time``, training only), as WhisperModel does.
- **The public view** ``filterbank(audio, mask)``: the normalised features the encoder sees.

A family supplies ``_filter_buffers`` (filters, window), ``_raw_filterbank`` (B, T) → (B, Fm, bins),
``_filterbank_lengths`` (valid feature frames), ``_utterance_norm`` and ``min_samples``.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterable
from typing import ClassVar

import torch
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

from dser.model.backbones.base import Backbone, BackboneError

log = logging.getLogger(__name__)


class FilterbankBackbone(Backbone):
    """A backbone whose front end is a filterbank computed from the waveform (Whisper, w2v-BERT)."""

    min_samples: ClassVar[int]  # the shortest batch the filterbank can frame
    zero_padding_frames: ClassVar[bool] = False  # zero the features past each clip (w2v-BERT's extractor does)

    def _prepare(self) -> None:
        mel_filters, window = self._filter_buffers()
        self.register_buffer("mel_filters", mel_filters, persistent=False)
        self.register_buffer("window", window, persistent=False)
        if self.cfg.feature_norm == "global":
            bins = self.mel_filters.shape[1]
            self.register_buffer("feature_mean", torch.zeros(bins))
            self.register_buffer("feature_std", torch.ones(bins))
            # An integer count: module.half() / bf16 casts leave it exact.
            self.register_buffer("feature_frames", torch.zeros((), dtype=torch.long))

    @abc.abstractmethod
    def _filter_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mel_filters (freq_bins, bins) float32, window)`` for ``_raw_filterbank``."""

    @abc.abstractmethod
    def _raw_filterbank(self, audio: torch.Tensor) -> torch.Tensor:
        """Log-mel / log-fbank of zero-padded (B, T) audio before any normalisation, (B, Fm, bins) float32."""

    @abc.abstractmethod
    def _filterbank_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """(B,) valid feature frames (at least 1) of clips ``lengths`` samples long."""

    @abc.abstractmethod
    def _utterance_norm(self, feats: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The family's stock scaling of (B, Fm, bins) features; ``valid`` (B, Fm) marks the clip's frames."""

    def _filterbank(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised filterbank features and their valid-frame mask: (B, Fm, bins), (B, Fm)."""
        if audio.shape[1] < self.min_samples:
            raise BackboneError(
                f"{self.family} needs clips of at least {self.min_samples} samples; the batch holds {audio.shape[1]}"
            )
        feats = self._raw_filterbank(audio)  # (B, Fm, bins)
        valid = torch.arange(feats.shape[1], device=feats.device)[None, :] < self._filterbank_lengths(lengths)[:, None]
        if self.cfg.feature_norm == "global":
            if int(self.feature_frames) == 0:
                raise BackboneError(
                    "feature_norm is 'global' but the feature statistics were never fitted; call "
                    "Backbone.fit_feature_stats on training audio (or load a checkpoint that has them)"
                )
            feats = (feats - self.feature_mean.float()) / self.feature_std.float()
        else:
            feats = self._utterance_norm(feats, valid)
        if self.zero_padding_frames:
            feats = feats.masked_fill(~valid[..., None], 0.0)  # the HF extractor pads with zeros
        return feats, valid

    def filterbank(
        self, audio: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised filterbank features the encoder sees.

        Args:
            audio: (B, T) float, 16 kHz.
            attention_mask: (B, T) bool, True on real samples; None means no padding.

        Returns:
            ``(features (B, Fm, 80), valid (B, Fm) bool)`` at 100 frames/s, before w2v-BERT's
            stacking of frame pairs.
        """
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
            BackboneError: the backbone's ``feature_norm`` is not ``"global"``, or the batches
                held no audio.
        """
        if self.cfg.feature_norm != "global":
            raise self._no_feature_stats()
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
