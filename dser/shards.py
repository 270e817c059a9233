"""The sharder: a corpus listing in, WebDataset tar shards plus ``index.json`` out.

``dser shard CORPUS ROOT [OUT]`` reads a corpus (``dser.corpora``) and calls ``build_shards``,
which decodes every clip, makes it 16 kHz mono 16-bit, and packs it with its labels::

    Listing.records ─check ids─▶ sorted by group (reader order within a group)
        │
        ▼  ``workers`` processes (spawned; results come back in input order)
    soundfile read ─ checks: missing, unreadable, empty, truncated, non-finite
        ─ down-mix (mean of channels) ─ soxr resample (HQ) ─ int16 ─ checks: too short, silent
        ─ FLAC (PCM_16) bytes            … or a Skip with the reason
        │
        ▼  main process
    OUT/<group>/<group>-000000.tar, -000001.tar, …   <key>.flac + <key>.json per sample;
        │    a new shard starts before one would pass --max-shard-mb or --max-shard-samples
        ▼
    OUT/index.json: per group its shards (sha256, bytes, samples, seconds), hours, emotion and
        style counts; totals; corpus, ROOT, options, dser version; every skipped input + reason

``<key>`` is the utt_id with each character outside ``[A-Za-z0-9_-]`` replaced by ``_``
(webdataset splits a member name at its first dot). The JSON holds ``Record.labels()``
(``utt_id, corpus, group, speaker, gender, emotion, emotion_raw, valence, arousal, dominance,
style`` and the record's extra fields) plus ``duration``: seconds of the stored audio.

Guarantees:

- Same input and options → byte-identical shards (same sha256), whatever ``workers`` is:
  results are consumed in input order and tar members carry fixed mtime/owner/mode.
- 16-bit PCM mono input at the target rate is stored bit-exactly (read as int16, never
  scaled through floats). Other input is converted with ``round(x · 32768)``, the inverse of
  the loader's ``int16 / 32768``.
- Writing is atomic: everything goes to a hidden sibling ``.<OUT>.partial-<pid>``,
  ``index.json`` last, and only a finished run renames it to OUT. A crash (even ``kill -9``)
  leaves at most that ``.partial`` directory, never an OUT with an ``index.json``.
- Bad input never stops the run: the input is skipped with its reason (in ``index.json`` and
  the printed summary); ``strict=True`` turns any skip into a ``ShardError`` instead, and
  nothing is published.

Usage::

    from dser.corpora import read_corpus
    from dser.shards import ShardIndex, build_shards

    listing = read_corpus("crema-d", Path("/data/CREMA-D"))
    index = build_shards(listing, Path("shards/crema-d"), corpus="crema-d",
                         root=Path("/data/CREMA-D"), workers=8)
    index.groups                     # ['fold0', 'fold1', …]
    index.shard_paths("fold0")       # [Path('shards/crema-d/fold0/fold0-000000.tar'), …]
    ShardIndex.load("shards/crema-d").verify()   # [] when every shard matches its sha256
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import struct
import sys
import tarfile
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import soxr

from dser import __version__
from dser.corpora import Listing, Record, Skip
from dser.labels import EMOTIONS, STYLES

FORMAT = "dser-shards/1"
INDEX_NAME = "index.json"

# --max-shard-mb counts mebibytes, as `du -h` and `ls -lh` show them.
_MB = 1 << 20

# Group names become directory and file names.
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

# Bytes per sample of the uncompressed subtypes whose WAV data length tells the frame count.
_SAMPLE_WIDTH = {"PCM_U8": 1, "PCM_S8": 1, "ULAW": 1, "ALAW": 1, "PCM_16": 2, "PCM_24": 3,
                 "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8}

# How many skips the printed summary and a --strict error list before "… and N more".
_SHOW_SKIPS = 10


class ShardError(Exception):
    """Shards cannot be built or read as asked (OUT exists, --strict with skipped inputs, a
    bad option, a missing or foreign index.json); the message says what to do."""


def shard_key(utt_id: str) -> str:
    """The tar key of an utterance: every character outside ``[A-Za-z0-9_-]`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", utt_id)


# ───────────────────────────── index.json ─────────────────────────────


@dataclass
class ShardIndex:
    """A shard directory's ``index.json`` and where it lives.

    Attributes:
        out: the shard directory (the one holding ``index.json``).
        data: the parsed ``index.json`` (schema in the module docstring and the README).
    """

    out: Path
    data: dict

    @classmethod
    def load(cls, out: str | Path) -> "ShardIndex":
        """Read ``OUT/index.json`` (``out`` may also name the ``index.json`` itself).

        Raises:
            ShardError: no index there, not JSON, or not a dser shard index.
        """
        out = Path(out).expanduser()
        path = out if out.name == INDEX_NAME and out.is_file() else out / INDEX_NAME
        if not path.is_file():
            raise ShardError(f"no {INDEX_NAME} in {path.parent}; make shards there with `dser shard`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ShardError(f"{path}: cannot be read as JSON ({e}); rebuild it with `dser shard --overwrite`") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("groups"), dict):
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ShardError(f"{path}: not a dser shard index (format {found!r}, expected {FORMAT!r}); "
                             f"rebuild it with `dser shard --overwrite`")
        return cls(path.parent, data)

    def save(self, out: str | Path | None = None) -> Path:
        """Write ``index.json`` atomically (a temporary file renamed into place) and fsync it.

        Args:
            out: the directory to write into; defaults to ``self.out``.

        Returns:
            The path written.
        """
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
        """One group's entry: ``shards``, ``samples``, ``hours``, ``emotions``, ``styles``.

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

    @property
    def totals(self) -> dict:
        """``samples``, ``hours``, ``emotions`` and ``styles`` over all groups."""
        return self.data["totals"]

    @property
    def skipped(self) -> list[Skip]:
        """Every input left out, with its reason."""
        return [Skip(s["input"], s["reason"]) for s in self.data.get("skipped", [])]

    def verify(self) -> list[str]:
        """Check every shard file against its recorded size and sha256.

        Returns:
            One line per problem (missing file, wrong size, wrong sha256); empty when all match.
        """
        problems = []
        for g in self.groups:
            for s in self.group(g)["shards"]:
                path = self.out / s["path"]
                if not path.is_file():
                    problems.append(f"{path}: missing")
                elif path.stat().st_size != s["bytes"]:
                    problems.append(f"{path}: {path.stat().st_size} bytes, index says {s['bytes']}")
                elif _sha256(path) != s["sha256"]:
                    problems.append(f"{path}: sha256 differs from the index (corrupt or replaced)")
        return problems


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ───────────────────────────── encoding (worker side) ─────────────────────────────


class _BadAudio(Exception):
    """An input's audio cannot be used; the message is the reason recorded for the skip."""


def _wav_data_frames(path: str, subtype: str, channels: int) -> int | None:
    """Frames a RIFF/WAVE file's ``data`` chunk header promises, or None when unknowable.

    libsndfile quietly shortens a WAV whose data chunk runs past the end of the file, so a
    truncated WAV reads "fine" unless the header is checked by hand.
    """
    width = _SAMPLE_WIDTH.get(subtype)
    if width is None:
        return None
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"data":
                # 0 and 0xFFFFFFFF are what streaming writers leave when they never knew the length.
                return None if size in (0, 0xFFFFFFFF) else size // (width * channels)
            f.seek(size + (size & 1), os.SEEK_CUR)


def _to_int16(path: str, sample_rate: int) -> np.ndarray:
    """Decode ``path`` to mono int16 at ``sample_rate``.

    Returns:
        (T,) int16 samples.

    Raises:
        _BadAudio: missing, unreadable, empty, truncated or non-finite audio.
    """
    if not os.path.isfile(path):
        raise _BadAudio("audio file missing")
    try:
        f = sf.SoundFile(path)
    except sf.LibsndfileError as e:
        raise _BadAudio(f"unreadable audio ({e.error_string})") from e
    except RuntimeError as e:
        raise _BadAudio(f"unreadable audio ({e})") from e
    with f:
        sr_in, channels, subtype, frames, fmt = f.samplerate, f.channels, f.subtype, f.frames, f.format
        if frames == 0:
            raise _BadAudio("empty audio (0 samples)")
        # The bit-exact path: already what we store, so never scale through floats.
        exact = subtype == "PCM_16" and channels == 1 and sr_in == sample_rate
        try:
            data = f.read(dtype="int16" if exact else "float64", always_2d=True)  # (T, C)
        except RuntimeError as e:  # a FLAC/OGG cut short fails in the decoder
            raise _BadAudio(f"unreadable or truncated audio ({getattr(e, 'error_string', e)})") from e
    promised = _wav_data_frames(path, subtype, channels) if fmt == "WAV" else None
    if len(data) == 0:
        raise _BadAudio("empty audio (0 samples)")
    promised = max(frames, promised or 0)
    if len(data) < promised:
        raise _BadAudio(f"truncated audio: the header promises {promised} samples, "
                        f"the file holds {len(data)}")
    if exact:
        return data[:, 0]
    if not np.isfinite(data).all():
        raise _BadAudio("non-finite samples (NaN or inf) in the audio")
    x = data.mean(axis=1)  # (T,) down-mix: the mean keeps the level of correlated channels
    if sr_in != sample_rate:
        x = soxr.resample(x, sr_in, sample_rate, quality="HQ")  # (T',)
    # round(x * 32768) inverts the loader's int16 / 32768; clipping absorbs resampler overshoot.
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


def _encode(task: tuple[str, int, float]) -> tuple[bytes, float] | str:
    """Worker entry point (top level, so spawned processes can import it).

    Args:
        task: ``(path, sample_rate, min_duration)``.

    Returns:
        ``(flac_bytes, duration_seconds)``, or the reason the input is skipped.
    """
    path, sample_rate, min_duration = task
    try:
        audio = _to_int16(path, sample_rate)  # (T,) int16
        duration = len(audio) / sample_rate
        if duration < min_duration:
            raise _BadAudio(f"too short: {duration:.3f} s (< min_duration {min_duration:g} s)")
        if not audio.any():
            raise _BadAudio("silent audio: every sample is zero")
        buf = io.BytesIO()
        sf.write(buf, audio, sample_rate, format="FLAC", subtype="PCM_16")
        return buf.getvalue(), duration
    except _BadAudio as e:
        return str(e)
    except (ValueError, OSError, RuntimeError) as e:  # soxr, file system, libsndfile on odd input
        return f"could not encode audio ({type(e).__name__}: {e})"


def _encode_all(tasks: list[tuple[str, int, float]], workers: int) -> Iterator[tuple[bytes, float] | str]:
    """Encode in input order, in this process or a pool of spawned ones."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_encode, tasks)
        return
    # spawn, not fork: the caller may hold threads (torch, tqdm) that a fork would copy mid-lock.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap(_encode, tasks, chunksize=4)


# ───────────────────────────── writing (main process) ─────────────────────────────


def _member(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata: the shard's bytes depend on the audio and labels only.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _label_counts(values) -> dict[str, int]:
    """Counts keyed by value (``null`` for None), in vocabulary order then alphabetical."""
    order = {v: i for i, v in enumerate((*EMOTIONS, *STYLES))}
    counts = Counter("null" if v is None else v for v in values)
    return dict(sorted(counts.items(), key=lambda kv: (kv[0] == "null", order.get(kv[0], len(order)), kv[0])))


class _TarShardWriter:
    """Appends samples to ``<dir>/<group>/<group>-NNNNNN.tar``, rolling to a new shard before
    one would pass ``max_bytes`` (as closed on disk) or ``max_samples``."""

    def __init__(self, out: Path, max_bytes: int, max_samples: int | None):
        self.out, self.max_bytes, self.max_samples = out, max_bytes, max_samples
        self.tar: tarfile.TarFile | None = None  # the open shard, its file and index entry
        self.file = None
        self.current: dict = {}
        self.group: str | None = None
        self.shards: dict[str, list[dict]] = {}  # group → index entries of its closed shards
        self.records: dict[str, list[Record]] = {}  # group → records written

    def add(self, record: Record, flac: bytes, duration: float) -> None:
        key = shard_key(record.utt_id)
        labels = record.labels()
        labels["duration"] = duration
        meta = json.dumps(labels, ensure_ascii=False, default=_json_scalar).encode("utf-8")
        members = [(_member(f"{key}.flac", len(flac)), flac), (_member(f"{key}.json", len(meta)), meta)]
        if record.group != self.group:
            self._close()
            self.group = record.group
            self.shards[record.group], self.records[record.group] = [], []
        elif self.tar is not None and self._would_overflow(members):
            self._close()
        if self.tar is None:
            self._open()
        for info, payload in members:
            self.tar.addfile(info, io.BytesIO(payload))
        self.current["samples"] += 1
        self.current["seconds"] += duration
        self.records[record.group].append(record)

    def _would_overflow(self, members) -> bool:
        if self.max_samples is not None and self.current["samples"] >= self.max_samples:
            return True
        added = sum(len(info.tobuf(self.tar.format, self.tar.encoding, self.tar.errors))
                    + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for info, _ in members)
        # Closing writes two zero blocks and pads to a whole record.
        closed = self.tar.offset + added + 2 * tarfile.BLOCKSIZE
        closed = -(-closed // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
        return closed > self.max_bytes

    def _open(self) -> None:
        rel = f"{self.group}/{self.group}-{len(self.shards[self.group]):06d}.tar"
        (self.out / self.group).mkdir(exist_ok=True)
        self.current = {"path": rel, "sha256": "", "bytes": 0, "samples": 0, "seconds": 0.0}
        self.file = open(self.out / rel, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)

    def _close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        path = self.out / self.current["path"]
        self.current.update(sha256=_sha256(path), bytes=path.stat().st_size,
                            seconds=round(self.current["seconds"], 3))
        self.shards[self.group].append(self.current)
        self.tar = None

    def close(self) -> dict[str, dict]:
        """Finish the open shard; returns the ``groups`` section of ``index.json``."""
        self._close()
        groups = {}
        for g, shards in self.shards.items():
            recs = self.records[g]
            groups[g] = {"shards": shards, "samples": len(recs),
                         "hours": round(sum(s["seconds"] for s in shards) / 3600, 6),
                         "emotions": _label_counts(r.emotion for r in recs),
                         "styles": _label_counts(r.style for r in recs)}
        return groups

    def abort(self) -> None:
        if self.tar is not None:
            self.file.close()
            self.tar = None


def _json_scalar(value):
    """numpy scalars (a reader's extra fields) as plain JSON numbers."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# ───────────────────────────── the build ─────────────────────────────


def _check_options(sample_rate, max_shard_mb, max_shard_samples, min_duration, workers) -> None:
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ShardError(f"--sample-rate must be a positive integer (Hz), got {sample_rate!r}")
    if not max_shard_mb > 0:
        raise ShardError(f"--max-shard-mb must be positive, got {max_shard_mb!r}")
    if max_shard_samples is not None and max_shard_samples < 1:
        raise ShardError(f"--max-shard-samples must be at least 1, got {max_shard_samples!r}")
    if not min_duration >= 0:
        raise ShardError(f"--min-duration must be >= 0 seconds, got {min_duration!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ShardError(f"--workers must be a positive integer, got {workers!r}")


def _check_out(out: Path, overwrite: bool) -> None:
    """Fail before any work when publishing to ``out`` would be refused."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ShardError(f"OUT {out} is a file, not a directory; choose another OUT")
    if not overwrite:
        raise ShardError(f"OUT {out} already exists; pass --overwrite to replace it, or choose another OUT")
    # --overwrite deletes OUT, so only ever delete something that is a shard directory.
    if not (out / INDEX_NAME).is_file() and any(out.iterdir()):
        raise ShardError(f"OUT {out} is not empty and holds no {INDEX_NAME}, so it is not a shard "
                         f"directory; refusing to replace it (remove it yourself or choose another OUT)")


def _plan(listing: Listing) -> tuple[list[Record], list[Skip]]:
    """Records to encode (sorted by group, reader order kept within each) and the id skips."""
    skipped: list[Skip] = []
    records: list[Record] = []
    by_id: set[str] = set()
    by_key: dict[str, str] = {}
    for r in listing.records:
        key = shard_key(r.utt_id)
        if not _GROUP_NAME.match(r.group or ""):
            raise ShardError(f"{r.path}: group {r.group!r} of {r.utt_id!r} cannot name a shard directory "
                             f"(use letters, digits, '_', '.', '-'); fix the reader or manifest")
        if not r.utt_id:
            skipped.append(Skip(str(r.path), "empty utterance id"))
        elif r.utt_id in by_id:
            skipped.append(Skip(str(r.path), f"duplicate utterance id {r.utt_id!r}"))
        elif key in by_key:
            skipped.append(Skip(str(r.path), f"utterance id {r.utt_id!r} gives the same shard key "
                                             f"{key!r} as {by_key[key]!r}"))
        else:
            by_id.add(r.utt_id)
            by_key[key] = r.utt_id
            records.append(r)
    records.sort(key=lambda r: r.group)  # stable: reader order within a group
    return records, skipped


def _partial_dir(out: Path) -> Path:
    """A fresh hidden sibling of ``out`` to build in (plain mkdir, so the umask applies)."""
    base = out.parent / f".{out.name}.partial-{os.getpid()}"
    path, n = base, 0
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out``, moving an old ``out`` aside first."""
    _check_out(out, overwrite)  # again: OUT may have appeared while we were encoding
    if not out.exists():
        os.rename(tmp, out)
    else:
        old = tmp.with_name(tmp.name.replace(".partial-", ".old-"))
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    try:  # make the renames durable; not every file system lets a directory be opened
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _format_skips(skipped: list[Skip], limit: int | None) -> list[str]:
    shown = skipped if limit is None else skipped[:limit]
    lines = [f"  {s.input}: {s.reason}" for s in shown]
    if len(skipped) > len(shown):
        lines.append(f"  … and {len(skipped) - len(shown)} more")
    return lines


def build_shards(listing: Listing, out: Path, *, corpus: str, root: Path, sample_rate: int = 16000,
                 max_shard_mb: float = 256.0, max_shard_samples: int | None = None,
                 min_duration: float = 0.25, workers: int = 1, overwrite: bool = False,
                 strict: bool = False, progress: bool = True) -> ShardIndex:
    """Encode a corpus listing into WebDataset shards and ``index.json`` (atomically).

    Args:
        listing: records to shard and the inputs the reader already skipped (kept in the index).
        out: the shard directory to create (``shards/<corpus>`` from the CLI).
        corpus: corpus name recorded in the index.
        root: the corpus ROOT, recorded (absolute) in the index.
        sample_rate: output rate in Hz; other rates are resampled with soxr (HQ).
        max_shard_mb: start a new shard before one would pass this many MiB.
        max_shard_samples: start a new shard past this many samples (None: no limit).
        min_duration: clips shorter than this (seconds, after conversion) are skipped.
        workers: encoding processes; the output is byte-identical for any value. They are
            spawned, so a script calling this with ``workers > 1`` needs the usual
            ``if __name__ == "__main__":`` guard.
        overwrite: replace an existing OUT (only one holding an ``index.json``, or empty).
        strict: raise instead of publishing when any input was skipped.
        progress: show a tqdm bar (utterances/s, × real time) on stderr.

    Returns:
        The published index.

    Raises:
        ShardError: a bad option; OUT exists (without ``overwrite``) or is not a shard
            directory; a group name unfit for a directory; nothing left to shard; ``strict``
            with skipped inputs (naming them). OUT is untouched in every case.
    """
    _check_options(sample_rate, max_shard_mb, max_shard_samples, min_duration, workers)
    out = Path(out).expanduser().absolute()
    _check_out(out, overwrite)
    records, id_skips = _plan(listing)
    skipped = [*listing.skipped, *id_skips]
    out.parent.mkdir(parents=True, exist_ok=True)
    leftovers = sorted(out.parent.glob(f".{out.name}.partial-*"))
    if leftovers:
        print(f"note: {', '.join(map(str, leftovers))} left by an interrupted run; safe to delete",
              file=sys.stderr)

    from tqdm import tqdm  # only the sharder draws progress bars

    tmp = _partial_dir(out)
    writer = _TarShardWriter(tmp, max_bytes=int(max_shard_mb * _MB), max_samples=max_shard_samples)
    started, audio_seconds, last_postfix = time.monotonic(), 0.0, 0.0
    try:
        tasks = [(str(r.path), sample_rate, min_duration) for r in records]
        # closing(): on an error below, the pool is torn down now, not whenever GC gets to it.
        with closing(_encode_all(tasks, workers)) as results, \
                tqdm(total=len(records), unit="utt", desc=f"shard {corpus}", file=sys.stderr,
                     disable=not progress, dynamic_ncols=True) as bar:
            for record, result in zip(records, results):
                if isinstance(result, str):
                    skipped.append(Skip(str(record.path), result))
                else:
                    writer.add(record, *result)
                    audio_seconds += result[1]
                bar.update(1)
                now = time.monotonic()
                if now - last_postfix > 0.5 or bar.n == len(records):
                    bar.set_postfix_str(f"{audio_seconds / max(now - started, 1e-9):.0f}× real time")
                    last_postfix = now
        groups = writer.close()
        if strict and skipped:
            print("\n".join(["skipped inputs:", *_format_skips(skipped, None)]), file=sys.stderr)
            raise ShardError(f"--strict: {len(skipped)} input(s) skipped, so {out} was not written: "
                             + "; ".join(f"{s.input} ({s.reason})" for s in skipped[:_SHOW_SKIPS])
                             + (f"; … and {len(skipped) - _SHOW_SKIPS} more" if len(skipped) > _SHOW_SKIPS else ""))
        if not groups:
            reasons = "; ".join(f"{s.input} ({s.reason})" for s in skipped[:3])
            raise ShardError(f"nothing to shard for {corpus}: {len(listing.records)} record(s), "
                             f"{len(skipped)} input(s) skipped" + (f", e.g. {reasons}" if reasons else ""))
        all_records = [r for g in groups for r in writer.records[g]]
        index = ShardIndex(out, {
            "format": FORMAT,
            "corpus": corpus,
            "root": str(Path(root).expanduser().absolute()),
            "dser_version": __version__,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "sample_rate": sample_rate,
            "options": {"sample_rate": sample_rate, "max_shard_mb": max_shard_mb,
                        "max_shard_samples": max_shard_samples, "min_duration": min_duration,
                        "workers": workers, "overwrite": overwrite, "strict": strict},
            "groups": groups,
            "totals": {"samples": len(all_records),
                       "hours": round(sum(s["seconds"] for g in groups.values() for s in g["shards"]) / 3600, 6),
                       "shards": sum(len(g["shards"]) for g in groups.values()),
                       "emotions": _label_counts(r.emotion for r in all_records),
                       "styles": _label_counts(r.style for r in all_records)},
            "skipped": [{"input": s.input, "reason": s.reason} for s in skipped],
        })
        index.save(tmp)  # last: a directory with index.json is a finished one
        _publish(tmp, out, overwrite)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    t = index.totals
    lines = [f"wrote {out}: {len(groups)} group(s), {t['samples']} samples in {t['shards']} shard(s), "
             f"{t['hours']:.2f} h, in {time.monotonic() - started:.1f} s"]
    lines += [f"  {g}: {e['samples']} samples, {e['hours']:.2f} h, {len(e['shards'])} shard(s)"
              for g, e in groups.items()]
    if skipped:
        lines.append(f"skipped {len(skipped)} input(s) (all listed in {out / INDEX_NAME}):")
        lines += _format_skips(skipped, _SHOW_SKIPS)
    lines.append(f"index: {out / INDEX_NAME}")
    print("\n".join(lines))
    return index
