"""The shard directory's contract, one definition for the writer, the loader and ``dser verify``.

A shard directory (``dser-shards/2``)::

    OUT/index.json                 the summary: format, corpus, sample rate, options, totals,
                                   every skipped input, and per group: its shards (sha256,
                                   bytes, samples, seconds), its per-sample table (sha256,
                                   bytes, rows), speakers, emotion × style counts, attribute
                                   counts per style, clipped samples
    OUT/<group>/<group>-NNNNNN.tar <key>.flac + <key>.json per sample (webdataset layout)
    OUT/<group>/samples.jsonl      the per-sample table: one JSON object per sample, in shard
                                   order (``TABLE_FIELDS``)

A table row::

    {"utt_id": "Ses01F_impro01_F000", "key": "Ses01F_impro01_F000", "speaker": "Ses01F",
     "emotion": "neutral", "style": "acted", "attributes": ["valence", "arousal", "dominance"],
     "duration": 1.234, "clipped": 0, "shard": "Session1-000000.tar",
     "flac": [0, 40448], "json": [40448, 1024]}

``flac`` and ``json`` are ``[offset, size]`` of the tar member in its shard, headers and
padding included: ``shard_bytes[offset:offset + size]`` is a complete tar member, so a reader
can seek a sample without scanning the tar. ``attributes`` lists the attributes the sample
has (not null); ``clipped`` counts the samples the sharder had to clip to 16-bit full scale.

The sample JSON is a ``Sample`` and a table row a ``TableRow`` (frozen dataclasses): dser
shard writes them (``Sample.encode``, ``TableRow.to_json``), the loader and ``dser verify``
parse them (``from_json``), with the same checks (a missing key, a value of the wrong kind:
``SampleError``, naming the key) and the same duration tolerance (``Sample.matches``).

What a loader reads is what the index lists: ``ShardIndex.find(D)`` is the index that governs
a directory given as a shard spec (``D/index.json`` for a corpus directory, ``D/../index.json``
for a group directory), and ``ShardIndex.listed_files`` is every file dser wrote there.

This module imports nothing heavy (no torch, no audio libraries).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tarfile
from dataclasses import dataclass, field, fields
from pathlib import Path

from dser.labels import ATTRIBUTES  # dimensional labels, each in [0, 1] or null

FORMAT = "dser-shards/2"
OLD_FORMATS = ("dser-shards/1",)
INDEX_NAME = "index.json"
TABLE_NAME = "samples.jsonl"
TABLE_FIELDS = ("utt_id", "key", "speaker", "emotion", "style", "attributes", "duration",
                "clipped", "shard", "flac", "json")

# The sample JSON beside each ``<key>.flac``: these keys always (null when unknown), plus the
# corpus's own extra fields (IEMOCAP's dialog and times, …). ``duration`` is the stored audio's
# length in seconds; the sharder adds it to the reader's ``Record.labels()``.
SAMPLE_FIELDS = ("utt_id", "corpus", "group", "speaker", "gender", "emotion", "emotion_raw", *ATTRIBUTES,
                 "duration", "style")
# The rates ``dser shard --sample-rate`` writes; the loader resamples any of them to the
# backbones' 16 kHz (soxr).
SAMPLE_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
LABEL_KEYS = ("emotion", *ATTRIBUTES)  # what a loader needs of every sample JSON
IGNORE_INDEX = -100  # the emotion target of clips without a class (cross-entropy's ignore_index)
# A sample whose FLAC holds more or less audio than its JSON ``duration`` says by more than this
# is damaged, for the loader and for ``dser verify`` alike. Batches are planned from
# ``duration``; 1 ms admits durations written to the millisecond by other tools.
DURATION_TOLERANCE_S = 0.001


def duration_matches(samples: int, duration: float, sample_rate: int) -> bool:
    """Whether ``samples`` of audio at ``sample_rate`` are the ``duration`` a sample JSON states."""
    return abs(samples - duration * sample_rate) <= DURATION_TOLERANCE_S * sample_rate


class ShardError(Exception):
    """Shards cannot be built or read as asked (OUT exists, --strict with skipped inputs, a
    bad option, a missing, old or foreign index.json); the message says what to do."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fresh_dir(base: Path) -> Path:
    """A new directory named ``base`` (or ``base-1``, ``base-2`` … when taken), for dser to write
    in: plain mkdir, so the umask applies and nothing that was there is ever touched."""
    path, n = Path(base), 0
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1
            path = path.with_name(f"{Path(base).name}-{n}")


def read_index_json(path: Path) -> dict | None:
    """The parsed ``path`` if it is a JSON object with a dser shard format marker (any
    version), else None. Never raises for a missing or foreign file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if isinstance(data, dict) and data.get("format") in (FORMAT, *OLD_FORMATS) \
            and isinstance(data.get("groups"), dict):
        return data
    return None


def upgrade_command(data: dict, out: Path) -> str:
    """The command that rewrites an old shard directory in the current format."""
    reader = data.get("options", {}).get("reader") or data.get("corpus", "CORPUS")
    root = data.get("root", "ROOT")
    return f"dser shard {reader} {root} {out} --overwrite"


@dataclass
class ShardIndex:
    """A shard directory's ``index.json`` and where it lives.

    Attributes:
        out: the shard directory (the one holding ``index.json``).
        data: the parsed ``index.json`` (the layout in this module's docstring).
    """

    out: Path
    data: dict

    @classmethod
    def load(cls, out: str | Path) -> "ShardIndex":
        """Read ``OUT/index.json`` (``out`` may also name the ``index.json`` itself).

        Raises:
            ShardError: no index there, not JSON, not a dser shard index, or an older format
                (naming the command that rewrites it).
        """
        out = Path(out).expanduser()
        path = out if out.name == INDEX_NAME and out.is_file() else out / INDEX_NAME
        if not path.is_file():
            from dser.paths import found

            raise ShardError(f"{out}: expected a shard directory with {INDEX_NAME}, found {found(out, directory=True)}; "
                             f"make shards there with `dser shard`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ShardError(f"{path}: cannot be read as JSON ({e}); rebuild it with `dser shard --overwrite`") from e
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        if found in OLD_FORMATS:
            raise ShardError(f"{path}: shards in the old format {found!r} (this dser reads {FORMAT!r}, which "
                             f"lists every sample); rewrite them with `{upgrade_command(data, path.parent)}`")
        if not isinstance(data, dict) or found != FORMAT or not isinstance(data.get("groups"), dict):
            raise ShardError(f"{path}: not a dser shard index (format {found!r}, expected {FORMAT!r}); "
                             f"rebuild it with `dser shard --overwrite`")
        return cls(path.parent, data)

    @classmethod
    def find(cls, directory: Path) -> tuple["ShardIndex", str | None] | None:
        """The index that governs a directory given as a shard spec, and the group it names.

        Returns:
            ``(index, None)`` for a corpus directory (``D/index.json``), ``(index, group)`` for a
            group directory (``D/../index.json`` lists a group named ``D.name``), None when
            neither holds a dser index.

        Raises:
            ShardError: the index there is unreadable or old; ``D/..`` has an index that does not
                list ``D``.
        """
        if (directory / INDEX_NAME).is_file():
            return cls.load(directory), None
        parent = directory.parent
        if (parent / INDEX_NAME).is_file() and read_index_json(parent / INDEX_NAME) is not None:
            index = cls.load(parent)
            if directory.name not in index.data["groups"]:
                raise ShardError(f"{directory}: {parent / INDEX_NAME} lists no group {directory.name!r} "
                                 f"(groups: {', '.join(index.groups) or 'none'}); the folder was not written by "
                                 f"`dser shard`, or its index was replaced")
            return index, directory.name
        return None

    def save(self, out: str | Path | None = None) -> Path:
        """Write ``index.json`` atomically (a temporary file renamed into place) and fsync it."""
        out = Path(out) if out is not None else self.out
        path = out / INDEX_NAME
        tmp = out / f".{INDEX_NAME}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    @property
    def corpus(self) -> str:
        return self.data["corpus"]

    @property
    def sample_rate(self) -> int:
        return int(self.data["sample_rate"])

    @property
    def options(self) -> dict:
        return dict(self.data.get("options", {}))

    @property
    def groups(self) -> list[str]:
        """Group names, in index order (sorted by name when written by ``build_shards``)."""
        return list(self.data["groups"])

    def group(self, name: str) -> dict:
        """One group's entry (``shards``, ``table``, ``samples``, ``speakers``, ``emotion_style``, …).

        Raises:
            ShardError: unknown group, naming the groups there are.
        """
        if name not in self.data["groups"]:
            raise ShardError(f"{self.out}: no shard group {name!r}; groups: {', '.join(self.groups) or 'none'}")
        return self.data["groups"][name]

    def shard_paths(self, group: str | None = None) -> list[Path]:
        """Shard files of one group (or of every group, in index order), under ``self.out``."""
        names = [group] if group is not None else self.groups
        return [self.out / s["path"] for g in names for s in self.group(g)["shards"]]

    def table_path(self, group: str) -> Path:
        return self.out / self.group(group)["table"]["path"]

    def table(self, group: str) -> list[TableRow]:
        """A group's per-sample table, parsed and checked (``TableRow.from_json``).

        Raises:
            ShardError: the table is missing, or a row does not parse or breaks the row's
                contract (naming the line and the field).
        """
        path = self.table_path(group)
        rows, n = [], 0
        try:
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    rows.append(TableRow.from_json(json.loads(line)))
        except FileNotFoundError as e:
            raise ShardError(f"{path}: missing; rewrite the shards with `{upgrade_command(self.data, self.out)}`") from e
        except SampleError as e:
            raise ShardError(f"{path}: line {n}: the row {e}; run `dser verify {self.out}`") from e
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ShardError(f"{path}: line {n} does not parse ({e}); run `dser verify {self.out}`") from e
        return rows

    def listed_files(self) -> set[Path]:
        """Every file the index says dser wrote (relative to ``out``), the index included."""
        files = {Path(INDEX_NAME)}
        for g in self.groups:
            entry = self.group(g)
            files.update(Path(s["path"]) for s in entry["shards"])
            if "table" in entry:
                files.add(Path(entry["table"]["path"]))
        return files

    @property
    def totals(self) -> dict:
        """``samples``, ``hours``, ``shards``, ``emotions`` and ``styles`` over all groups."""
        return self.data["totals"]

    @property
    def skipped(self) -> list:
        """Every input left out, with its reason (``dser.corpora.Skip``)."""
        from dser.corpora import Skip

        return [Skip(s["input"], s["reason"]) for s in self.data.get("skipped", [])]

    def verify(self) -> list[str]:
        """Check every shard and table file against its recorded size and sha256.

        Returns:
            One line per problem (missing file, wrong size, wrong sha256); empty when all match.
        """
        problems = []
        for g in self.groups:
            entry = self.group(g)
            for s in [*entry["shards"], entry["table"]]:
                path = self.out / s["path"]
                if not path.is_file():
                    problems.append(f"{path}: missing")
                elif path.stat().st_size != s["bytes"]:
                    problems.append(f"{path}: {path.stat().st_size} bytes, index says {s['bytes']}")
                elif sha256_file(path) != s["sha256"]:
                    problems.append(f"{path}: sha256 differs from the index (corrupt or replaced)")
        return problems


def unlisted_files(index: ShardIndex, under: Path) -> list[Path]:
    """Files below ``under`` (inside ``index.out``) that the index does not list, sorted;
    dser's own temporary names (``.index.json.tmp-*``) excepted."""
    listed = {index.out / p for p in index.listed_files()}
    found = []
    for dirpath, dirnames, filenames in os.walk(under):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path not in listed and not name.startswith(f".{INDEX_NAME}.tmp-"):
                found.append(path)
    return found


def scan_tar(path: Path) -> list[dict]:
    """The members of a shard, in order: ``{"name", "offset", "size"}`` per regular file, where
    ``offset`` is where its header starts (an extended header included) and ``size`` runs to
    the next member's header, so ``[offset, size]`` covers header, data and padding.

    Raises:
        tarfile.TarError, OSError: unreadable or truncated tar.
    """
    members = []
    with tarfile.open(path, "r:") as tar:
        infos = list(tar)
        end = tar.offset
    # TarInfo.offset is the start of the member's (possibly extended) header.
    for info, nxt in zip(infos, [*infos[1:], None]):
        stop = nxt.offset if nxt is not None else end
        if info.isfile():
            members.append({"name": info.name, "offset": info.offset, "size": stop - info.offset})
    return members


class SampleError(ValueError):
    """A sample JSON or a table row that breaks this contract; the message names the key."""


# The sample JSON's keys in the order dser shard writes them: a Record's fields, then the
# corpus's own, then ``duration``.
_SAMPLE_ORDER = ("utt_id", "corpus", "group", "speaker", "gender", "emotion", "emotion_raw", *ATTRIBUTES, "style")
_TEXT_FIELDS = ("utt_id", "corpus", "group", "gender", "emotion", "emotion_raw", "style")


def _plain(value):
    """A numpy scalar (a reader's extra fields, a rescaled attribute) as the Python number it holds."""
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json_default(value):
    """What ``json.dumps`` cannot write itself: numpy scalars and paths in a reader's extra fields."""
    plain = _plain(value)
    if plain is not value:
        return plain
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@dataclass(frozen=True)
class Sample:
    """The sample JSON beside each ``<key>.flac`` (``SAMPLE_FIELDS``, then the corpus's own).

    ``dser shard`` writes it (``encode``), the loader and ``dser verify`` read it
    (``from_json``): one parser, one set of checks, one duration tolerance (``matches``).

    Attributes:
        utt_id: the utterance id (None only in a loose tar from another tool; the loader then
            uses the member key).
        duration: the stored audio's length in seconds (positive).
        corpus, group, speaker, gender, emotion, emotion_raw, style: text or None.
        valence, arousal, dominance: numbers (in [0, 1] as dser writes them) or None.
        extra: the corpus's own fields (IEMOCAP's dialog and times, …), kept verbatim.
    """

    utt_id: str | None
    duration: float
    corpus: str | None = None
    group: str | None = None
    speaker: str | None = None
    gender: str | None = None
    emotion: str | None = None
    emotion_raw: str | None = None
    valence: float | None = None
    arousal: float | None = None
    dominance: float | None = None
    style: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: bytes | str | dict, required: tuple[str, ...] = SAMPLE_FIELDS) -> "Sample":
        """Parse and check a sample JSON.

        Args:
            raw: the JSON member's bytes (or text, or the parsed object).
            required: keys that must be present (null allowed where the field allows it);
                ``duration`` always is. ``SAMPLE_FIELDS`` (verify, the writer) or
                ``LABEL_KEYS`` (the loader, which also reads other tools' tars).

        Raises:
            SampleError: not JSON, not an object, a required key missing, or a value of the
                wrong kind (naming the key and the value).
        """
        data = raw
        if isinstance(raw, (bytes, bytearray, str)):
            try:
                data = json.loads(raw)
            except (UnicodeDecodeError, ValueError) as e:
                raise SampleError(f"does not parse as JSON ({e})") from e
        if not isinstance(data, dict):
            raise SampleError(f"is a JSON {type(data).__name__}, not an object")
        missing = [k for k in dict.fromkeys((*required, "duration")) if k not in data]
        if missing:
            raise SampleError(f"lacks {', '.join(missing)}")
        values = {k: _plain(data.get(k)) for k in _SAMPLE_ORDER}
        duration = _plain(data["duration"])
        if not (_is_number(duration) and duration > 0):
            raise SampleError(f"duration {duration!r} is not a positive number of seconds")
        for k in _TEXT_FIELDS:
            if values[k] is not None and not isinstance(values[k], str):
                raise SampleError(f"{k} {values[k]!r} is neither text nor null")
        speaker = values["speaker"]
        if speaker is not None and not isinstance(speaker, str):
            if not isinstance(speaker, int) or isinstance(speaker, bool):
                raise SampleError(f"speaker {speaker!r} is neither text nor null")
            values["speaker"] = str(speaker)  # other tools write numeric speaker ids
        for a in ATTRIBUTES:
            if values[a] is not None and not _is_number(values[a]):
                raise SampleError(f"{a} {values[a]!r} is neither a number nor null")
        extra = {k: v for k, v in data.items() if k not in _SAMPLE_ORDER and k != "duration"}
        return cls(duration=duration, extra=extra, **values)

    def to_json(self) -> dict:
        """The JSON object, keys in the order dser shard writes them."""
        out = {k: getattr(self, k) for k in _SAMPLE_ORDER}
        out.update(self.extra)
        out["duration"] = self.duration
        return out

    def encode(self) -> bytes:
        """The UTF-8 JSON member (numpy scalars in ``extra`` as plain numbers)."""
        return json.dumps(self.to_json(), ensure_ascii=False, default=_json_default).encode("utf-8")

    @property
    def attributes(self) -> tuple[float, ...]:
        """``ATTRIBUTES``' values, NaN where null."""
        return tuple(math.nan if v is None else float(v) for v in (getattr(self, a) for a in ATTRIBUTES))

    @property
    def labelled_attributes(self) -> list[str]:
        """The attributes this sample has (not null), in ``ATTRIBUTES`` order."""
        return [a for a in ATTRIBUTES if getattr(self, a) is not None]

    def matches(self, samples: int, sample_rate: int) -> bool:
        """Whether ``samples`` of audio at ``sample_rate`` last ``duration`` (``DURATION_TOLERANCE_S``)."""
        return duration_matches(samples, self.duration, sample_rate)


def _span(value, key: str) -> tuple[int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise SampleError(f"{key} {value!r} is not [offset, size]")
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class TableRow:
    """One row of a group's per-sample table (``samples.jsonl``); the layout in this module's
    docstring. ``dser shard`` writes it (``of``, ``to_json``), ``dser verify`` reads it
    (``ShardIndex.table``) and compares it with the row the tars give."""

    utt_id: str
    key: str
    speaker: str | None
    emotion: str | None
    style: str | None
    attributes: tuple[str, ...]
    duration: float
    clipped: int
    shard: str
    flac: tuple[int, int]
    json: tuple[int, int]

    @classmethod
    def of(cls, sample: Sample, key: str, shard: str, flac: tuple[int, int], json_: tuple[int, int],
           clipped: int) -> "TableRow":
        """The row of a sample stored as ``key`` in ``shard``, its members at ``flac`` and ``json_``."""
        return cls(utt_id=sample.utt_id or key, key=key, speaker=sample.speaker, emotion=sample.emotion,
                   style=sample.style, attributes=tuple(sample.labelled_attributes), duration=sample.duration,
                   clipped=int(clipped), shard=shard, flac=_span(list(flac), "flac"), json=_span(list(json_), "json"))

    @classmethod
    def from_json(cls, data) -> "TableRow":
        """A parsed table line, checked.

        Raises:
            SampleError: not an object, a field missing or unknown, or a value of the wrong kind.
        """
        if not isinstance(data, dict):
            raise SampleError(f"is a JSON {type(data).__name__}, not an object")
        missing = [k for k in TABLE_FIELDS if k not in data]
        if missing:
            raise SampleError(f"lacks {', '.join(missing)}")
        unknown = [k for k in data if k not in TABLE_FIELDS]
        if unknown:
            raise SampleError(f"has unknown fields {', '.join(unknown)}")
        for k in ("utt_id", "key", "shard"):
            if not isinstance(data[k], str):
                raise SampleError(f"{k} {data[k]!r} is not text")
        for k in ("speaker", "emotion", "style"):
            if data[k] is not None and not isinstance(data[k], str):
                raise SampleError(f"{k} {data[k]!r} is neither text nor null")
        attributes = data["attributes"]
        if not isinstance(attributes, list) or not set(attributes) <= set(ATTRIBUTES):
            raise SampleError(f"attributes {attributes!r} is not a list of {', '.join(ATTRIBUTES)}")
        if not (_is_number(data["duration"]) and data["duration"] > 0):
            raise SampleError(f"duration {data['duration']!r} is not a positive number of seconds")
        clipped = data["clipped"]
        if not isinstance(clipped, int) or isinstance(clipped, bool) or clipped < 0:
            raise SampleError(f"clipped {clipped!r} is not a count")
        return cls(**{**data, "attributes": tuple(attributes), "flac": _span(data["flac"], "flac"),
                      "json": _span(data["json"], "json")})

    def to_json(self) -> dict:
        """The table line's object (``TABLE_FIELDS`` order; lists where JSON has arrays)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(attributes=list(self.attributes), flac=list(self.flac), json=list(self.json))
        return out


def encode_table(rows: list[TableRow]) -> bytes:
    return b"".join(json.dumps(r.to_json(), ensure_ascii=False).encode("utf-8") + b"\n" for r in rows)


def group_summary(rows: list[TableRow]) -> dict:
    """The counts ``index.json`` states for a group, from its table rows: speakers (clips per
    speaker), emotion × style, attributes per style (each attribute, and ``all`` three),
    clipped samples (total, and clips with any)."""
    speakers: dict[str, int] = {}
    emotion_style: dict[str, dict[str, int]] = {}
    attributes: dict[str, dict[str, int]] = {}
    clipped = {"samples": 0, "clips": 0}
    for r in rows:
        spk = "null" if r.speaker is None else str(r.speaker)
        speakers[spk] = speakers.get(spk, 0) + 1
        emo = "null" if r.emotion is None else r.emotion
        style = "null" if r.style is None else r.style
        per = emotion_style.setdefault(emo, {})
        per[style] = per.get(style, 0) + 1
        attrs = attributes.setdefault(style, {**{a: 0 for a in ATTRIBUTES}, "all": 0})
        for a in r.attributes:
            attrs[a] += 1
        attrs["all"] += len(r.attributes) == len(ATTRIBUTES)
        clipped["samples"] += r.clipped
        clipped["clips"] += r.clipped > 0
    return {"speakers": dict(sorted(speakers.items())),
            "emotion_style": {e: dict(sorted(s.items())) for e, s in sorted(emotion_style.items())},
            "attributes": dict(sorted(attributes.items())),
            "clipped": clipped}
