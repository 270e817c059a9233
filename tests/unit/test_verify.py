"""dser verify finds flipped bytes, truncated shards, and passes clean ones."""

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
