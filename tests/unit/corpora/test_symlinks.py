"""Symbolic links in the file-name-layout readers (emodb, crema-d, ravdess): a link to a real
clip is a record; a broken link, a link loop and a link to a directory are listed skips with
their reason. Every input a reader sees is either a record or a skip."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from fixtures_corpora import crema_names, ravdess_name, write_crema_d, write_emodb, write_ravdess

from dser.cli import main
from dser.corpora import read_corpus


def _plant(folder: Path, good: str, linked: str, broken: str, loop: str, to_dir: str) -> dict[str, str]:
    """Beside the real clip ``good``: a link to it, a broken link, a looping link, a link to a
    directory. Returns name → the reason expected (None for a record)."""
    os.symlink(folder / good, folder / linked)
    os.symlink(folder / "gone-away.wav", folder / broken)
    os.symlink(folder / loop, folder / loop)  # resolves to itself
    (folder.parent / "somedir").mkdir(exist_ok=True)
    os.symlink(folder.parent / "somedir", folder / to_dir)
    return {linked: None, broken: "broken symbolic link to ", loop: "symbolic link loop",
            to_dir: "a directory, not an audio file (a symbolic link to one)"}


CASES = {
    "emodb": (lambda root: write_emodb(root, names=("03a01Fa.wav",))[0].parent,
              "03a01Fa.wav", ("03a01Wa.wav", "08a02Lb.wav", "09b03Ta.wav", "11b09Na.wav")),
    "crema-d": (lambda root: write_crema_d(root, names=crema_names()[:1])[0].parent,
                crema_names()[0], tuple(crema_names()[1:5])),
    "ravdess": (lambda root: write_ravdess(root, actors=(1,), emotions=("01",))[0].parent,
                ravdess_name(1, "01"), tuple(ravdess_name(1, e) for e in ("03", "04", "05", "06"))),
}


@pytest.mark.parametrize("corpus", list(CASES))
def test_every_link_is_a_record_or_a_listed_skip(tmp_path, corpus):
    make, good, names = CASES[corpus]
    folder = make(tmp_path / corpus)
    good = next(p.name for p in folder.iterdir() if p.is_file() and not p.is_symlink())
    expected = _plant(folder, good, *names)
    listing = read_corpus(corpus, tmp_path / corpus)
    records = {Path(r.path).name for r in listing.records if Path(r.path).parent == folder}
    skips = {Path(s.input).name: s.reason for s in listing.skipped if Path(s.input).parent == folder}
    assert good in records
    for name, reason in expected.items():
        if reason is None:
            assert name in records and name not in skips
        else:
            assert name in skips and skips[name].startswith(reason), (name, skips.get(name))
            assert name not in records
    # Every .wav entry the reader saw appears exactly once.
    seen = [p.name for p in folder.iterdir() if p.suffix == ".wav"]
    assert sorted(seen) == sorted([*records, *skips])


def test_dser_shard_lists_the_bad_links_in_index_json(tmp_path):
    folder = write_emodb(tmp_path / "emodb", names=("03a01Fa.wav", "08a02Lb.wav"))[0].parent
    os.symlink(folder / "nowhere.wav", folder / "09b03Ta.wav")
    os.symlink(folder / "11b09Na.wav", folder / "11b09Na.wav")
    result = CliRunner().invoke(main, ["shard", "emodb", str(tmp_path / "emodb"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    reasons = {Path(s["input"]).name: s["reason"] for s in index["skipped"]}
    assert reasons["09b03Ta.wav"].startswith("broken symbolic link to ")
    assert reasons["11b09Na.wav"].startswith("symbolic link loop")
    assert index["totals"]["samples"] == 2
    assert "09b03Ta.wav: broken symbolic link" in result.output and "11b09Na.wav: symbolic link loop" in result.output


def test_a_looping_directory_link_does_not_hang_ravdess(tmp_path):
    wavs = write_ravdess(tmp_path / "rav", actors=(1, 2), emotions=("01",))
    before = read_corpus("ravdess", tmp_path / "rav")
    os.symlink(tmp_path / "rav", wavs[0].parent / "loop")  # a directory link back to ROOT
    after = read_corpus("ravdess", tmp_path / "rav")
    assert [r.path for r in after.records] == [r.path for r in before.records] and before.records
