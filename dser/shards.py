"""The sharder: a corpus listing in, WebDataset tar shards plus ``index.json`` out.

``dser shard CORPUS ROOT [OUT]`` reads a corpus (``dser.corpora``) and calls ``build_shards``,
which decodes every clip, makes it 16 kHz mono 16-bit, and packs it with its labels::

    Listing.records ─check ids─▶ sorted by group (reader order within a group)
        │
        ▼  ``workers`` processes (spawned; results come back in input order): ``dser.shard_encoding``
    soundfile read ─ checks: missing, unreadable, empty, truncated, non-finite
        ─ down-mix (mean of channels) ─ soxr resample (HQ) ─ int16, clipped samples counted
        ─ checks: too short, silent, clipped past --max-clipped ─ FLAC (PCM_16) bytes
                                         … or a Skip with the reason
        │
        ▼  main process
    OUT/<group>/<group>-000000.tar, -000001.tar, …   <key>.flac + <key>.json per sample;
        │    a new shard starts before one would pass --max-shard-mb or --max-shard-samples
        │ OUT/<group>/samples.jsonl: one row per sample (labels, duration, clipped samples,
        │    shard, offset and size of each tar member)
        ▼
    OUT/index.json (``dser-shards/2``, ``dser.schema``): per group its shards (sha256, bytes,
        samples, seconds), its table (sha256, bytes, rows), hours, speakers, emotion, style,
        emotion × style, attribute and clipped counts; totals; corpus, ROOT, options, dser
        version; every skipped input + reason

This module is the main process's side: ``build_shards`` and its steps, the tar writer
(``_TarShardWriter``: shards, tables, the ``groups`` section of the index) and the checks that
keep OUT safe to write and to replace. The encoding and its worker pool are in
``dser.shard_encoding``.

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
- Signals: SIGTERM and SIGINT stop the run, remove the ``.partial`` directory and (from the
  CLI) exit with 128 + the signal number after one line; every encoding worker dies with the
  sharder, SIGKILL included (parent-death signal plus a ``getppid`` watchdog), though after a
  SIGKILL the ``.partial`` directory stays.
- Bad input never stops the run: the input is skipped with its reason (in ``index.json`` and
  the printed summary); ``strict=True`` turns any skip into a ``ShardError`` instead, and
  nothing is published.
- OUT is replaced (``overwrite=True``) only when dser wrote it: its ``index.json`` carries a
  dser format marker (any version) and OUT holds nothing that index does not list. OUT is
  never, and never contains, the current directory, ``$HOME``, ROOT or an input file; it may
  lie inside the current directory (the default ``shards/CORPUS``).

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

import errno
import hashlib
import io
import os
import re
import shutil
import signal
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path

from dser import __version__
from dser.corpora import Listing, Record, Skip
from dser.labels import EMOTIONS, STYLES
from dser.schema import (FORMAT, INDEX_NAME, SAMPLE_RATES, TABLE_NAME, Sample, ShardError, ShardIndex, TableRow,
                         encode_table, fresh_dir, group_summary, read_index_json, sha256_file)
from dser.shard_encoding import encode_all

__all__ = ["FORMAT", "INDEX_NAME", "MAX_CLIPPED", "ShardError", "ShardIndex", "Stopped", "build_shards", "shard_key"]

# --max-shard-mb counts mebibytes, as `du -h` and `ls -lh` show them.
_MB = 1 << 20

# Group names become directory and file names.
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

# How many skips the printed summary and a --strict error list before "… and N more".
_SHOW_SKIPS = 10

# A clip with more than this share of its samples clipped to 16-bit full scale is skipped.
MAX_CLIPPED = 0.01


def shard_key(utt_id: str) -> str:
    """The tar key of an utterance: every character outside ``[A-Za-z0-9_-]`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", utt_id)


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
        self.rows: dict[str, list[TableRow]] = {}  # group → per-sample table rows
        self.tables: dict[str, dict] = {}  # group → index entry of its written table

    def add(self, record: Record, flac: bytes, duration: float, clipped: int = 0) -> None:
        key = shard_key(record.utt_id)
        sample = Sample.from_json({**record.labels(), "duration": duration})
        meta = sample.encode()
        members = [(_member(f"{key}.flac", len(flac)), flac), (_member(f"{key}.json", len(meta)), meta)]
        if record.group != self.group:
            self._close()
            self._write_table()
            self.group = record.group
            self.shards[record.group], self.records[record.group], self.rows[record.group] = [], [], []
        elif self.tar is not None and self._would_overflow(members):
            self._close()
        if self.tar is None:
            self._open()
        spans = []
        for info, payload in members:
            start = self.tar.offset
            self.tar.addfile(info, io.BytesIO(payload))
            spans.append((start, self.tar.offset - start))  # header, data and padding
        self.current["samples"] += 1
        self.current["seconds"] += duration
        self.records[record.group].append(record)
        self.rows[record.group].append(TableRow.of(sample, key, Path(self.current["path"]).name, *spans, clipped))

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
        self.current.update(sha256=sha256_file(path), bytes=path.stat().st_size,
                            seconds=round(self.current["seconds"], 3))
        self.shards[self.group].append(self.current)
        self.tar = None

    def _write_table(self) -> None:
        """Write the finished group's per-sample table beside its shards (fsynced)."""
        if self.group is None or self.group in self.tables:
            return
        rel = f"{self.group}/{TABLE_NAME}"
        data = encode_table(self.rows[self.group])
        with open(self.out / rel, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.tables[self.group] = {"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                                   "rows": len(self.rows[self.group])}

    def close(self) -> dict[str, dict]:
        """Finish the open shard and table; returns the ``groups`` section of ``index.json``."""
        self._close()
        self._write_table()
        groups = {}
        for g, shards in self.shards.items():
            recs = self.records[g]
            groups[g] = {"shards": shards, "table": self.tables[g], "samples": len(recs),
                         "hours": round(sum(s["seconds"] for s in shards) / 3600, 6),
                         "emotions": _label_counts(r.emotion for r in recs),
                         "styles": _label_counts(r.style for r in recs),
                         **group_summary(self.rows[g])}
        return groups

    def abort(self) -> None:
        if self.tar is not None:
            self.file.close()
            self.tar = None


# ───────────────────────────── the build ─────────────────────────────


class Stopped(BaseException):
    """The sharder got SIGTERM (SIGINT stays KeyboardInterrupt); ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def _raise_stopped(signum, frame):
    # Once only: a second SIGTERM during the cleanup must not cut the cleanup short.
    signal.signal(signum, signal.SIG_IGN)
    raise Stopped(signum)


@contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM (kill, timeout, docker stop) raises ``Stopped`` inside the block, so the build's
    cleanup removes the .partial directory and tears the pool down, as it already does for
    Ctrl-C. Outside the main thread (no handlers can be set) nothing changes."""
    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _raise_stopped) if in_main else None
    try:
        yield
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_term)


def _check_options(sample_rate, max_shard_mb, max_shard_samples, min_duration, max_duration, max_clipped,
                   workers) -> None:
    """One ``ShardError`` line for the first bad option, named as the CLI spells it."""
    if not isinstance(sample_rate, int) or sample_rate not in SAMPLE_RATES:
        raise ShardError(f"--sample-rate must be one of {', '.join(map(str, SAMPLE_RATES))} (Hz), got {sample_rate!r}")
    if not max_shard_mb > 0:
        raise ShardError(f"--max-shard-mb must be positive, got {max_shard_mb!r}")
    if max_shard_samples is not None and max_shard_samples < 1:
        raise ShardError(f"--max-shard-samples must be at least 1, got {max_shard_samples!r}")
    if not min_duration >= 0:
        raise ShardError(f"--min-duration must be >= 0 seconds, got {min_duration!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ShardError(f"--workers must be a positive integer, got {workers!r}")
    if max_duration is not None and not max_duration > 0:
        raise ShardError(f"--max-duration must be a positive number of seconds, got {max_duration!r}")
    if not 0 <= max_clipped <= 1:
        raise ShardError(f"--max-clipped must be a fraction in [0, 1], got {max_clipped!r}")


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _check_out(out: Path, overwrite: bool, protected: list[tuple[str, Path]] = ()) -> None:
    """Fail before any work when publishing to ``out`` would be refused.

    ``--overwrite`` replaces OUT only when dser wrote it: its ``index.json`` carries dser's format
    marker and OUT holds nothing the index does not list. OUT is never, and never contains, one of
    ``protected`` (the current directory, ``$HOME``, ROOT, the corpus's files).
    """
    names = {os.path.abspath(out)}
    if os.path.exists(out):
        names.add(os.path.realpath(out))
    for what, path in protected:
        # Each input only as named (realpath for 100k clips costs seconds); the rest resolved too.
        for p in {os.path.abspath(path)} if what == "the corpus file" else {os.path.abspath(path), os.path.realpath(path)}:
            hit = next((n for n in names if _inside(p, n)), None)
            if hit is not None:
                raise ShardError(f"OUT {out} is or contains {what} {path}; refusing to write there (replacing OUT "
                                 f"would delete it): choose another OUT, e.g. shards/<corpus>")
    if out.is_symlink():
        raise ShardError(f"OUT {out} is a symbolic link; give the directory itself, or choose another OUT")
    if not out.exists():
        return
    if not out.is_dir():
        raise ShardError(f"OUT {out} is a file, not a directory; choose another OUT")
    if not overwrite:
        raise ShardError(f"OUT {out} already exists; pass --overwrite to replace it, or choose another OUT")
    if not any(out.iterdir()):
        return
    # --overwrite deletes OUT, so only ever replace what dser wrote, and all of it.
    data = read_index_json(out / INDEX_NAME)
    if data is None:
        raise ShardError(f"OUT {out} is not a dser shard directory ({out / INDEX_NAME} is missing, unreadable or "
                         f"not dser's); refusing to replace it: remove it yourself or choose another OUT")
    listed = ShardIndex(out, data).listed_files()
    groups = {p.parent for p in listed if p.parent != Path(".")}
    for dirpath, dirnames, filenames in os.walk(out):
        rel = Path(dirpath).relative_to(out)
        for name in sorted(dirnames):
            if (out / rel / name).is_symlink() or rel / name not in groups:
                raise ShardError(f"OUT {out} holds {out / rel / name}, which its {INDEX_NAME} does not list; refusing "
                                 f"to replace OUT (move that out, or choose another OUT)")
        for name in sorted(filenames):
            path = rel / name
            if (out / path).is_symlink() or (path not in listed and not (
                    rel == Path(".") and name.startswith(f".{INDEX_NAME}.tmp-"))):
                raise ShardError(f"OUT {out} holds {out / path}, which its {INDEX_NAME} does not list; refusing "
                                 f"to replace OUT (move that file out, or choose another OUT)")


def _protected(listing: Listing, root: Path) -> list[tuple[str, Path]]:
    """What OUT must never be or contain: the current directory, $HOME, ROOT, every input."""
    paths = [("the current directory", Path.cwd()), ("your home directory", Path.home()), ("ROOT", Path(root))]
    paths += [("the corpus file", Path(r.path)) for r in listing.records]
    paths += [("the corpus file", Path(s.input)) for s in listing.skipped if os.path.isabs(s.input)]
    return paths


def _not_utf8(record: Record) -> str | None:
    """The first of a record's path and labels that UTF-8 cannot encode, or None.

    ``os.listdir`` hands a non-UTF-8 file name back with surrogate escapes; such a string
    cannot go into a JSON label, a table row or ``index.json``.
    """
    for text in (str(record.path), *(v for v in record.labels().values() if isinstance(v, str))):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return text
    return None


def _shown(text: str) -> str:
    """``text`` as is when UTF-8 can encode it, else its ``repr`` (printable, JSON-safe)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return repr(text)


def _plan(listing: Listing) -> tuple[list[Record], list[Skip]]:
    """Records to encode (sorted by group, reader order kept within each) and the id skips."""
    skipped: list[Skip] = []
    records: list[Record] = []
    by_id: set[str] = set()
    by_key: dict[str, str] = {}
    for r in listing.records:
        if _not_utf8(r):
            skipped.append(Skip(_shown(str(r.path)), f"file name or label is not valid UTF-8 "
                                                     f"({_not_utf8(r)!r}); rename it to UTF-8 to shard it"))
            continue
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


def _publish(tmp: Path, out: Path, overwrite: bool, protected: list[tuple[str, Path]]) -> None:
    """Rename the finished ``tmp`` to ``out``, moving an old ``out`` aside first."""
    _check_out(out, overwrite, protected)  # again: OUT may have changed while we were encoding
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


def _unwritable(out: Path, e: OSError) -> str:
    """One line for an OS error while writing OUT: the path, what the errno means, what to do."""
    where = e.filename if e.filename else out
    return (f"cannot write OUT {out}: {where}: {os.strerror(e.errno)}; choose another OUT (a writable "
            f"directory with free space); nothing was published and temporary files were removed")


def _format_skips(skipped: list[Skip], limit: int | None) -> list[str]:
    shown = skipped if limit is None else skipped[:limit]
    lines = [f"  {s.input}: {s.reason}" for s in shown]
    if len(skipped) > len(shown):
        lines.append(f"  … and {len(skipped) - len(shown)} more")
    return lines


def build_shards(listing: Listing, out: Path, *, corpus: str, root: Path, sample_rate: int = 16000,
                 max_shard_mb: float = 256.0, max_shard_samples: int | None = None,
                 min_duration: float = 0.25, max_clipped: float = MAX_CLIPPED, workers: int = 1,
                 max_duration: float | None = None,
                 overwrite: bool = False, strict: bool = False, progress: bool = True,
                 reader: str | None = None) -> ShardIndex:
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
        max_duration: clips longer than this (seconds, by their header, before decoding) are
            skipped; None: no limit. Any length is encoded in bounded memory
            (``dser.shard_encoding.BLOCK_FRAMES``).
        max_clipped: clips with more than this share of samples past 16-bit full scale
            (float input above 0 dBFS) are skipped; below it they are clipped and counted.
        workers: encoding processes; the output is byte-identical for any value. They are
            spawned, so a script calling this with ``workers > 1`` needs the usual
            ``if __name__ == "__main__":`` guard.
        overwrite: replace an existing OUT: only an empty one, or one dser wrote (a dser
            ``index.json`` and nothing it does not list).
        strict: raise instead of publishing when any input was skipped.
        progress: show a tqdm bar (utterances/s, × real time) on stderr.
        reader: the ``dser shard`` reader that made ``listing`` (recorded, so that messages can
            name the command that rewrites OUT); defaults to ``corpus``.

    Returns:
        The published index.

    Raises:
        ShardError: a bad option; OUT exists (without ``overwrite``) or is not wholly a shard
            directory; OUT is or contains the current directory, $HOME, ROOT or an input; a group
            name unfit for a directory; nothing left to shard; ``strict`` with skipped inputs
            (naming them). OUT is untouched in every case.
    """
    _check_options(sample_rate, max_shard_mb, max_shard_samples, min_duration, max_duration, max_clipped, workers)
    out = Path(out).expanduser().absolute()
    protected = _protected(listing, root)
    _check_out(out, overwrite, protected)
    records, id_skips = _plan(listing)
    # A reader may name a non-UTF-8 file in a skip; shown by repr, it still prints and saves.
    skipped = [Skip(_shown(s.input), _shown(s.reason)) for s in listing.skipped] + id_skips
    tmp = _make_partial(out)
    options = {"reader": reader or corpus, "sample_rate": sample_rate, "max_shard_mb": max_shard_mb,
               "max_shard_samples": max_shard_samples, "min_duration": min_duration, "max_duration": max_duration,
               "max_clipped": max_clipped, "workers": workers, "overwrite": overwrite, "strict": strict}
    with _sigterm_stops():
        writer = _TarShardWriter(tmp, max_bytes=int(max_shard_mb * _MB), max_samples=max_shard_samples)
        started = time.monotonic()
        try:
            tasks = [(str(r.path), sample_rate, min_duration, max_clipped, max_duration) for r in records]
            _encode_into(writer, records, tasks, workers, skipped, desc=f"shard {corpus}", progress=progress)
            groups = writer.close()
            _check_outcome(groups, skipped, strict=strict, out=out, corpus=corpus, n_records=len(listing.records))
            index = ShardIndex(out, _index_data(groups, writer.records, skipped, corpus=corpus, root=root,
                                                sample_rate=sample_rate, options=options))
            index.save(tmp)  # last: a directory with index.json is a finished one
            _publish(tmp, out, overwrite, protected)
        except BaseException as e:
            writer.abort()
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and e.errno is not None:  # full disk, read-only or vanished OUT
                raise ShardError(_unwritable(out, e)) from None
            raise
    print(_summary(out, index, skipped, max_clipped, time.monotonic() - started))
    return index


def _make_partial(out: Path) -> Path:
    """Create OUT's parent and, in it, the hidden sibling ``.<OUT>.partial-<pid>`` to build in
    (noting any a killed run left there)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # a file where a directory of OUT's path should be
        raise ShardError(_unwritable(out, OSError(errno.ENOTDIR, "", e.filename))) from None
    except OSError as e:
        raise ShardError(_unwritable(out, e)) from None
    leftovers = sorted(out.parent.glob(f".{out.name}.partial-*"))
    if leftovers:
        print(f"note: {', '.join(map(str, leftovers))} left by an interrupted run; safe to delete",
              file=sys.stderr)
    try:
        return fresh_dir(out.parent / f".{out.name}.partial-{os.getpid()}")
    except OSError as e:
        raise ShardError(_unwritable(out, e)) from None


def _encode_into(writer: _TarShardWriter, records: list[Record], tasks: list[tuple], workers: int,
                 skipped: list[Skip], *, desc: str, progress: bool) -> None:
    """Encode each record (its ``tasks`` entry) and add it to ``writer``, in input order; an
    input that cannot be used goes to ``skipped`` with its reason. The tqdm bar (on stderr)
    counts utterances and shows the audio encoded per second of wall time (× real time)."""
    from tqdm import tqdm  # only the sharder draws progress bars

    started, audio_seconds, last_postfix = time.monotonic(), 0.0, 0.0
    # closing(): on an error, the pool is torn down now, not whenever GC gets to it.
    with closing(encode_all(tasks, workers)) as results, \
            tqdm(total=len(records), unit="utt", desc=desc, file=sys.stderr,
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


def _check_outcome(groups: dict[str, dict], skipped: list[Skip], *, strict: bool, out: Path, corpus: str,
                   n_records: int) -> None:
    """Refuse to publish under ``strict`` when an input was skipped (printing them all), or
    when no sample is left."""
    if strict and skipped:
        print("\n".join(["skipped inputs:", *_format_skips(skipped, None)]), file=sys.stderr)
        raise ShardError(f"--strict: {len(skipped)} input(s) skipped, so {out} was not written: "
                         + "; ".join(f"{s.input} ({s.reason})" for s in skipped[:_SHOW_SKIPS])
                         + (f"; … and {len(skipped) - _SHOW_SKIPS} more" if len(skipped) > _SHOW_SKIPS else ""))
    if not groups:
        reasons = "; ".join(f"{s.input} ({s.reason})" for s in skipped[:3])
        raise ShardError(f"nothing to shard for {corpus}: {n_records} record(s), "
                         f"{len(skipped)} input(s) skipped" + (f", e.g. {reasons}" if reasons else ""))


def _index_data(groups: dict[str, dict], records: dict[str, list[Record]], skipped: list[Skip], *, corpus: str,
                root: Path, sample_rate: int, options: dict) -> dict:
    """The ``index.json`` of a finished build (``dser-shards/2``, ``dser.schema``)."""
    all_records = [r for g in groups for r in records[g]]
    return {
        "format": FORMAT,
        "corpus": corpus,
        "root": str(Path(root).expanduser().absolute()),
        "dser_version": __version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "sample_rate": sample_rate,
        "options": options,
        "groups": groups,
        "totals": {"samples": len(all_records),
                   "hours": round(sum(s["seconds"] for g in groups.values() for s in g["shards"]) / 3600, 6),
                   "shards": sum(len(g["shards"]) for g in groups.values()),
                   "emotions": _label_counts(r.emotion for r in all_records),
                   "styles": _label_counts(r.style for r in all_records),
                   "clipped": {k: sum(g["clipped"][k] for g in groups.values()) for k in ("samples", "clips")}},
        "skipped": [{"input": s.input, "reason": s.reason} for s in skipped],
    }


def _summary(out: Path, index: ShardIndex, skipped: list[Skip], max_clipped: float, seconds: float) -> str:
    """What a finished build prints: per group its samples, hours and shards; clipping; skips."""
    t, groups = index.totals, index.data["groups"]
    lines = [f"wrote {out}: {len(groups)} group(s), {t['samples']} samples in {t['shards']} shard(s), "
             f"{t['hours']:.2f} h, in {seconds:.1f} s"]
    lines += [f"  {g}: {e['samples']} samples, {e['hours']:.2f} h, {len(e['shards'])} shard(s)"
              for g, e in groups.items()]
    clipped = t["clipped"]
    too_clipped = sum(s.reason.startswith("clipped:") for s in skipped)
    if clipped["clips"] or too_clipped:
        lines.append(f"clipped: {clipped['clips']} clip(s) kept with samples past full scale ({clipped['samples']} "
                     f"samples in all, counted per clip in the tables); {too_clipped} skipped over "
                     f"--max-clipped {max_clipped:g}")
    if skipped:
        lines.append(f"skipped {len(skipped)} input(s) (all listed in {out / INDEX_NAME}):")
        lines += _format_skips(skipped, _SHOW_SKIPS)
    lines.append(f"index: {out / INDEX_NAME}")
    return "\n".join(lines)
