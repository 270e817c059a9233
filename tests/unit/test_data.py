"""dser.data: shard → batch round trip, filtering, the seconds cap, determinism, exact resume,
rank/worker splitting, and bucketing efficiency on an IEMOCAP-like length distribution."""

import collections
import io
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf
import torch
import webdataset as wds

import dser.data as data
import dser.workers as workers
from dser.data import BatchStream, DataError, LoaderConfig, TrainStream, collate, make_loader
from dser.labels import get_label_set
from dser.planning import bucket_by_length, cut_batches
from dser.schema import ShardIndex
from dser.shardfiles import resolve_shards
from fixtures_shards import write_test_shards

SR = 16000


def read_all(cfg, **kw):
    return list(make_loader(cfg, **kw))


def by_utt(records):
    return {r["utt_id"]: r for r in records}


def rows(batches):
    """utt_id → (int16 samples as loaded, emotion, attributes) over all batches."""
    out = {}
    for b in batches:
        for i, u in enumerate(b["utt_id"]):
            n = int(b["lengths"][i])
            pcm = (b["audio"][i, :n].numpy() * 32768).astype(np.int64)
            assert u not in out, f"{u} yielded twice"
            out[u] = (pcm, int(b["emotion"][i]), b["attributes"][i].numpy())
    return out


def check_layout(b, max_batch_seconds=None):
    B, T = b["audio"].shape
    assert b["audio"].dtype == torch.float32 and b["attention_mask"].dtype == torch.bool
    assert b["lengths"].dtype == torch.long and b["emotion"].dtype == torch.long
    assert b["attributes"].shape == (B, 3) and b["attributes"].dtype == torch.float32
    assert len(b["utt_id"]) == B and b["lengths"].shape == (B,)
    assert T == int(b["lengths"].max())
    assert torch.equal(b["attention_mask"], torch.arange(T)[None, :] < b["lengths"][:, None])
    assert torch.all(b["audio"][~b["attention_mask"]] == 0)
    assert b["duration_s"] == pytest.approx(float(b["lengths"].sum()) / SR)
    if max_batch_seconds is not None:
        assert B * T <= max_batch_seconds * SR


# ---- round trip and labels -------------------------------------------------------------

def test_round_trip_is_bit_exact_and_labels_equal(tmp_path):
    records = write_test_shards(tmp_path, 30, 3)
    ls = get_label_set("4class")
    cfg = LoaderConfig(shards=[str(tmp_path)], label_set="4class", require=None, train=False,
                       max_batch_seconds=4.0, num_workers=0)
    batches = read_all(cfg)
    for b in batches:
        check_layout(b, 4.0)
    got = rows(batches)
    assert set(got) == {r["utt_id"] for r in records}
    for r in records:
        pcm, emotion, attrs = got[r["utt_id"]]
        np.testing.assert_array_equal(pcm, r["audio"].astype(np.int64))
        expected = ls.index(r["emotion"])
        assert emotion == (-100 if expected is None else expected)
        want = np.array([np.nan if r[a] is None else r[a] for a in ("valence", "arousal", "dominance")],
                        dtype=np.float32)
        np.testing.assert_array_equal(attrs, want)  # NaN == NaN here


def test_label_set_folds_excited_into_happy_and_drops_the_rest(tmp_path):
    records = write_test_shards(tmp_path, 35, 2)
    cfg = LoaderConfig(shards=[str(tmp_path)], label_set="4class", train=False, num_workers=0)
    got = rows(read_all(cfg))
    kept = {r["utt_id"]: r["emotion"] for r in records
            if r["emotion"] in ("neutral", "happy", "excited", "angry", "sad")}
    assert set(got) == set(kept)
    assert any(e == "excited" for e in kept.values())
    for u, emo in kept.items():
        assert got[u][1] == {"neutral": 0, "happy": 1, "excited": 1, "angry": 2, "sad": 3}[emo]

    custom = replace(cfg, label_set=["angry", "neutral"])
    got = rows(read_all(custom))
    assert {u: e for u, (_, e, _) in got.items()} == {
        r["utt_id"]: {"angry": 0, "neutral": 1}[r["emotion"]]
        for r in records if r["emotion"] in ("angry", "neutral")}


def test_style_filter(tmp_path):
    records = write_test_shards(tmp_path, 20, 2)
    cfg = LoaderConfig(shards=[str(tmp_path)], label_set=None, require=None, styles=["natural"],
                       train=False, num_workers=0)
    assert set(rows(read_all(cfg))) == {r["utt_id"] for r in records if r["style"] == "natural"}


def test_required_labels(tmp_path):
    records = write_test_shards(tmp_path, 30, 2)
    has_attrs = {r["utt_id"] for r in records if r["valence"] is not None}
    in_set = {r["utt_id"] for r in records if r["emotion"] in ("neutral", "happy", "excited", "angry", "sad")}
    base = LoaderConfig(shards=[str(tmp_path)], train=False, num_workers=0, label_set=None, require="attributes")
    got = rows(read_all(base))
    assert set(got) == has_attrs
    assert all(e == -100 for _, e, _ in got.values())  # no label set: no class targets
    got = rows(read_all(replace(base, label_set="4class", require="any")))
    assert set(got) == has_attrs | in_set
    assert set(rows(read_all(replace(base, require=None)))) == {r["utt_id"] for r in records}


# ---- the seconds cap, cropping --------------------------------------------------------

def test_batches_respect_the_cap_and_crops_are_windows_of_the_clip(tmp_path):
    records = by_utt(write_test_shards(tmp_path, 40, 3, durations=(0.3, 2.5)))
    cfg = LoaderConfig(shards=[str(tmp_path)], label_set=None, require=None, train=True,
                       max_seconds=0.8, max_batch_seconds=3.0, num_workers=0, seed=5)
    batches = read_all(cfg)
    for b in batches:
        check_layout(b, 3.0)
    got = rows(batches)
    assert set(got) == set(records)
    cropped = 0
    for u, (pcm, _, _) in got.items():
        orig = records[u]["audio"].astype(np.int64)
        assert len(pcm) == min(len(orig), int(0.8 * SR))
        if len(orig) > len(pcm):
            cropped += 1
            starts = [s for s in range(len(orig) - len(pcm) + 1) if np.array_equal(orig[s:s + len(pcm)], pcm)]
            assert starts, f"{u}: the crop is not a window of the clip"
        else:
            np.testing.assert_array_equal(pcm, orig)
    assert cropped > 10

    # Evaluation cuts long clips to their first max_seconds.
    got = rows(read_all(replace(cfg, train=False)))
    for u, (pcm, _, _) in got.items():
        np.testing.assert_array_equal(pcm, records[u]["audio"][: int(0.8 * SR)].astype(np.int64))


def test_a_clip_longer_than_the_cap_gets_a_batch_of_its_own(tmp_path):
    write_test_shards(tmp_path, 6, 1, durations=[0.5, 0.5, 3.0, 0.5, 0.4, 0.6])
    cfg = LoaderConfig(shards=[str(tmp_path)], require=None, train=False, max_batch_seconds=2.0, num_workers=0)
    batches = read_all(cfg)
    assert sum(len(b["utt_id"]) for b in batches) == 6
    long = [b for b in batches if b["audio"].shape[1] == 3 * SR]
    assert len(long) == 1 and len(long[0]["utt_id"]) == 1


# ---- evaluation coverage, determinism, resume ----------------------------------------

def test_eval_yields_every_sample_once_across_workers(tmp_path):
    records = write_test_shards(tmp_path, 45, 3)
    cfg = LoaderConfig(shards=[str(tmp_path)], require=None, train=False, max_batch_seconds=3.0, num_workers=2)
    batches = read_all(cfg)
    assert [b["index"] for b in batches] == list(range(len(batches)))
    ids = [u for b in batches for u in b["utt_id"]]
    assert sorted(ids) == sorted(r["utt_id"] for r in records)


def signature(batches):
    return [(b["epoch"], b["index"], tuple(b["utt_id"]), float(b["audio"].sum())) for b in batches]


def test_training_order_and_crops_are_determined_by_seed_and_epoch(tmp_path):
    write_test_shards(tmp_path, 60, 4, durations=(0.3, 2.0))
    cfg = LoaderConfig(shards=[str(tmp_path)], require=None, train=True, max_seconds=1.0,
                       max_batch_seconds=3.0, shuffle_buffer=20, bucket_buffer=20, num_workers=0, seed=1)
    first = signature(read_all(cfg))
    assert signature(read_all(cfg)) == first
    # The plan does not depend on the number of workers.
    assert signature(read_all(replace(cfg, num_workers=2))) == first
    assert signature(read_all(replace(cfg, seed=2))) != first
    assert [s[2] for s in signature(read_all(cfg, epoch=1))] != [s[2] for s in first]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core CI box
def test_resume_at_batch_n_continues_the_uninterrupted_sequence(tmp_path):
    # 3 shards of unequal size and 2 workers: workers run dry at different times.
    write_test_shards(tmp_path / "a", 25, 2, group="a", prefix="a", durations=(0.3, 1.5))
    write_test_shards(tmp_path / "b", 8, 1, group="b", prefix="b", durations=(0.3, 1.5))
    cfg = LoaderConfig(shards=[str(tmp_path / "a"), str(tmp_path / "b")], require=None, train=True,
                       max_seconds=1.0, max_batch_seconds=2.5, shuffle_buffer=10, bucket_buffer=10,
                       num_workers=2, seed=7)
    full = signature(read_all(cfg, epoch=3))
    n_batches = len(full)
    assert n_batches > 8
    for n in (1, 4, n_batches - 3, n_batches - 1, n_batches):
        assert signature(read_all(cfg, epoch=3, skip_batches=n)) == full[n:], f"resumed at {n}"
    # …also with another number of workers than the interrupted run had.
    assert signature(read_all(replace(cfg, num_workers=3), epoch=3, skip_batches=5)) == full[5:]
    # …and for any rank of several: each resumes its own batches.
    ranks = [replace(cfg, rank=r, world_size=3) for r in range(3)]
    per_rank = [signature(read_all(c, epoch=3)) for c in ranks]
    assert len({len(p) for p in per_rank}) == 1
    for c, p in zip(ranks, per_rank):
        assert signature(read_all(replace(c, num_workers=1), epoch=3, skip_batches=2)) == p[2:]


def test_skipped_batches_are_not_decoded(tmp_path, monkeypatch):
    write_test_shards(tmp_path, 40, 2)
    cfg = LoaderConfig(shards=[str(tmp_path)], require=None, train=True, max_batch_seconds=3.0, num_workers=0)
    full = read_all(cfg)
    decoded = []
    real_decode = data.decode_flac
    monkeypatch.setattr(data, "decode_flac", lambda b, sr: decoded.append(1) or real_decode(b, sr))
    rest = read_all(cfg, skip_batches=5)
    assert len(decoded) == sum(len(b["utt_id"]) for b in full[5:])
    assert len(rest) == len(full) - 5


def test_batch_stream_tracks_its_position_across_epochs(tmp_path):
    write_test_shards(tmp_path, 24, 2)
    cfg = LoaderConfig(shards=[str(tmp_path)], require=None, train=True, max_batch_seconds=3.0,
                       shuffle_buffer=8, bucket_buffer=8, num_workers=0)
    per_epoch = len(read_all(cfg))
    stream = BatchStream(cfg)
    it = iter(stream)
    taken, states = [], []
    for _ in range(2 * per_epoch + 3):
        taken.append(next(it))
        states.append(stream.state())
    assert states[per_epoch - 1] == {"epoch": 0, "batches_done": per_epoch}
    assert states[per_epoch] == {"epoch": 1, "batches_done": 1}
    assert states[-1] == {"epoch": 2, "batches_done": 3}
    for k in (2, per_epoch - 1, per_epoch + 1):
        resumed = iter(BatchStream(cfg, **states[k]))
        again = [next(resumed) for _ in range(len(taken) - k - 1)]
        assert signature(again) == signature(taken[k + 1:]), f"resumed after batch {k}"


def test_batch_stream_fails_when_a_rank_gets_no_clips(tmp_path):
    write_test_shards(tmp_path, 10, 2, styles=("acted",))
    cfg = LoaderConfig(shards=[str(tmp_path)], require=None, styles=["natural"], train=True, num_workers=0)
    with pytest.raises(DataError, match="got no training clips"):
        next(iter(BatchStream(cfg)))



def test_train_stream_mixes_rehearsal_at_its_share_and_resumes_exactly(tmp_path):
    write_test_shards(tmp_path / "target", 24, 2, durations=(0.3, 1.0))
    write_test_shards(tmp_path / "source", 18, 2, durations=(0.3, 1.0), prefix="src-", seed=4)
    main = LoaderConfig(shards=[str(tmp_path / "target")], require=None, train=True, max_batch_seconds=2.0,
                        shuffle_buffer=8, bucket_buffer=8, num_workers=0)
    rehearsal = replace(main, shards=[str(tmp_path / "source")], seed=1)
    stream = TrainStream(main, rehearsal, share=0.3, seed=5)
    # the choice of stream is a function of (seed, batch number) alone, at the share
    picks = [stream.source(n) for n in range(20000)]
    assert abs(picks.count("rehearsal") / len(picks) - 0.3) < 0.01
    assert picks == [TrainStream(main, rehearsal, 0.3, 5).source(n) for n in range(20000)]
    assert picks != [TrainStream(main, rehearsal, 0.3, 6).source(n) for n in range(20000)]
    assert {TrainStream(main, None, 0.3, 5).source(n) for n in range(100)} == {"main"}  # no rehearsal set

    taken, states = [], []
    for _ in range(30):  # several epochs of each stream
        taken.append(stream.next())
        states.append(stream.state_dict())
    got = ["rehearsal" if b["utt_id"][0].startswith("src-") else "main" for b in taken]
    assert got == picks[:30]
    assert all(u.startswith("src-") == (g == "rehearsal") for b, g in zip(taken, got) for u in b["utt_id"])
    assert states[-1]["drawn"] == 30 and states[-1]["pos"]["rehearsal"][0] >= 1  # a rehearsal epoch ended
    # each stream alone is the BatchStream it wraps
    alone = iter(BatchStream(rehearsal))
    assert signature([b for b, g in zip(taken, got) if g == "rehearsal"]) == \
        signature([next(alone) for _ in range(got.count("rehearsal"))])
    for k in (0, 9, 17):
        again = TrainStream(main, rehearsal, 0.3, 5).load_state_dict(states[k])
        assert signature([again.next() for _ in range(29 - k)]) == signature(taken[k + 1:]), f"after batch {k}"


def test_a_stream_whose_every_clip_is_corrupt_stops_instead_of_going_round(tmp_path):
    write_test_shards(tmp_path, 6, 1, durations=(0.5, 0.5), corrupt=set(range(6)))
    cfg = LoaderConfig(shards=[str(tmp_path)], require=None, max_batch_seconds=1.0, num_workers=0)
    with pytest.raises(DataError, match=r"rank 0 of 1: every clip of its \d+ batches of epoch 0 .* was corrupt"):
        TrainStream(cfg).next()


def test_train_stream_never_returns_an_empty_batch_and_keeps_the_bad_samples(tmp_path):
    write_test_shards(tmp_path, 12, 2, durations=(0.5, 0.5), corrupt={0, 1, 2, 3, 4, 5})
    cfg = LoaderConfig(shards=[str(tmp_path)], require=None, train=False, max_batch_seconds=1.0,
                       num_workers=0, skip_damaged_shards=True)
    plain = read_all(cfg)
    assert any(not b["utt_id"] for b in plain)  # the loader's own batches include empty ones
    stream = TrainStream(cfg)
    batches = [stream.next() for _ in range(len([b for b in plain if b["utt_id"]]))]
    assert all(b["utt_id"] for b in batches)
    assert sorted(u for b in batches for u in b["utt_id"]) == sorted(u for b in plain for u in b["utt_id"])
    assert len(stream.bad_samples) == 6 == sum(len(b["bad_samples"]) for b in batches)
    assert stream.state_dict()["bad_samples"] == stream.bad_samples


# ---- ranks and workers -----------------------------------------------------------------

@pytest.mark.parametrize("train", [True, False])
def test_ranks_and_workers_split_without_loss_or_duplication(tmp_path, train):
    records = write_test_shards(tmp_path, 35, 7)
    cfg = LoaderConfig(shards=[str(tmp_path)], require=None, train=train, max_seconds=1.0,
                       max_batch_seconds=3.0, num_workers=2, rank=0, world_size=2)
    per_rank = [[u for b in read_all(replace(cfg, rank=r)) for u in b["utt_id"]] for r in (0, 1)]
    assert all(per_rank)
    counts = collections.Counter(u for ids in per_rank for u in ids)
    assert max(counts.values()) == 1
    assert set(counts) == {r["utt_id"] for r in records}


def test_one_shard_feeds_sixteen_ranks_each_clip_once_and_every_rank_the_same_batches(tmp_path):
    records = write_test_shards(tmp_path, 40, 1, durations=(0.2, 1.2))
    cfg = LoaderConfig(shards=[str(tmp_path)], require=None, max_batch_seconds=2.0, num_workers=0,
                       rank=0, world_size=16)
    per_rank = [read_all(replace(cfg, rank=r)) for r in range(16)]
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1 and counts.pop() >= 1  # every rank the same number of batches
    for batches in per_rank:
        assert [b["index"] for b in batches] == list(range(len(batches)))
        assert all(b["utt_id"] for b in batches)
    uses = collections.Counter(u for batches in per_rank for b in batches for u in b["utt_id"])
    assert set(uses) == {r["utt_id"] for r in records}
    repeated = sum(b["repeated"] for batches in per_rank for b in batches)
    assert sum(uses.values()) == len(records) + repeated  # only counted repeats


def test_the_loader_yields_the_global_plans_batches_with_their_crops(tmp_path):
    records = by_utt(write_test_shards(tmp_path / "a", 30, 2, group="a", prefix="a", durations=(0.3, 2.0)))
    records.update(by_utt(write_test_shards(tmp_path / "b", 20, 1, group="b", prefix="b", durations=(0.3, 2.0))))
    cfg = LoaderConfig(shards=[str(tmp_path / "a"), str(tmp_path / "b" / "b")], require=None, max_seconds=0.8,
                       max_batch_seconds=3.0, bucket_buffer=10, num_workers=2, seed=4, rank=1, world_size=3)
    found = data.indexed_set(cfg.shards, None, None, None)
    plan = data.epoch_plan(cfg, found, epoch=2, world_size=3)
    batches = read_all(cfg, epoch=2)
    assert len(batches) == len(plan)
    for b, (step, planned) in zip(batches, plan.rank_batches(1)):
        assert b["index"] == step and b["epoch"] == 2
        assert b["utt_id"] == [found.rows[c.index].utt_id for c in planned.clips]
        assert b["audio"].shape == (len(planned.clips), max(c.length for c in planned.clips))
        for i, c in enumerate(planned.clips):
            pcm = (b["audio"][i, :int(b["lengths"][i])].numpy() * 32768).astype(np.int16)
            original = records[b["utt_id"][i]]["audio"]
            np.testing.assert_array_equal(pcm, original[c.offset: c.offset + c.length])


def test_loose_training_tars_need_a_tar_per_rank(tmp_path):
    write_test_shards(tmp_path, 6, 2)
    cfg = LoaderConfig(shards=[str(tmp_path / "fold0" / "*.tar")], require=None, rank=0, world_size=3,
                       num_workers=0)
    with pytest.raises(DataError, match=r"2 shard\(s\), 2 of them loose .tar files \(no index\), for 3 ranks.*"
                                        r"give the directories `dser shard` wrote"):
        make_loader(cfg)
    # The same shards through their index feed the 3 ranks.
    assert read_all(replace(cfg, shards=[str(tmp_path)]))
    # Evaluation may leave a rank without shards: it yields nothing.
    assert read_all(replace(cfg, train=False, rank=2)) == []


def test_fewer_training_clips_than_ranks_is_one_line(tmp_path):
    write_test_shards(tmp_path, 5, 1)
    cfg = LoaderConfig(shards=[str(tmp_path)], require=None, rank=0, world_size=8, num_workers=0)
    with pytest.raises(DataError, match=r"5 training clip\(s\) for 8 ranks.*at most 5 rank"):
        make_loader(cfg)


def test_rank_comes_from_the_environment_without_a_process_group(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert data.resolve_rank(LoaderConfig(require=None)) == (1, 4)
    assert data.resolve_rank(LoaderConfig(require=None, rank=0, world_size=2)) == (0, 2)


# ---- bad input -------------------------------------------------------------------------

def test_resolve_shards(tmp_path):
    write_test_shards(tmp_path / "corpus", 6, 2, group="Session1")
    write_test_shards(tmp_path / "corpus", 6, 3, group="Session2")
    every = resolve_shards([str(tmp_path / "corpus")])
    assert [p.split("/")[-1] for p in every] == [
        "Session1-000000.tar", "Session1-000001.tar", "Session2-000000.tar", "Session2-000001.tar",
        "Session2-000002.tar"]
    assert resolve_shards([str(tmp_path / "corpus" / "Session2" / "*-00000[01].tar")]) == every[2:4]
    assert resolve_shards([every[4], str(tmp_path / "corpus" / "Session2")]) == [every[4]] + every[2:4]
    for spec, msg in ((tmp_path / "nope", "no such file"), (tmp_path / "corpus" / "index.json", "no .tar"),
                      (str(tmp_path / "x*"), "no .tar")):
        with pytest.raises(DataError, match=msg) as e:
            resolve_shards([str(spec)])
        assert str(spec) in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        make_loader(LoaderConfig(shards=[str(tmp_path / "empty")], require=None))


def test_corrupt_samples_are_skipped_and_reported_once(tmp_path):
    records = write_test_shards(tmp_path, 20, 2, corrupt={3})
    # A sample whose JSON duration disagrees with its audio, and one without audio.
    # (A tar the index does not list: named explicitly, read as it is.)
    (tmp_path / "loose").mkdir()
    with wds.TarWriter(str(tmp_path / "loose" / "extra.tar")) as sink:
        good = records[0]
        buf = io.BytesIO()
        sf.write(buf, good["audio"], SR, format="FLAC", subtype="PCM_16")
        meta = {**{k: v for k, v in good.items() if k != "audio"}, "utt_id": "liar", "duration": 9.0}
        sink.write({"__key__": "liar", "flac": buf.getvalue(), "json": json.dumps(meta).encode()})
        sink.write({"__key__": "mute", "json": json.dumps({**meta, "utt_id": "mute"}).encode()})
    cfg = LoaderConfig(shards=[str(tmp_path / "fold0"), str(tmp_path / "loose" / "extra.tar")], require=None, train=False,
                       max_batch_seconds=12.0, num_workers=2)
    batches = read_all(cfg)
    got = {u for b in batches for u in b["utt_id"]}
    assert got == {r["utt_id"] for r in records} - {records[3]["utt_id"]}
    bad = [s for b in batches for s in b["bad_samples"]]
    assert len(bad) == 3, bad
    assert any(records[3]["utt_id"] in s and "undecodable" in s for s in bad)
    assert any(s.startswith("liar:") and "duration" in s for s in bad)
    assert any(s.startswith("mute:") and "no mute.flac" in s for s in bad)


def test_a_truncated_shard_fails_evaluation_with_its_name(tmp_path):
    write_test_shards(tmp_path, 10, 1)
    shard = tmp_path / "fold0" / "fold0-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    cfg = LoaderConfig(shards=[str(tmp_path)], require=None, train=False, num_workers=1)
    with pytest.raises(DataError) as e:
        read_all(cfg)
    assert str(shard) in str(e.value) and "\n" not in str(e.value)


def test_training_goes_on_past_a_damaged_shard_reporting_each_lost_sample(tmp_path, caplog):
    records = write_test_shards(tmp_path, 12, 2)
    shard = tmp_path / "fold0" / "fold0-000000.tar"
    data_ = bytearray(shard.read_bytes())
    # Damage of the listed size (a truncated one is refused up front: its size is wrong), over
    # the members of samples 3 and 4 only: random access reads the samples after it.
    table = ShardIndex.load(tmp_path).table("fold0")
    start, end = table[3].flac[0] + 100, table[4].json[0] + 10
    data_[start:end] = b"\xff" * (end - start)
    shard.write_bytes(bytes(data_))
    cfg = LoaderConfig(shards=[str(tmp_path)], require=None, train=True, max_batch_seconds=12.0, num_workers=0)
    with caplog.at_level("WARNING", logger="dser.data"):
        batches = read_all(cfg)
    got = {u for b in batches for u in b["utt_id"]}
    lost = {records[3]["utt_id"], records[4]["utt_id"]}
    assert got == {r["utt_id"] for r in records} - lost
    bad = [s for b in batches for s in b["bad_samples"]]
    assert sorted(s.split(":")[0] for s in bad) == sorted(lost), bad
    assert all(str(shard) in s and "dser verify" in s for s in bad)
    # A set that must be whole stops at the damage, naming the shard and sample.
    with pytest.raises(DataError) as e:
        read_all(replace(cfg, skip_damaged_shards=False))
    assert str(shard) in str(e.value) and "\n" not in str(e.value)


def test_a_json_without_label_keys_is_a_bad_sample(tmp_path):
    records = write_test_shards(tmp_path, 6, 1)
    (tmp_path / "loose").mkdir()
    with wds.TarWriter(str(tmp_path / "loose" / "x.tar")) as sink:
        buf = io.BytesIO()
        sf.write(buf, records[0]["audio"], SR, format="FLAC", subtype="PCM_16")
        meta = {"utt_id": "nolabels", "duration": len(records[0]["audio"]) / SR, "style": "acted"}
        sink.write({"__key__": "nolabels", "flac": buf.getvalue(), "json": json.dumps(meta).encode()})
    cfg = LoaderConfig(shards=[str(tmp_path / "fold0"), str(tmp_path / "loose" / "x.tar")], require=None, train=False,
                       num_workers=0)
    batches = read_all(cfg)
    assert "nolabels" not in {u for b in batches for u in b["utt_id"]}
    (bad,) = [s for b in batches for s in b["bad_samples"]]
    assert bad.startswith("nolabels:") and "emotion" in bad and "valence" in bad


def test_starting_a_loader_leaves_the_global_torch_rng_alone(tmp_path):
    # The model's dropout draws from the global generator: a loader started mid-run (a new
    # epoch, a resume) must not shift it, or a resumed run diverges from an uninterrupted one.
    write_test_shards(tmp_path, 10, 2)
    cfg = LoaderConfig(shards=[str(tmp_path)], require=None, train=True, num_workers=1)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    next(iter(make_loader(cfg, epoch=1, skip_batches=1)))
    torch.testing.assert_close(torch.rand(3), expected)


def pids_holding(link: str) -> set[int]:
    """The processes with an open descriptor whose /proc link reads ``link``."""
    pids = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == link for fd in fd_dir.iterdir()):
                pids.add(int(fd_dir.parent.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def test_workers_hold_none_of_the_ranks_descriptors(tmp_path):
    # A rank listens on the rendezvous port (the TCPStore) and runs threads when it evaluates.
    # Forked from it, a worker held that socket, outlived its killed rank, and the requeued job
    # failed with EADDRINUSE on every restart: workers start from a clean forkserver instead.
    write_test_shards(tmp_path, 12, 2)
    cfg = LoaderConfig(shards=[str(tmp_path)], require=None, train=False, max_batch_seconds=2.0, num_workers=2)
    with socket.create_server(("127.0.0.1", 0)) as store:
        link = f"socket:[{os.fstat(store.fileno()).st_ino}]"
        batches = iter(make_loader(cfg))
        next(batches)  # the workers run now
        holders = pids_holding(link)
        rest = list(batches)
    assert holders == {os.getpid()}
    assert rest, "the loader went on after the check"


RANK_SCRIPT = """
import sys, time
from dser.data import LoaderConfig, make_loader
cfg = LoaderConfig(shards=[sys.argv[1]], require=None, train=True, max_batch_seconds=2.0, num_workers=2)
batches = iter(make_loader(cfg))
next(batches)
print("reading", flush=True)
time.sleep(600)
"""


def pids_marked(mark: bytes) -> dict[int, str]:
    """{pid: command line} of the processes whose environment holds ``mark``."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if mark in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:
            continue
    return found


def test_the_workers_end_when_their_rank_is_killed(tmp_path):
    # A worker's parent is the forkserver, which a killed rank leaves running while its workers
    # run: they must notice the rank itself, or they wait for ever holding its output pipe.
    write_test_shards(tmp_path, 12, 2)
    mark = f"DSER_TEST_RANK={os.getpid()}-{tmp_path.name}"
    rank = subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, mark.split("=")[0]: mark.split("=")[1]})
    try:
        assert rank.stdout.readline() == "reading\n"
        helpers = set(pids_marked(mark.encode())) - {rank.pid}
        assert len(helpers) >= 3, helpers  # the forkserver and two workers (and a resource tracker)
    finally:
        rank.kill()
        rank.wait()
    deadline = time.monotonic() + 30
    while (left := pids_marked(mark.encode())) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:  # do not leave them behind whatever the outcome
        os.kill(pid, 9)
    assert not left, f"still running after their rank was killed: {left}"


def test_a_process_ends_with_its_loader_mid_epoch(tmp_path):
    # At exit multiprocessing terminates (SIGTERM) the workers of a loader still being read and
    # joins them: the rank's own SIGTERM must end a worker though others' are dropped.
    write_test_shards(tmp_path, 12, 2)
    script = RANK_SCRIPT.replace("time.sleep(600)", "")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "reading\n", r.stderr[-2000:]


def test_stop_signals_leave_the_loader_running(tmp_path):
    # Slurm signals every process of a job step (USR1 before a preemption, TERM before the
    # kill): the rank checkpoints on them, and its workers must go on serving it meanwhile
    # (only the rank's own SIGTERM, multiprocessing's terminate(), ends a worker).
    write_test_shards(tmp_path, 30, 3)
    cfg = LoaderConfig(shards=[str(tmp_path)], require=None, train=False, max_batch_seconds=1.0, num_workers=2)
    expected = [b["utt_id"] for b in read_all(cfg)]
    batches = iter(make_loader(cfg))
    got = [next(batches)["utt_id"]]
    helpers = psutil.Process().children(recursive=True)  # the forkserver, its workers, the tracker
    assert len(helpers) >= 3, helpers
    for sig in workers.STOP_SIGNALS:  # from another process, as from slurmstepd
        subprocess.run(["kill", f"-{sig.value}", *(str(p.pid) for p in helpers)], check=True)
    time.sleep(0.5)
    assert [p for p in helpers if p.status() == psutil.STATUS_ZOMBIE or not p.is_running()] == []
    got += [b["utt_id"] for b in batches]
    assert got == expected


@pytest.mark.parametrize("kw, msg", [
    ({"require": None, "max_seconds": 10.0, "max_batch_seconds": 8.0}, "exceeds data.max_batch_seconds"),
    ({"require": "emotion"}, "needs a label set"),
    ({"label_set": "5class"}, "unknown label set"),
    ({"label_set": "4class", "styles": ["spontaneous"]}, "data.styles"),
    ({"require": "labels"}, "data.require"),
    ({"require": None, "rank": 1}, "give both"),
])
def test_config_errors_name_the_key(kw, msg):
    with pytest.raises(DataError, match=msg):
        LoaderConfig(shards=["x"], **kw)


# ---- collate and bucketing -------------------------------------------------------------

def test_collate_pads_and_scales():
    a = np.array([16384, -32768, 1], dtype=np.int16)
    f = np.array([0.5, -0.25], dtype=np.float32)
    b = collate([{"audio": a, "utt_id": "a", "emotion": 2, "attributes": (0.1, math.nan, 0.3)},
                 {"audio": f, "utt_id": "b"}])
    check_layout(b)
    assert b["audio"].tolist() == [[0.5, -1.0, 1 / 32768], [0.5, -0.25, 0.0]]
    assert b["emotion"].tolist() == [2, -100]
    assert torch.isnan(b["attributes"][1]).all() and torch.isnan(b["attributes"][0, 1])


def test_cut_batches_respects_the_cap():
    lengths = [5, 1, 3, 9, 2, 2, 8]
    batches = cut_batches(lengths, 10)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 10 or len(b) == 1
    # 1 | 2, 2 | 3 | 5 | 8 | 9: [1, 2] would be 75 % real, [2, 2, 3] 78 %, [3, 5] 80 %, [5, 8] over the cap
    assert batches == [[1], [4, 5], [2], [0], [6], [3]]
    for b in batches:
        assert sum(lengths[i] for i in b) >= 0.9 * len(b) * max(lengths[i] for i in b)


def test_cut_batches_without_the_real_share_rule_fills_to_the_cap():
    lengths = [5, 1, 3, 9, 2, 2, 8]
    batches = cut_batches(lengths, 10, min_real_fraction=0.0)
    assert batches[0] == [1, 4, 5]  # 1, 2, 2 → a fourth (3) would make 4 × 3 > 10


@pytest.mark.parametrize("train, crop", [(False, 30.0), (True, 6.0)])
def test_bucketing_keeps_real_audio_above_90_percent_on_iemocap_like_lengths(train, crop):
    # IEMOCAP-like: 0.6–30 s, median 3.5 s; the loader's default buffer and cap.
    rng = np.random.default_rng(0)
    seconds = np.clip(rng.lognormal(math.log(3.5), 0.65, 5000), 0.6, 30.0)
    assert 3.3 < np.median(seconds) < 3.7
    cfg = LoaderConfig(require=None)
    cap = int(cfg.max_batch_seconds * SR)
    lengths = [min(int(s * SR), int(crop * SR)) for s in seconds]
    batches = list(bucket_by_length(range(len(lengths)), lengths.__getitem__, cap, cfg.bucket_buffer,
                                    cfg.bucket_min_batches * cap, random.Random(0) if train else None))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= cap
    real_fraction = sum(lengths) / padded
    assert real_fraction >= 0.9, real_fraction
    worst = min(sum(lengths[i] for i in b) / (len(b) * max(lengths[i] for i in b)) for b in batches)
    assert worst >= 0.9, worst  # every batch, not only on average
    # …while batches stay full: on average at least 80 % of the cap in real audio.
    assert sum(lengths) / len(batches) >= 0.8 * cap


# ---- what is read is what the index lists ----------------------------------------------------

def _eval_ids(shards, **kw) -> list[str]:
    cfg = LoaderConfig(shards=shards, **{"require": None, "train": False, "num_workers": 0, **kw})
    return [u for b in read_all(cfg) for u in b["utt_id"]]


def test_a_stray_tar_in_a_group_is_an_error_naming_it(tmp_path):
    """A backup tar beside the shards once turned a 12-clip test set into 20 clips, silently."""
    write_test_shards(tmp_path, 12, 2)
    assert len(_eval_ids([str(tmp_path / "fold0")])) == 12
    stray = tmp_path / "fold0" / "old-backup.tar"
    stray.write_bytes((tmp_path / "fold0" / "fold0-000000.tar").read_bytes())
    for spec in (tmp_path / "fold0", tmp_path):  # group directory, corpus directory
        with pytest.raises(DataError) as e:
            _eval_ids([str(spec)])
        assert str(stray) in str(e.value) and "does not list" in str(e.value) and "\n" not in str(e.value)


def test_a_duplicate_copy_of_a_shard_is_an_error_not_a_traceback(tmp_path):
    write_test_shards(tmp_path, 6, 1)
    copy = tmp_path / "fold0" / "fold0-000000 (copy).tar"
    copy.write_bytes((tmp_path / "fold0" / "fold0-000000.tar").read_bytes())
    with pytest.raises(DataError, match=r"fold0-000000 \(copy\)\.tar: a \.tar that .* does not list"):
        _eval_ids([str(tmp_path / "fold0")])


def test_a_resized_or_missing_listed_shard_is_an_error(tmp_path):
    write_test_shards(tmp_path, 6, 2)
    shard = tmp_path / "fold0" / "fold0-000001.tar"
    shard.write_bytes(shard.read_bytes() + b"\0" * 512)
    with pytest.raises(DataError, match=r"fold0-000001\.tar: \d+ bytes, .*index\.json says \d+; run `dser verify"):
        _eval_ids([str(tmp_path / "fold0")])
    shard.unlink()
    with pytest.raises(DataError, match=r"fold0-000001\.tar: listed in .* but missing"):
        _eval_ids([str(tmp_path / "fold0")])


def test_loose_tars_and_globs_are_read_as_they_are_with_a_note(tmp_path, caplog):
    write_test_shards(tmp_path, 8, 2)
    loose = tmp_path / "copies" / "elsewhere"
    loose.mkdir(parents=True)
    for p in (tmp_path / "fold0").glob("*.tar"):
        (loose / p.name).write_bytes(p.read_bytes())
    with caplog.at_level("WARNING", logger="dser.data"):
        ids = _eval_ids([str(loose / "*.tar")])
    assert len(ids) == 8
    notes = [r.getMessage() for r in caplog.records if "loose .tar" in r.getMessage()]
    assert len(notes) == 1 and "2 loose .tar file(s) read as they are (no index" in notes[0]
    # A directory no index governs is not read blindly.
    with pytest.raises(DataError, match=r"has no index\.json in it or its parent.*elsewhere/\*\.tar"):
        _eval_ids([str(loose)])
    # A glob of group directories reads each through the index.
    write_test_shards(tmp_path, 4, 1, group="fold1", prefix="b")
    assert len(_eval_ids([str(tmp_path / "fold[01]")])) == 12


def test_old_format_shards_name_the_command_that_upgrades_them(tmp_path):
    write_test_shards(tmp_path, 4, 1, old_format=True)
    with pytest.raises(DataError) as e:
        _eval_ids([str(tmp_path / "fold0")])
    msg = str(e.value)
    assert "old format 'dser-shards/1'" in msg and f"dser shard testcorpus {tmp_path} {tmp_path} --overwrite" in msg


@pytest.mark.parametrize("workers", [0, 1])
def test_evaluation_stops_at_a_damaged_sample_naming_it(tmp_path, workers):
    """Garbage of the listed size where a tar header should be read as the archive's end when
    streaming: the samples after it vanished from a test set. Read by their table rows, the
    damaged sample is an error naming the shard and the sample."""
    write_test_shards(tmp_path, 10, 1)
    shard = tmp_path / "fold0" / "fold0-000000.tar"
    data_ = bytearray(shard.read_bytes())
    members = ShardIndex.load(tmp_path).table("fold0")
    cut = members[6].flac[0]  # the header of the 7th sample
    data_[cut:cut + 512] = b"\xff" * 512
    shard.write_bytes(bytes(data_))
    with pytest.raises(DataError) as e:
        _eval_ids([str(tmp_path / "fold0")], num_workers=workers)
    msg = str(e.value)
    assert msg.startswith(f"{shard}: sample '{members[6].key}': its flac member at") and "\n" not in msg
    assert f"dser verify {tmp_path}" in msg


@pytest.mark.parametrize("rate", [8000, 48000])
def test_shards_at_another_rate_are_resampled_to_the_loaders(tmp_path, rate):
    import soxr

    records = write_test_shards(tmp_path, 12, 2, sample_rate=rate, durations=(0.3, 1.0))
    cfg = LoaderConfig(shards=[str(tmp_path)], require=None, train=False, num_workers=0)
    batches = read_all(cfg)
    want = {r["utt_id"]: soxr.resample(r["audio"].astype(np.float32) / 32768, rate, SR, quality="HQ")
            for r in records}
    got = {}
    for b in batches:
        assert not b["bad_samples"]
        for i, u in enumerate(b["utt_id"]):
            got[u] = b["audio"][i, :int(b["lengths"][i])].numpy()
    assert got.keys() == want.keys()
    for u, x in got.items():
        assert abs(len(x) - len(want[u])) <= 1 and abs(len(x) - round(by_utt(records)[u]["duration"] * SR)) <= 1
        n = min(len(x), len(want[u]))
        np.testing.assert_allclose(x[:n], want[u][:n], atol=1e-6)
    assert sum(b["duration_s"] for b in batches) == pytest.approx(sum(r["duration"] for r in records), abs=1e-3)
