"""Shard lists: which ``.tar`` files a set of shard specs names, and what their indexes count.

A shard spec is a group or corpus directory written by ``dser shard`` (read through its
``index.json``: exactly the shards it lists, each of the listed size), a ``.tar`` file, or a
glob of either. ``shard_files`` expands specs into the shards the loader reads; ``count_set``
counts a set's clips per class from the indexes alone, without reading a tar (the recipe's
start-up checks use it). The module imports no torch.

Usage::

    files = shard_files(["shards/iemocap/Session1", "shards/x/*.tar"])   # [ShardFile, …]
    paths = resolve_shards(["shards/iemocap"])                            # absolute .tar paths
    counts = count_set(["shards/iemocap/Session5"], get_label_set("4class"), None, "emotion")
    counts.clips, counts.classes                                          # kept clips, clips per class
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from dser.labels import LabelSet
from dser.schema import INDEX_NAME, ShardError, ShardIndex

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Shards or loader settings the user must fix; the message names the file or key."""

    def __init__(self, message: str = ""):
        # Raised in a DataLoader worker, it comes back re-made from torch's "Caught DataError
        # in DataLoader worker process N. Original Traceback …"; keep the one line that matters.
        if message.startswith("Caught DataError"):
            message = message.rstrip().splitlines()[-1].split("DataError: ", 1)[-1]
        super().__init__(message)

    def __str__(self) -> str:
        # webdataset appends the stream and the URL to the args of an error passing through its
        # tar reader (printed as a Python tuple); the message is the first.
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ShardFile:
    """One shard to read, and what its index says about it.

    Attributes:
        path: absolute path of the ``.tar``.
        group: where it belongs, for messages: ``<shard dir>/<group>`` or the loose spec.
        samples: samples its index lists (None for a loose tar: no index).
        index: the ``index.json`` that lists it (None for a loose tar).
        sample_rate: the rate its audio is stored at, from the index (None for a loose tar: it
            must be the loader's ``sample_rate``).
        group_name: its group's name in the index (None for a loose tar).
    """

    path: str
    group: str
    samples: int | None
    index: str | None = None
    sample_rate: int | None = None
    group_name: str | None = None


_LOOSE_NOTED: set[str] = set()


def _indexed_files(directory: Path, spec: str) -> list[ShardFile] | None:
    """The shards a directory's index lists (all groups for a corpus directory, one for a group
    directory), sizes checked and unlisted tars refused; None when no index governs it."""
    try:
        found = ShardIndex.find(directory)
    except ShardError as e:
        raise DataError(f"shard spec {spec!r}: {e}") from e
    if found is None:
        return None
    index, group = found
    groups = index.groups if group is None else [group]
    listed = {index.out / s["path"] for g in groups for s in index.group(g)["shards"]}
    for path in sorted(directory.rglob("*.tar")):
        if path not in listed:
            raise DataError(f"{path}: a .tar that {index.out / INDEX_NAME} does not list; move it out of {directory} "
                            f"(dser reads exactly the shards its index lists), or re-shard")
    files = []
    for g in groups:
        for s in index.group(g)["shards"]:
            path = index.out / s["path"]
            if not path.is_file():
                raise DataError(f"{path}: listed in {index.out / INDEX_NAME} but missing; run `dser verify {index.out}`")
            if path.stat().st_size != s["bytes"]:
                raise DataError(f"{path}: {path.stat().st_size} bytes, {index.out / INDEX_NAME} says {s['bytes']}; "
                                f"run `dser verify {index.out}`")
            files.append(ShardFile(str(path.resolve()), f"{index.out}/{g}", int(s["samples"]),
                                   str((index.out / INDEX_NAME).resolve()), index.sample_rate, g))
    return files


def _spec_matches(spec: str | Path) -> list[Path]:
    """The paths a shard spec names: a glob's matches (sorted), or the path itself.

    Raises:
        DataError: a plain path that does not exist.
    """
    text = os.path.expanduser(str(spec))
    if glob.has_magic(text):
        return [Path(m) for m in sorted(glob.glob(text, recursive=True))]
    if os.path.exists(text):
        return [Path(text)]
    raise DataError(f"shard spec {str(spec)!r}: no such file or directory "
                    f"(give shard group directories, .tar files or globs; make shards with `dser shard`)")


def shard_files(specs: Sequence[str | Path]) -> list[ShardFile]:
    """Expand shard specs into the shards to read, in spec order, duplicates dropped.

    A directory is read through the index that governs it (``D/index.json`` for a corpus
    directory, ``D/../index.json`` for a group directory): exactly the shards it lists, each
    of the listed size; a ``.tar`` under D that the index does not list is an error. A glob
    matching directories reads each the same way. ``.tar`` files named explicitly (or matched
    by a glob) are read as they are, without an index, and a one-line note says so.

    Args:
        specs: group or corpus directories, ``.tar`` files, or globs (``shards/iemocap/Session[1-4]``,
            ``shards/x/*.tar``); ``~`` is expanded.

    Raises:
        DataError: a spec that matches no shard, a directory no dser index governs, an old or
            unreadable index, an unlisted, missing or resized shard — naming it.
    """
    if isinstance(specs, (str, Path)):
        specs = [specs]
    out: list[ShardFile] = []
    seen: set[str] = set()
    for spec in specs:
        matches = _spec_matches(spec)
        found: list[ShardFile] = []
        loose = 0
        for m in matches:
            if m.is_dir():
                files = _indexed_files(m.absolute(), str(spec))
                if files is None:
                    raise DataError(f"shard spec {str(spec)!r}: {m} has no {INDEX_NAME} in it or its parent, so no "
                                    f"dser index says what to read there; make it with `dser shard`, or name the "
                                    f"tars ({m}/*.tar) to read them as they are")
                found.extend(files)
            elif m.is_file() and m.suffix == ".tar":
                found.append(ShardFile(str(m.resolve()), str(spec), None))
                loose += 1
        if not found:
            raise DataError(f"shard spec {str(spec)!r} matches no .tar shards; "
                            f"point it at a directory written by `dser shard` or at .tar files")
        if loose and str(spec) not in _LOOSE_NOTED:
            _LOOSE_NOTED.add(str(spec))
            log.warning("shard spec %r: %d loose .tar file(s) read as they are (no index: no listed counts, no "
                        "size checks, no balance guarantees)", str(spec), loose)
        for f in found:
            if f.path not in seen:
                seen.add(f.path)
                out.append(f)
    return out


def resolve_shards(specs: Sequence[str | Path]) -> list[str]:
    """The absolute ``.tar`` paths of ``shard_files(specs)``, in order."""
    return [f.path for f in shard_files(specs)]


@dataclass
class SetCounts:
    """What a set of shard specs holds for a run, counted from the shard indexes.

    Attributes:
        clips: clips the loader would keep (label set, styles and ``require`` applied), over
            the indexed groups.
        classes: clips per class of the label set (every class, 0 included); empty without one.
        groups: the indexed groups counted (``<shard dir>/<group>``).
        loose: specs read without an index (their clips are not counted).
    """

    clips: int = 0
    classes: dict[str, int] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)
    loose: list[str] = field(default_factory=list)
    emotions: dict[str, int] = field(default_factory=dict)  # "emotion/style" → clips, before any filter

    def holds(self, limit: int = 6) -> str:
        """What the groups hold, most common first: ``"fear/acted 12, neutral/natural 3"``."""
        top = sorted(self.emotions.items(), key=lambda kv: (-kv[1], kv[0]))
        text = ", ".join(f"{k} {v}" for k, v in top[:limit])
        return (text + (f", … {len(top) - limit} more" if len(top) > limit else "")) or "no clips"


def count_set(specs: Sequence[str | Path], label_set: LabelSet | None, styles: Sequence[str] | None,
              require: str | None) -> SetCounts:
    """Count a set's clips per class from its indexes (emotion × style and attribute counts), as
    the loader would keep them, without reading a tar.

    Raises:
        DataError: as ``shard_files`` (a spec matching nothing, an old index, …).
    """
    counts = SetCounts(classes={c: 0 for c in label_set.classes} if label_set is not None else {})
    seen: set[tuple[str, str]] = set()
    keep = set(styles) if styles else None
    for spec in [specs] if isinstance(specs, (str, Path)) else specs:
        for m in _spec_matches(spec):
            found = None
            if m.is_dir():
                try:
                    found = ShardIndex.find(m.absolute())
                except ShardError as e:
                    raise DataError(f"shard spec {str(spec)!r}: {e}") from e
            if found is None:
                if str(spec) not in counts.loose:
                    counts.loose.append(str(spec))
                continue
            index, group = found
            for g in index.groups if group is None else [group]:
                if (str(index.out), g) in seen:
                    continue
                seen.add((str(index.out), g))
                counts.groups.append(f"{index.out}/{g}")
                entry = index.group(g)
                labelled = 0
                for emotion, per_style in entry["emotion_style"].items():
                    for st, v in per_style.items():
                        counts.emotions[f"{emotion}/{st}"] = counts.emotions.get(f"{emotion}/{st}", 0) + v
                    n = sum(v for st, v in per_style.items() if keep is None or st in keep)
                    k = label_set.index(None if emotion == "null" else emotion) if label_set is not None else None
                    if k is not None:
                        counts.classes[label_set.classes[k]] += n
                        labelled += n
                attributed = sum(a["all"] for st, a in entry["attributes"].items() if keep is None or st in keep)
                every = sum(v for per in entry["emotion_style"].values() for st, v in per.items()
                            if keep is None or st in keep)
                # "any" keeps a clip with a class or all attributes: at least the larger count.
                counts.clips += {"emotion": labelled, "attributes": attributed,
                                 "any": max(labelled, attributed), None: every}[require]
    return counts


def ranks_problem(specs: Sequence[str | Path], world_size: int, clips: int, key: str = "data.train") -> str | None:
    """Whether a training set can feed ``world_size`` ranks, as the loader will read it.

    A set of indexed groups only is planned globally (``dser.global_plan``): any number of
    ranks works on any number of shards while there is a clip for every rank. A set with a
    loose ``.tar`` (no index) streams, its tars split across ranks: it needs a tar per rank.

    Args:
        specs: the set's shard specs.
        world_size: ranks that will train.
        clips: the set's clips after its filters (``count_set(...).clips``; loose tars uncounted).
        key: the config key, for the message.

    Returns:
        One line saying what is wrong and what to do, or None when the set fits.

    Raises:
        DataError: as ``shard_files``.
    """
    files = shard_files(specs)
    loose = [f for f in files if f.index is None]
    if loose:
        if len(files) < world_size:
            return (f"config.{key}: {len(files)} shard(s), {len(loose)} of them loose .tar files (no index), for "
                    f"{world_size} ranks: a set with loose tars streams them split across ranks, at least one each; "
                    f"give the directories `dser shard` wrote instead (read through their index, any number of "
                    f"ranks works), or run on at most {len(files)} rank(s)")
        return None
    if clips < world_size:
        return (f"config.{key}: {clips} clip(s) for {world_size} ranks, and every rank needs a clip each step; "
                f"add groups to {key} or run on at most {max(clips, 1)} rank(s)")
    return None
