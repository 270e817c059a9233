"""MSP-Podcast: the consensus CSV becomes records grouped by the release's own splits."""

from __future__ import annotations

import re

import pytest
from fixtures_corpora import MSP_HEADER, MSP_ROWS, write_msp_podcast

from dser.corpora import CorpusError, msp_podcast


def test_reads_every_row_with_its_labels(msp_root):
    listing = msp_podcast.read(msp_root)
    assert listing.skipped == []
    recs = {r.utt_id: r for r in listing.records}
    assert sorted(recs) == sorted(row[0][:-4] for row in MSP_ROWS)

    r = recs["MSP-PODCAST_0001_0019"]
    assert r.path == msp_root / "Audios" / "MSP-PODCAST_0001_0019.wav"
    assert (r.corpus, r.group, r.speaker, r.gender, r.style) == ("msp-podcast", "Train", "127", "F", "natural")
    assert (r.emotion, r.emotion_raw) == ("angry", "A")
    # EmoVal 1.5, EmoAct 6.5, EmoDom 5.5 on 1-7.
    assert r.valence == pytest.approx(0.5 / 6)
    assert r.arousal == pytest.approx(5.5 / 6)
    assert r.dominance == pytest.approx(4.5 / 6)

    assert (recs["MSP-PODCAST_0002_0003"].group, recs["MSP-PODCAST_0002_0003"].gender) == ("Development", "M")
    assert recs["MSP-PODCAST_0002_0003"].valence == 1.0
    assert recs["MSP-PODCAST_0004_0002"].emotion == "contempt"


def test_unknown_speaker_gender_and_no_agreement(msp_root):
    r = next(r for r in msp_podcast.read(msp_root).records if r.utt_id == "MSP-PODCAST_0003_0001")
    assert (r.speaker, r.gender, r.group) == (None, None, "Test1")
    assert (r.emotion, r.emotion_raw) == (None, "X")
    assert r.arousal == pytest.approx(2 / 6)  # attributes survive a missing category


def test_every_code_maps(tmp_path):
    codes = {"A": "angry", "S": "sad", "H": "happy", "U": "surprise", "F": "fear", "D": "disgust",
             "C": "contempt", "N": "neutral", "O": "other", "X": None}
    rows = [(f"MSP-PODCAST_0100_{i:04d}.wav", c, "4", "4", "4", "200", "Male", "Train")
            for i, c in enumerate(codes)]
    write_msp_podcast(tmp_path, rows)
    assert {r.emotion_raw: r.emotion for r in msp_podcast.read(tmp_path).records} == codes


def test_bad_rows_are_skipped_with_the_line(tmp_path):
    rows = MSP_ROWS + (
        ("MSP-PODCAST_0009_0001.wav", "Z", "4", "4", "4", "300", "Male", "Train"),     # line 7
        ("MSP-PODCAST_0009_0002.wav", "N", "4", "8.5", "4", "300", "Male", "Train"),   # line 8
        ("MSP-PODCAST_0009_0003.wav", "N", "4", "4", "4", "300", "Male", "Train"),     # line 9
        ("MSP-PODCAST_0009_0004.wav", "N", "4", "4", "4", "300", "Male", ""),          # line 10
    )
    write_msp_podcast(tmp_path, rows, missing_audio={"MSP-PODCAST_0009_0003.wav"})
    listing = msp_podcast.read(tmp_path)
    labels = tmp_path / "Labels" / "labels_consensus.csv"
    skipped = {s.input: s.reason for s in listing.skipped}
    assert len(skipped) == 4
    assert "unknown emotion code 'Z'" in skipped[f"{labels}:7"]
    assert "EmoVal" in skipped[f"{labels}:8"] and "outside the scale [1.0, 7.0]" in skipped[f"{labels}:8"]
    missing = tmp_path / "Audios" / "MSP-PODCAST_0009_0003.wav"
    assert skipped[f"{labels}:9"] == f"label row has no audio file at {missing}"
    assert "Split_Set" in skipped[f"{labels}:10"]
    assert len(listing.records) == len(MSP_ROWS)


def test_wrong_header_is_a_corpus_error(tmp_path):
    write_msp_podcast(tmp_path, header=("File", "Class", "Act", "Val", "Dom", "Spk", "Gen", "Split"))
    with pytest.raises(CorpusError, match=re.escape("must start with the header " + ",".join(MSP_HEADER))):
        msp_podcast.read(tmp_path)


def test_extra_columns_after_the_header_are_ignored(tmp_path):
    rows = [row + ("x",) for row in MSP_ROWS]
    write_msp_podcast(tmp_path, rows, header=MSP_HEADER + ("EmoClass_Major",))
    assert len(msp_podcast.read(tmp_path).records) == len(MSP_ROWS)


def test_missing_label_file_or_audio_folder_is_a_corpus_error(msp_root, tmp_path):
    (msp_root / "Labels" / "labels_consensus.csv").rename(msp_root / "Labels" / "other.csv")
    with pytest.raises(CorpusError, match=re.escape(str(msp_root / "Labels" / "labels_consensus.csv"))):
        msp_podcast.read(msp_root)
    write_msp_podcast(tmp_path / "b")
    for wav in (tmp_path / "b" / "Audios").iterdir():
        wav.unlink()
    (tmp_path / "b" / "Audios").rmdir()
    with pytest.raises(CorpusError, match=re.escape(str(tmp_path / "b" / "Audios"))):
        msp_podcast.read(tmp_path / "b")


def test_options_are_refused(msp_root):
    with pytest.raises(ValueError, match="unknown option 'include_song'"):
        msp_podcast.read(msp_root, include_song="true")
