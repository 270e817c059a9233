"""EmoDB reader (Burkhardt et al., 2005): the Berlin database of emotional speech.

The layout as published (only the audio is read)::

    ROOT/
      wav/03a01Fa.wav       <speaker><text><emotion><version>.wav, 16 kHz mono

The name carries every label: speaker (two digits), text (``a01`` … ``b10``), emotion (German
initial: W Wut/anger, L Langeweile/boredom, E Ekel/disgust, A Angst/fear, F Freude/happiness,
T Trauer/sadness, N neutral) and version (``a``, ``b`` …). Text and version are kept in the
sample JSON. The ten actors are male (03, 10, 11, 12, 15) or female (08, 09, 13, 14, 16); an
unlisted speaker number gets gender None.

Groups are speaker-independent folds ``fold0`` … (``dser.corpora.assign_folds``). Every clip
is ``acted``. Other ``.wav`` names are skipped with a reason.

Usage::

    listing = read(Path("/data/emodb"), n_folds="5")

Options:
    n_folds: number of speaker-independent folds (default 5).
"""

from __future__ import annotations

import re
from pathlib import Path

from dser.corpora import Listing, Record, read_named_wavs, require_dir
from dser.corpora.options import N_FOLDS, Option, parse_options

NAME = "emodb"

OPTIONS: dict[str, Option] = {
    "n_folds": N_FOLDS,
}

CODES = {"W": "angry", "L": "boredom", "E": "disgust", "A": "fear", "F": "happy", "T": "sad", "N": "neutral"}

GENDERS = {"03": "M", "10": "M", "11": "M", "12": "M", "15": "M",
           "08": "F", "09": "F", "13": "F", "14": "F", "16": "F"}

_NAME = re.compile(r"^(\d\d)([ab]\d\d)([A-Za-z])([a-z])$")


def read(root: Path, **options) -> Listing:
    """Read every ``wav/*.wav`` under ``root``; labels come from the file names.

    Args:
        root: the EmoDB directory (holding ``wav/``).
        **options: ``n_folds`` (see the module docstring).

    Returns:
        One record per well-named WAV, grouped into folds; other WAV names are skipped.

    Raises:
        CorpusError: ``wav/`` is missing.
        ValueError: an unknown option or a bad value.
    """
    opts = parse_options(NAME, options, OPTIONS)
    audio = require_dir(Path(root) / "wav", "emodb audio folder")

    return read_named_wavs([audio], _NAME, "<speaker><text><emotion><version>.wav (e.g. 03a01Fa.wav)", _record,
                           opts["n_folds"])


def _record(wav: Path, m: re.Match) -> Record | str:
    """The record of a well-named clip, or why it is skipped."""
    speaker, text, code, version = m.groups()
    if code not in CODES:
        return f"unknown emotion code {code!r} in {wav.name}; expected one of {', '.join(CODES)}"
    return Record(utt_id=wav.stem, path=wav, corpus=NAME, group="", speaker=speaker, gender=GENDERS.get(speaker),
                  emotion=CODES[code], emotion_raw=code, style="acted", extra={"text": text, "version": version})
