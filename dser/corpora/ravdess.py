"""RAVDESS reader (Livingstone & Russo, 2018): 24 actors speaking and singing two statements.

The layout as published: one folder per actor, either directly under ROOT or under the
folder a download unpacks to (both are found; ``Actor_*`` folders are searched recursively)::

    ROOT/
      Audio_Speech_Actors_01-24/        (or Actor_01 … directly in ROOT)
        Actor_01/03-01-05-01-02-01-01.wav    48 kHz
      Audio_Song_Actors_01-24/
        Actor_01/03-02-03-01-01-01-01.wav

The name ``MM-VV-EE-II-SS-RR-AA.wav`` carries every label: modality (01 audio-video,
02 video-only, 03 audio-only), vocal channel (01 speech, 02 song), emotion (01 neutral,
02 calm, 03 happy, 04 sad, 05 angry, 06 fearful, 07 disgust, 08 surprised), intensity
(01 normal, 02 strong; neutral has only normal), statement (01 "Kids are talking by the
door", 02 "Dogs are sitting by the door"), repetition (01, 02) and actor (odd = male,
even = female). Intensity, statement, repetition and vocal channel are kept in the sample
JSON.

Only audio-only (03) files are inputs: a ``.wav`` of another modality is skipped with a
reason. Song is skipped (with a reason) unless ``include_song=true``. Groups are
speaker-independent folds ``fold0`` … (``dser.corpora.assign_folds``). Every clip is
``acted``.

Usage::

    listing = read(Path("/data/RAVDESS"), include_song="true")

Options:
    include_song: also read sung clips (vocal channel 02); default false.
    n_folds: number of speaker-independent folds (default 5).
"""

from __future__ import annotations

import re
from pathlib import Path

from dser.corpora import CorpusError, Listing, Record, read_named_wavs
from dser.corpora.options import N_FOLDS, Option, parse_bool, parse_options

NAME = "ravdess"

OPTIONS: dict[str, Option] = {
    "include_song": Option(parse_bool, False, "also read sung clips (vocal channel 02)"),
    "n_folds": N_FOLDS,
}

CODES = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry",
         "06": "fear", "07": "disgust", "08": "surprise"}

CHANNELS = {"01": "speech", "02": "song"}

INTENSITIES = {"01": "normal", "02": "strong"}

_NAME = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")


def read(root: Path, **options) -> Listing:
    """Read every ``Actor_*/*.wav`` found under ``root``; labels come from the file names.

    Args:
        root: a directory holding ``Actor_NN`` folders, at any depth.
        **options: ``include_song``, ``n_folds`` (see the module docstring).

    Returns:
        One record per audio-only clip (speech, plus song when asked), grouped into folds.

    Raises:
        CorpusError: no ``Actor_*`` folder under ``root``.
        ValueError: an unknown option or a bad value.
    """
    opts = parse_options(NAME, options, OPTIONS)
    root = Path(root)
    actors = sorted(p for p in root.rglob("Actor_*") if p.is_dir())
    if not actors:
        raise CorpusError(f"ravdess: expected Actor_01 … Actor_24 directories in {root} "
                          f"(directly or in a subfolder such as Audio_Speech_Actors_01-24), found none")

    return read_named_wavs(actors, _NAME, "MM-VV-EE-II-SS-RR-AA.wav (e.g. 03-01-05-01-02-01-01.wav)",
                           lambda wav, m: _record(wav, m, opts["include_song"]), opts["n_folds"])


def _record(wav: Path, m: re.Match, include_song: bool) -> Record | str:
    """The record of a well-named clip, or why it is skipped."""
    modality, channel, code, intensity, statement, repetition, actor = m.groups()
    if modality != "03":
        return f"modality {modality} is not audio-only (03)"
    if channel not in CHANNELS:
        return f"unknown vocal channel {channel!r} in {wav.name}; expected 01 (speech) or 02 (song)"
    if channel == "02" and not include_song:
        return "song (vocal channel 02) is left out; pass --option include_song=true to read it"
    if code not in CODES:
        return f"unknown emotion code {code!r} in {wav.name}; expected one of {', '.join(CODES)}"
    if intensity not in INTENSITIES:
        return f"unknown intensity {intensity!r} in {wav.name}; expected 01 (normal) or 02 (strong)"
    if actor == "00":
        return f"actor 00 in {wav.name} is not an actor number"
    return Record(
        utt_id=wav.stem, path=wav, corpus=NAME, group="", speaker=f"Actor_{actor}",
        gender="M" if int(actor) % 2 else "F", emotion=CODES[code], emotion_raw=code, style="acted",
        extra={"vocal_channel": CHANNELS[channel], "intensity": INTENSITIES[intensity],
               "statement": statement, "repetition": repetition})
