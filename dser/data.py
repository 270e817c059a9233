"""The data loader: shards in, padded batches capped by audio seconds out.

Training and evaluation read the shards written by ``dser shard`` (``<group>/<group>-NNNNNN.tar``
holding ``<key>.flac`` + ``<key>.json``, and the group's per-sample table ``samples.jsonl``).
Decoding happens *after* the batches are planned, so planning (and skipping, on resume) costs
no audio. Indexed groups (directories ``dser shard`` wrote) are planned from their tables and
read by random access; loose ``.tar`` files (no index) are streamed::

    indexed groups ─indexed_set─▶ every kept sample's table row (label set, styles, required
        │   labels applied from the table; dser.indexed_set)
        ▼
    training: the global epoch plan (dser.global_plan; the same on every rank): shuffle by
        │   (seed, epoch), a crop window per clip, buckets under max_batch_seconds, batches
        │   dealt into steps of near-equal padded seconds, one batch per rank per step
    evaluation: every clip once in table order, cut to max_seconds, bucketed, batches dealt
        │   to the ranks in turn
        ▼
    this rank's batches (from ``skip`` on) ─ split by worker: worker p takes every K-th ─
        ShardReader: pread each clip's members at its row's offsets (an LRU of open shards) ─
        decode FLAC (soundfile, int16 → float32 / 32768) ─ resample (index rate → 16 kHz) ─
        crop as planned ─ pad ─▶ batch dict

    loose .tar files ─shuffle (seed, epoch)─▶ split by node (rank r takes r::W; training needs
        │   a tar per rank) ─ WebDataset: parse JSON only ─ filter ─ shuffle buffer ─ bucket by
        ▼   length (each rank on its own: no balance across ranks) ─ split by worker ─ decode …

Why a global plan: ranks wait for each other at every step, so a step lasts as long as its
slowest rank. Planned per rank, at 8 ranks with 15 s crops and a 160 s cap, a step's ranks
averaged 89 % of the slowest's padded seconds; planned for all ranks at once, 99 % (``dser
bench --only balance``). It also lets any number of ranks train on any number of shards (an
IEMOCAP session is one 150 MB shard) and gives every rank the same number of batches an epoch:
clips repeat only where a set is too small to fill whole steps otherwise (counted in each
batch's ``repeated`` and logged).

Why split by worker at the batch level: the rank's batch sequence is one plan that does not
depend on the number of workers, PyTorch's in-order round robin over workers hands it back
exactly in plan order, and resuming at batch ``n`` of an epoch is exact
(``make_loader(cfg, epoch=e, skip_batches=n)``) even with a different ``num_workers``. A worker
reads only its own batches' clips (random access; loose tars: every worker reads the rank's
tar bytes and decodes its share). A few workers per rank (2–4) are enough: one decodes and pads
well over 1000× real time.

Where the stages live: ``dser.shardfiles`` expands shard specs into the shards their indexes
list (and counts a set's clips without reading a tar), ``dser.indexed_set`` gathers a set's
table rows, ``dser.global_plan`` plans a training epoch, ``dser.shard_reader`` reads a row's
members, ``dser.planning`` plans loose tars (parse, filter, shuffle, bucket) and holds the
bucketing both paths use, and ``dser.workers`` starts the DataLoader workers and ends them with
their rank; this module holds the config, decoding and collating, the datasets and the loader,
and the training streams.

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
    epoch, index     int              where the batch sits: the epoch and its place in the rank's
                                      plan (training on indexed groups: the step)
    bad_samples      list[str]        "utt_id: reason" of corrupt samples left out since the
                                      previous batch (counted against train.max_bad_samples)
    repeated         int              clips of this batch that the epoch also plans elsewhere (a
                                      batch repeated so that every rank has one each step; 0 almost
                                      always; indexed training only)

A batch has ``B = 0`` only when every clip planned into it turned out corrupt; the recipe
should draw the next batch.

Resume: the consumer counts the batches it took in the current epoch; a loader made with
``make_loader(cfg, epoch=e, skip_batches=n)`` yields batch ``n`` of epoch ``e`` first, and the
same batches (clips, crops, order) an uninterrupted loader would. The global plan depends on
(seed, epoch, world size) alone; the loose-tar path's random crops draw from a generator seeded
by (seed, epoch, utt_id), its shuffles by (seed, epoch, rank), so nothing depends on how far
anybody skipped. ``BatchStream`` wraps this into an endless training
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

import io
import logging
import math
import os
import random
import zlib
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence, TypeVar

import numpy as np
import soundfile as sf
import soxr
import torch
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dser.global_plan import EpochPlan, PlannedClip, PlannedStepBatch, plan_epoch
from dser.indexed_set import IndexedGroup, IndexedSet, indexed_set
from dser.labels import STYLES, LabelSet, get_label_set
from dser.planning import Clip, PlannedBatch, Planner, bucket_by_length, shard_problem, shuffle_buffer
from dser.schema import IGNORE_INDEX, TableRow, duration_matches
from dser.shard_reader import SampleReadError, ShardReader
from dser.shardfiles import DataError, ShardFile, ranks_problem, shard_files
from dser.workers import end_with_rank, worker_context

log = logging.getLogger(__name__)


T = TypeVar("T")


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
        shuffle_buffer: compressed clips held for shuffling (training on loose tars only: the
            global plan shuffles the whole set).
        seed: seed for shard order, shuffles and crops.
        num_workers: DataLoader worker processes per rank (0 = in the calling process).
        prefetch_factor: batches each worker prepares ahead.
        pin_memory: pin batch tensors (only with CUDA).
        skip_damaged_shards: go on past a damaged shard (indexed groups: a sample whose
            members are not where its table row says; loose tars: a truncated or unreadable
            tar, its readable samples used), reporting the damage in ``bad_samples``, instead
            of failing; None: in training only (a test set read in part would give wrong
            metrics). Undecodable audio is always skipped and reported.
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

def _shard_error(exn: Exception) -> bool:
    """webdataset handler for evaluation: a shard that cannot be read stops with its name
    (a test set read in part would give wrong metrics)."""
    if isinstance(exn, DataError):  # raised here already, passing through an outer stage
        raise exn
    where, what = shard_problem(exn)
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

    def plan(self) -> Iterator[PlannedBatch]:
        """The rank's batches for the epoch, undecoded, in order."""
        cfg = self.cfg
        urls = epoch_shards(self.shards, cfg.seed, self.epoch, cfg.train)
        if self.rank >= len(urls):
            return
        # Node splitting only: workers split the plan's batches below, not the shards.
        planner = Planner(cfg, {url: f.sample_rate for url, f in self.listed.items()})
        skip_damage = cfg.train if cfg.skip_damaged_shards is None else cfg.skip_damaged_shards
        source = wds.WebDataset(urls, shardshuffle=False,
                                handler=planner.shard_damaged if skip_damage else _shard_error,
                                nodesplitter=partial(_take_every, start=self.rank, step=self.world_size),
                                workersplitter=None, empty_check=False)
        clips: Iterable[Clip] = planner.parse(source)
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
            yield PlannedBatch(clips_, bad)
        if planner.bad:  # corrupt samples after the last batch: nobody else will report them
            yield PlannedBatch([], planner.bad)
        self.shortfalls = self._shortfalls(urls[self.rank::self.world_size], planner)

    def _shortfalls(self, urls: list[str], planner: Planner) -> list[str]:
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

    def _load(self, clip: Clip) -> dict:
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


class PlannedStream(IterableDataset):
    """One epoch of one rank's planned batches, from batch ``skip`` on, read by random access
    and split across DataLoader workers.

    The main process plans (``epoch_plan`` in training, ``eval_plan`` in evaluation) and keeps
    this rank's batches from ``skip`` on, each clip as its table row, group, crop offset and
    length; worker ``p`` of ``K`` reads, decodes and pads the batches ``p, p + K, …`` of that
    list, so the DataLoader's round robin returns them in plan order. Nothing here scans a tar:
    each clip's members are read at the offsets its row records (``ShardReader``, one per group
    and worker, its files opened in the worker).
    """

    def __init__(self, cfg: LoaderConfig, found: IndexedSet, batches: Iterable[tuple[int, PlannedStepBatch]],
                 epoch: int):
        super().__init__()
        self.cfg, self.epoch = cfg, epoch
        self.groups: tuple[IndexedGroup, ...] = found.groups
        # (index, clips planned elsewhere too, ((group, row, offset, length), …)) per batch of this rank
        self.batches: list[tuple[int, bool, tuple[tuple[int, TableRow, int, int], ...]]] = [
            (index, b.repeat, tuple((found.group_of[c.index], found.rows[c.index], c.offset, c.length)
                                    for c in b.clips))
            for index, b in batches]

    def _load(self, readers: list[ShardReader], k: int, row: TableRow, offset: int, length: int) -> dict:
        cfg, group = self.cfg, self.groups[k]
        flac, sample = readers[k].read(row)
        pcm = decode_flac(flac, group.sample_rate)
        if not duration_matches(len(pcm), sample.duration, group.sample_rate):
            raise ValueError(f"its JSON duration says {sample.duration:.3f} s "
                             f"but the FLAC holds {len(pcm) / group.sample_rate:.3f} s")
        if group.sample_rate != cfg.sample_rate:  # as the streaming path: to the backbone's rate
            pcm = soxr.resample(pcm.astype(np.float32) / 32768, group.sample_rate, cfg.sample_rate, quality="HQ")
        n = min(len(pcm), length)
        start = min(offset, len(pcm) - n)  # the plan's offset, from the table's duration
        emotion = cfg.label_set.index(sample.emotion) if cfg.label_set is not None else None
        return {"audio": pcm[start: start + n], "utt_id": row.utt_id,
                "emotion": IGNORE_INDEX if emotion is None else emotion, "attributes": sample.attributes}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skip_damage = self.cfg.train if self.cfg.skip_damaged_shards is None else self.cfg.skip_damaged_shards
        readers = [g.reader() for g in self.groups]
        try:
            for step, repeat, clips in self.batches[worker::num_workers]:
                samples, bad = [], []
                for k, row, offset, length in clips:
                    try:
                        samples.append(self._load(readers, k, row, offset, length))
                    except SampleReadError as e:
                        if not skip_damage:
                            raise DataError(str(e)) from None
                        bad.append(f"{row.utt_id}: {e}")
                    except ValueError as e:
                        bad.append(f"{row.utt_id}: {e} (in {self.groups[k].directory / row.shard})")
                for b in bad:
                    log.warning("skipping corrupt sample %s", b)
                batch = collate(samples, self.cfg.sample_rate)
                batch.update(epoch=self.epoch, index=step, bad_samples=bad, repeated=len(clips) if repeat else 0)
                yield batch
        finally:
            for r in readers:
                r.close()


def epoch_plan(cfg: LoaderConfig, found: IndexedSet, epoch: int, world_size: int) -> EpochPlan:
    """The global plan of a training epoch of ``found`` with ``cfg``'s batching (the same on
    every rank).

    Raises:
        DataError: no clip kept (naming the filters), or fewer clips than ranks.
    """
    if not len(found):
        raise DataError(f"got no training clips from {cfg.shards}: none of their {found.listed} samples has "
                        f"{_wanted(cfg)}; check data.label_set, data.styles and data.require")
    return plan_epoch(found.durations, seed=cfg.seed, epoch=epoch, world_size=world_size,
                      max_seconds=cfg.max_seconds, max_batch_seconds=cfg.max_batch_seconds,
                      bucket_buffer=cfg.bucket_buffer, bucket_min_batches=cfg.bucket_min_batches,
                      sample_rate=cfg.sample_rate)


def eval_plan(cfg: LoaderConfig, found: IndexedSet, rank: int, world_size: int) -> list[PlannedStepBatch]:
    """Rank ``rank``'s evaluation batches of ``found``: every kept clip once, in table order,
    cut to its first ``max_seconds``, bucketed by length under the cap (``bucket_by_length``, as
    a stream would be), the batches dealt to the ranks in turn (rank ``r`` takes ``r::world_size``;
    a rank may get one batch fewer than another, or none)."""
    sr = cfg.sample_rate
    keep = None if cfg.max_seconds is None else int(round(cfg.max_seconds * sr))
    clips = [PlannedClip(i, 0, min(n, keep) if keep is not None else n)
             for i, n in enumerate(int(round(d * sr)) for d in found.durations)]
    cap = int(cfg.max_batch_seconds * sr)
    batches = bucket_by_length(clips, lambda c: c.length, cap, cfg.bucket_buffer, cfg.bucket_min_batches * cap)
    return [PlannedStepBatch(tuple(b)) for b in islice(batches, rank, None, world_size)]


def _wanted(cfg: LoaderConfig) -> str:
    styles = f" in styles {cfg.styles}" if cfg.styles else ""
    labels = {"emotion": f"a class of label set {cfg.label_set and cfg.label_set.name}",
              "attributes": "all three attributes", "any": "a class or all three attributes",
              None: "any labels"}[cfg.require]
    return labels + styles


def make_loader(cfg: LoaderConfig, *, epoch: int = 0, skip_batches: int = 0) -> DataLoader:
    """A DataLoader over one epoch of this rank's batches.

    Training on indexed groups (directories ``dser shard`` wrote) follows the global plan:
    every rank plans the whole epoch from the groups' tables, gets the same number of batches,
    and reads its own clips by random access. Evaluation, and training on loose ``.tar`` files
    (no index), stream the rank's share of the shards (``ShardStream``).

    Args:
        cfg: what to read and how to batch it.
        epoch: the epoch (shard order, shuffles and crops depend on it in training).
        skip_batches: start at this batch of the epoch; the skipped ones are planned but not
            decoded, and the rest are exactly those an uninterrupted loader yields.

    Returns:
        A ``torch.utils.data.DataLoader`` yielding batch dicts (see the module docstring).

    Raises:
        DataError: a shard spec matching nothing; in training, no clip kept, fewer clips than
            ranks, or (loose tars) fewer tars than ranks.
    """
    shards = shard_files(cfg.shards)
    rank, world_size = resolve_rank(cfg)
    if skip_batches < 0:
        raise DataError(f"skip_batches must be >= 0, got {skip_batches}")
    found = indexed_set(shards, cfg.label_set, cfg.styles, cfg.require)
    if found is not None and cfg.train:
        plan = epoch_plan(cfg, found, epoch, world_size)
        if plan.repeats and rank == 0:
            log.warning("epoch %d: %d clip(s) planned twice so that each of the %d ranks has a batch every step "
                        "(%d clips, %d steps)", epoch, plan.repeats, world_size, len(found), len(plan))
        dataset: IterableDataset = PlannedStream(cfg, found, plan.rank_batches(rank, start=skip_batches), epoch)
    elif found is not None:
        batches = list(enumerate(eval_plan(cfg, found, rank, world_size)))[skip_batches:]
        dataset = PlannedStream(cfg, found, batches, epoch)
    else:
        if cfg.train and len(shards) < world_size:
            raise DataError(ranks_problem(cfg.shards, world_size, 0, "data.train") or
                            f"{len(shards)} training shard(s) in {cfg.shards} for {world_size} ranks")
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
                      worker_init_fn=partial(end_with_rank, os.getpid()) if workers > 0 else None,
                      pin_memory=cfg.pin_memory and torch.cuda.is_available(), persistent_workers=False)


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
            fresh, clips = self.batches_done == 0, 0
            for batch in make_loader(self.cfg, epoch=self.epoch, skip_batches=self.batches_done):
                self.batches_done += 1
                clips += len(batch["utt_id"])
                yield batch
            if fresh and self.batches_done and not clips:  # else the stream would go round for ever
                rank, world = resolve_rank(self.cfg)
                raise DataError(f"rank {rank} of {world}: every clip of its {self.batches_done} batches of epoch "
                                f"{self.epoch} from {self.cfg.shards} was corrupt (see the warnings above); run "
                                f"`dser verify` on the shards")
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
        self.repeated = 0  # clips this rank was given twice in an epoch, to keep the ranks in step
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
            self.repeated += batch.get("repeated", 0)
            if batch["utt_id"]:
                batch["bad_samples"] = bad
                return batch

    def state_dict(self) -> dict:
        pos = {name: [s.epoch, s.batches_done] for name, s in self.streams.items()}
        return {"pos": {"main": [0, 0], "rehearsal": [0, 0], **pos}, "drawn": self.drawn,
                "bad_samples": list(self.bad_samples), "repeated": self.repeated}

    def load_state_dict(self, state: dict) -> "TrainStream":
        pos = state.get("pos", {})
        self.streams = {name: BatchStream(cfg, *pos.get(name, (0, 0))) for name, cfg in self.cfgs.items()
                        if cfg is not None}
        self.iters = {}
        self.drawn = int(state.get("drawn", 0))
        self.bad_samples = list(state.get("bad_samples", []))
        self.repeated = int(state.get("repeated", 0))
        return self
