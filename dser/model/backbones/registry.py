"""The backbone registry: a transformers ``model_type`` → the ``Backbone`` subclass that runs it.

``load_backbone`` reads a checkpoint's (or preset's) config, looks its ``model_type`` up here and
builds that class around the family's transformers model; a model type not listed is refused
with the list below. One front-end family per module::

    wavlm            WavLMBackbone          waveform.py   waveform CNN (+ module-calling attention)
    hubert           HubertBackbone         waveform.py   waveform CNN
    wav2vec2         Wav2Vec2Backbone       waveform.py   waveform CNN
    data2vec-audio   Data2VecAudioBackbone  waveform.py   waveform CNN, stacked position convs
    whisper          WhisperBackbone        whisper.py    log-mel (shared code: filterbank.py)
    wav2vec2-bert    W2VBertBackbone        w2v_bert.py   Kaldi fbank (shared code: filterbank.py)

Adding a family:

1. Write ``dser/model/backbones/<family>.py``: a ``Backbone`` subclass (``FilterbankBackbone`` for a
   filterbank front end) that names its ``family`` and transformers ``model_class`` and implements
   ``_encode``, ``frame_lengths`` and ``front_end_parameters`` (the base class docstring lists the
   rest it may set). The module docstring says what its ``hidden_states`` hold.
2. Add its line to ``FAMILIES`` below (and its module to the import).
3. Add a tiny preset to ``presets.TINY_PRESETS``: the registry/presets test fails until the new
   family has one, and every per-preset test (shapes, padding, stock forward, LoRA, save/load)
   then runs on it.
"""

from __future__ import annotations

from dser.model.backbones import w2v_bert, waveform, whisper
from dser.model.backbones.base import Backbone

FAMILIES: dict[str, type[Backbone]] = {
    "wavlm": waveform.WavLMBackbone,
    "hubert": waveform.HubertBackbone,
    "wav2vec2": waveform.Wav2Vec2Backbone,
    "data2vec-audio": waveform.Data2VecAudioBackbone,
    "whisper": whisper.WhisperBackbone,
    "wav2vec2-bert": w2v_bert.W2VBertBackbone,
}
