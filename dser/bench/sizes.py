"""What every bench section shares: the sizes of a run (``QUICK``, ``FULL``), the audio
constants and ``BenchError``.

Each section takes a ``BenchSizes`` and reads only its own fields; ``run_bench`` picks
``QUICK`` or ``FULL`` (``dser bench --quick``) and may swap the backbone (``--backbone``).
"""

from __future__ import annotations

from dataclasses import dataclass

SAMPLE_RATE = 16000
CLASSES = ("neutral", "happy", "angry", "sad")
# The paper's adaptor combination, trained by the peft and soak sections.
PEFT_COMBINATION = ["lora", "bottleneck", "weighted_sum", "weight_gating"]


class BenchError(RuntimeError):
    """A benchmark step failed; the message names the step and where its log is."""


@dataclass(frozen=True)
class BenchSizes:
    """How big each measurement is (``QUICK`` and ``FULL``).

    Attributes:
        shard_clips_16k, shard_clips_48k: clips of the generated corpora (IEMOCAP-like lengths).
        loader_passes: epochs over the 16 kHz shards per loader measurement.
        padding_clips: lengths drawn for the padding and balance measurements.
        backbone: the model of the training runs (``random:wavlm-base-plus`` or a tiny preset).
        max_seconds: training crop (``data.max_seconds``) of the training runs.
        max_batch_seconds: padded seconds per batch and rank (``data.max_batch_seconds``); the
            baseline's fixed batch is ``ranks × max_batch_seconds / max_seconds`` clips, the same
            worst-case padded size.
        warmup_steps, measured_steps: optimizer steps of a training run left out / measured.
        rounds: dser / baseline alternations in the pipeline comparison.
        soak_backbone, soak_steps, soak_warmup_steps: the long tiny-model run whose resident
            memory is watched, and the steps left out as warm-up.
    """

    shard_clips_16k: int
    shard_clips_48k: int
    loader_passes: int
    padding_clips: int
    backbone: str
    max_seconds: float
    max_batch_seconds: float
    warmup_steps: int
    measured_steps: int
    rounds: int
    soak_backbone: str = "tiny-whisper"
    soak_steps: int = 2000
    soak_warmup_steps: int = 200


QUICK = BenchSizes(shard_clips_16k=120, shard_clips_48k=40, loader_passes=2, padding_clips=4000,
                   backbone="random:wavlm-base-plus", max_seconds=3.0, max_batch_seconds=6.0,
                   warmup_steps=1, measured_steps=2, rounds=1, soak_steps=200, soak_warmup_steps=50)
FULL = BenchSizes(shard_clips_16k=1200, shard_clips_48k=400, loader_passes=3, padding_clips=20000,
                  backbone="random:wavlm-base-plus", max_seconds=6.0, max_batch_seconds=12.0,
                  warmup_steps=2, measured_steps=8, rounds=2)
