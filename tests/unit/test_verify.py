"""dser verify finds flipped bytes, truncated shards, and passes clean ones."""

import hashlib
import json
from pathlib import Path

from click.testing import CliRunner
from fixtures_corpora import write_emodb

from dser.cli import main
from dser.corpora import read_corpus
from dser.shards import build_shards
from dser.verify import verify_shards


def _shards(tmp_path: Path) -> Path:
    root = tmp_path / "emodb"
    write_emodb(root, seconds=0.5)
    out = tmp_path / "shards"
    build_shards(read_corpus("emodb", root), out, corpus="emodb", root=root, max_shard_samples=2,
                 progress=False)
    return out


def test_clean_shards_verify(tmp_path):
    out = _shards(tmp_path)
    report = verify_shards(out, progress=False)
    assert report.ok, report.problems
    assert report.samples > 0 and report.shards > 1
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 0, result.output


def test_flipped_byte_is_reported_with_its_shard(tmp_path):
    out = _shards(tmp_path)
    shard = sorted(out.glob("*/*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[1024 + 200] ^= 0xFF  # inside the first member's payload
    shard.write_bytes(bytes(data))
    report = verify_shards(out, progress=False)
    assert not report.ok
    assert any(str(shard) in p and "sha256" in p for p in report.problems)
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 1
    assert str(shard) in result.output


def test_truncated_shard_is_reported(tmp_path):
    out = _shards(tmp_path)
    shard = sorted(out.glob("*/*.tar"))[-1]
    shard.write_bytes(shard.read_bytes()[:700])
    report = verify_shards(out, progress=False)
    text = "\n".join(report.problems)
    assert "bytes, index says" in text
    assert "samples, the index says" in text or "truncated" in text


def test_missing_index_is_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert result.exit_code != 0
    assert "index.json" in result.output


def test_unlisted_files_are_reported(tmp_path):
    """A stray backup tar and a copy of a shard: verify names them (training never reads them)."""
    out = _shards(tmp_path)
    shard = sorted(out.glob("*/*.tar"))[0]
    (shard.parent / "backup.tar").write_bytes(shard.read_bytes())
    (out / "notes.txt").write_text("hi")
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 1
    assert f"{shard.parent / 'backup.tar'}: not listed in {out / 'index.json'}" in result.output
    assert f"{out / 'notes.txt'}: not listed" in result.output


def test_every_number_the_index_states_is_checked(tmp_path):
    out = _shards(tmp_path)
    index = json.loads((out / "index.json").read_text())
    group = next(iter(index["groups"]))
    g = index["groups"][group]
    spk = next(iter(g["speakers"]))
    g["speakers"][spk] += 1
    emo = next(iter(g["emotion_style"]))
    g["emotion_style"][emo]["acted"] = g["emotion_style"][emo].get("acted", 0) + 5
    g["samples"] += 1
    index["totals"]["emotions"]["sad"] = index["totals"]["emotions"].get("sad", 0) + 2
    (out / "index.json").write_text(json.dumps(index))
    text = "\n".join(verify_shards(out, progress=False).problems)
    assert f"group {group} speakers: the index says" in text
    assert f"group {group} emotion_style: the index says" in text
    assert f"group {group} samples: the index says {g['samples']}, the shards hold {g['samples'] - 1}" in text
    assert "totals emotions: the index says" in text
    assert "totals samples" in text


def test_the_table_is_checked_against_the_tars(tmp_path):
    out = _shards(tmp_path)
    index = json.loads((out / "index.json").read_text())
    group = next(iter(index["groups"]))
    table = out / index["groups"][group]["table"]["path"]
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    rows[0]["flac"][0] += 512  # a wrong offset
    rows[1]["emotion"] = "fear" if rows[1]["emotion"] != "fear" else "sad"  # a wrong label
    dropped = rows.pop()  # a sample the table does not list
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    table.write_bytes(data)
    # Keep the table's sha256 in the index, so only the content checks can catch it.
    index["groups"][group]["table"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (out / "index.json").write_text(json.dumps(index))
    text = "\n".join(verify_shards(out, progress=False).problems)
    assert f"{rows[0]['utt_id']!r} has flac" in text
    assert f"{rows[1]['utt_id']!r} has emotion" in text
    assert f"no row for {dropped['utt_id']!r}" in text


def test_an_old_format_directory_names_the_upgrade_command(tmp_path):
    from fixtures_shards import write_test_shards

    write_test_shards(tmp_path / "old", n_samples=3, n_shards=1, old_format=True)
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "old")])
    assert result.exit_code != 0 and "old format 'dser-shards/1'" in result.output
    assert f"dser shard testcorpus {tmp_path / 'old'} {tmp_path / 'old'} --overwrite" in result.output
    assert "Traceback" not in result.output
