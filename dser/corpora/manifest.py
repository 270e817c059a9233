"""Manifest reader: any corpus described by a CSV or JSONL file, one row per clip.

This is how ``dser synth`` output is ingested (``dser shard manifest demo/acted/manifest.jsonl``)
and how a corpus without its own reader can be sharded. ROOT is the manifest file itself::

    data/manifest.jsonl
        {"path": "wav/spk00_0000.wav", "emotion": "angry", "valence": 0.2, "speaker": "spk00",
         "group": "train", "style": "acted", "session": 3}
    data/manifest.csv
        path,utt_id,emotion,valence,arousal,dominance,speaker,gender,group,style
        wav/a.wav,a,happy,0.8,0.7,,s1,F,train,natural

Columns (all optional except ``path``; an empty string or a JSON null counts as missing):

- ``path``: the audio file, relative to the manifest's directory or absolute.
- ``utt_id``: defaults to the path's stem.
- ``emotion``: a canonical emotion (``dser.labels.EMOTIONS``, any case); ``emotion_raw``
  defaults to the value as written.
- ``valence``, ``arousal``, ``dominance``: in [0, 1], or on the scale given by
  ``attribute_scale=LOW,HIGH`` (then rescaled to [0, 1]).
- ``speaker``; ``gender`` (``F``/``M``/``female``/``male``, any case).
- ``group``: the shard group (letters, digits, ``_ . -``), else ``all``.
- ``style``: ``acted`` or ``natural``.
- ``corpus``: the sample's corpus name, else ``manifest`` (useful for a merged manifest).

Any other column is kept in the sample JSON (``Record.extra``), except ``duration``, which
the sharder measures itself. A row that breaks these rules is skipped with its line number.

Usage::

    listing = read(Path("demo/acted/manifest.jsonl"))
    listing = read(Path("my.csv"), attribute_scale="1,5")

Options:
    attribute_scale: LOW,HIGH scale of the attribute columns (default: already in [0, 1]).
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from dser.corpora import CorpusError, Listing, Record, Skip, require_file
from dser.corpora.options import Option, parse_options, parse_scale
from dser.labels import ATTRIBUTES, EMOTIONS, STYLES, rescale_attribute

NAME = "manifest"

OPTIONS: dict[str, Option] = {
    "attribute_scale": Option(parse_scale, (0.0, 1.0),
                              "LOW,HIGH scale of valence/arousal/dominance, rescaled to [0, 1]"),
}

KNOWN = ("path", "utt_id", "emotion", "emotion_raw", *ATTRIBUTES, "speaker", "gender", "group",
         "style", "corpus")

# Measured from the audio by the sharder; a stale manifest value must not shadow it.
IGNORED = ("duration",)

GENDERS = {"f": "F", "female": "F", "m": "M", "male": "M"}

# Groups name shard folders and files, so they must be safe path components.
_GROUP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _BadRow(ValueError):
    """A row that cannot become a record; the message is the skip reason."""


def read(root: Path, **options) -> Listing:
    """Read a CSV (``.csv``) or JSONL (``.jsonl``, ``.ndjson``) manifest.

    Args:
        root: the manifest file.
        **options: ``attribute_scale`` (see the module docstring).

    Returns:
        One record per valid row; other rows are skipped with ``FILE:LINE`` and the reason.

    Raises:
        CorpusError: the file is missing, has another extension, or (CSV) has no ``path`` column.
        ValueError: an unknown option or a bad value.
    """
    opts = parse_options(NAME, options, OPTIONS)
    manifest = require_file(Path(root), "manifest")
    suffix = manifest.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(manifest)
    elif suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(manifest)
    else:
        raise CorpusError(f"manifest: {manifest} should be a .csv or .jsonl file "
                          f"(found {suffix or 'no extension'})")

    listing = Listing([])
    base = manifest.parent
    for lineno, row in rows:
        where = f"{manifest}:{lineno}"
        try:
            if isinstance(row, str):
                raise _BadRow(row)
            listing.records.append(_record(row, base, opts["attribute_scale"]))
        except _BadRow as e:
            listing.skipped.append(Skip(where, f"line {lineno}: {e}"))
    return listing


def _read_text(path: Path) -> str:
    """The manifest's text; a byte that is not UTF-8 is one error naming the file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise CorpusError(f"manifest: {path}: line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x} at "
                          f"column {column}); save the manifest as UTF-8") from None


def _csv_rows(path: Path):
    """Yield (line number, row dict or skip reason) for each CSV data row."""
    with io.StringIO(_read_text(path), newline="") as f:
        reader = csv.DictReader(f)
        fields = [name.strip() for name in (reader.fieldnames or [])]
        if "path" not in fields:
            raise CorpusError(f"manifest: {path} has no 'path' column "
                              f"(header: {','.join(fields) or 'empty'}); "
                              f"the first line must name the columns, e.g. path,emotion,speaker,group")
        reader.fieldnames = fields
        for row in reader:
            if None in row:
                yield reader.line_num, f"row has more fields than the header's {len(fields)}"
                continue
            yield reader.line_num, row


def _jsonl_rows(path: Path):
    """Yield (line number, row dict or skip reason) for each non-blank JSONL line."""
    with io.StringIO(_read_text(path)) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, f"not valid JSON ({e.msg})"
                continue
            if not isinstance(row, dict):
                yield lineno, f"expected a JSON object, got {type(row).__name__}"
                continue
            yield lineno, row


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _text(row: dict, key: str) -> str | None:
    value = row.get(key)
    if _missing(value):
        return None
    if isinstance(value, (dict, list, bool)):
        raise _BadRow(f"{key} must be a string, got {json.dumps(value)}")
    return str(value).strip()


def _record(row: dict, base: Path, scale: tuple[float, float]) -> Record:
    path_text = _text(row, "path")
    if path_text is None:
        raise _BadRow("no path")
    path = Path(path_text)
    path = path if path.is_absolute() else base / path
    raw = row.get("path")
    if not path.is_file() and isinstance(raw, str) and raw != path_text:
        # a file whose name starts or ends in whitespace is still found under its exact name
        exact = Path(raw) if Path(raw).is_absolute() else base / raw
        path = exact if exact.is_file() else path
    if not path.is_file():
        raise _BadRow(f"label row has no audio file at {path}")
    utt_id = _text(row, "utt_id") or path.stem

    emotion_raw = _text(row, "emotion")
    emotion = emotion_raw.lower() if emotion_raw is not None else None
    if emotion is not None and emotion not in EMOTIONS:
        raise _BadRow(f"{utt_id}: emotion {emotion_raw!r} is not canonical; use one of {', '.join(EMOTIONS)}")
    emotion_raw = _text(row, "emotion_raw") or emotion_raw

    attributes = {}
    for name in ATTRIBUTES:
        value = row.get(name)
        if _missing(value):
            attributes[name] = None
            continue
        try:
            if isinstance(value, bool):
                raise ValueError("a boolean is not a number")
            attributes[name] = rescale_attribute(float(value), *scale)
        except (TypeError, ValueError) as e:
            raise _BadRow(f"{utt_id}: bad {name} {value!r}: {e}") from None

    gender_text = _text(row, "gender")
    gender = None
    if gender_text is not None:
        gender = GENDERS.get(gender_text.lower())
        if gender is None:
            raise _BadRow(f"{utt_id}: gender {gender_text!r} is not F, M, female or male")

    style = _text(row, "style")
    if style is not None:
        style = style.lower()
        if style not in STYLES:
            raise _BadRow(f"{utt_id}: style {style!r} is not one of {', '.join(STYLES)}")

    group = _text(row, "group") or "all"
    if not _GROUP.match(group):
        raise _BadRow(f"{utt_id}: group {group!r} cannot name a shard folder; "
                      f"use letters, digits, '_', '.' and '-'")

    extra = {k: None if _missing(v) else v for k, v in row.items() if k not in KNOWN and k not in IGNORED}
    return Record(utt_id=utt_id, path=path, corpus=_text(row, "corpus") or NAME, group=group,
                  speaker=_text(row, "speaker"), gender=gender, emotion=emotion,
                  emotion_raw=emotion_raw, style=style, extra=extra, **attributes)
