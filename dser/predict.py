"""Inference on audio files: ``dser predict RUN_DIR FILE…``.

Reads any format soundfile reads, at any sample rate (down-mixed to mono and resampled to
16 kHz with soxr), runs the run's exported model and returns per-class probabilities and/or
valence/arousal/dominance per file. Clips longer than ``max_seconds`` (from the header, before
decoding) are refused instead of exhausting memory. A file that cannot be predicted is one line
naming it; ``dser predict`` goes on with the others and exits 1 when any failed.

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

from dser.rundir import RunDir, RunDirError

SAMPLE_RATE = 16000

# Shorter clips are refused: every backbone's front end needs 25 ms for one frame (the
# wav2vec 2.0 family's convolutions span 400 samples, the filterbanks a 400-sample window), and
# a few frames say nothing about emotion; training skipped clips under 0.25 s by default.
MIN_SECONDS = 0.1

# libsndfile's frame count for a stream whose header gives no length (SF_COUNT_MAX).
_UNKNOWN_FRAMES = 1 << 62


class PredictError(ValueError):
    """A file that cannot be predicted (unreadable, empty, too long), or a run directory with no
    usable export; names the file."""


def load_audio(path: Path, max_seconds: float) -> np.ndarray:
    """Read ``path`` as 16 kHz mono float32 in [-1, 1].

    The length is checked from the header before anything is decoded.

    Raises:
        PredictError: missing, a directory, unreadable, empty, truncated, non-finite, shorter
            than ``MIN_SECONDS`` or longer than ``max_seconds``.
    """
    if path.is_dir():
        raise PredictError(f"{path}: is a directory, not an audio file")
    if not path.exists():
        raise PredictError(f"{path}: no such file")
    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError) as e:
        raise PredictError(f"{path}: cannot read audio ({getattr(e, 'error_string', None) or e})") from e
    if info.frames <= 0:
        raise PredictError(f"{path}: no audio samples (its header says {info.frames})")
    if info.frames >= _UNKNOWN_FRAMES:  # e.g. a FLAC whose header says 0 samples, i.e. "not known"
        raise PredictError(f"{path}: its header gives no length (0 samples), which the decoder cannot read; "
                           f"re-encode it, e.g. ffmpeg -i IN OUT.flac")
    if info.duration > max_seconds:
        raise PredictError(f"{path}: {info.duration:.1f} s is longer than --max-seconds {max_seconds:g}; "
                           f"cut it or raise the limit")
    if info.duration < MIN_SECONDS:
        raise PredictError(f"{path}: {info.duration * 1000:.0f} ms is too short (dser predict needs at least "
                           f"{MIN_SECONDS:g} s)")
    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as e:  # a FLAC/OGG cut short fails in the decoder
        raise PredictError(f"{path}: cannot decode audio ({getattr(e, 'error_string', None) or e})") from e
    if audio.size == 0:
        raise PredictError(f"{path}: no audio samples")
    if not np.isfinite(audio).all():
        raise PredictError(f"{path}: audio holds NaN or infinite samples")
    audio = audio.mean(axis=1)  # (T,) mono
    if sr != SAMPLE_RATE:
        audio = soxr.resample(audio, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return np.clip(audio, -1.0, 1.0)


def load_model(run_dir: Path, device: str = "cpu"):
    """The exported model of ``run_dir`` (in eval mode, on ``device``), its run config and label set.

    Raises:
        PredictError: no export there, or an export that cannot be loaded (one line naming it).
    """
    from dser.model.checkpoint_io import load_exported

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PredictError(f"{run_dir}: no such run directory" if not run_dir.exists() else
                           f"{run_dir}: is a file; give a run directory (runs/<name>) holding export/")
    run = RunDir(run_dir)
    if run.config_file.is_file() and not run.finished():  # a run dser started that did not finish
        try:
            run.require_finished("run")
        except RunDirError as e:
            raise PredictError(str(e)) from None
    export = run.export
    if not (export / "config.yaml").is_file():
        what = "a shard directory" if (run_dir / "index.json").is_file() else "no exported model"
        raise PredictError(f"{run_dir} is {what}, not a finished run: give a run directory holding "
                           f"export/config.yaml (written when a run finishes)")
    try:
        model, run_config, label_set = load_exported(export)
    except ValueError as e:  # CheckpointError, BackboneError, UnsafeCheckpointError: one line naming the file
        raise PredictError(str(e)) from None
    return model.to(device).eval(), run_config, label_set


@torch.no_grad()
def predict_one(model, label_set, path: Path, max_seconds: float = 60.0, device: str = "cpu") -> dict:
    """One file's prediction: ``file``, ``duration``, and ``emotion`` + ``probabilities``
    (class → probability) and/or ``valence``, ``arousal``, ``dominance``.

    Raises:
        PredictError: the file cannot be read or predicted (naming it).
    """
    audio = torch.from_numpy(load_audio(Path(path), max_seconds))[None]  # (1, T)
    mask = torch.ones_like(audio, dtype=torch.bool)
    try:
        out = model(audio.to(device), mask.to(device))
    except RuntimeError as e:  # never a traceback for one odd file
        raise PredictError(f"{path}: the model failed on this clip ({' '.join(str(e).split())[:200]})") from e
    r: dict = {"file": str(path), "duration": audio.shape[1] / SAMPLE_RATE}
    if out.get("logits") is not None:
        probs = torch.softmax(out["logits"].float(), -1)[0].cpu().numpy()
        r["emotion"] = label_set.classes[int(probs.argmax())]
        r["probabilities"] = {c: float(p) for c, p in zip(label_set.classes, probs)}
    if out.get("attributes") is not None:
        v, a, d = out["attributes"][0].float().cpu().tolist()
        r.update(valence=v, arousal=a, dominance=d)
    return r


def predict_files(run_dir: Path, files: list[Path], max_seconds: float = 60.0, device: str = "cpu",
                  errors: str = "raise") -> list[dict]:
    """Predict each file with the exported model of ``run_dir``.

    Args:
        errors: ``"raise"`` stops at the first file that fails; ``"record"`` gives that file
            ``{"file": …, "error": "<one line naming it>"}`` and goes on with the others.

    Returns:
        One dict per file, as :func:`predict_one` (or with ``error``).

    Raises:
        PredictError: no usable export in ``run_dir``; with ``errors="raise"``, a bad file.
    """
    model, _run_config, label_set = load_model(run_dir, device)
    results = []
    for f in files:
        try:
            results.append(predict_one(model, label_set, Path(f), max_seconds, device))
        except PredictError as e:
            if errors == "raise":
                raise
            results.append({"file": str(f), "error": str(e)})
    return results
