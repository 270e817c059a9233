"""dser.shard_reader: samples read by their table offsets are what webdataset streams, the LRU
of open shard files stays bounded, damage is one line naming the shard and key, and a forked or
forkserver child reads with its own descriptors."""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import webdataset as wds
from fixtures_corpora import write_manifest

from dser.corpora import read_corpus
from dser.data import decode_flac
from dser.schema import Sample, ShardIndex
from dser.shard_reader import SampleReadError, ShardReader
from dser.shardfiles import DataError
from dser.shards import build_shards

LONG_ID = "u" * 120  # a key over tar's 100-character name field: dser shard writes a pax header for it


def _shards(tmp_path: Path, n: int = 14, per_shard: int = 3) -> Path:
    """Real ``dser shard`` output: a manifest corpus in one group over several shards."""
    emotions = ("neutral", "happy", "angry", "sad", None)
    rows = [{"path": f"wav/c{i}.wav", "utt_id": LONG_ID if i == 5 else f"spk{i % 2}.utt{i:03d}",
             "emotion": emotions[i % len(emotions)], "speaker": f"spk{i % 2}", "group": "fold0",
             "style": "acted", "valence": 0.25 if i % 3 else None} for i in range(n)]
    manifest = tmp_path / "corpus" / "manifest.jsonl"
    write_manifest(manifest, rows, seconds=0.4)
    out = tmp_path / "shards"
    build_shards(read_corpus("manifest", manifest), out, corpus="manifest", root=manifest,
                 max_shard_samples=per_shard, progress=False)
    return out


def _streamed(out: Path) -> dict[str, dict]:
    """key → {"flac": bytes, "json": bytes} as webdataset's streaming reader yields them."""
    urls = [str(p) for p in ShardIndex.load(out).shard_paths("fold0")]
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


def _shard_fds() -> list[str]:
    """The shard files this process holds open (from /proc/self/fd)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
        if target.endswith(".tar"):
            found.append(target)
    return found


def _one_line_error(excinfo, shard: Path, key: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(f"{shard}: sample {key!r}: "), message
    assert "dser verify" in message and "dser shard" in message and "--overwrite" in message
    assert isinstance(excinfo.value, DataError) and isinstance(excinfo.value, ValueError)  # counted as corrupt
    assert excinfo.value.shard == str(shard) and excinfo.value.key == key
    return message


def test_every_sample_read_by_offset_is_what_webdataset_streams(tmp_path):
    out = _shards(tmp_path)
    streamed = _streamed(out)
    reader = ShardReader(out / "fold0")
    assert len(reader.rows) == len(streamed) == 14
    assert len({r.shard for r in reader.rows}) == 5
    for row in reader.rows:
        flac, sample = reader.read(row)
        assert flac == streamed[row.key]["flac"]  # byte for byte
        assert sample == Sample.from_json(streamed[row.key]["json"])
        assert sample.utt_id == row.utt_id and len(decode_flac(flac, 16000)) == round(row.duration * 16000)
    assert any(r.key == LONG_ID for r in reader.rows)  # the pax-headed member was among them
    # read_many joins adjacent rows into one read and yields the same
    joined = list(reader.read_many(reader.rows))
    assert [r for r, _, _ in joined] == reader.rows
    assert all(flac == streamed[r.key]["flac"] and s == Sample.from_json(streamed[r.key]["json"])
               for r, flac, s in joined)
    # in a random order too, and from rows handed in
    index = ShardIndex.load(out)
    again = ShardReader.of_index(index, "fold0")
    for row in reversed(again.rows):
        assert again.read(row)[0] == streamed[row.key]["flac"]
    reader.close()
    again.close()


def test_the_lru_of_open_shards_is_bounded(tmp_path):
    out = _shards(tmp_path)
    before = _shard_fds()
    reader = ShardReader(out / "fold0", max_open=2)
    shards = sorted({r.shard for r in reader.rows})
    for row in [*reader.rows, *reversed(reader.rows), *reader.rows[::3]]:
        reader.read(row)
        assert reader.open_files <= 2
        assert len(_shard_fds()) - len(before) <= 2
    assert reader.open_files == 2
    # the most recently used two are the ones held
    last = reader.rows[::3][-2:]
    assert {Path(p).name for p in _shard_fds()} - {Path(p).name for p in before} == {r.shard for r in last}
    reader.close()
    assert reader.open_files == 0 and _shard_fds() == before
    assert len(shards) == 5
    with pytest.raises(DataError, match="max_open must be at least 1"):
        ShardReader(out / "fold0", max_open=0)


def test_a_missing_shard_is_one_line(tmp_path):
    out = _shards(tmp_path)
    reader = ShardReader(out / "fold0")
    row = reader.rows[-1]
    (out / "fold0" / row.shard).unlink()
    with pytest.raises(SampleReadError) as e:
        reader.read(row)
    assert "the shard is missing" in _one_line_error(e, out / "fold0" / row.shard, row.key)
    assert reader.read(reader.rows[0])[0]  # the others still read


def test_a_truncated_shard_is_one_line_and_the_samples_before_the_cut_still_read(tmp_path):
    out = _shards(tmp_path)
    reader = ShardReader(out / "fold0")
    rows = [r for r in reader.rows if r.shard == reader.rows[0].shard]
    shard = out / "fold0" / rows[0].shard
    cut = rows[1].json[0] + 100  # inside the second sample's JSON member
    shard.write_bytes(shard.read_bytes()[:cut])
    assert reader.read(rows[0])[0]
    for row in rows[1:]:
        with pytest.raises(SampleReadError) as e:
            reader.read(row)
        assert f"cut short: it ends at byte {cut}" in _one_line_error(e, shard, row.key)
    # read_many yields the rows before the damage, then raises at it
    got = []
    with pytest.raises(SampleReadError, match=rows[1].key):
        for row, _, _ in reader.read_many(rows):
            got.append(row)
    assert got == rows[:1]


def test_changed_member_bytes_are_one_line(tmp_path):
    out = _shards(tmp_path)
    reader = ShardReader(out / "fold0")
    a, b, c = reader.rows[:3]
    shard = out / "fold0" / a.shard
    data = bytearray(shard.read_bytes())
    json_a = data[a.json[0] + 512: a.json[0] + a.json[1]].rstrip(b"\0")
    data[a.json[0] + 512: a.json[0] + 512 + len(json_a)] = json_a.replace(b'"spk0"', b'"spk9"')  # same length
    data[b.json[0] + 512] = ord("X")  # the JSON no longer parses
    data[c.flac[0] + 3] ^= 0x20  # the name in the FLAC member's header (its checksum now fails)
    shard.write_bytes(bytes(data))
    with pytest.raises(SampleReadError) as e:
        reader.read(a)
    assert "its JSON has speaker 'spk9', the table 'spk0'" in _one_line_error(e, shard, a.key)
    with pytest.raises(SampleReadError) as e:
        reader.read(b)
    assert "its JSON does not parse as JSON" in _one_line_error(e, shard, b.key)
    with pytest.raises(SampleReadError) as e:
        reader.read(c)
    assert "its flac member at" in _one_line_error(e, shard, c.key) and "no tar header there" in str(e.value)


def test_a_wrong_offset_in_the_table_is_one_line(tmp_path):
    out = _shards(tmp_path)
    reader = ShardReader(out / "fold0")
    a, b = reader.rows[:2]
    shard = out / "fold0" / a.shard
    moved = replace(a, flac=(a.flac[0] + 512, a.flac[1]))  # into the member's data: no header there
    with pytest.raises(SampleReadError) as e:
        reader.read(moved)
    assert "no tar header there" in _one_line_error(e, shard, a.key)
    other = replace(a, flac=b.flac, json=b.json)  # another sample's members
    with pytest.raises(SampleReadError) as e:
        reader.read(other)
    assert f"the tar header there names '{b.key}.flac', not '{a.key}.flac'" in _one_line_error(e, shard, a.key)
    longer = replace(a, json=(a.json[0], a.json[1] + 512))  # a size that runs into the next member
    with pytest.raises(SampleReadError) as e:
        reader.read(longer)
    assert "do not fill the" in _one_line_error(e, shard, a.key)
    drifted = replace(a, duration=a.duration + 0.01)  # the JSON's duration is not the row's
    with pytest.raises(SampleReadError, match="its JSON has duration"):
        reader.read(drifted)
    assert reader.read(replace(a, duration=a.duration + 0.0009))[0]  # inside the 1 ms tolerance


def test_the_error_survives_a_worker_pickle(tmp_path):
    e = SampleReadError("x.tar: sample 'k': cut short; run `dser verify D`", "x.tar", "k")
    back = pickle.loads(pickle.dumps(e))
    assert str(back) == str(e) and back.shard == "x.tar" and back.key == "k"


def _digest(reader: ShardReader) -> str:
    h = hashlib.sha256()
    for row in reader.rows:
        flac, sample = reader.read(row)
        h.update(flac + sample.encode())
    return h.hexdigest()


def test_a_forked_child_opens_its_own_files(tmp_path):
    out = _shards(tmp_path)
    reader = ShardReader(out / "fold0", max_open=3)
    expected = _digest(reader)
    assert reader.open_files == 3
    parent_fds = dict(reader._fds)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: read everything, report the digest and whether it reused a descriptor
        try:
            os.close(r)
            digest = _digest(reader)
            reused = any(fd == parent_fds.get(name) and os.readlink(f"/proc/self/fd/{fd}").endswith(name)
                         for name, fd in reader._fds.items()) and reader._pid != os.getpid()
            os.write(w, f"{digest} {reader.open_files} {reused}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        digest, open_files, reused = f.read().decode().split()
    os.waitpid(pid, 0)
    assert digest == expected and open_files == "3" and reused == "False"
    assert _digest(reader) == expected  # the parent's descriptors are untouched


class _RowDataset:
    """A map-style dataset over a reader's rows, for DataLoader workers (picklable by reference)."""

    def __init__(self, reader: ShardReader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader.rows)

    def __getitem__(self, i: int) -> tuple[bytes, bytes, int]:
        flac, sample = self.reader.read(self.reader.rows[i])
        return flac, sample.encode(), os.getpid()


def test_dataloader_workers_from_the_forkserver_read_the_pickled_reader(tmp_path):
    from functools import partial

    from torch.utils.data import DataLoader

    from dser.workers import end_with_rank, worker_context

    out = _shards(tmp_path)
    reader = ShardReader(out / "fold0", max_open=2)
    expected = [(flac, sample.encode()) for flac, sample in map(reader.read, reader.rows)]
    assert reader.open_files == 2  # the parent holds open files when the dataset is pickled
    assert pickle.loads(pickle.dumps(reader)).open_files == 0  # no descriptor travels
    loader = DataLoader(_RowDataset(reader), batch_size=None, num_workers=2, multiprocessing_context=worker_context(),
                        worker_init_fn=partial(end_with_rank, os.getpid()))
    got = list(loader)
    assert [(flac, meta) for flac, meta, _ in got] == expected
    assert len({pid for _, _, pid in got}) == 2 and os.getpid() not in {pid for _, _, pid in got}
