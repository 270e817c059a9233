"""CREMA-D: labels from file names, gender from VideoDemographics.csv, speaker-independent folds."""

from __future__ import annotations

import re
from collections import defaultdict

import pytest
from fixtures_corpora import CREMA_ACTORS, crema_names, write_crema_d, write_wav

from dser.corpora import CorpusError, crema_d


def _fold_of_speaker(listing):
    folds = defaultdict(set)
    for r in listing.records:
        folds[r.speaker].add(r.group)
    return folds


def test_reads_every_clip_from_its_name(crema_root):
    listing = crema_d.read(crema_root)
    assert listing.skipped == []
    recs = {r.utt_id: r for r in listing.records}
    assert sorted(recs) == sorted(n[:-4] for n in crema_names())
    r = recs["1001_DFA_ANG_XX"]
    assert r.path == crema_root / "AudioWAV" / "1001_DFA_ANG_XX.wav"
    assert (r.corpus, r.speaker, r.gender, r.style) == ("crema-d", "1001", None, "acted")
    assert (r.emotion, r.emotion_raw) == ("angry", "ANG")
    assert r.extra == {"sentence": "DFA", "level": "XX"}
    assert (r.valence, r.arousal, r.dominance) == (None, None, None)
    assert recs["1002_IEO_HAP_HI"].extra == {"sentence": "IEO", "level": "HI"}
    assert {r.emotion for r in listing.records} == {"angry", "happy", "sad", "fear", "disgust", "neutral"}


def test_demographics_give_gender(tmp_path):
    write_crema_d(tmp_path, demographics={"1001": "Male", "1002": "Female", "1003": "Other"})
    gender = {r.speaker: r.gender for r in crema_d.read(tmp_path).records}
    assert gender["1001"] == "M" and gender["1002"] == "F"
    assert gender["1003"] is None and gender["1004"] is None  # unknown value, unlisted actor


def test_folds_are_speaker_independent_balanced_and_deterministic(crema_root):
    a, b = crema_d.read(crema_root), crema_d.read(crema_root)
    assert [(r.utt_id, r.group) for r in a.records] == [(r.utt_id, r.group) for r in b.records]
    folds = _fold_of_speaker(a)
    assert set(folds) == set(CREMA_ACTORS)
    assert all(len(f) == 1 for f in folds.values())  # each actor in exactly one fold
    assert {r.group for r in a.records} == {f"fold{i}" for i in range(5)}
    # 7 actors into 5 folds: 1001 (6 clips) alone, then the 3-clip actors fill the lightest folds.
    sizes = sorted(sum(r.group == f"fold{i}" for r in a.records) for i in range(5))
    assert sizes == [3, 3, 6, 6, 6]
    assert [r.speaker for r in a.records if r.group == a.records[0].group] == ["1001"] * 6


def test_n_folds_option(crema_root):
    listing = crema_d.read(crema_root, n_folds="3")
    assert {r.group for r in listing.records} == {"fold0", "fold1", "fold2"}
    assert all(len(f) == 1 for f in _fold_of_speaker(listing).values())


@pytest.mark.parametrize("value", ["1", "five", "2.5", ""])
def test_bad_n_folds_names_the_option(crema_root, value):
    with pytest.raises(ValueError, match="option n_folds.*allowed options: n_folds"):
        crema_d.read(crema_root, n_folds=value)


def test_unknown_option(crema_root):
    with pytest.raises(ValueError, match="unknown option 'folds'; allowed options: n_folds"):
        crema_d.read(crema_root, folds="5")


def test_bad_names_are_skipped_and_other_files_ignored(crema_root):
    audio = crema_root / "AudioWAV"
    for name in ("1001_DFA_XYZ_XX.wav", "1001_DFA_ANG_ZZ.wav", "readme.wav"):
        write_wav(audio / name)
    (audio / ".DS_Store").write_bytes(b"\0")
    (audio / "notes.txt").write_text("not audio")
    listing = crema_d.read(crema_root)
    skipped = {s.input: s.reason for s in listing.skipped}
    assert set(skipped) == {str(audio / n) for n in ("1001_DFA_XYZ_XX.wav", "1001_DFA_ANG_ZZ.wav", "readme.wav")}
    assert "unknown emotion code 'XYZ'" in skipped[str(audio / "1001_DFA_XYZ_XX.wav")]
    assert "unknown emotion level 'ZZ'" in skipped[str(audio / "1001_DFA_ANG_ZZ.wav")]
    assert "1001_DFA_ANG_XX.wav" in skipped[str(audio / "readme.wav")]
    assert len(listing.records) == len(crema_names())


def test_missing_audio_folder_is_a_corpus_error(tmp_path):
    with pytest.raises(CorpusError, match=re.escape(str(tmp_path / "AudioWAV"))):
        crema_d.read(tmp_path)


def test_demographics_without_its_columns_is_a_corpus_error(crema_root):
    (crema_root / "VideoDemographics.csv").write_text("Actor,Gender\n1001,Male\n")
    with pytest.raises(CorpusError, match="VideoDemographics.csv must have the columns ActorID and Sex"):
        crema_d.read(crema_root)
