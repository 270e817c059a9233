"""The streaming data loader: WebDataset shards in, padded batches capped by audio seconds out.

Training and evaluation read the shards written by ``dser shard`` (``<group>/<group>-NNNNNN.tar``
holding ``<key>.flac`` + ``<key>.json``) through one pipeline per rank. Decoding happens *after*
the batches are planned, so planning (and skipping, on resume) costs only tar reading::

    shard specs ─resolve_shards─▶ .tar paths ─shuffle (seed, epoch)─▶ split by node (rank)
        │   (training only)                    (every rank the same order; rank r takes r::W)
        ▼
    WebDataset: tar → {key.flac (bytes), key.json} ─ parse JSON only ─ filter: label set, style,
        │       required labels ─ shuffle buffer on compressed samples (training only)
        ▼
    bucket by length: a buffer sorted by (cropped) duration, cut into batches whose padded
        │       size B × T_max ≤ max_batch_seconds; batch order shuffled (training) or kept
        ▼
    the epoch's *plan*: batch 0, 1, 2, … — the same on every DataLoader worker of the rank
        │
        ▼  split by worker: of the plan from batch ``skip`` on, worker p takes every K-th
    decode FLAC (soundfile, int16 → float32 / 32768) ─ crop ─ pad ─▶ batch dict

Why split by worker at the batch level (every worker reads its rank's tars; each decodes a
1/K share of the batches) rather than at the shard level: the rank's batch sequence is then
one plan that does not depend on the number of workers, PyTorch's in-order round robin over
workers hands it back exactly in plan order, and resuming at batch ``n`` of an epoch is exact
(``make_loader(cfg, epoch=e, skip_batches=n)``) even after some workers ran dry, and even with a
different ``num_workers``. The cost is that every worker reads (not decodes) the rank's tar
bytes and holds its own shuffle and bucket buffers; workers walk the tars in step, so the page
cache serves most reads, and decoding dominates. A few workers per rank (2–4) are enough: one
decodes and pads well over 1000× real time.

Where a rank's number comes from: ``LoaderConfig.rank``/``world_size`` when set (tests
simulate ranks this way), else the initialised ``torch.distributed`` process group (as
``deepspeed.init_distributed`` makes), else the launcher's ``RANK``/``WORLD_SIZE`` variables,
else rank 0 of 1. It is resolved once, in the main process, because spawned workers have no
process group; webdataset 1.0.2's own ``split_by_node`` would read ``RANK`` first and
``torch.distributed`` only inside each worker.

Batch dict (what the loader yields; ``B`` clips, ``T`` = longest clip in samples at 16 kHz)::

    audio            (B, T) float32   waveforms in [-1, 1), zero after each clip's end
    attention_mask   (B, T) bool      True on real samples
    lengths          (B,)   long      real samples per clip
    emotion          (B,)   long      class index in the label set; -100 where the clip has no
                                      class in the set or there is no label set
    attributes       (B, 3) float32   valence, arousal, dominance in [0, 1]; NaN where unlabelled
    utt_id           list[str]        utterance ids, in row order
    duration_s       float            real audio seconds in the batch (for audio-seconds/s logs)
    epoch, index     int              where the batch sits: the epoch and its place in the plan
    bad_samples      list[str]        "utt_id: reason" of corrupt samples left out since the
                                      previous batch (counted against train.max_bad_samples)

A batch has ``B = 0`` only when every clip planned into it turned out corrupt; the recipe
should draw the next batch.

Resume: the consumer counts the batches it took in the current epoch; a loader made with
``make_loader(cfg, epoch=e, skip_batches=n)`` yields batch ``n`` of epoch ``e`` first, and the
same batches (clips, crops, order) an uninterrupted loader would. Random crops draw from a
generator seeded by (seed, epoch, utt_id), the shuffles by (seed, epoch, rank), so nothing
depends on how far anybody skipped. ``BatchStream`` wraps this into an endless training
iterator that tracks ``(epoch, batches_done)``; ``TrainStream``, the recipe's, mixes a second
(rehearsal) ``BatchStream`` into the first at a fixed share and never returns an empty batch.

Usage::

    cfg = LoaderConfig(shards=["shards/iemocap/Session1", "shards/iemocap/Session2"],
                       label_set="4class", max_seconds=6.0, max_batch_seconds=48.0, train=True)
    for batch in make_loader(cfg, epoch=0):
        batch["audio"]              # (B, T)
    stream = BatchStream(cfg)                          # endless, across epochs
    batch = next(iter(stream)); stream.state()         # {"epoch": 0, "batches_done": 1}
    mixed = TrainStream(cfg, rehearsal_cfg, share=0.2, seed=0)
    batch = mixed.next(); mixed.state_dict()           # both positions, for checkpoints
"""

from __future__ import annotations

import glob
import io
import logging
import math
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import random
import re
import select
import signal
import threading
import time
import zlib
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Sequence, TypeVar

import numpy as np
import soundfile as sf
import soxr
import torch
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dser.labels import STYLES, LabelSet, get_label_set
from dser.schema import (IGNORE_INDEX, INDEX_NAME, LABEL_KEYS, Sample, SampleError, ShardError, ShardIndex,
                         duration_matches)

log = logging.getLogger(__name__)


T = TypeVar("T")


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


@dataclass
class LoaderConfig:
    """What to read and how to batch it.

    Attributes:
        shards: shard groups: directories (all ``*.tar`` below, recursively), ``.tar`` files
            or globs.
        label_set: classes for ``emotion`` targets: a ``LabelSet``, a name (``4class``) or a
            list of emotions (see ``dser.labels.get_label_set``); None gives -100 everywhere.
        styles: keep only clips of these styles (``acted``, ``natural``); None keeps all.
        require: which labels a clip must have to be kept: ``emotion`` (a class in the label
            set), ``attributes`` (all of valence, arousal, dominance), ``any`` (either), or
            None (keep every clip, e.g. for prediction).
        max_seconds: clips longer than this are cut: a random window when training, the
            first ``max_seconds`` when evaluating; None keeps whole clips.
        max_batch_seconds: cap on padded audio per batch, B × T_max, in seconds.
        bucket_buffer: clips sorted by length together when planning batches.
        bucket_min_batches: the bucket buffer also holds at least this many batches' worth of
            audio, so padding stays small for any ``max_batch_seconds``.
        shuffle_buffer: compressed clips held for shuffling (training only).
        seed: seed for shard order, shuffles and crops.
        num_workers: DataLoader worker processes per rank (0 = in the calling process).
        prefetch_factor: batches each worker prepares ahead.
        pin_memory: pin batch tensors (only with CUDA).
        skip_damaged_shards: go on past a truncated or unreadable shard (its readable samples
            are used, the damage is reported in ``bad_samples``) instead of failing; None:
            in training only (a test set read in part would give wrong metrics).
        train: training (shuffle, random crops) or evaluation (fixed order, every clip once).
        sample_rate: the rate batches come at (the backbones' 16 kHz). Shards stored at another
            rate (their index says) are resampled to it with soxr; a loose tar's clips must be at
            this rate.
        rank, world_size: this process's rank and the number of ranks; None takes them from
            ``torch.distributed`` or ``RANK``/``WORLD_SIZE``.
    """

    shards: list[str] = field(default_factory=list)
    label_set: LabelSet | str | list[str] | None = None
    styles: list[str] | None = None
    require: Literal["emotion", "attributes", "any"] | None = "emotion"
    max_seconds: float | None = None
    max_batch_seconds: float = 48.0
    bucket_buffer: int = 200
    bucket_min_batches: int = 16
    shuffle_buffer: int = 500
    seed: int = 0
    num_workers: int = 1
    prefetch_factor: int = 2
    pin_memory: bool = False
    skip_damaged_shards: bool | None = None
    train: bool = True
    sample_rate: int = 16000
    rank: int | None = None
    world_size: int | None = None

    def __post_init__(self):
        if isinstance(self.shards, (str, Path)):
            self.shards = [str(self.shards)]
        if self.label_set is not None and not isinstance(self.label_set, LabelSet):
            try:
                self.label_set = get_label_set(self.label_set)
            except ValueError as e:
                raise DataError(f"data.label_set: {e}") from e
        if self.require not in ("emotion", "attributes", "any", None):
            raise DataError(f"data.require: {self.require!r} is not one of emotion, attributes, any, null")
        if self.require == "emotion" and self.label_set is None:
            raise DataError("data.require: 'emotion' needs a label set (data.label_set, e.g. 4class)")
        for s in self.styles or ():
            if s not in STYLES:
                raise DataError(f"data.styles: {s!r} is not one of {', '.join(STYLES)}")
        if not self.max_batch_seconds > 0:
            raise DataError(f"data.max_batch_seconds: must be positive, got {self.max_batch_seconds}")
        if self.max_seconds is not None:
            if not self.max_seconds > 0:
                raise DataError(f"data.max_seconds: must be positive or null, got {self.max_seconds}")
            if self.max_seconds > self.max_batch_seconds:
                raise DataError(f"data.max_seconds ({self.max_seconds}) exceeds data.max_batch_seconds "
                                f"({self.max_batch_seconds}): one clip would not fit in a batch")
        for key in ("bucket_buffer", "bucket_min_batches", "shuffle_buffer", "prefetch_factor", "sample_rate"):
            if getattr(self, key) < (0 if key in ("bucket_min_batches", "shuffle_buffer") else 1):
                raise DataError(f"data.{key}: {getattr(self, key)} is too small")
        if self.num_workers < 0:
            raise DataError(f"data.num_workers: {self.num_workers} is negative")
        if (self.rank is None) != (self.world_size is None):
            raise DataError("data.rank and data.world_size: give both or neither")
        if self.world_size is not None and not 0 <= self.rank < self.world_size:
            raise DataError(f"data.rank {self.rank} is not in [0, world_size={self.world_size})")


# ----------------------------------------------------------------------------------------
# shard lists
# ----------------------------------------------------------------------------------------

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
    """

    path: str
    group: str
    samples: int | None
    index: str | None = None
    sample_rate: int | None = None


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
                                   str((index.out / INDEX_NAME).resolve()), index.sample_rate))
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


def resolve_rank(cfg: LoaderConfig) -> tuple[int, int]:
    """``(rank, world_size)`` for splitting shards: the config's, the process group's, the
    launcher's environment, or (0, 1)."""
    if cfg.world_size is not None:
        return cfg.rank, cfg.world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def _seed(*parts: int) -> int:
    """A stable 64-bit seed from integers (unlike ``hash``, the same in every process)."""
    words = np.random.SeedSequence([p % (1 << 63) for p in parts]).generate_state(2, dtype=np.uint32)
    return int(words[0]) << 32 | int(words[1])


def _utt_hash(utt_id: str) -> int:
    return zlib.crc32(utt_id.encode("utf-8"))


def epoch_shards(shards: Sequence[str], seed: int, epoch: int, train: bool) -> list[str]:
    """The epoch's shard order: shuffled by (seed, epoch) for training, as given otherwise.
    Every rank computes the same order, so splitting it by rank covers each shard once."""
    shards = list(shards)
    if train:
        random.Random(_seed(seed, epoch, 0x5A4D)).shuffle(shards)
    return shards


def _take_every(src: Iterable[T], start: int, step: int) -> Iterator[T]:
    """``islice(src, start, None, step)`` as a webdataset pipeline stage."""
    return islice(src, start, None, step)


# ----------------------------------------------------------------------------------------
# planning: parse, filter, shuffle, bucket (no decoding)
# ----------------------------------------------------------------------------------------

@dataclass(slots=True)
class _Clip:
    """A parsed but not yet decoded sample."""

    utt_id: str
    flac: bytes
    url: str
    rate: int  # the stored audio's sample rate (its shard's index), decoded then resampled to the loader's
    duration: float  # seconds of stored audio, from the JSON
    full: int  # samples it has at the loader's rate, from the JSON duration
    length: int  # samples it will have in the batch (after cutting to max_seconds)
    emotion: int
    attributes: tuple[float, float, float]


@dataclass
class _PlannedBatch:
    clips: list[_Clip]
    bad: list[str]


MIN_REAL_FRACTION = 0.9  # least share of real (non-padded) audio in a batch with more than one clip


def cut_batches(lengths: Sequence[int], max_batch_samples: int,
                min_real_fraction: float = MIN_REAL_FRACTION) -> list[list[int]]:
    """Sort clips by length and cut the sorted run greedily into batches under a padded cap.

    Each batch takes the next-longest clips while ``len(batch) × longest ≤ max_batch_samples``
    and real audio stays at least ``min_real_fraction`` of the padded batch; a clip longer
    than the cap makes a batch of its own. The second rule matters where lengths are sparse
    (the short end of a buffer): without it a 0.6 s and a 1.7 s clip would share a batch
    padded to 1.7 s.

    Args:
        lengths: clip lengths (any unit, e.g. samples).
        max_batch_samples: cap on ``batch size × longest clip`` (same unit).
        min_real_fraction: least ``sum(lengths) / (batch size × longest)`` of every batch.

    Returns:
        Batches as lists of indices into ``lengths``, shortest clips first.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i in order:
        # Sorted ascending, so clip i is the batch's new longest.
        padded = (len(cur) + 1) * lengths[i]
        if cur and (padded > max_batch_samples or real + lengths[i] < min_real_fraction * padded):
            batches.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += lengths[i]
    if cur:
        batches.append(cur)
    return batches


def bucket_by_length(items: Iterable[T], length: Callable[[T], int], max_batch_samples: int,
                     buffer_size: int, min_buffer_length: int = 0,
                     rng: random.Random | None = None) -> Iterator[list[T]]:
    """Group a stream into batches of similar length, each under a padded-size cap.

    Items collect in a buffer until ``buffer_size`` new items and ``min_buffer_length`` total
    length have arrived; the buffer is then cut with ``cut_batches``. Batches holding less
    than half the cap in real audio (the longest, usually part-filled one, and short clips
    that found no neighbours of similar length) are carried into the next buffer rather than
    emitted underfull; the end of the stream flushes everything, so every item comes out
    exactly once.

    Args:
        items: the stream.
        length: an item's length (samples).
        max_batch_samples: cap on ``batch size × longest item``.
        buffer_size: new items sorted together with the carried ones.
        min_buffer_length: least total length in the buffer before cutting.
        rng: shuffles the batch order of each cut (training); None keeps shortest first.

    Yields:
        Lists of items.
    """
    buf: list[T] = []
    total, new = 0, 0
    for item in items:
        buf.append(item)
        total += length(item)
        new += 1
        if new >= buffer_size and total >= min_buffer_length:
            lengths = [length(x) for x in buf]
            batches, carried = [], []
            cut = cut_batches(lengths, max_batch_samples)
            for k, b in enumerate(cut):
                full = sum(lengths[i] for i in b) >= max_batch_samples / 2
                (batches if full and k < len(cut) - 1 else carried).append([buf[i] for i in b])
            buf = [x for b in carried for x in b]
            total, new = sum(length(x) for x in buf), 0
            if rng is not None:
                rng.shuffle(batches)
            yield from batches
    if buf:
        batches = [[buf[i] for i in b] for b in cut_batches([length(x) for x in buf], max_batch_samples)]
        if rng is not None:
            rng.shuffle(batches)
        yield from batches


def shuffle_buffer(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """Approximate shuffle of a stream: fill ``size`` items, then emit a random one per new item."""
    buf: list[T] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


class _Planner:
    """Turns raw tar samples into clips (JSON only) and filters them; notes corrupt ones."""

    def __init__(self, cfg: LoaderConfig, rates: dict[str, int | None] | None = None):
        self.cfg = cfg
        self.rates = rates or {}  # shard url → its stored rate (None or absent: the loader's)
        self.max_samples = None if cfg.max_seconds is None else int(round(cfg.max_seconds * cfg.sample_rate))
        self.styles = set(cfg.styles) if cfg.styles else None
        self.bad: list[str] = []
        self._damaged: set[str] = set()
        self.read: dict[str, int] = {}  # shard url → samples read from it with both members and a parsable JSON
        self.unreadable: dict[str, int] = {}  # shard url → samples noted in ``bad`` instead

    def shard_damaged(self, exn: Exception) -> bool:
        """webdataset handler for training: note a truncated or unreadable shard (once) and go
        on with the samples read before the damage and the next shard."""
        where, what = _shard_problem(exn)
        if where not in self._damaged:
            self._damaged.add(where)
            self.bad.append(f"{where}: damaged shard, samples after the damage are lost ({what}); "
                            f"run dser verify")
        return True

    def parse(self, samples: Iterable[dict]) -> Iterator[_Clip]:
        cfg = self.cfg
        for s in samples:
            key, url = s.get("__key__", "?"), s.get("__url__", "?")
            if "json" not in s or "flac" not in s:
                missing = "json" if "json" not in s else "flac"
                self.bad.append(f"{key}: no {key}.{missing} in {url}")
                self.unreadable[url] = self.unreadable.get(url, 0) + 1
                continue
            try:  # the shard contract has every label key (null when unlabelled)
                meta = Sample.from_json(s["json"], required=LABEL_KEYS)
            except SampleError as e:
                self.bad.append(f"{key}: unreadable {key}.json in {url} (the JSON {e})")
                self.unreadable[url] = self.unreadable.get(url, 0) + 1
                continue
            utt_id, duration = meta.utt_id or key, meta.duration
            self.read[url] = self.read.get(url, 0) + 1
            if self.styles is not None and meta.style not in self.styles:
                continue
            emotion = cfg.label_set.index(meta.emotion) if cfg.label_set is not None else None
            attributes = meta.attributes
            has_attrs = not any(math.isnan(v) for v in attributes)
            if cfg.require == "emotion" and emotion is None:
                continue
            if cfg.require == "attributes" and not has_attrs:
                continue
            if cfg.require == "any" and emotion is None and not has_attrs:
                continue
            full = int(round(duration * cfg.sample_rate))
            length = full if self.max_samples is None else min(full, self.max_samples)
            yield _Clip(utt_id, s["flac"], url, self.rates.get(url) or cfg.sample_rate, duration, full, length,
                        IGNORE_INDEX if emotion is None else emotion, attributes)


# ----------------------------------------------------------------------------------------
# decoding and collating
# ----------------------------------------------------------------------------------------

def decode_flac(data: bytes, sample_rate: int) -> np.ndarray:
    """Decode mono 16-bit FLAC bytes to int16 samples.

    Raises:
        ValueError: unreadable data, another sample rate, or more than one channel.
    """
    try:
        audio, sr = sf.read(io.BytesIO(data), dtype="int16", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(f"undecodable FLAC ({e})") from e
    if sr != sample_rate:
        raise ValueError(f"sample rate {sr} Hz, expected {sample_rate} Hz")
    if audio.ndim != 1:
        raise ValueError(f"{audio.shape[1]} channels, expected mono")
    return audio


def collate(samples: Sequence[dict], sample_rate: int = 16000) -> dict:
    """Pad clips into a batch dict (the layout in this module's docstring).

    Args:
        samples: dicts with ``audio`` (1-D int16 samples, scaled by 1/32768, or float32 in
            [-1, 1)), ``utt_id`` (str), and optionally ``emotion`` (int, default -100) and
            ``attributes`` (3 floats, NaN where unlabelled; default all NaN).
        sample_rate: the clips' rate, for ``duration_s``.

    Returns:
        The batch dict without the loader's bookkeeping keys (``epoch``, ``index``,
        ``bad_samples``).
    """
    b = len(samples)
    lengths = np.array([len(s["audio"]) for s in samples], dtype=np.int64)  # (B,)
    t = int(lengths.max()) if b else 0
    audio = np.zeros((b, t), dtype=np.float32)  # (B, T)
    for i, s in enumerate(samples):
        a = s["audio"]
        if a.dtype == np.int16:
            # x / 32768 is exact in float32 for every int16 x, so ×32768 recovers the PCM.
            np.multiply(a, np.float32(1 / 32768), out=audio[i, : len(a)], casting="unsafe")
        else:
            audio[i, : len(a)] = a
    lengths_t = torch.from_numpy(lengths)
    return {
        "audio": torch.from_numpy(audio),
        "attention_mask": torch.from_numpy(np.arange(t)[None, :] < lengths[:, None]),  # (B, T)
        "lengths": lengths_t,
        "emotion": torch.tensor([s.get("emotion", IGNORE_INDEX) for s in samples], dtype=torch.long),
        "attributes": torch.tensor([list(s.get("attributes", (math.nan,) * 3)) for s in samples],
                                   dtype=torch.float32).reshape(b, 3),
        "utt_id": [s["utt_id"] for s in samples],
        "duration_s": float(lengths.sum()) / sample_rate,
    }


# ----------------------------------------------------------------------------------------
# the dataset and the loader
# ----------------------------------------------------------------------------------------

def _shard_problem(exn: Exception) -> tuple[str, str]:
    """(shard path, what went wrong) of a webdataset read error."""
    url = next((a for a in reversed(exn.args) if isinstance(a, str) and a.endswith(".tar")), None)
    # webdataset reports some errors only as "… @ <_io.BufferedReader name='….tar'>"
    named = re.search(r"name='([^']+\.tar)'", str(exn))
    where = url or (named.group(1) if named else str(exn.args[0]) if exn.args else "a shard")
    what = str(exn.args[0] if exn.args else exn).split(" @ <")[0]
    return where, f"{type(exn).__name__}: {what}"


def _shard_error(exn: Exception) -> bool:
    """webdataset handler for evaluation: a shard that cannot be read stops with its name
    (a test set read in part would give wrong metrics)."""
    if isinstance(exn, DataError):  # raised here already, passing through an outer stage
        raise exn
    where, what = _shard_problem(exn)
    raise DataError(f"{where}: unreadable shard ({what}); re-create it with `dser shard`") from exn


class ShardStream(IterableDataset):
    """One epoch of one rank's batches, from batch ``skip`` on, split across DataLoader workers.

    Every worker plans the whole epoch (tar reading and JSON only) and decodes the batches
    ``skip + p, skip + p + K, …`` (worker ``p`` of ``K``), so the DataLoader's round robin
    returns them in plan order.
    """

    def __init__(self, cfg: LoaderConfig, shards: Sequence[str | ShardFile], rank: int, world_size: int,
                 epoch: int, skip: int):
        super().__init__()
        files = [f if isinstance(f, ShardFile) else ShardFile(str(f), str(f), None) for f in shards]
        self.cfg, self.shards = cfg, [f.path for f in files]
        self.listed = {f.path: f for f in files}
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = epoch, skip
        self.shortfalls: list[str] = []  # set when a plan has run: groups that yielded fewer samples than listed

    def plan(self) -> Iterator[_PlannedBatch]:
        """The rank's batches for the epoch, undecoded, in order."""
        cfg = self.cfg
        urls = epoch_shards(self.shards, cfg.seed, self.epoch, cfg.train)
        if self.rank >= len(urls):
            return
        # Node splitting only: workers split the plan's batches below, not the shards.
        planner = _Planner(cfg, {url: f.sample_rate for url, f in self.listed.items()})
        skip_damage = cfg.train if cfg.skip_damaged_shards is None else cfg.skip_damaged_shards
        source = wds.WebDataset(urls, shardshuffle=False,
                                handler=planner.shard_damaged if skip_damage else _shard_error,
                                nodesplitter=partial(_take_every, start=self.rank, step=self.world_size),
                                workersplitter=None, empty_check=False)
        clips: Iterable[_Clip] = planner.parse(source)
        rng = random.Random(_seed(cfg.seed, self.epoch, self.rank)) if cfg.train else None
        if rng is not None and cfg.shuffle_buffer > 1:
            clips = shuffle_buffer(clips, cfg.shuffle_buffer, rng)
        cap = int(cfg.max_batch_seconds * cfg.sample_rate)
        batches = bucket_by_length(clips, lambda c: c.length, cap, cfg.bucket_buffer,
                                   cfg.bucket_min_batches * cap, rng)
        for clips_ in batches:
            # Each batch carries the corrupt samples noted since the previous one, so exactly
            # one worker (the batch's) reports them.
            bad, planner.bad = planner.bad, []
            yield _PlannedBatch(clips_, bad)
        if planner.bad:  # corrupt samples after the last batch: nobody else will report them
            yield _PlannedBatch([], planner.bad)
        self.shortfalls = self._shortfalls(urls[self.rank::self.world_size], planner)

    def _shortfalls(self, urls: list[str], planner: _Planner) -> list[str]:
        """Groups whose shards yielded fewer samples than their index lists, one line each."""
        per_group: dict[str, list[int]] = {}
        for url in urls:
            listed = self.listed[url]
            if listed.samples is None:
                continue
            counts = per_group.setdefault(listed.group, [0, 0, 0])
            counts[0] += planner.read.get(url, 0)
            counts[1] += listed.samples
            counts[2] += planner.unreadable.get(url, 0)
        where = f"rank {self.rank}: " if self.world_size > 1 else ""
        return [f"{where}{group}: epoch {self.epoch} read {read} of the {listed} samples its index lists "
                f"({bad} unreadable, reported above; {listed - read - bad} never seen: a damaged or cut shard?); "
                f"run `dser verify`"
                for group, (read, listed, bad) in per_group.items() if read < listed]

    def _load(self, clip: _Clip) -> dict:
        cfg = self.cfg
        pcm = decode_flac(clip.flac, clip.rate)
        if not duration_matches(len(pcm), clip.duration, clip.rate):
            raise ValueError(f"its JSON duration says {clip.duration:.3f} s "
                             f"but the FLAC holds {len(pcm) / clip.rate:.3f} s")
        if clip.rate != cfg.sample_rate:  # shards at another rate: to the backbone's, as the sharder resamples
            pcm = soxr.resample(pcm.astype(np.float32) / 32768, clip.rate, cfg.sample_rate, quality="HQ")
        n = min(len(pcm), clip.length)
        start = 0
        if cfg.train and len(pcm) > n:
            start = random.Random(_seed(cfg.seed, self.epoch, _utt_hash(clip.utt_id))).randint(0, len(pcm) - n)
        return {"audio": pcm[start: start + n], "utt_id": clip.utt_id, "emotion": clip.emotion,
                "attributes": clip.attributes}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index, planned in enumerate(self.plan()):
            if index < self.skip or (index - self.skip) % num_workers != worker:
                continue
            samples, bad = [], list(planned.bad)
            for clip in planned.clips:
                try:
                    samples.append(self._load(clip))
                except ValueError as e:
                    bad.append(f"{clip.utt_id}: {e} (in {clip.url})")
            for b in bad:
                log.warning("skipping corrupt sample %s", b)
            if not planned.clips:  # the tail of corrupt samples: not a batch of the plan
                continue
            batch = collate(samples, self.cfg.sample_rate)
            batch.update(epoch=self.epoch, index=index, bad_samples=bad)
            yield batch
        if worker == 0:  # every worker planned the same epoch; one says what fell short
            for line in self.shortfalls:
                log.warning("%s", line)


def make_loader(cfg: LoaderConfig, *, epoch: int = 0, skip_batches: int = 0) -> DataLoader:
    """A DataLoader over one epoch of this rank's batches.

    Args:
        cfg: what to read and how to batch it.
        epoch: the epoch (shard order, shuffles and crops depend on it in training).
        skip_batches: start at this batch of the epoch; the skipped ones are planned but not
            decoded, and the rest are exactly those an uninterrupted loader yields.

    Returns:
        A ``torch.utils.data.DataLoader`` yielding batch dicts (see the module docstring).

    Raises:
        DataError: a shard spec matching nothing, or (training) fewer shards than ranks.
    """
    shards = shard_files(cfg.shards)
    rank, world_size = resolve_rank(cfg)
    if cfg.train and len(shards) < world_size:
        raise DataError(f"{len(shards)} training shard(s) in {cfg.shards} for {world_size} ranks: every rank "
                        f"needs at least one; write more, smaller shards with `dser shard`")
    if skip_batches < 0:
        raise DataError(f"skip_batches must be >= 0, got {skip_batches}")
    dataset = ShardStream(cfg, shards, rank, world_size, epoch, skip_batches)
    workers = cfg.num_workers
    # The DataLoader's default in-order delivery (round robin over the workers, skipping those
    # that ran dry) is what puts worker p's batches skip + p, skip + p + K, … back in plan order.
    # Its own generator: starting an iterator draws the workers' base seed, and drawing it from
    # torch's global generator would shift the model's dropout stream by where an epoch
    # starts, so a resumed run would diverge from an uninterrupted one.
    generator = torch.Generator().manual_seed(_seed(cfg.seed, epoch, rank, skip_batches))
    return DataLoader(dataset, batch_size=None, num_workers=workers, generator=generator,
                      prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
                      multiprocessing_context=worker_context() if workers > 0 else None,
                      worker_init_fn=partial(_end_with_rank, os.getpid()) if workers > 0 else None,
                      pin_memory=cfg.pin_memory and torch.cuda.is_available(), persistent_workers=False)


# What a rank stops on with a checkpoint (dser.train); the loader's helper processes block them.
STOP_SIGNALS = frozenset({signal.SIGUSR1, signal.SIGTERM})


def worker_context() -> multiprocessing.context.BaseContext:
    """How DataLoader workers start: forked from a forkserver, never from the rank itself.

    A rank is a threaded process by the time it evaluates (gloo's transport threads, the
    TensorBoard writer's thread on rank 0, CUDA's), and a fork copies only the calling thread:
    a lock another thread held at that moment stays held in the child for ever. A forked worker
    also inherits every open descriptor, the rendezvous store's listening socket among them: a
    worker that hung that way outlived its killed rank and held the job's rendezvous port, so the
    requeued job failed with EADDRINUSE on every restart. The forkserver is a fresh,
    single-threaded interpreter (started once per process, ~1 s, with ``dser.data`` and torch
    imported); each worker is a fork of it, and the dataset reaches it pickled.

    Slurm signals every process of a job step: ``--signal=USR1@…`` and ``scancel --signal``
    reach the workers, the forkserver and multiprocessing's resource tracker too, and SIGTERM
    comes before the kill. The rank checkpoints on those; the others must live on until it has
    (forked workers inherited the rank's handler; a fresh interpreter has the default: death).
    So the server and the tracker start with them blocked, a mask that their forks, the workers,
    inherit; blocked, not ignored, so a signal to the rank meanwhile waits for it and is not lost.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["dser.data"])  # no effect once the server runs: it has them
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        multiprocessing.resource_tracker.ensure_running()  # no-ops while they run
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # the tracker's start unblocked SIGTERM
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return ctx


def _end_with_rank(rank_pid: int, _worker_id: int) -> None:
    """``worker_init_fn``: the worker lives exactly as long as the rank that made it.

    torch's own watchdog ends a worker whose *parent* changed, and a worker's parent is now the
    forkserver, which outlives a killed rank for as long as any of its workers runs (each holds
    the server's keep-alive pipe): without a watch on the rank itself, SIGKILL of a rank left its
    workers and the server waiting for ever, holding the job's output pipe.

    The stop signals arrive blocked (``worker_context``) and wait in a thread of their own: the
    rank's SIGTERM (multiprocessing's ``terminate()``, at its exit or the loader's shutdown) ends
    the worker as it always did; anybody else's (Slurm's, a shell's), and USR1, are dropped, so
    the worker serves its rank while the rank checkpoints.
    """
    for watch in (_wait_then_exit, _take_stop_signals):
        threading.Thread(target=watch, args=(rank_pid,), name=f"dser-{watch.__name__}", daemon=True).start()


def _take_stop_signals(rank_pid: int) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == rank_pid:
            os._exit(128 + signal.SIGTERM)


def _wait_then_exit(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)  # readable once the process has ended (Linux 5.3+)
    except OSError:  # gone already (ProcessLookupError), or no pidfds here: poll
        while _alive(pid):
            time.sleep(1.0)
    else:
        select.select([fd], [], [])
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now has the pid: ours has ended
        return False
    return True


class BatchStream:
    """Endless batches of one loader config over epochs that knows where it is, for checkpoints.

    ``state()`` after taking a batch is ``{"epoch": e, "batches_done": n}``: n batches of
    epoch e consumed. ``BatchStream(cfg, **state)`` continues with the next one, as an
    uninterrupted stream would. Positions are per rank; a recipe saves every rank's.
    """

    def __init__(self, cfg: LoaderConfig, epoch: int = 0, batches_done: int = 0):
        self.cfg, self.epoch, self.batches_done = cfg, epoch, batches_done

    def state(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def __iter__(self) -> Iterator[dict]:
        while True:
            fresh = self.batches_done == 0
            for batch in make_loader(self.cfg, epoch=self.epoch, skip_batches=self.batches_done):
                self.batches_done += 1
                yield batch
            if fresh and self.batches_done == 0:
                rank, world = resolve_rank(self.cfg)
                raise DataError(f"rank {rank} of {world} got no training clips from {self.cfg.shards} in "
                                f"epoch {self.epoch}: check data.label_set, data.styles and data.require, "
                                f"and that there are more shards than ranks x data.num_workers")
            self.epoch, self.batches_done = self.epoch + 1, 0


class TrainStream:
    """The training recipe's batches: one ``BatchStream`` over the training groups and, with
    rehearsal (stage 2), a second over source-domain groups mixed in.

    Batch number ``n`` comes from the rehearsal stream with probability ``share``, drawn from a
    generator seeded by ``(seed, n)`` (``source(n)``), so a resumed run makes the same choices
    and the share does not depend on the data. A batch whose clips were all corrupt (``B = 0``)
    is never returned: the next one is drawn from the same stream, and the corrupt clips'
    descriptions travel in the returned batch's ``bad_samples``, which also collects them all
    in ``self.bad_samples``.

    ``state_dict()`` holds both positions, the batches drawn and the corrupt clips seen;
    ``load_state_dict`` continues from there exactly as an uninterrupted stream would.

    Usage::

        stream = TrainStream(train_cfg, rehearsal_cfg, share=0.2, seed=cfg.seed)
        batch = stream.next()
        state = stream.state_dict()                        # into the checkpoint
        TrainStream(train_cfg, rehearsal_cfg, 0.2, cfg.seed).load_state_dict(state)
    """

    def __init__(self, main: LoaderConfig, rehearsal: LoaderConfig | None = None, share: float = 0.0,
                 seed: int = 0):
        self.cfgs = {"main": main, "rehearsal": rehearsal}
        self.share, self.seed = share if rehearsal is not None else 0.0, seed
        self.drawn = 0
        self.bad_samples: list[str] = []
        self.streams: dict[str, BatchStream] = {}
        self.iters: dict[str, Iterator[dict]] = {}
        self.load_state_dict({})

    def source(self, n: int) -> str:
        """Which stream batch number ``n`` (0-based) comes from: ``main`` or ``rehearsal``."""
        if self.share <= 0:
            return "main"
        return "rehearsal" if np.random.default_rng([self.seed, 7919, n]).random() < self.share else "main"

    def next(self) -> dict:
        """The next non-empty batch (the batch dict above).

        Raises:
            DataError: this rank got no clip in a whole epoch of a stream.
        """
        which = self.source(self.drawn)
        self.drawn += 1
        bad: list[str] = []
        while True:
            if which not in self.iters:
                self.iters[which] = iter(self.streams[which])
            batch = next(self.iters[which])
            bad.extend(batch["bad_samples"])
            self.bad_samples.extend(batch["bad_samples"])
            if batch["utt_id"]:
                batch["bad_samples"] = bad
                return batch

    def state_dict(self) -> dict:
        pos = {name: [s.epoch, s.batches_done] for name, s in self.streams.items()}
        return {"pos": {"main": [0, 0], "rehearsal": [0, 0], **pos}, "drawn": self.drawn,
                "bad_samples": list(self.bad_samples)}

    def load_state_dict(self, state: dict) -> "TrainStream":
        pos = state.get("pos", {})
        self.streams = {name: BatchStream(cfg, *pos.get(name, (0, 0))) for name, cfg in self.cfgs.items()
                        if cfg is not None}
        self.iters = {}
        self.drawn = int(state.get("drawn", 0))
        self.bad_samples = list(state.get("bad_samples", []))
        return self
