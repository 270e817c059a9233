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

One module per front-end family, a small base class for what they share, and the tables::

    base.py        BackboneOutput, BackboneError; Backbone: the call, the layer loop (LayerDrop),
                   SpecAugment on hidden states, frozen front end, hook points, adaptor targets
                   (BackboneConfig is defined without torch in dser.model.config, re-exported)
    waveform.py    wavlm, hubert, wav2vec2, data2vec-audio: CNN on the waveform, 50 frames/s
    filterbank.py  what the filterbank families share: normalisation (per utterance | global,
                   fit_feature_stats), SpecAugment on feature frames, filterbank()
    whisper.py     whisper: 80-bin log-mel, 100 → 50 frames/s, trimmed positions, no 30 s window
    w2v_bert.py    w2v-bert: Kaldi fbank, frame pairs stacked to 160 dims, 50 frames/s
    presets.py     TINY_PRESETS (tests, demo) and REAL_CONFIGS (parameter counts, benchmark)
    registry.py    FAMILIES: transformers model_type → Backbone subclass; how to add a family
    loading.py     load_backbone, check_backbone, backbone_from_config, tiny_backbone_dir

Each family's module docstring says what its ``hidden_states`` hold and how its quirks are
handled. Everything a caller needs is imported from this package.
"""

from dser.model.backbones.base import (
    SAMPLE_RATE,
    Backbone,
    BackboneConfig,
    BackboneError,
    BackboneOutput,
)
from dser.model.backbones.loading import (
    backbone_from_config,
    check_backbone,
    load_backbone,
    tiny_backbone_dir,
)
from dser.model.backbones.presets import REAL_CONFIGS, TINY_PRESETS
from dser.model.backbones.registry import FAMILIES

__all__ = [
    "FAMILIES",
    "REAL_CONFIGS",
    "SAMPLE_RATE",
    "TINY_PRESETS",
    "Backbone",
    "BackboneConfig",
    "BackboneError",
    "BackboneOutput",
    "backbone_from_config",
    "check_backbone",
    "load_backbone",
    "tiny_backbone_dir",
]
