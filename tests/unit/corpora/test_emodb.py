"""EmoDB: labels and gender from the file names, speaker-independent folds."""

from __future__ import annotations

import re
from collections import defaultdict

import pytest
from fixtures_corpora import EMODB_NAMES, write_emodb, write_wav

from dser.corpora import CorpusError, emodb


def test_reads_every_clip_from_its_name(emodb_root):
    listing = emodb.read(emodb_root)
    assert listing.skipped == []
    recs = {r.utt_id: r for r in listing.records}
    assert sorted(recs) == sorted(n[:-4] for n in EMODB_NAMES)
    r = recs["03a01Fa"]
    assert r.path == emodb_root / "wav" / "03a01Fa.wav"
    assert (r.corpus, r.speaker, r.gender, r.style) == ("emodb", "03", "M", "acted")
    assert (r.emotion, r.emotion_raw) == ("happy", "F")
    assert r.extra == {"text": "a01", "version": "a"}
    assert {r.emotion_raw: r.emotion for r in listing.records} == {
        "W": "angry", "L": "boredom", "E": "disgust", "A": "fear", "F": "happy", "T": "sad", "N": "neutral"}
    assert {r.speaker: r.gender for r in listing.records} == {
        "03": "M", "08": "F", "09": "F", "10": "M", "11": "M", "13": "F", "14": "F", "16": "F"}


def test_folds_are_speaker_independent_and_deterministic(emodb_root):
    a, b = emodb.read(emodb_root), emodb.read(emodb_root, n_folds=5)
    assert [(r.utt_id, r.group) for r in a.records] == [(r.utt_id, r.group) for r in b.records]
    folds = defaultdict(set)
    for r in a.records:
        folds[r.speaker].add(r.group)
    assert all(len(f) == 1 for f in folds.values())
    assert {r.group for r in a.records} == {f"fold{i}" for i in range(5)}
    two = emodb.read(emodb_root, n_folds="2")
    assert {r.group for r in two.records} == {"fold0", "fold1"}
    # 12 clips: the largest speakers first, each to the lighter fold, ends 6/6.
    assert sum(r.group == "fold0" for r in two.records) == 6


def test_bad_names_are_skipped_and_unknown_speakers_have_no_gender(emodb_root):
    wav = emodb_root / "wav"
    bad_code = write_wav(wav / "03a01Xa.wav")
    bad_name = write_wav(wav / "speaker3.wav")
    write_wav(wav / "21a01Na.wav")
    (wav / "README").write_text("not audio")
    listing = emodb.read(emodb_root)
    skipped = {s.input: s.reason for s in listing.skipped}
    assert set(skipped) == {str(bad_code), str(bad_name)}
    assert "unknown emotion code 'X' in 03a01Xa.wav" in skipped[str(bad_code)]
    assert "03a01Fa.wav" in skipped[str(bad_name)]
    r = next(r for r in listing.records if r.utt_id == "21a01Na")
    assert (r.speaker, r.gender, r.emotion) == ("21", None, "neutral")


def test_missing_wav_folder_is_a_corpus_error(tmp_path):
    with pytest.raises(CorpusError, match=re.escape(f"expected a directory at {tmp_path / 'wav'}")):
        emodb.read(tmp_path)


def test_unknown_option(emodb_root):
    with pytest.raises(ValueError, match="unknown option 'include_song'; allowed options: n_folds"):
        emodb.read(emodb_root, include_song="true")
