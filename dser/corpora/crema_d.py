"""CREMA-D reader (Cao et al., 2014): 91 actors reading 12 sentences in six emotions.

The layout as published (only the parts read here)::

    ROOT/
      AudioWAV/1001_DFA_ANG_XX.wav        <actor>_<sentence>_<emotion>_<level>.wav, 16 kHz mono
      VideoDemographics.csv               optional: ActorID,Age,Sex,Race,Ethnicity

The name carries every label: the actor id (1001-1091), the sentence (``DFA``, ``IEO`` …), the
intended emotion (ANG DIS FEA HAP NEU SAD) and its level (LO, MD, HI, or XX unspecified).
Sentence and level are kept in the sample JSON. ``VideoDemographics.csv`` (``Sex`` is
``Male``/``Female``) gives each actor's gender; without it, gender is None.

CREMA-D has no official split, so groups are speaker-independent folds ``fold0`` …
(``dser.corpora.assign_folds``): deterministic, balanced by clip count, every actor in one
fold. Every clip is ``acted``. Other ``.wav`` names are skipped with a reason; non-WAV files
(``.DS_Store`` …) are not inputs and are ignored.

Usage::

    listing = read(Path("/data/CREMA-D"), n_folds="5")

Options:
    n_folds: number of speaker-independent folds (default 5).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from dser.corpora import CorpusError, Listing, Record, read_named_wavs, require_dir
from dser.corpora.options import N_FOLDS, Option, parse_options

NAME = "crema-d"

OPTIONS: dict[str, Option] = {
    "n_folds": N_FOLDS,
}

CODES = {"ANG": "angry", "DIS": "disgust", "FEA": "fear", "HAP": "happy", "NEU": "neutral", "SAD": "sad"}

LEVELS = ("LO", "MD", "HI", "XX")

GENDERS = {"Female": "F", "Male": "M"}

_NAME = re.compile(r"^(\d+)_([A-Z]+)_([A-Z]+)_([A-Z]+)$")


def read(root: Path, **options) -> Listing:
    """Read every ``AudioWAV/*.wav`` under ``root``; labels come from the file names.

    Args:
        root: the CREMA-D directory (holding ``AudioWAV/``).
        **options: ``n_folds`` (see the module docstring).

    Returns:
        One record per well-named WAV, grouped into folds; other WAV names are skipped.

    Raises:
        CorpusError: ``AudioWAV/`` is missing, or ``VideoDemographics.csv`` lacks its columns.
        ValueError: an unknown option or a bad value.
    """
    opts = parse_options(NAME, options, OPTIONS)
    root = Path(root)
    audio = require_dir(root / "AudioWAV", "crema-d audio folder")
    gender_of = _read_demographics(root / "VideoDemographics.csv")

    return read_named_wavs([audio], _NAME, "<actor>_<sentence>_<emotion>_<level>.wav (e.g. 1001_DFA_ANG_XX.wav)",
                           lambda wav, m: _record(wav, m, gender_of), opts["n_folds"])


def _record(wav: Path, m: re.Match, gender_of: dict[str, str]) -> Record | str:
    """The record of a well-named clip, or why it is skipped."""
    actor, sentence, code, level = m.groups()
    if code not in CODES:
        return f"unknown emotion code {code!r} in {wav.name}; expected one of {', '.join(CODES)}"
    if level not in LEVELS:
        return f"unknown emotion level {level!r} in {wav.name}; expected one of {', '.join(LEVELS)}"
    return Record(utt_id=wav.stem, path=wav, corpus=NAME, group="", speaker=actor, gender=gender_of.get(actor),
                  emotion=CODES[code], emotion_raw=code, style="acted", extra={"sentence": sentence, "level": level})


def _read_demographics(path: Path) -> dict[str, str]:
    """Actor id → ``F``/``M`` from ``VideoDemographics.csv``; empty when the file is absent."""
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = csv.DictReader(f)
        if not {"ActorID", "Sex"} <= set(rows.fieldnames or ()):
            raise CorpusError(f"crema-d: {path} must have the columns ActorID and Sex "
                              f"(header ActorID,Age,Sex,Race,Ethnicity); found {rows.fieldnames}")
        return {row["ActorID"].strip(): GENDERS[row["Sex"].strip()]
                for row in rows if row["ActorID"] and (row["Sex"] or "").strip() in GENDERS}
