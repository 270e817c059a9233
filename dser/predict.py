"""Inference on audio files: ``dser predict RUN_DIR FILE…``.

Reads any format soundfile reads, at any sample rate (down-mixed to mono and resampled to
16 kHz with soxr), runs the run's exported model and returns per-class probabilities and/or
valence/arousal/dominance per file. Clips longer than ``max_seconds`` are refused instead of
exhausting memory.

Usage::

    predictions = predict_files(Path("runs/demo-stage2-…"), [Path("clip.wav")])
    predictions[0]["probabilities"]["angry"]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

SAMPLE_RATE = 16000


class PredictError(Exception):
    """A file that cannot be predicted (unreadable, empty, too long); names the file."""


def load_audio(path: Path, max_seconds: float) -> np.ndarray:
    """Read ``path`` as 16 kHz mono float32 in [-1, 1].

    Raises:
        PredictError: unreadable, empty, non-finite or longer than ``max_seconds``.
    """
    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError) as e:
        raise PredictError(f"{path}: cannot read audio ({e})") from e
    if info.duration > max_seconds:
        raise PredictError(f"{path}: {info.duration:.1f} s is longer than --max-seconds {max_seconds:g}; "
                           f"cut it or raise the limit")
    audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if audio.size == 0:
        raise PredictError(f"{path}: no audio samples")
    if not np.isfinite(audio).all():
        raise PredictError(f"{path}: audio holds NaN or infinite samples")
    audio = audio.mean(axis=1)  # (T,) mono
    if sr != SAMPLE_RATE:
        audio = soxr.resample(audio, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return np.clip(audio, -1.0, 1.0)


@torch.no_grad()
def predict_files(run_dir: Path, files: list[Path], max_seconds: float = 60.0, device: str = "cpu") -> list[dict]:
    """Predict each file with the exported model of ``run_dir``.

    Returns:
        One dict per file: ``file``, ``duration``, and ``emotion`` + ``probabilities``
        (class → probability) and/or ``valence``, ``arousal``, ``dominance`` in [0, 1].
    """
    from dser.model.checkpoint_io import load_exported

    export = Path(run_dir) / "export"
    if not (export / "config.yaml").is_file():
        raise PredictError(f"{export} holds no exported model: did the run in {run_dir} finish?")
    try:
        model, _run_config, label_set = load_exported(export)
    except ValueError as e:  # CheckpointError, BackboneError, UnsafeCheckpointError: one line naming the file
        raise PredictError(str(e)) from None
    model.to(device).eval()
    results = []
    for f in files:
        audio = torch.from_numpy(load_audio(Path(f), max_seconds))[None]  # (1, T)
        mask = torch.ones_like(audio, dtype=torch.bool)
        out = model(audio.to(device), mask.to(device))
        r: dict = {"file": str(f), "duration": audio.shape[1] / SAMPLE_RATE}
        if out.get("logits") is not None:
            probs = torch.softmax(out["logits"].float(), -1)[0].cpu().numpy()
            r["emotion"] = label_set.classes[int(probs.argmax())]
            r["probabilities"] = {c: float(p) for c, p in zip(label_set.classes, probs)}
        if out.get("attributes") is not None:
            v, a, d = out["attributes"][0].float().cpu().tolist()
            r.update(valence=v, arousal=a, dominance=d)
        results.append(r)
    return results
