"""A set of indexed shard groups as the global plan sees it: every kept sample's table row, in
one list, with the group that holds it.

``dser shard`` writes a per-sample table beside each group (``samples.jsonl``: utt_id, labels,
duration, shard and the member offsets). A training set of indexed groups is planned from these
tables alone (``dser.global_plan``) and read by random access (``dser.shard_reader``), so no tar
is opened before the plan is made::

    shard specs ─shard_files─▶ the listed shards (sizes checked) ─▶ their (index, group) pairs
        ─ShardIndex.table─▶ rows ─ label set, styles, required labels ─▶ IndexedSet
              (rows[i], its group's reader, durations[i]: sample i of the plan)

The filters are the loader's (``dser.planning.Planner.parse`` applies the same to a stream):
a clip is kept when its style is in ``styles`` and it has the labels ``require`` asks for (a
class of the label set, all three attributes, either, or nothing). The table has the emotion
and which attributes are labelled, so the filters need no sample JSON.

Tables are cached per process by (path, size, mtime): a training stream makes a loader every
epoch, and a table of 100 000 rows takes about a second to parse.

Usage::

    found = indexed_set(["shards/iemocap/Session1", "shards/iemocap/Session2"], label_set, None, "emotion")
    found.rows[i], found.readers[found.group_of[i]], found.durations[i]

The module imports no torch.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dser.labels import LabelSet
from dser.schema import ATTRIBUTES, INDEX_NAME, ShardError, ShardIndex, TableRow, upgrade_command
from dser.shard_reader import ShardReader
from dser.shardfiles import DataError, ShardFile, shard_files

_ALL_ATTRIBUTES = frozenset(ATTRIBUTES)
_TABLE_CACHE: OrderedDict[tuple, list[TableRow]] = OrderedDict()
_TABLE_CACHE_SIZE = 32  # groups; IEMOCAP has 5, MSP-Podcast a handful


@dataclass(frozen=True)
class IndexedGroup:
    """One indexed group of a set.

    Attributes:
        name: ``<shard dir>/<group>``, for messages.
        directory: the group directory (where its shards and table are).
        out: the shard directory (the one holding ``index.json``).
        sample_rate: the rate its audio is stored at (the index's).
        reshard: the command that rewrites the shard directory, for messages.
    """

    name: str
    directory: Path
    out: Path
    sample_rate: int
    reshard: str

    def reader(self, max_open: int = 8) -> ShardReader:
        """A reader of this group's samples by their rows (no table read: the rows come with the plan)."""
        return ShardReader(self.directory, (), max_open=max_open, out=self.out, reshard=self.reshard)


@dataclass(frozen=True)
class IndexedSet:
    """The kept samples of a set of indexed groups.

    Attributes:
        groups: the set's groups, in spec order.
        rows: the kept samples' table rows, group by group in table order; sample ``i`` of a plan
            made from ``durations`` is ``rows[i]``.
        group_of: ``group_of[i]`` is the index in ``groups`` of the group holding ``rows[i]``.
        listed: samples the groups' indexes list, before the filters.
    """

    groups: tuple[IndexedGroup, ...]
    rows: tuple[TableRow, ...]
    group_of: tuple[int, ...]
    listed: int

    @property
    def durations(self) -> list[float]:
        """Each kept sample's seconds, from its table row."""
        return [r.duration for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)


def keeps(row: TableRow, label_set: LabelSet | None, styles: set[str] | None, require: str | None) -> bool:
    """Whether the loader keeps the sample of ``row`` (``Planner.parse``'s filters, from the table)."""
    if styles is not None and row.style not in styles:
        return False
    in_set = label_set is not None and label_set.index(row.emotion) is not None
    has_attributes = _ALL_ATTRIBUTES <= set(row.attributes)
    return {"emotion": in_set, "attributes": has_attributes, "any": in_set or has_attributes, None: True}[require]


def _table(index: ShardIndex, group: str) -> list[TableRow]:
    """``index.table(group)``, from the cache while the file is unchanged."""
    path = index.table_path(group)
    try:
        st = os.stat(path)
        key = (str(path), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _TABLE_CACHE:
        _TABLE_CACHE.move_to_end(key)
        return _TABLE_CACHE[key]
    try:
        rows = index.table(group)
    except ShardError as e:
        raise DataError(str(e)) from e
    if key is not None:
        _TABLE_CACHE[key] = rows
        while len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    return rows


def _group_rows(index: ShardIndex, group: str) -> list[TableRow]:
    """A group's table, checked against its index: a row per listed sample, each in a listed shard."""
    rows = _table(index, group)
    entry = index.group(group)
    listed = sum(int(s["samples"]) for s in entry["shards"])
    where = index.table_path(group)
    if len(rows) != listed:
        raise DataError(f"{where}: {len(rows)} rows, but {index.out / INDEX_NAME} lists {listed} samples in group "
                        f"{group!r}; run `dser verify {index.out}`, and rewrite the shards with "
                        f"`{upgrade_command(index.data, index.out)}` if it reports damage")
    shards = {Path(s["path"]).name for s in entry["shards"]}
    for n, row in enumerate(rows, 1):
        if row.shard not in shards:
            raise DataError(f"{where}: line {n} puts {row.key!r} in {row.shard!r}, which {index.out / INDEX_NAME} "
                            f"does not list for group {group!r}; run `dser verify {index.out}`")
    return rows


def indexed_set(specs: Sequence[str | Path] | Sequence[ShardFile], label_set: LabelSet | None,
                styles: Sequence[str] | None, require: str | None) -> IndexedSet | None:
    """The kept samples of ``specs`` when every spec is an indexed group or corpus directory.

    Args:
        specs: shard specs (or the ``ShardFile`` list ``shard_files`` made of them).
        label_set, styles, require: the loader's filters (``LoaderConfig``).

    Returns:
        The ``IndexedSet``, or None when a spec names loose ``.tar`` files (no index: such a set
        streams).

    Raises:
        DataError: as ``shard_files``; a table that is missing, unreadable, or disagrees with its
            index (naming it and ``dser verify``).
    """
    files = list(specs) if specs and all(isinstance(f, ShardFile) for f in specs) else shard_files(specs)
    if any(f.index is None for f in files):
        return None
    pairs: list[tuple[str, str]] = []  # (index.json, group) in the order of their first shard
    for f in files:
        pair = (f.index, f.group_name)
        if pair not in pairs:
            pairs.append(pair)
    indexes: dict[str, ShardIndex] = {}
    groups, rows, group_of, listed = [], [], [], 0
    keep_styles = set(styles) if styles else None
    for index_path, group in pairs:
        if index_path not in indexes:
            try:
                indexes[index_path] = ShardIndex.load(Path(index_path).parent)
            except ShardError as e:
                raise DataError(str(e)) from e
        index = indexes[index_path]
        k = len(groups)
        groups.append(IndexedGroup(f"{index.out}/{group}", index.out / group, index.out, index.sample_rate,
                                   upgrade_command(index.data, index.out)))
        table = _group_rows(index, group)
        listed += len(table)
        for row in table:
            if keeps(row, label_set, keep_styles, require):
                rows.append(row)
                group_of.append(k)
    return IndexedSet(tuple(groups), tuple(rows), tuple(group_of), listed)
