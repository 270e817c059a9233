"""dser.global_plan: any number of ranks on any number of shards, every clip once an epoch (repeats
counted), equal steps per rank, step balance on IEMOCAP-like lengths against today's per-rank
planner, real audio as today's, crops inside each clip, determinism, exact resume, and speed."""

from __future__ import annotations

import collections
import hashlib
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest

from dser.bench.corpus import iemocap_like_lengths
from dser.corpora import Listing, Record
from dser.global_plan import EpochPlan, PlannedClip, crop_offsets, plan_epoch, step_balance
from dser.planning import bucket_by_length, shuffle_buffer
from dser.shardfiles import DataError
from dser.shards import ShardIndex, build_shards
from fixtures_corpora import write_wav

RATE = 16000
RECIPE = dict(max_seconds=15.0, max_batch_seconds=160.0, bucket_buffer=400)  # dser/configs/iemocap_loso.yaml
DEFAULT = dict(max_seconds=6.0, max_batch_seconds=48.0, bucket_buffer=200)  # dser.runconfig.DataConfig


def _uses(plan: EpochPlan) -> collections.Counter:
    return collections.Counter(c.index for step in plan.steps for b in step for c in b.clips)


def _check_complete(plan: EpochPlan, n: int, world_size: int) -> None:
    """Every clip planned at least once, repeats only in repeat batches and counted, every step
    one batch per rank and none empty."""
    assert all(len(step) == world_size for step in plan.steps)
    assert all(b.clips for step in plan.steps for b in step)
    uses = _uses(plan)
    assert set(uses) == set(range(n))
    repeated = sum(len(b.clips) for step in plan.steps for b in step if b.repeat)
    assert sum(uses.values()) == n + plan.repeats and repeated == plan.repeats


def test_one_shard_feeds_sixteen_ranks(tmp_path):
    # One group written as one shard; its index's per-sample table is all the plan needs.
    records = [Record(utt_id=f"u{i:02d}", path=write_wav(tmp_path / "wav" / f"u{i:02d}.wav", seconds=0.2 + 0.05 * i),
                      corpus="t", group="train", emotion="happy") for i in range(40)]
    build_shards(Listing(records), tmp_path / "shards", corpus="t", root=tmp_path, progress=False)
    index = ShardIndex.load(tmp_path / "shards")
    rows = index.table("train")
    assert len({r.shard for r in rows}) == 1
    plan = plan_epoch([r.duration for r in rows], seed=0, epoch=0, world_size=16, **DEFAULT)
    _check_complete(plan, len(rows), 16)
    assert plan.repeats == 0  # 40 clips fill whole steps by splitting batches, no clip twice
    assert len(plan) >= 1


@pytest.mark.parametrize("n, world_size", [(16, 16), (17, 16), (5, 3), (1, 1), (3000, 8), (999, 7), (40, 16)])
def test_every_clip_once_and_equal_steps(n, world_size):
    durations = iemocap_like_lengths(n, seed=n) if n > 100 else [1.0] * n
    plan = plan_epoch(durations, seed=1, epoch=2, world_size=world_size, **DEFAULT)
    _check_complete(plan, n, world_size)
    assert plan.repeats == 0  # batches split until they fill whole steps: no clip twice


def test_repeats_fill_the_last_step_only_where_one_clip_a_batch_cannot():
    # 17 clips of 30 s under a 48 s cap: one clip a batch already, 17 batches for 16 ranks.
    plan = plan_epoch([30.0] * 17, seed=0, epoch=0, world_size=16, max_seconds=None, max_batch_seconds=48.0)
    _check_complete(plan, 17, 16)
    assert len(plan) == 2 and plan.repeats == 15
    for step in plan.steps:  # a step never holds the same clip twice
        indices = [c.index for b in step for c in b.clips]
        assert len(indices) == len(set(indices))


def test_fewer_clips_than_ranks_is_one_line_naming_data_train():
    with pytest.raises(DataError) as e:
        plan_epoch([2.0] * 3, seed=0, epoch=0, world_size=8, **DEFAULT)
    message = str(e.value)
    assert "\n" not in message and message.startswith("data.train: 3 training clip(s) for 8 ranks")
    assert "at most 3 rank(s)" in message
    with pytest.raises(DataError, match="data.train: 0 training clip"):
        plan_epoch([], seed=0, epoch=0, world_size=1, **DEFAULT)
    with pytest.raises(DataError, match="sample 1 has duration nan"):
        plan_epoch([1.0, float("nan")], seed=0, epoch=0, world_size=1, **DEFAULT)


def test_batches_keep_the_cap_and_crops_stay_inside_their_clips():
    durations = iemocap_like_lengths(4000, seed=5)
    plan = plan_epoch(durations, seed=3, epoch=1, world_size=4, **RECIPE)
    cap, crop = int(RECIPE["max_batch_seconds"] * RATE), int(RECIPE["max_seconds"] * RATE)
    full = np.rint(np.asarray(durations) * RATE).astype(int)
    cropped = 0
    for step in plan.steps:
        for b in step:
            assert b.padded <= cap
            assert [c.length for c in b.clips] == sorted(c.length for c in b.clips)  # shortest first
            for c in b.clips:
                assert c.length == min(full[c.index], crop)
                assert 0 <= c.offset <= full[c.index] - c.length
                cropped += c.offset > 0
    assert cropped > 0.9 * (full > crop).sum()  # long clips get a window, not always their start


def test_crop_offsets_depend_on_the_clip_not_on_the_set():
    full, length = np.full(1000, 100_000), np.full(1000, 20_000)
    a = crop_offsets(full, length, seed=0, epoch=0)
    assert np.array_equal(a[:10], crop_offsets(full[:10], length[:10], seed=0, epoch=0))
    assert not np.array_equal(a, crop_offsets(full, length, seed=0, epoch=1))
    assert not np.array_equal(a, crop_offsets(full, length, seed=1, epoch=0))
    assert a.min() >= 0 and a.max() <= 80_000 and 35_000 < a.mean() < 45_000  # uniform over the span
    assert not crop_offsets(np.array([5, 7]), np.array([5, 7]), seed=0, epoch=0).any()


def _per_rank_steps(seconds: np.ndarray, world_size: int, max_seconds: float, max_batch_seconds: float,
                    bucket_buffer: int, shuffle: int = 500) -> list[list[list[int]]]:
    """Today's loader, in memory: rank r plans its own equal share with the shuffle buffer and
    ``bucket_by_length``; step k pairs every rank's k-th batch."""
    lengths = np.minimum(np.rint(seconds * RATE), max_seconds * RATE).astype(int).tolist()
    cap = int(max_batch_seconds * RATE)
    per_rank = []
    for rank in range(world_size):
        rng = random.Random(rank)
        share = shuffle_buffer(lengths[rank::world_size], shuffle, rng)
        per_rank.append(list(bucket_by_length(share, lambda x: x, cap, bucket_buffer, 16 * cap, rng)))
    return [list(step) for step in zip(*per_rank)]


def _real_fraction(batches) -> float:
    return sum(map(sum, batches)) / sum(len(b) * max(b) for b in batches)


@pytest.mark.parametrize("batching", [RECIPE, DEFAULT], ids=["15s-160s", "6s-48s"])
def test_step_balance_beats_per_rank_planning_and_real_audio_holds(batching):
    seconds = iemocap_like_lengths(20000, seed=7)
    for world_size in (2, 4, 8):
        plan = plan_epoch(seconds, seed=0, epoch=0, world_size=world_size, **batching)
        old = _per_rank_steps(seconds, world_size, **batching)
        old_balance = step_balance([[len(b) * max(b) for b in step] for step in old])
        assert plan.balance() >= 0.97, (world_size, plan.balance())
        assert plan.balance() > old_balance, (world_size, plan.balance(), old_balance)
        new_real = _real_fraction([[c.length for c in b.clips] for step in plan.steps for b in step])
        old_real = _real_fraction([b for step in old for b in step])
        assert new_real >= old_real - 0.005, (world_size, new_real, old_real)
        assert plan.repeats == 0


def test_step_balance():
    assert step_balance([[10, 10], [5, 10]]) == pytest.approx((1.0 + 0.75) / 2)
    assert step_balance([]) == 1.0 and step_balance([[0, 0]]) == 1.0


def test_the_plan_is_the_same_every_call_and_differs_by_epoch_and_seed():
    seconds = iemocap_like_lengths(3000, seed=2)
    plan = plan_epoch(seconds, seed=4, epoch=3, world_size=8, **RECIPE)
    assert plan == plan_epoch(list(seconds), seed=4, epoch=3, world_size=8, **RECIPE)

    def order(p: EpochPlan) -> list[int]:
        return [c.index for step in p.steps for b in step for c in b.clips]

    assert order(plan) != order(plan_epoch(seconds, seed=4, epoch=4, world_size=8, **RECIPE))
    assert order(plan) != order(plan_epoch(seconds, seed=5, epoch=3, world_size=8, **RECIPE))
    # which rank is slowest changes from step to step: no rank always gets the largest batch
    largest = {max(range(8), key=lambda r: step[r].padded) for step in plan.steps}
    assert len(largest) > 4


PLAN_DIGEST = r"""
import hashlib, sys
from dser.global_plan import plan_epoch
loaded = "torch" in sys.modules
import numpy as np
seconds = np.clip(np.exp(np.random.default_rng(2).normal(1.25, 0.71, 3000)), 0.6, 30.0)
plan = plan_epoch(seconds, seed=4, epoch=3, world_size=8, max_seconds=15.0, max_batch_seconds=160.0,
                  bucket_buffer=400)
print(hashlib.sha256(repr(plan.steps).encode()).hexdigest(), loaded)
"""


def test_every_process_plans_the_same_epoch_without_torch():
    # What another rank computes: a fresh interpreter with another hash seed; importing the plan
    # loads no torch.
    seconds = np.clip(np.exp(np.random.default_rng(2).normal(1.25, 0.71, 3000)), 0.6, 30.0)
    here = hashlib.sha256(repr(plan_epoch(seconds, seed=4, epoch=3, world_size=8, **RECIPE).steps).encode())
    env = dict(os.environ, PYTHONHASHSEED="123")
    r = subprocess.run([sys.executable, "-c", PLAN_DIGEST], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [here.hexdigest(), "False"]


def test_resume_at_step_k_is_the_rest_of_the_epoch():
    plan = plan_epoch(iemocap_like_lengths(2000, seed=9), seed=0, epoch=1, world_size=4, **DEFAULT)
    for rank in range(4):
        whole = list(plan.rank_batches(rank))
        assert [s for s, _ in whole] == list(range(len(plan)))
        assert list(plan.rank_batches(rank, start=7)) == whole[7:]
        assert plan.batch(7, rank) == whole[7][1] == plan.steps[7][rank]
    with pytest.raises(IndexError, match="rank 4 is not in"):
        plan.batch(0, 4)
    assert isinstance(plan.batch(0, 0).clips[0], PlannedClip)


def test_planning_100k_clips_is_quick():
    seconds = iemocap_like_lengths(100_000, seed=1)
    start = time.perf_counter()
    plan = plan_epoch(seconds, seed=0, epoch=0, world_size=8, **RECIPE)
    took = time.perf_counter() - start
    assert took < 3.0, f"planning 100k clips took {took:.2f} s"  # ~0.4 s on a 2-core machine
    assert sum(_uses(plan).values()) == 100_000 + plan.repeats
