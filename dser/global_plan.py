"""The global epoch plan: every rank computes the same plan of an epoch's training batches from
the training set's per-sample durations, then reads only the batches the plan gives it.

Planned per rank, on the shards each was dealt (``dser.planning`` over ``ShardStream``, what
loose tars still get), ranks wait at every step for the one with the most padded audio, and a
set with fewer shards than ranks cannot be trained on. Here the whole set is planned at once,
from the durations in the shard index's per-sample table (``TableRow.duration``), so any number
of ranks works on any number of shards. ``dser.data.make_loader`` plans every training epoch of
indexed groups this way (``dser.indexed_set`` gives it the rows)::

    durations (the set's table, sample i = the set's i-th row)
        │  permutation by (seed, epoch); crop length min(duration, max_seconds) per clip
        ▼
    windows of ``bucket_buffer`` clips (and ``bucket_min_batches`` batches' worth of audio):
        │  sorted by length and cut under ``max_batch_seconds`` (``bucket_by_length``, the
        │  per-rank planner's own rules: the cap, 90 % real audio, underfull batches carried)
        ▼
    the batch of most clips split in two until the batches fill whole steps; batches sorted
        │  by padded seconds (B × T_max) and the sorted run dealt into steps of ``world_size``
        │  neighbours (repeats fill the last step only where every batch is one clip already)
        ▼
    step order shuffled, ranks shuffled within each step ─▶ EpochPlan: batch(step, rank)

Why sort the batches of the whole epoch by padded seconds: a step lasts as long as its slowest
rank, so each step should hold batches of near-equal padded seconds; neighbours in the sorted
run are, and shuffling the steps afterwards keeps the epoch's order random (no curriculum).
Batch *contents* stay as random as the per-rank planner's: each batch is cut from one shuffled
window of ``bucket_buffer`` clips. The shuffle is a full permutation, not a buffer: with the
table in hand nothing has to stream, so ``data.shuffle_buffer`` plays no part. How even the
steps come out (``dser bench --only balance``): on 20 000 IEMOCAP-like lengths with 15 s crops
and a 160 s cap, a step's 8 ranks average 99.4 % of its largest batch (per-rank planning:
89.4 %). What is left are the batches the 90 % real-audio rule leaves underfull where lengths
are sparse; they make the smallest steps, so an epoch of few steps weighs them more (3 300
clips, 15 steps at 8 ranks: 93.4 %).

Crops are planned too, so the reader crops exactly as planned: a clip longer than
``max_seconds`` keeps the window ``[offset, offset + length)`` of its samples, with ``offset``
drawn uniformly from the clip's own (seed, epoch, index) by a counter-based hash, so it does not
depend on the set's size, the order or the ranks. Offsets are computed from the table's
duration; a reader whose decoded clip is a few samples shorter clamps the offset to it.

Batches are addressed by ``(epoch, step)``: resuming after ``k`` steps is
``plan.rank_batches(rank, start=k)``, and every rank holds the same plan (nothing here depends
on the rank). The module imports no torch.

Usage::

    plan = plan_epoch(durations, seed=0, epoch=3, world_size=8, max_seconds=15.0,
                      max_batch_seconds=160.0, bucket_buffer=400)
    for step, batch in plan.rank_batches(rank, start=k):
        for clip in batch.clips:          # clip.index: the set's sample; clip.offset, clip.length
            ...
    plan.repeats                          # clips planned twice this epoch, to keep ranks in step
    plan.balance()                        # mean / max padded seconds of a step's ranks, averaged
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from dser.planning import bucket_by_length
from dser.shardfiles import DataError

_MASK = (1 << 64) - 1


class PlannedClip(NamedTuple):
    """One clip of a planned batch: the set's sample ``index``, and the samples to keep of it,
    ``[offset, offset + length)`` at the plan's sample rate."""

    index: int
    offset: int
    length: int


@dataclass(frozen=True)
class PlannedStepBatch:
    """One rank's batch of one step, its clips shortest first.

    Attributes:
        clips: the clips to read, crop and pad.
        repeat: the batch repeats clips planned elsewhere this epoch (it fills the last step).
    """

    clips: tuple[PlannedClip, ...]
    repeat: bool = False

    @property
    def padded(self) -> int:
        """Padded samples of the batch: clips × the longest (cropped) clip."""
        return len(self.clips) * max((c.length for c in self.clips), default=0)

    @property
    def real(self) -> int:
        """Real (non-padded) samples of the batch."""
        return sum(c.length for c in self.clips)


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's training batches for every step and rank (``plan_epoch`` makes it).

    Attributes:
        epoch, seed, world_size, sample_rate: what it was planned for.
        steps: ``steps[s][r]`` is rank ``r``'s batch of step ``s``; every rank has one per step.
        repeats: clips planned a second time (in the last step), so every rank has a batch; 0
            unless the set has too few clips to fill whole steps otherwise.
    """

    epoch: int
    seed: int
    world_size: int
    sample_rate: int
    steps: tuple[tuple[PlannedStepBatch, ...], ...]
    repeats: int

    def __len__(self) -> int:
        return len(self.steps)

    def batch(self, step: int, rank: int) -> PlannedStepBatch:
        """Rank ``rank``'s batch of step ``step``."""
        if not 0 <= rank < self.world_size:
            raise IndexError(f"rank {rank} is not in [0, world_size={self.world_size})")
        return self.steps[step][rank]

    def rank_batches(self, rank: int, start: int = 0) -> Iterator[tuple[int, PlannedStepBatch]]:
        """``(step, batch)`` of rank ``rank`` from step ``start`` on (an exact resume)."""
        for step in range(start, len(self.steps)):
            yield step, self.batch(step, rank)

    def balance(self) -> float:
        """Mean over steps of (mean / max padded seconds of the step's ranks); see ``step_balance``."""
        return step_balance([b.padded for b in step] for step in self.steps)


def step_balance(steps: Iterable[Sequence[float]]) -> float:
    """How evenly steps load their ranks: per step, the ranks' mean padded size over the largest
    (1.0 when every rank pads the same), averaged over the steps.

    Args:
        steps: per step, each rank's padded size (any unit, e.g. samples).

    Returns:
        The average, in (0, 1]; 1.0 for no steps. A step padding nothing counts as 1.
    """
    ratios = [sum(p) / len(p) / max(p) if max(p) > 0 else 1.0 for p in (list(s) for s in steps)]
    return sum(ratios) / len(ratios) if ratios else 1.0


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a stable, well-mixed hash."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def crop_offsets(full: np.ndarray, length: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Each clip's crop start: uniform in ``[0, full - length]``, from its (seed, epoch, index).

    Args:
        full: (N,) samples each clip has.
        length: (N,) samples each clip keeps (at most ``full``).
        seed, epoch: the run's seed and the epoch.

    Returns:
        (N,) int64 offsets (0 where nothing is cut).
    """
    key = _mix64(np.array([(seed & _MASK) ^ (0x9E3779B97F4A7C15 * (epoch + 1) & _MASK)], dtype=np.uint64))
    h = _mix64(key + _mix64(np.arange(len(full), dtype=np.uint64) + np.uint64(0xC809)))
    u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # [0, 1)
    span = np.maximum(full - length, 0)
    return np.minimum(np.floor(u * (span + 1)).astype(np.int64), span)


def _split(batch: list[PlannedClip]) -> tuple[list[PlannedClip], list[PlannedClip]]:
    """A batch (shortest first) cut into its shorter and its longer half."""
    half = len(batch) // 2
    return batch[:half], batch[half:]


def plan_epoch(durations: Sequence[float], *, seed: int, epoch: int, world_size: int,
               max_seconds: float | None, max_batch_seconds: float, bucket_buffer: int = 200,
               bucket_min_batches: int = 16, sample_rate: int = 16000) -> EpochPlan:
    """Plan an epoch of training batches for every rank: shuffle, crop, bucket, balance.

    Args:
        durations: seconds of each sample of the training set (after its filters), sample
            ``i`` being the set's ``i``-th; only their count and values matter.
        seed: the run's seed (``seed``).
        epoch: the epoch; each gets its own order, batches and crops.
        world_size: ranks; each gets one batch per step.
        max_seconds: crop limit (``data.max_seconds``); None keeps whole clips.
        max_batch_seconds: cap on a batch's padded seconds, clips × longest (``data.max_batch_seconds``).
        bucket_buffer: clips sorted by length together (``data.bucket_buffer``).
        bucket_min_batches: a window also holds this many batches' worth of audio.
        sample_rate: the rate lengths and offsets are counted at (the loader's 16 kHz).

    Returns:
        The ``EpochPlan``: every clip in exactly one batch, except ``repeats`` clips planned
        twice in the last step; every rank the same number of steps.

    Raises:
        DataError: fewer samples than ranks, or a duration that is negative or not finite.
    """
    n = len(durations)
    if world_size < 1:
        raise DataError(f"world_size must be at least 1, got {world_size}")
    if n < world_size:
        raise DataError(f"data.train: {n} training clip(s) for {world_size} ranks, and every rank needs one a step; "
                        f"add training data to data.train or run on at most {n} rank(s)")
    seconds = np.asarray(durations, dtype=np.float64)
    if not np.all(np.isfinite(seconds) & (seconds >= 0)):
        bad = int(np.flatnonzero(~(np.isfinite(seconds) & (seconds >= 0)))[0])
        raise DataError(f"data.train: sample {bad} has duration {float(seconds[bad])}; run dser verify on its shards")
    full = np.rint(seconds * sample_rate).astype(np.int64)
    length = full if max_seconds is None else np.minimum(full, int(round(max_seconds * sample_rate)))
    offset = crop_offsets(full, length, seed, epoch)
    rng = np.random.default_rng([seed & _MASK, epoch, 0x61_0BA1])
    order = rng.permutation(n)
    clips = [PlannedClip(int(i), int(o), int(ln)) for i, o, ln in zip(order, offset[order], length[order])]

    cap = int(max_batch_seconds * sample_rate)
    batches = list(bucket_by_length(clips, lambda c: c.length, cap, bucket_buffer, bucket_min_batches * cap))
    # Whole steps: split the batch of most clips in two until the batches fill whole steps (so
    # every clip is used once), or every batch is one clip (then repeats fill the last step).
    while len(batches) % world_size:
        fullest = max(range(len(batches)), key=lambda k: len(batches[k]))
        if len(batches[fullest]) < 2:
            break
        batches[fullest:fullest + 1] = _split(batches[fullest])

    def padded(b: list[PlannedClip]) -> int:
        return len(b) * b[-1].length  # shortest first: the last is the longest

    batches.sort(key=padded, reverse=True)  # stable: ties keep the windows' order, the same on every rank
    # Where the last step (the smallest batches) is still short, it is topped up with copies of
    # the batches just above it: the closest in padded seconds that are not in the step already.
    short = -len(batches) % world_size
    last = len(batches) - (world_size - short) if short else len(batches)  # where the last step starts
    fill = batches[last - short: last]
    dealt = [PlannedStepBatch(tuple(b)) for b in batches] + [PlannedStepBatch(tuple(b), repeat=True) for b in fill]
    steps = [dealt[s: s + world_size] for s in range(0, len(dealt), world_size)]
    shuffler = random.Random(int(rng.integers(1 << 62)))
    for step in steps:
        shuffler.shuffle(step)
    shuffler.shuffle(steps)
    return EpochPlan(epoch=epoch, seed=seed, world_size=world_size, sample_rate=sample_rate,
                     steps=tuple(tuple(s) for s in steps), repeats=sum(len(b) for b in fill))
