"""Planning an epoch's batches without decoding: tar samples → clips → shuffled → bucketed.

``dser.data.ShardStream`` runs these stages over the WebDataset samples of a rank's shards
(see the diagram in ``dser.data``): ``Planner.parse`` reads each sample's JSON (never its
FLAC), filters by label set, style and required labels and notes corrupt samples;
``shuffle_buffer`` shuffles the compressed clips (training); ``bucket_by_length`` sorts a
buffer by length and cuts it with ``cut_batches`` into batches whose padded size
``B × T_max`` stays under the cap. The result is a ``PlannedBatch`` per batch: the clips to
decode and the corrupt samples to report with it.

Usage::

    batches = cut_batches([16000, 24000, 80000], max_batch_samples=96000)   # [[0, 1], [2]]
    for batch in bucket_by_length(clips, lambda c: c.length, cap, buffer_size=200):
        ...
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence, TypeVar

from dser.schema import IGNORE_INDEX, LABEL_KEYS, Sample, SampleError

if TYPE_CHECKING:  # annotations only: dser.data imports this module
    from dser.data import LoaderConfig

T = TypeVar("T")


@dataclass(slots=True)
class Clip:
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
class PlannedBatch:
    """One batch of the plan: its clips, undecoded, and the corrupt samples noted since the
    previous batch (reported by the worker that decodes this one)."""

    clips: list[Clip]
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


def shard_problem(exn: Exception) -> tuple[str, str]:
    """(shard path, what went wrong) of a webdataset read error."""
    url = next((a for a in reversed(exn.args) if isinstance(a, str) and a.endswith(".tar")), None)
    # webdataset reports some errors only as "… @ <_io.BufferedReader name='….tar'>"
    named = re.search(r"name='([^']+\.tar)'", str(exn))
    where = url or (named.group(1) if named else str(exn.args[0]) if exn.args else "a shard")
    what = str(exn.args[0] if exn.args else exn).split(" @ <")[0]
    return where, f"{type(exn).__name__}: {what}"


class Planner:
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
        where, what = shard_problem(exn)
        if where not in self._damaged:
            self._damaged.add(where)
            self.bad.append(f"{where}: damaged shard, samples after the damage are lost ({what}); "
                            f"run dser verify")
        return True

    def parse(self, samples: Iterable[dict]) -> Iterator[Clip]:
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
            yield Clip(utt_id, s["flac"], url, self.rates.get(url) or cfg.sample_rate, duration, full, length,
                       IGNORE_INDEX if emotion is None else emotion, attributes)
