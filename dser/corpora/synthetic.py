"""The embedded demo corpora: synthetic emotional speech, so the whole pipeline runs offline.

``dser synth OUT --style acted|natural`` writes ``OUT/wav/*.wav`` (16-bit PCM, mono) and
``OUT/manifest.jsonl`` (one JSON object per clip) that ``dser shard manifest OUT/manifest.jsonl``
ingests. Two styles stand in for the two kinds of corpora the method is about:

- ``acted`` (think CREMA-D, RAVDESS): exaggerated, well separated emotions, clean studio audio.
- ``natural`` (think MSP-Podcast): weaker cues (on average ~70 % of the acted strength, but
  varying widely from clip to clip and from speaker to speaker, some barely expressive) with
  more spread in every cue, *other* speakers, more pauses, background noise at 5-25 dB SNR,
  channel colouring (some clips telephone-band or low-passed), reverberation and a random
  recording level. Classes overlap, and a model trained on ``acted`` and tested on
  ``natural`` meets a real domain shift.

Each clip's audio comes from ``dser.corpora.synthetic_speech`` (source-filter synthesis, the
emotion profiles and the voices); this module draws the speakers, lays the clips out over them
(emotions balanced, groups speaker-independent), writes the WAVs, the manifest and a marker,
and publishes OUT atomically.

Usage::

    from dser.corpora.synthetic import synthesize
    manifest = synthesize(Path("demo_out/acted"), "acted", utterances=800, speakers=10, seed=0)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import soundfile as sf

from dser.corpora.synthetic_speech import CLASSES, clip_rng, make_voices, render_clip
from dser.labels import STYLES
from dser.schema import fresh_dir


def speaker_groups(speakers: int) -> list[str]:
    """Speaker-independent split: about 70/15/15 % of speakers to train/valid/test, at least one
    each. Valid and test take the last speakers, so (with alternating genders) each holds
    both genders as soon as it has two speakers.

    Args:
        speakers: number of speakers (>= 3).

    Returns:
        The group (``train``, ``valid``, ``test``) of each speaker index.
    """
    n_held = max(1, round(0.15 * speakers))
    n_train = speakers - 2 * n_held
    return ["train"] * n_train + ["valid"] * n_held + ["test"] * n_held


def synthesize(out: Path, style: str, *, utterances: int = 800, speakers: int = 10, seed: int = 0,
               sample_rate: int = 16000, overwrite: bool = False) -> Path:
    """Generate a synthetic emotional-speech corpus: ``OUT/wav/*.wav`` and ``OUT/manifest.jsonl``.

    Each speaker says each of the four emotions equally often (utterance ``i`` has emotion
    ``CLASSES[i % 4]`` and speaker ``(i // 4) % speakers``), and all of a speaker's clips share
    one group, so ``train``/``valid``/``test`` are speaker-independent. The same arguments
    give byte-identical files.

    Args:
        out: output directory; created if missing, or empty. Synth writes a marker
            (``.dser-synth.json``: its options and the sha256 of every file it wrote) and
            publishes atomically (a hidden sibling renamed into place).
        style: ``acted`` or ``natural``.
        utterances: number of clips; at least 4 per speaker.
        speakers: number of speakers; at least 3 (one per group).
        seed: random seed (>= 0).
        sample_rate: output sample rate in Hz, 8000-48000.
        overwrite: replace an earlier synth output (recognised by its marker, and holding
            nothing but the files it lists, unchanged). Without a marker, OUT is replaced only
            when it holds exactly the files this run generates (an older synth's output).

    Returns:
        The path of the manifest. Each row holds ``path`` (relative to the manifest's
        directory), ``utt_id``, ``emotion``, ``valence``, ``arousal``, ``dominance`` (in [0, 1]),
        ``speaker``, ``gender``, ``group`` and ``style``.

    Raises:
        ValueError: a bad argument or an unusable OUT, with what to change.
    """
    _check_arguments(out, style, utterances, speakers, seed, sample_rate)
    out = Path(out).expanduser().absolute()
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    final, out = out, fresh_dir(out.parent / f".{out.name}.synth-partial-{os.getpid()}")
    manifest = out / "manifest.jsonl"
    (out / "wav").mkdir()

    voices = make_voices(style, speakers, seed)
    groups = speaker_groups(speakers)
    said = [0] * speakers
    rows = []
    for i in range(utterances):
        emotion = CLASSES[i % len(CLASSES)]
        s = (i // len(CLASSES)) % speakers
        voice = voices[s]
        rng = clip_rng(style, seed, i)
        audio, attributes = render_clip(rng, voice, emotion, style, sample_rate)
        name = f"spk{s:02d}_{said[s]:04d}"
        said[s] += 1
        sf.write(out / "wav" / f"{name}.wav", audio, sample_rate, subtype="PCM_16")
        rows.append({"path": f"wav/{name}.wav", "utt_id": f"{style}_{name}", "emotion": emotion,
                     **{k: round(v, 4) for k, v in attributes.items()},
                     "speaker": voice.speaker, "gender": voice.gender, "group": groups[s],
                     "style": style})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        files = _tree(out)
        (out / MARKER).write_text(json.dumps({
            "format": MARKER_FORMAT, "style": style, "utterances": utterances, "speakers": speakers, "seed": seed,
            "sample_rate": sample_rate, "files": files}, indent=1) + "\n")
        _publish(out, final, overwrite)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # our own new folder; gone already when published
    return final / "manifest.jsonl"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_arguments(out, style, utterances, speakers, seed, sample_rate) -> None:
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    if not _is_int(speakers) or speakers < 3:
        raise ValueError(f"--speakers must be an integer >= 3 (one each for train, valid and test), "
                         f"got {speakers!r}")
    if not _is_int(utterances) or utterances < len(CLASSES) * speakers:
        raise ValueError(f"--utterances must be an integer >= {len(CLASSES) * speakers} "
                         f"({len(CLASSES)} emotions x {speakers} speakers) so every speaker says "
                         f"every emotion, got {utterances!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed!r}")
    if not _is_int(sample_rate) or not 8000 <= sample_rate <= 48000:
        raise ValueError(f"--sample-rate must be an integer between 8000 and 48000 Hz, got {sample_rate!r}")
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"OUT {out} is a file; give a directory")


MARKER = ".dser-synth.json"
MARKER_FORMAT = "dser-synth/1"


def _tree(out: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under ``out`` (the marker excepted), "directory"
    for each folder; a symbolic link or anything else is recorded as such, so it never matches
    what synth wrote."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(out):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(out))
            if path.is_symlink():
                files[rel] = "symbolic link"
            elif path.is_dir():
                files[rel] = "directory"
            elif path.is_file() and rel != MARKER:
                files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif rel != MARKER:
                files[rel] = "not a file"
    return files


def _first_foreign(have: dict[str, str], ours: dict[str, str]) -> str | None:
    """The first file of ``have`` that synth did not write as it is now (sorted), if any."""
    return next((rel for rel in sorted(have) if ours.get(rel) != have[rel]), None)


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse, before generating, an OUT that holds what synth did not write (per its marker)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {out} is a file; choose a new or empty directory")
    if out.is_symlink():
        raise ValueError(f"OUT {out} is a symbolic link; give the directory itself, or a new one")
    if not out.is_dir() or not any(out.iterdir()):
        return
    marker = out / MARKER
    if not marker.is_file():
        return  # maybe an older synth output: compared with what this run generates, in _publish
    try:
        meta = json.loads(marker.read_text())
        ours = dict(meta["files"]) if meta.get("format") == MARKER_FORMAT else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ours = None
    if ours is None:
        raise ValueError(f"{marker}: not a dser synth marker; refusing to replace {out}: choose a new or empty "
                         f"directory")
    foreign = _first_foreign(_tree(out), ours)
    if foreign is not None:
        raise ValueError(f"OUT {out} holds {out / foreign}, which dser synth did not write (or which changed "
                         f"since); refusing to replace it: move it out, or choose a new or empty directory")
    if not overwrite:
        raise ValueError(f"OUT {out} holds an earlier dser synth output; pass --overwrite to replace it, or "
                         f"choose a new or empty directory")


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``out``: into a new or empty OUT, over an earlier synth
    output (``overwrite``), or over files byte-identical to what was generated (an older
    synth's output without a marker: nothing is lost). Anything else is refused, naming it."""
    _check_out(out, overwrite)
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            have, ours = _tree(out), _tree(tmp)
            foreign = _first_foreign(have, ours)
            if foreign is not None:
                raise ValueError(f"OUT {out} is not empty and holds {out / foreign}, which dser synth did not "
                                 f"write (no {MARKER} there, and it differs from what this run generates); "
                                 f"refusing to replace it: choose a new or empty directory")
        old = fresh_dir(out.parent / f".{out.name}.synth-old-{os.getpid()}")
        os.rename(out, old / out.name)
        os.rename(tmp, out)
        shutil.rmtree(old)  # a folder of our own, holding the old OUT: checked above, only what synth wrote
    else:
        if out.is_dir():
            out.rmdir()
        os.rename(tmp, out)
