"""IEMOCAP: label rows become records; headers, annotator lines and bad rows do not."""

from __future__ import annotations

import re

import pytest
from fixtures_corpora import IEMOCAP_TURNS, write_iemocap, write_wav

from dser.corpora import CorpusError, iemocap, read_corpus


def _by_id(listing):
    return {r.utt_id: r for r in listing.records}


def test_reads_every_turn_with_its_labels(iemocap_root):
    listing = iemocap.read(iemocap_root)
    assert listing.skipped == []  # headers, C-E/A-E lines and blank lines are not skips
    recs = _by_id(listing)
    assert sorted(recs) == sorted(t[0] for t in IEMOCAP_TURNS)

    r = recs["Ses01F_impro01_F000"]
    assert r.path == iemocap_root / "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav"
    assert (r.corpus, r.group, r.speaker, r.gender) == ("iemocap", "Session1", "Ses01F", "F")
    assert (r.emotion, r.emotion_raw, r.style) == ("neutral", "neu", "natural")
    assert (r.valence, r.arousal, r.dominance) == (0.375, 0.375, 0.375)
    assert r.extra == {"dialog": "Ses01F_impro01", "start": 1.0, "end": 1.3}

    # The speaker is the gender letter of the turn id's last part, not the dialog's.
    r = recs["Ses01F_impro01_M001"]
    assert (r.speaker, r.gender, r.emotion) == ("Ses01M", "M", "angry")
    assert r.valence == pytest.approx(0.125) and r.arousal == 0.75 and r.dominance == 0.875
    assert r.extra["start"] == 4.0

    r = recs["Ses01F_script01_1_F002"]
    assert (r.emotion, r.emotion_raw, r.style) == (None, "xxx", "acted")
    assert r.extra["dialog"] == "Ses01F_script01_1" and r.valence == 0.5

    assert recs["Ses01M_script02_2_M000"].emotion == "frustrated"
    assert recs["Ses02F_impro03_F000"].emotion == "excited"
    assert (recs["Ses02F_impro03_M001"].group, recs["Ses02F_impro03_M001"].speaker) == ("Session2", "Ses02M")
    assert (recs["Ses02F_impro03_M001"].valence, recs["Ses02F_impro03_M001"].dominance) == (0.0, 0.0)


def test_other_codes_map_to_the_canonical_vocabulary(tmp_path):
    codes = {"hap": "happy", "sur": "surprise", "fea": "fear", "dis": "disgust", "oth": "other",
             "sad": "sad"}
    turns = [(f"Ses03M_impro02_F{i:03d}", code, (3, 3, 3)) for i, code in enumerate(codes)]
    write_iemocap(tmp_path, turns)
    got = {r.emotion_raw: r.emotion for r in iemocap.read(tmp_path).records}
    assert got == codes


def test_irregular_rows_are_skipped_with_file_and_line(iemocap_root):
    # One row whose WAV is missing, in a dialog of its own.
    write_iemocap(iemocap_root, [("Ses01F_impro02_F000", "neu", (3, 3, 3))], missing_audio={"Ses01F_impro02_F000"})
    txt = iemocap_root / "Session1/dialog/EmoEvaluation/Ses01F_impro01.txt"
    wav_dir = iemocap_root / "Session1/sentences/wav/Ses01F_impro01"
    for utt in ("Ses01F_impro01_F010", "Ses01F_impro01_F011", "Ses01F_impro01_F012"):
        write_wav(wav_dir / f"{utt}.wav")
    n = len(txt.read_text().splitlines())
    with open(txt, "a") as f:
        f.write("[10.0000 - 11.0000]\tSes01F_impro01_F010\tzzz\t[3.0000, 3.0000, 3.0000]\n"  # n+1
                "[12.0000 - 13.0000]\tSes01F_impro01_F011\tneu\t[3.0000, 6.0000, 3.0000]\n"  # n+2
                "[14.0000 - ]\tSes01F_impro01_F012\tneu\t[3.0000, 3.0000, 3.0000]\n"        # n+3
                "\n% another comment\nC-E4:\tAnger;\t()\n")
    listing = iemocap.read(iemocap_root)
    skipped = {s.input: s.reason for s in listing.skipped}
    assert len(skipped) == 4
    assert "unknown emotion code 'zzz'" in skipped[f"{txt}:{n + 1}"]
    assert "Ses01F_impro01_F010" in skipped[f"{txt}:{n + 1}"]
    assert "outside the scale [1.0, 5.0]" in skipped[f"{txt}:{n + 2}"]
    assert "unparseable" in skipped[f"{txt}:{n + 3}"]
    missing_txt = iemocap_root / "Session1/dialog/EmoEvaluation/Ses01F_impro02.txt"
    missing_wav = iemocap_root / "Session1/sentences/wav/Ses01F_impro02/Ses01F_impro02_F000.wav"
    assert skipped[f"{missing_txt}:3"] == f"label row has no audio file at {missing_wav}"
    assert sorted(r.utt_id for r in listing.records) == sorted(t[0] for t in IEMOCAP_TURNS)


def test_only_top_level_label_files_are_read(iemocap_root):
    # A label-shaped row in a per-annotator subfolder must not become a record.
    labels = iemocap_root / "Session1/dialog/EmoEvaluation"
    write_wav(iemocap_root / "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F099.wav")
    (labels / "Attribute" / "Ses01F_impro01_e1.txt").write_text(
        "[1.0000 - 2.0000]\tSes01F_impro01_F099\tneu\t[3.0000, 3.0000, 3.0000]\n")
    assert "Ses01F_impro01_F099" not in _by_id(iemocap.read(iemocap_root))


def test_missing_sessions_are_not_an_error(tmp_path):
    write_iemocap(tmp_path, [t for t in IEMOCAP_TURNS if t[0].startswith("Ses02")])
    listing = iemocap.read(tmp_path)
    assert {r.group for r in listing.records} == {"Session2"}
    assert len(listing.records) == 2


def test_root_without_sessions_is_a_corpus_error(tmp_path):
    with pytest.raises(CorpusError, match=re.escape(f"Session1 … Session5 directories in {tmp_path}")):
        iemocap.read(tmp_path)


def test_session_without_label_folder_is_a_corpus_error(iemocap_root):
    (iemocap_root / "Session3" / "sentences").mkdir(parents=True)
    with pytest.raises(CorpusError, match="Session3/dialog/EmoEvaluation"):
        iemocap.read(iemocap_root)


def test_options_are_refused(iemocap_root):
    with pytest.raises(ValueError, match="unknown option 'n_folds'; allowed options: none"):
        iemocap.read(iemocap_root, n_folds="5")


def test_read_corpus_turns_a_duplicate_turn_into_a_skip(iemocap_root):
    # The same turn listed in two dialogs' label files (a hand-edited copy).
    other = iemocap_root / "Session1/dialog/EmoEvaluation/Ses01F_script01_1.txt"
    with open(other, "a") as f:
        f.write("[20.0000 - 21.0000]\tSes01F_impro01_F000\tang\t[1.0000, 5.0000, 5.0000]\n")
    listing = read_corpus("iemocap", iemocap_root)
    recs = [r for r in listing.records if r.utt_id == "Ses01F_impro01_F000"]
    assert len(recs) == 1 and recs[0].emotion == "neutral"  # the first one read is kept
    assert [s.reason for s in listing.skipped] == ["duplicate utterance id 'Ses01F_impro01_F000'"]
