"""MSP-Podcast reader (Lotfian & Busso, 2019): natural emotional speech from podcasts.

The layout as published (release 1.9 and later)::

    ROOT/
      Audios/MSP-PODCAST_0001_0008.wav      16 kHz mono
      Labels/labels_consensus.csv

``labels_consensus.csv`` starts with the header
``FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set`` (later releases may add
columns after these; they are ignored) and has one row per clip::

    MSP-PODCAST_0001_0008.wav,N,3.4,4.2,3.8,127,Female,Train

``EmoClass`` is the consensus category: A angry, S sad, H happy, U surprise, F fear,
D disgust, C contempt, N neutral, O other, X no agreement (``emotion=None``, the clip keeps its
attributes). ``EmoAct``/``EmoVal``/``EmoDom`` (arousal, valence, dominance) are on 1-7 and are
rescaled to [0, 1]. ``SpkrID`` may be ``Unknown`` (speaker None); ``Gender`` is
``Female``/``Male`` (anything else gives None). Groups are the release's own ``Split_Set``
values (``Train``, ``Development``, ``Test1``, ``Test2`` …), which are speaker-independent.
Every clip is ``natural``.

Usage::

    listing = read(Path("/data/MSP-Podcast"))

Options: none.
"""

from __future__ import annotations

import csv
from pathlib import Path

from dser.corpora import CorpusError, Listing, Record, Skip, require_dir, require_file
from dser.corpora.options import Option, parse_options
from dser.labels import rescale_attribute

NAME = "msp-podcast"

OPTIONS: dict[str, Option] = {}

HEADER = ("FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set")

CODES: dict[str, str | None] = {
    "A": "angry", "S": "sad", "H": "happy", "U": "surprise", "F": "fear", "D": "disgust",
    "C": "contempt", "N": "neutral", "O": "other", "X": None,
}

GENDERS = {"Female": "F", "Male": "M"}

SCALE = (1.0, 7.0)

# Column → attribute name in the record.
_ATTRIBUTES = (("EmoVal", "valence"), ("EmoAct", "arousal"), ("EmoDom", "dominance"))


def read(root: Path, **options) -> Listing:
    """Read ``Labels/labels_consensus.csv`` and find each clip in ``Audios/``.

    Args:
        root: the MSP-Podcast release directory.
        **options: none are accepted.

    Returns:
        One record per label row; rows with unknown codes, out-of-scale attributes, no split
        or no audio file are skipped with the CSV line.

    Raises:
        CorpusError: ``Audios/`` or the label file is missing, or the header is not the
            expected one.
        ValueError: any option.
    """
    parse_options(NAME, options, OPTIONS)
    root = Path(root)
    labels = require_file(root / "Labels" / "labels_consensus.csv", "msp-podcast consensus labels")
    audios = require_dir(root / "Audios", "msp-podcast audio folder")

    listing = Listing([])
    with open(labels, newline="", encoding="utf-8-sig") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None or tuple(h.strip() for h in header[:len(HEADER)]) != HEADER:
            raise CorpusError(f"msp-podcast: {labels} must start with the header "
                              f"{','.join(HEADER)}; found {','.join(header or []) or 'an empty file'}")
        for row in rows:
            where = f"{labels}:{rows.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < len(HEADER):
                listing.skipped.append(Skip(where, f"row has {len(row)} fields, expected {len(HEADER)}"))
                continue
            record = _record(dict(zip(HEADER, (cell.strip() for cell in row))), audios, where, listing)
            if record is not None:
                listing.records.append(record)
    return listing


def _record(row: dict[str, str], audios: Path, where: str, listing: Listing) -> Record | None:
    name = row["FileName"]
    code = row["EmoClass"]
    if code not in CODES:
        listing.skipped.append(Skip(where, f"{name}: unknown emotion code {code!r}; "
                                           f"expected one of {', '.join(CODES)}"))
        return None
    attributes = {}
    for column, attribute in _ATTRIBUTES:
        try:
            attributes[attribute] = rescale_attribute(float(row[column]), *SCALE) if row[column] else None
        except ValueError as e:
            listing.skipped.append(Skip(where, f"{name}: bad {column} {row[column]!r}: {e}"))
            return None
    if not row["Split_Set"]:
        listing.skipped.append(Skip(where, f"{name}: empty Split_Set, so no group to put it in"))
        return None
    wav = audios / name
    if not name or not wav.is_file():
        listing.skipped.append(Skip(where, f"label row has no audio file at {wav}"))
        return None
    speaker = row["SpkrID"]
    return Record(
        utt_id=Path(name).stem, path=wav, corpus=NAME, group=row["Split_Set"],
        speaker=None if speaker in ("", "Unknown") else speaker,
        gender=GENDERS.get(row["Gender"]),
        emotion=CODES[code], emotion_raw=code, style="natural", **attributes)
