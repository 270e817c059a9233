"""dser.shards: bit-exact round trip, resampling and down-mixing, the index, shard rolling,
determinism across worker counts, skipped inputs, --strict, --overwrite and atomic publishing."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

import dser
import dser.shards as shards
from dser.corpora import Listing, Record, Skip
from dser.shards import ShardError, ShardIndex, build_shards, shard_key

SR = 16000
EMOS = ("angry", "happy", "sad", "neutral", None)


def write_wav(path: Path, audio: np.ndarray, sr: int = SR, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, sr, subtype=subtype)
    return path


def noise(n: int, seed: int) -> np.ndarray:
    """(n,) int16 noise with both extremes in it, which must survive too."""
    x = np.random.default_rng(seed).integers(-12000, 12000, n, dtype=np.int16)
    x[:2] = (-32768, 32767)
    return x


def record(path: Path, i: int, group: str = "fold0", **kw) -> Record:
    fields = dict(utt_id=f"spk{i % 2}.utt{i:03d}", path=path, corpus="testcorpus", group=group,
                  speaker=f"spk{i % 2}", gender="FM"[i % 2], emotion=EMOS[i % len(EMOS)],
                  emotion_raw=str(EMOS[i % len(EMOS)]).upper()[:3], style="acted",
                  valence=0.25, arousal=None, dominance=0.75)
    fields.update(kw)
    return Record(**fields)


def corpus(tmp_path: Path, n: int, groups=("fold0",), seconds=(0.3, 0.8)) -> tuple[Listing, dict]:
    """n int16 16 kHz mono clips spread over groups; returns the listing and utt_id → samples."""
    rng = np.random.default_rng(1)
    recs, audio = [], {}
    for i in range(n):
        x = noise(int(rng.uniform(*seconds) * SR), seed=i)
        r = record(write_wav(tmp_path / "wav" / f"c{i}.wav", x), i, group=groups[i % len(groups)])
        recs.append(r)
        audio[r.utt_id] = x
    return Listing(recs), audio


def build(listing, out, **kw):
    kw.setdefault("progress", False)
    return build_shards(listing, out, corpus="testcorpus", root=out.parent / "root", **kw)


def read_shard(path: Path) -> dict[str, dict]:
    """key → {"flac": bytes, "json": dict} of one tar, in member order."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            payload = tar.extractfile(m).read()
            samples.setdefault(key, {})[ext] = json.loads(payload) if ext == "json" else payload
    return samples


def read_out(out: Path) -> dict[str, dict]:
    """utt_id → {"audio": int16 samples, "sr": rate, "json": labels} over every shard."""
    got = {}
    for tar in sorted(out.rglob("*.tar")):
        for key, s in read_shard(tar).items():
            audio, sr = sf.read(io.BytesIO(s["flac"]), dtype="int16")
            assert shard_key(s["json"]["utt_id"]) == key
            got[s["json"]["utt_id"]] = {"audio": audio, "sr": sr, "json": s["json"]}
    return got


def test_round_trip_is_bit_exact_and_keeps_labels(tmp_path):
    listing, audio = corpus(tmp_path, 6)
    listing.records[0].extra = {"dialog": "Ses01F_impro01", "start": 1.5}
    out = tmp_path / "shards"
    build(listing, out)

    got = read_out(out)
    assert set(got) == set(audio)
    for r in listing.records:
        g = got[r.utt_id]
        assert g["sr"] == SR
        np.testing.assert_array_equal(g["audio"], audio[r.utt_id])
        assert g["json"] == {**r.labels(), "duration": len(audio[r.utt_id]) / SR}
    assert got["spk0.utt000"]["json"]["dialog"] == "Ses01F_impro01"
    # The dotted ids were sanitised, so webdataset sees one sample per clip with both parts.
    ds = list(wds.WebDataset([str(p) for p in sorted(out.rglob("*.tar"))], shardshuffle=False))
    assert len(ds) == 6 and all({"flac", "json"} <= set(s) for s in ds)


def test_48k_stereo_becomes_16k_mono_of_the_same_duration(tmp_path):
    t = np.arange(48000 * 3 // 2) / 48000  # 1.5 s
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)  # (T, 2)
    path = write_wav(tmp_path / "st.wav", stereo, sr=48000)
    out = tmp_path / "shards"
    build(Listing([record(path, 0)]), out)

    (g,) = read_out(out).values()
    assert g["sr"] == SR and g["audio"].ndim == 1
    assert len(g["audio"]) == 24000 and g["json"]["duration"] == 1.5
    # Averaging the channels halves the tone; the resampled 440 Hz tone is where it should be.
    expected = 0.25 * np.sin(2 * np.pi * 440 * np.arange(24000) / SR)
    mid = slice(1000, -1000)  # away from the resampler's edges
    np.testing.assert_allclose(g["audio"][mid] / 32768, expected[mid], atol=2e-3)


def test_index_records_files_counts_and_options(tmp_path):
    listing, audio = corpus(tmp_path, 9, groups=("fold0", "fold1", "Session2"))
    listing.skipped.append(Skip("/labels.csv line 7", "unknown emotion code 'X'"))
    out = tmp_path / "shards"
    index = build(listing, out, max_shard_samples=2)
    data = json.loads((out / "index.json").read_text())
    assert data == index.data

    assert data["format"] == "dser-shards/2" and data["corpus"] == "testcorpus"
    assert data["dser_version"] == dser.__version__ and data["sample_rate"] == SR
    assert data["root"] == str((tmp_path / "root").absolute())
    assert data["options"] == {"reader": "testcorpus", "sample_rate": SR, "max_shard_mb": 256.0,
                               "max_shard_samples": 2, "min_duration": 0.25, "max_duration": None, "max_clipped": 0.01,
                               "workers": 1, "overwrite": False, "strict": False}
    assert list(data["groups"]) == ["Session2", "fold0", "fold1"]
    assert data["skipped"] == [{"input": "/labels.csv line 7", "reason": "unknown emotion code 'X'"}]
    for name, g in data["groups"].items():
        recs = [r for r in listing.records if r.group == name]
        assert g["samples"] == len(recs) == sum(s["samples"] for s in g["shards"])
        seconds = sum(len(audio[r.utt_id]) for r in recs) / SR
        assert g["hours"] == pytest.approx(seconds / 3600, abs=1e-6)
        want = {}
        for r in recs:
            want[r.emotion or "null"] = want.get(r.emotion or "null", 0) + 1
        assert g["emotions"] == want and g["styles"] == {"acted": len(recs)}
        for s in g["shards"]:
            path = out / s["path"]
            assert s["path"].startswith(f"{name}/{name}-")
            assert s["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert s["bytes"] == path.stat().st_size
            members = read_shard(path)
            assert s["samples"] == len(members)
            assert s["seconds"] == pytest.approx(sum(m["json"]["duration"] for m in members.values()), abs=1e-3)
        # The per-sample table lists every sample in shard order, and its spans seek each member.
        table = (out / g["table"]["path"]).read_bytes()
        assert g["table"] == {"path": f"{name}/samples.jsonl", "sha256": hashlib.sha256(table).hexdigest(),
                              "bytes": len(table), "rows": len(recs)}
        rows = index.table(name)
        assert [r.utt_id for r in rows] == [r.utt_id for r in recs]
        for row, rec in zip(rows, recs):
            shard = (out / name / row.shard).read_bytes()
            meta = read_shard(out / name / row.shard)[row.key]["json"]
            assert (row.speaker, row.emotion, row.style) == (rec.speaker, rec.emotion, rec.style)
            assert row.duration == meta["duration"] and row.clipped == 0
            assert row.attributes == tuple(a for a in ("valence", "arousal", "dominance") if meta[a] is not None)
            for ext in ("flac", "json"):
                offset, size = getattr(row, ext)
                with tarfile.open(fileobj=io.BytesIO(shard[offset:offset + size]), mode="r:") as one:
                    (member,) = one.getmembers()
                    assert member.name == f"{row.key}.{ext}"
                    payload = one.extractfile(member).read()
                with tarfile.open(out / name / row.shard) as whole:
                    assert payload == whole.extractfile(f"{row.key}.{ext}").read()
        speakers = {}
        for r in recs:
            speakers[r.speaker] = speakers.get(r.speaker, 0) + 1
        assert g["speakers"] == dict(sorted(speakers.items()))
        assert sum(n for per in g["emotion_style"].values() for n in per.values()) == len(recs)
        assert g["clipped"] == {"samples": 0, "clips": 0}
    assert data["totals"]["samples"] == 9
    assert data["totals"]["hours"] == pytest.approx(sum(map(len, audio.values())) / SR / 3600, abs=1e-6)
    assert sum(data["totals"]["emotions"].values()) == 9 and data["totals"]["emotions"]["null"] == 1
    assert index.verify() == []


def test_shards_roll_at_max_samples(tmp_path):
    listing, _ = corpus(tmp_path, 7)
    out = tmp_path / "shards"
    index = build(listing, out, max_shard_samples=3)
    assert [s["samples"] for s in index.group("fold0")["shards"]] == [3, 3, 1]
    assert [p.name for p in index.shard_paths("fold0")] == [f"fold0-00000{i}.tar" for i in range(3)]
    # Reader order is kept within the group, across shards.
    ids = [s["json"]["utt_id"] for p in index.shard_paths("fold0") for s in read_shard(p).values()]
    assert ids == [r.utt_id for r in listing.records]


def test_shards_roll_before_passing_max_mb(tmp_path):
    listing, _ = corpus(tmp_path, 10, seconds=(0.5, 0.6))  # ~15 kB of FLAC each (noise)
    out = tmp_path / "shards"
    limit_mb = 0.05
    index = build(listing, out, max_shard_mb=limit_mb)
    sizes = [p.stat().st_size for p in index.shard_paths("fold0")]
    assert len(sizes) >= 3
    assert all(size <= limit_mb * 2**20 for size in sizes)
    assert sum(s["samples"] for s in index.group("fold0")["shards"]) == 10
    # A clip larger than the limit still gets a shard of its own rather than being lost.
    tiny = build(listing, tmp_path / "tiny", max_shard_mb=0.001)
    assert [s["samples"] for s in tiny.group("fold0")["shards"]] == [1] * 10


def test_worker_count_does_not_change_the_bytes(tmp_path):
    listing, _ = corpus(tmp_path, 8, groups=("a", "b"))
    t = np.arange(22050) / 22050
    odd = write_wav(tmp_path / "wav" / "odd.wav", 0.3 * np.sin(2 * np.pi * 300 * t), sr=22050)
    listing.records.append(record(odd, 99, group="a"))
    one = build(listing, tmp_path / "w1", workers=1, max_shard_samples=3)
    two = build(listing, tmp_path / "w2", workers=2, max_shard_samples=3)
    assert one.data["groups"] == two.data["groups"]
    for p1, p2 in zip(one.shard_paths(), two.shard_paths()):
        assert p1.read_bytes() == p2.read_bytes()
    # Nothing of the moment or the user leaks into the bytes: a rebuild later matches too.
    with tarfile.open(one.shard_paths()[0]) as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in tar.getmembers()} == {(0, 0, 0, "", "", 0o444)}


def bad_inputs(tmp_path: Path) -> tuple[list[Record], dict[str, str]]:
    """Records whose audio is broken in each way the sharder must catch → expected reason."""
    d = tmp_path / "bad"
    d.mkdir()
    good = write_wav(d / "good.wav", noise(8000, 0))
    garbage = d / "garbage.wav"
    garbage.write_bytes(b"this is not audio " * 100)
    zero_bytes = d / "zero.wav"
    zero_bytes.write_bytes(b"")
    truncated = d / "truncated.wav"
    full = write_wav(d / "full.wav", noise(16000, 1)).read_bytes()
    truncated.write_bytes(full[: len(full) // 2])
    empty = write_wav(d / "empty.wav", np.zeros(0, np.int16))
    nan = np.full(8000, 0.1, np.float32)
    nan[100] = np.nan
    nan_wav = write_wav(d / "nan.wav", nan, subtype="FLOAT")
    inf = np.full(8000, 0.1)
    inf[5] = np.inf
    inf_wav = write_wav(d / "inf.wav", inf, sr=22050, subtype="DOUBLE")
    short = write_wav(d / "short.wav", noise(1600, 2))  # 0.1 s
    silent = write_wav(d / "silent.wav", np.zeros(8000, np.int16))
    full_flac = d / "full.flac"
    sf.write(full_flac, noise(16000, 3), SR, subtype="PCM_16")
    cut_flac = d / "cut.flac"
    cut_flac.write_bytes(full_flac.read_bytes()[: full_flac.stat().st_size // 2])
    expected = {
        garbage: "unreadable audio", zero_bytes: "unreadable audio",
        truncated: "truncated audio: the header promises 16000 samples",
        empty: "empty audio", nan_wav: "non-finite", inf_wav: "non-finite",
        short: "too short: 0.100 s", silent: "silent audio", d / "missing.wav": "audio file missing",
        cut_flac: "truncated",
    }
    recs = [record(good, 0, utt_id="good.1")]
    recs += [record(p, i, utt_id=p.stem) for i, p in enumerate(expected, start=1)]
    recs.append(record(d / "good.wav", 50, utt_id="good.1"))  # the same id again
    recs.append(record(d / "good.wav", 51, utt_id="good_1"))  # a different id, the same key
    return recs, {str(p): reason for p, reason in expected.items()}


def test_bad_inputs_are_skipped_with_their_reason_and_the_rest_kept(tmp_path):
    recs, expected = bad_inputs(tmp_path)
    out = tmp_path / "shards"
    index = build(Listing(recs, [Skip("/x/labels.txt line 3", "no audio for row")]), out)

    assert list(read_out(out)) == ["good.1"]
    skipped = index.skipped
    assert skipped[0] == Skip("/x/labels.txt line 3", "no audio for row")
    reasons = {s.input: s.reason for s in skipped[1:] if "good" not in Path(s.input).name}
    assert set(reasons) == set(expected)
    for path, want in expected.items():
        assert want in reasons[path], (path, reasons[path])
    dup = [s.reason for s in skipped if Path(s.input).name == "good.wav"]
    assert dup == ["duplicate utterance id 'good.1'",
                   "utterance id 'good_1' gives the same shard key 'good_1' as 'good.1'"]
    assert ShardIndex.load(out).skipped == skipped


def test_summary_is_printed(tmp_path, capsys):
    recs, _ = bad_inputs(tmp_path)
    out = tmp_path / "shards"
    build(Listing(recs), out)
    printed = capsys.readouterr().out
    assert f"wrote {out.absolute()}: 1 group(s), 1 samples in 1 shard(s)" in printed
    assert "skipped 12 input(s)" in printed and "… and 2 more" in printed
    assert f"index: {out.absolute() / 'index.json'}" in printed


def test_strict_fails_naming_the_inputs_and_writes_nothing(tmp_path):
    recs, expected = bad_inputs(tmp_path)
    out = tmp_path / "shards"
    with pytest.raises(ShardError, match="--strict: 12 input") as e:
        build(Listing(recs), out, strict=True)
    assert str(tmp_path / "bad" / "garbage.wav") in str(e.value) and "unreadable audio" in str(e.value)
    assert not out.exists()
    assert list(tmp_path.glob(".shards.partial-*")) == []
    # A reader-level skip alone is enough.
    listing, _ = corpus(tmp_path, 2)
    listing.skipped.append(Skip("/x/labels.txt line 3", "unknown emotion code 'Q'"))
    with pytest.raises(ShardError, match="unknown emotion code 'Q'"):
        build(listing, out, strict=True)
    assert not out.exists()


def test_existing_out_needs_overwrite_which_replaces_it(tmp_path):
    listing, _ = corpus(tmp_path, 4)
    out = tmp_path / "shards"
    build(listing, out, max_shard_samples=1)
    before = (out / "index.json").read_bytes()
    with pytest.raises(ShardError, match="already exists; pass --overwrite"):
        build(listing, out)
    assert (out / "index.json").read_bytes() == before

    index = build(Listing(listing.records[:2]), out, overwrite=True, max_shard_samples=1)
    assert index.totals["samples"] == 2
    assert sorted(p.name for p in (out / "fold0").iterdir()) == ["fold0-000000.tar", "fold0-000001.tar",
                                                                 "samples.jsonl"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwrite_refuses_a_directory_that_is_not_shards(tmp_path):
    listing, _ = corpus(tmp_path, 2)
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("…")
    with pytest.raises(ShardError, match="not a dser shard directory"):
        build(listing, precious, overwrite=True)
    assert (precious / "chapter1.tex").read_text() == "…"


@pytest.mark.parametrize("existing, workers", [(False, 1), (True, 1), (False, 2)])
def test_a_crash_mid_write_leaves_no_out_and_no_temp(tmp_path, monkeypatch, existing, workers):
    listing, _ = corpus(tmp_path, 6)
    out = tmp_path / "shards"
    if existing:
        build(listing, out)
        before = (out / "index.json").read_bytes()
    calls = []
    real_add = shards._TarShardWriter.add

    def crashing_add(self, *args):
        calls.append(1)
        if len(calls) == 4:
            raise OSError("disk full")
        real_add(self, *args)

    monkeypatch.setattr(shards._TarShardWriter, "add", crashing_add)
    with pytest.raises(OSError, match="disk full"):
        build(listing, out, overwrite=True, max_shard_samples=2, workers=workers)
    assert len(calls) == 4
    if existing:
        assert (out / "index.json").read_bytes() == before and ShardIndex.load(out).verify() == []
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_kill_9_mid_write_leaves_only_a_partial_dir(tmp_path):
    listing, _ = corpus(tmp_path, 6)
    out = tmp_path / "shards"
    spec = [(str(r.path), r.utt_id) for r in listing.records]
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        import dser.shards as shards
        from dser.corpora import Listing, Record
        real_add, n = shards._TarShardWriter.add, [0]
        def add(self, *a):
            n[0] += 1
            if n[0] == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            real_add(self, *a)
        shards._TarShardWriter.add = add
        recs = [Record(u, Path(p), "t", "fold0") for p, u in {spec!r}]
        shards.build_shards(Listing(recs), Path({str(out)!r}), corpus="t", root=Path("."),
                            max_shard_samples=2, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(shards.__file__).parents[1],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert not out.exists()
    (partial,) = tmp_path.glob(".shards.partial-*")
    assert not (partial / "index.json").exists()
    # The next run says the leftover may go, and succeeds.
    build(listing, out)
    assert ShardIndex.load(out).totals["samples"] == 6


def test_nothing_to_shard_is_an_error(tmp_path):
    recs, _ = bad_inputs(tmp_path)
    bad_only = [r for r in recs if not r.utt_id.startswith("good")]
    with pytest.raises(ShardError, match="nothing to shard"):
        build(Listing(bad_only), tmp_path / "shards")
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize("kw, match", [
    (dict(sample_rate=0), "--sample-rate"), (dict(sample_rate=12345), "--sample-rate must be one of 8000, 16000"),
    (dict(max_shard_mb=0), "--max-shard-mb"),
    (dict(max_shard_samples=0), "--max-shard-samples"), (dict(min_duration=-1), "--min-duration"),
    (dict(workers=0), "--workers"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, kw, match):
    listing, _ = corpus(tmp_path, 1)
    with pytest.raises(ShardError, match=match):
        build(listing, tmp_path / "shards", **kw)
    assert not (tmp_path / "shards").exists()


def test_a_group_unfit_for_a_directory_is_refused(tmp_path):
    listing, _ = corpus(tmp_path, 2)
    listing.records[1].group = "../escape"
    with pytest.raises(ShardError, match="cannot name a shard directory"):
        build(listing, tmp_path / "shards")


def test_shard_index_load_save_and_verify(tmp_path):
    listing, _ = corpus(tmp_path, 5, groups=("fold0", "fold1"))
    listing.skipped.append(Skip("/a.wav", "duplicate utterance id 'a'"))
    out = tmp_path / "shards"
    built = build(listing, out, max_shard_samples=2)

    loaded = ShardIndex.load(out)
    assert loaded.data == built.data and loaded.out == out.absolute()
    assert ShardIndex.load(out / "index.json").data == built.data
    assert loaded.groups == ["fold0", "fold1"] and loaded.corpus == "testcorpus" and loaded.sample_rate == SR
    assert loaded.shard_paths("fold1") == [out.absolute() / "fold1/fold1-000000.tar"]
    assert len(loaded.shard_paths()) == 3 and all(p.is_file() for p in loaded.shard_paths())
    assert loaded.skipped == [Skip("/a.wav", "duplicate utterance id 'a'")]
    with pytest.raises(ShardError, match="no shard group 'fold7'; groups: fold0, fold1"):
        loaded.shard_paths("fold7")

    loaded.data["note"] = "edited"
    loaded.save()
    assert ShardIndex.load(out).data["note"] == "edited"

    victim = loaded.shard_paths("fold0")[0]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    loaded.shard_paths("fold1")[0].unlink()
    problems = loaded.verify()
    assert len(problems) == 2 and "sha256 differs" in problems[0] and "missing" in problems[1]


def test_shard_index_load_errors(tmp_path):
    with pytest.raises(ShardError, match="expected a shard directory with index.json, found .*dser shard"):
        ShardIndex.load(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ShardError, match="cannot be read as JSON"):
        ShardIndex.load(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ShardError, match="not a dser shard index"):
        ShardIndex.load(tmp_path)
