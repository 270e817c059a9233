"""Random access to an indexed shard group: a sample's members read by the offsets its table row
records, without scanning a tar.

``dser shard`` records, in each group's ``samples.jsonl``, where every sample's ``<key>.flac``
and ``<key>.json`` members sit in their shard (``TableRow.flac`` / ``.json``: ``[offset, size]``
of header, data and padding). ``ShardReader`` reads a row's members with ``os.pread`` from a
small LRU of open shard files, checks them and returns the FLAC bytes and the parsed sample
JSON::

    TableRow ─▶ LRU of open fds (opened lazily, in the reading process) ─pread [offset, size)─▶
        tar header(s): checksum, name == <key>.<ext>, size fills the span ─▶ FLAC bytes ("fLaC")
        + JSON ─Sample.from_json─▶ compared with the row (utt_id, labels, duration ± 1 ms)

What it checks, and when: the 512-byte tar header that opens each member (its checksum, the
name ``<key>.flac`` / ``<key>.json``, a regular file whose data and padding fill the span the
table gives) on *every* read. The header lies inside the span read anyway, so the check costs a
header parse (microseconds, against milliseconds of FLAC decoding) and no extra I/O, and it
catches what a once-per-shard check cannot: a wrong offset in one row, a member overwritten in
the middle of a shard. The FLAC payload is checked only for its ``fLaC`` marker; damage inside
it is found by decoding (``dser.data.decode_flac``, FLAC's frame checksums) and by ``dser
verify`` (sha256 of every file).

A row's two members are read with one ``pread`` when they are adjacent, as ``dser shard``
writes them; ``read_many`` also joins consecutive rows that are adjacent in one shard (a plan
that reads a shard in order reads it sequentially, in large requests).

Errors a user can meet (a shard missing, cut short, or holding other bytes than its table
says) raise ``SampleReadError``: one line naming the shard, the key and what to do (``dser
verify``, re-shard). It is a ``DataError`` and so a ``ValueError``: the loader counts it as a
corrupt sample where it counts undecodable FLAC (``train.max_bad_samples``) and stops with it
where a set must be whole.

Processes: file descriptors are opened lazily by the process that reads and never cross a
fork. A reader made in the main process and handed to DataLoader workers (forkserver: pickled;
fork: copied) opens its own files there; a forked copy closes the descriptors it inherited
before opening any. One reader is for one thread.

Usage::

    reader = ShardReader("shards/iemocap/Session1", max_open=8)
    for row in reader.rows:
        flac, sample = reader.read(row)          # bytes, dser.schema.Sample
    for row, flac, sample in reader.read_many(reader.rows[10:20]):
        ...
    reader.close()

This module imports nothing heavy (no torch, no audio libraries).
"""

from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from dser.schema import (DURATION_TOLERANCE_S, INDEX_NAME, SAMPLE_FIELDS, Sample, SampleError, ShardError,
                         ShardIndex, TableRow, upgrade_command)
from dser.shardfiles import DataError

BLOCK = tarfile.BLOCKSIZE  # 512: a tar header, and the unit members are padded to
DEFAULT_MAX_OPEN = 8
# read_many joins adjacent rows into requests of at most this many bytes.
MAX_JOINED_BYTES = 4 << 20


class SampleReadError(DataError):
    """A sample's members cannot be read as its table row says (shard missing, cut short, other
    bytes at the recorded offset, a JSON that does not match the row). One line, naming the
    shard, the key and what to do; a ``ValueError``, so the loader counts it as a corrupt sample.

    Attributes:
        shard: the shard file.
        key: the sample's key (its members are ``<key>.flac``, ``<key>.json``).
    """

    def __init__(self, message: str, shard: Path | str = "", key: str = ""):
        super().__init__(message)
        self.shard, self.key = str(shard), key

    def __reduce__(self):  # DataLoader workers send errors back pickled
        return type(self), (str(self), self.shard, self.key)


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _pax_records(data: bytes) -> dict[str, str]:
    """The ``key=value`` records of a pax extended header's data (``"%d %s=%s\\n"`` each)."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"", b"\0"):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0:
            raise ValueError("a pax record of length 0")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def parse_member(span: bytes | memoryview, name: str) -> bytes:
    """The data of the tar member ``span`` holds, checked to be the regular file ``name`` whose
    header(s), data and padding fill ``span`` exactly.

    Args:
        span: a member as ``TableRow`` spans cover it: its header (after a pax extended header,
            when the writer needed one), its data, zero padding to a 512-byte block.
        name: the member name it must have (``<key>.flac``).

    Returns:
        The member's data.

    Raises:
        ValueError: what is wrong (a bad header checksum, another name, another size), for the
            caller to put in its message.
    """
    span = memoryview(span)
    try:
        info = tarfile.TarInfo.frombuf(bytes(span[:BLOCK]), "utf-8", "surrogateescape")
        start = BLOCK
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE):  # pax: path and size may live here
            records = _pax_records(bytes(span[BLOCK:BLOCK + info.size]))
            start = BLOCK + _padded(info.size)
            info = tarfile.TarInfo.frombuf(bytes(span[start:start + BLOCK]), "utf-8", "surrogateescape")
            info.name = records.get("path", info.name)
            info.size = int(records.get("size", info.size))
            start += BLOCK
    except (tarfile.HeaderError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"no tar header there ({e or type(e).__name__})") from None
    if info.name != name:
        raise ValueError(f"the tar header there names {info.name!r}, not {name!r}")
    if not info.isreg():
        raise ValueError(f"the tar header there is not a regular file ({name!r}, type {info.type!r})")
    if start + _padded(info.size) != len(span):
        raise ValueError(f"the tar header gives {name!r} {info.size} bytes, which do not fill the "
                         f"{len(span)} bytes the table gives it")
    return bytes(span[start:start + info.size])


def check_sample(sample: Sample, row: TableRow) -> None:
    """Whether a sample JSON is the one its table row describes: the same utt_id, speaker,
    emotion, style and labelled attributes, and a duration within ``DURATION_TOLERANCE_S``.

    Raises:
        ValueError: the first field that differs, with both values.
    """
    expected = TableRow.of(sample, row.key, row.shard, row.flac, row.json, row.clipped)
    for k in ("utt_id", "speaker", "emotion", "style", "attributes"):
        if getattr(expected, k) != getattr(row, k):
            raise ValueError(f"its JSON has {k} {getattr(expected, k)!r}, the table {getattr(row, k)!r}")
    if abs(sample.duration - row.duration) > DURATION_TOLERANCE_S:
        raise ValueError(f"its JSON has duration {sample.duration!r} s, the table {row.duration!r} s")


class ShardReader:
    """Reads one indexed shard group's samples by the offsets in its per-sample table.

    Attributes:
        directory: the group directory (``OUT/<group>``), where the shards named in rows are.
        rows: the group's table rows (``samples.jsonl``), in shard order.
        max_open: shard files kept open at most (least recently used closed first).
    """

    def __init__(self, directory: str | Path, rows: Sequence[TableRow] | None = None, *,
                 max_open: int = DEFAULT_MAX_OPEN, out: str | Path | None = None, reshard: str | None = None):
        """
        Args:
            directory: a group directory written by ``dser shard`` (``OUT/<group>``; its
                ``OUT/index.json`` must list it).
            rows: the group's table rows, already parsed; None reads ``samples.jsonl`` (checked,
                ``ShardIndex.table``).
            max_open: shard files kept open at most (>= 1).
            out, reshard: the shard directory and the command that rewrites it, for messages;
                found from the index when None.

        Raises:
            DataError: ``directory`` is not an indexed group, its table is unreadable, or
                ``max_open`` < 1.
        """
        if max_open < 1:
            raise DataError(f"ShardReader: max_open must be at least 1, got {max_open}")
        self.directory, self.max_open = Path(directory).absolute(), int(max_open)
        if rows is None or out is None or reshard is None:
            try:
                found = ShardIndex.find(self.directory)
            except ShardError as e:
                raise DataError(str(e)) from e
            if found is None or found[1] is None:
                raise DataError(f"{self.directory}: not a shard group directory (its parent holds no {INDEX_NAME} "
                                f"listing it); give OUT/<group> of a directory written by `dser shard`")
            index, group = found
            if rows is None:
                try:
                    rows = index.table(group)
                except ShardError as e:
                    raise DataError(str(e)) from e
            out = index.out if out is None else out
            reshard = upgrade_command(index.data, index.out) if reshard is None else reshard
        self.rows = list(rows)
        self.out, self.reshard = Path(out), reshard
        self._fds: OrderedDict[str, int] = OrderedDict()  # shard name → fd, least recently used first
        self._pid = os.getpid()

    @classmethod
    def of_index(cls, index: ShardIndex, group: str, **kw) -> "ShardReader":
        """The reader of ``group`` of an index already loaded (its table read and checked)."""
        try:
            rows = index.table(group)
        except ShardError as e:
            raise DataError(str(e)) from e
        return cls(index.out / group, rows, out=index.out, reshard=upgrade_command(index.data, index.out), **kw)

    # ---- open files ---------------------------------------------------------------------

    def __getstate__(self) -> dict:
        # Pickled for a forkserver/spawn worker: no descriptors travel; the worker opens its own.
        state = dict(self.__dict__)
        state["_fds"], state["_pid"] = OrderedDict(), None
        return state

    def _fd(self, row: TableRow) -> int:
        """The open descriptor of ``row``'s shard (opening it, closing the least recently used)."""
        if self._pid != os.getpid():
            # A forked copy: these descriptors are the parent's; close our copies, open our own.
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._pid = os.getpid()
        fd = self._fds.get(row.shard)
        if fd is not None:
            self._fds.move_to_end(row.shard)
            return fd
        path = self.directory / row.shard
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise self._error(row, "the shard is missing") from None
        except OSError as e:
            raise self._error(row, f"the shard cannot be opened ({e.strerror})") from None
        self._fds[row.shard] = fd
        while len(self._fds) > self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    @property
    def open_files(self) -> int:
        """Shard files this process holds open now."""
        return len(self._fds) if self._pid == os.getpid() else 0

    def close(self) -> None:
        """Close every shard file this process opened (the reader can still be used after)."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds.clear()
        self._pid = os.getpid()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except (AttributeError, TypeError, OSError):  # half-made, or at interpreter shutdown
            pass

    # ---- reading ------------------------------------------------------------------------

    def _error(self, row: TableRow, what: str) -> SampleReadError:
        shard = self.directory / row.shard
        return SampleReadError(f"{shard}: sample {row.key!r}: {what}; run `dser verify {self.out}`, and if it "
                               f"reports damage rewrite the shards with `{self.reshard}`", shard, row.key)

    def _pread(self, row: TableRow, offset: int, size: int) -> bytes:
        fd = self._fd(row)
        try:
            data = os.pread(fd, size, offset)
        except OSError as e:
            raise self._error(row, f"cannot be read ({e.strerror})") from None
        while 0 < len(data) < size:  # a short read before the end of the file (rare; NFS, signals)
            more = os.pread(fd, size - len(data), offset + len(data))
            if not more:
                break
            data += more
        if len(data) < size:
            end = os.fstat(fd).st_size
            raise self._error(row, f"the shard is cut short: it ends at byte {end}, the table puts the sample's "
                                   f"members up to byte {offset + size}")
        return data

    def _span(self, row: TableRow) -> tuple[int, int]:
        """Where ``row``'s members are: one range when adjacent (as dser writes them), else the FLAC's."""
        (fo, fs), (jo, js) = row.flac, row.json
        if jo == fo + fs:
            return fo, fs + js
        return fo, fs

    def _parse(self, row: TableRow, data: bytes | memoryview, offset: int) -> tuple[bytes, Sample]:
        """The FLAC bytes and sample of ``row`` from ``data``, the shard's bytes from ``offset``."""
        view = memoryview(data)
        (fo, fs), (jo, js) = row.flac, row.json
        try:
            flac = parse_member(view[fo - offset: fo - offset + fs], f"{row.key}.flac")
        except ValueError as e:
            raise self._error(row, f"its flac member at [{fo}, {fs}]: {e}") from None
        if not flac.startswith(b"fLaC"):
            raise self._error(row, f"its flac member at [{fo}, {fs}] does not start as FLAC does")
        if jo - offset + js <= len(view) and jo >= offset:
            json_span = view[jo - offset: jo - offset + js]
        else:
            json_span = memoryview(self._pread(row, jo, js))
        try:
            raw = parse_member(json_span, f"{row.key}.json")
        except ValueError as e:
            raise self._error(row, f"its json member at [{jo}, {js}]: {e}") from None
        try:
            sample = Sample.from_json(raw, required=SAMPLE_FIELDS)
            check_sample(sample, row)
        except SampleError as e:
            raise self._error(row, f"its JSON {e}") from None
        except ValueError as e:
            raise self._error(row, str(e)) from None
        return flac, sample

    def read(self, row: TableRow) -> tuple[bytes, Sample]:
        """One sample's FLAC bytes and sample JSON, checked against its table row.

        Args:
            row: a row of this group's table (``self.rows``).

        Returns:
            ``(flac, sample)``: the ``<key>.flac`` member's bytes, byte for byte as stored, and
            the ``<key>.json`` member parsed (``Sample.from_json``).

        Raises:
            SampleReadError: the shard is missing or cut short, a member header is not the one
                the row names, or the JSON does not parse or does not match the row.
        """
        offset, size = self._span(row)
        return self._parse(row, self._pread(row, offset, size), offset)

    def read_many(self, rows: Iterable[TableRow]) -> Iterator[tuple[TableRow, bytes, Sample]]:
        """``read`` for each row, in the given order; consecutive rows that are adjacent in one
        shard are read with one ``pread`` (up to ``MAX_JOINED_BYTES``), so a plan that walks a
        shard in order reads it sequentially.

        Yields:
            ``(row, flac, sample)`` per row.

        Raises:
            SampleReadError: as ``read``, at the row it concerns (the rows before it are yielded).
        """
        run: list[TableRow] = []
        for row in rows:
            if run:
                last = run[-1]
                start, _ = self._span(run[0])
                end = sum(self._span(last))
                o, s = self._span(row)
                if row.shard != last.shard or o != end or o + s - start > MAX_JOINED_BYTES:
                    yield from self._read_run(run)
                    run = []
            run.append(row)
        if run:
            yield from self._read_run(run)

    def _read_run(self, run: list[TableRow]) -> Iterator[tuple[TableRow, bytes, Sample]]:
        if len(run) == 1:
            yield (run[0], *self.read(run[0]))
            return
        start, _ = self._span(run[0])
        end = sum(self._span(run[-1]))
        try:
            data = self._pread(run[-1], start, end - start)
        except SampleReadError:  # cut short somewhere in the run: each row on its own says which
            for row in run:
                yield (row, *self.read(row))
            return
        for row in run:
            yield (row, *self._parse(row, data, start))

