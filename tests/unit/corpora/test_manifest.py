"""Manifest reader: CSV and JSONL rows become records; bad rows are skipped with their line."""

from __future__ import annotations

import json
import re

import pytest
from fixtures_corpora import write_manifest, write_wav

from dser.corpora import CorpusError, manifest, read_corpus

ROWS = [
    {"path": "wav/a.wav", "utt_id": "a", "emotion": "angry", "valence": 0.25, "arousal": 0.9,
     "dominance": 0.75, "speaker": "s1", "gender": "F", "group": "train", "style": "acted", "session": "3"},
    {"path": "wav/b.wav", "emotion": "Happy", "valence": None, "arousal": "", "dominance": 0.5,
     "speaker": "s2", "gender": "male", "group": "test", "style": "natural", "session": None},
    {"path": "wav/c.wav", "utt_id": "", "emotion": None, "speaker": None, "gender": "", "group": "",
     "style": None, "session": "1"},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_reads_rows_with_their_labels(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    write_manifest(path, ROWS)
    listing = manifest.read(path)
    assert listing.skipped == []
    a, b, c = listing.records
    assert a.path == tmp_path / "wav" / "a.wav"
    assert (a.utt_id, a.corpus, a.group, a.speaker, a.gender, a.style) == (
        "a", "manifest", "train", "s1", "F", "acted")
    assert (a.emotion, a.emotion_raw, a.valence, a.arousal, a.dominance) == ("angry", "angry", 0.25, 0.9, 0.75)
    assert a.extra == {"session": "3"}
    # Canonical emotions in any case; empty strings and nulls are missing; utt_id from the stem.
    assert (b.utt_id, b.emotion, b.emotion_raw, b.gender, b.style) == ("b", "happy", "Happy", "M", "natural")
    assert (b.valence, b.arousal, b.dominance) == (None, None, 0.5)
    assert b.extra == {"session": None}
    assert (c.utt_id, c.emotion, c.speaker, c.gender, c.group, c.style) == ("c", None, None, None, "all", None)


def test_absolute_paths_and_attribute_scale(tmp_path):
    wav = write_wav(tmp_path / "elsewhere" / "x.wav")
    path = tmp_path / "lists" / "m.jsonl"
    write_manifest(path, [{"path": str(wav), "valence": 1, "arousal": "5", "dominance": 2.0}])
    r, = manifest.read(path, attribute_scale="1,5").records
    assert r.path == wav
    assert (r.valence, r.arousal, r.dominance) == (0.0, 1.0, 0.25)
    # Without the option the same values are outside [0, 1].
    assert "outside the scale [0.0, 1.0]" in manifest.read(path).skipped[0].reason


@pytest.mark.parametrize("value", ["5", "5,1", "a,b", "1,2,3"])
def test_bad_attribute_scale(tmp_path, value):
    path = tmp_path / "m.jsonl"
    write_manifest(path, [{"path": "x.wav"}])
    with pytest.raises(ValueError, match="option attribute_scale.*allowed options: attribute_scale"):
        manifest.read(path, attribute_scale=value)


def test_bad_jsonl_rows_are_skipped_with_the_line_number(tmp_path):
    path = tmp_path / "m.jsonl"
    good = {"path": "wav/ok.wav", "emotion": "sad"}
    rows = [
        good,                                            # 1
        {"emotion": "sad"},                              # 2 no path
        {"path": "", "emotion": "sad"},                  # 3 empty path
        {"path": "wav/e.wav", "emotion": "joy"},         # 4 not canonical
        {"path": "wav/v.wav", "valence": 1.5},           # 5 out of range
        {"path": "wav/missing.wav"},                     # 6 no audio
        {"path": "wav/g.wav", "gender": "x"},            # 7
        {"path": "wav/s.wav", "style": "scripted"},      # 8
        {"path": "wav/grp.wav", "group": "../escape"},   # 9
        {"path": "wav/bool.wav", "arousal": True},       # 10
    ]
    write_manifest(path, rows, missing_audio={"wav/missing.wav"})
    with open(path, "a") as f:
        f.write("\n")                       # 11 blank: ignored
        f.write("{not json\n")              # 12
        f.write('["wav/ok.wav"]\n')         # 13
    listing = manifest.read(path)
    assert [r.utt_id for r in listing.records] == ["ok"]
    skipped = {s.input: s.reason for s in listing.skipped}
    assert sorted(skipped) == sorted(f"{path}:{n}" for n in (2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13))
    assert skipped[f"{path}:2"] == "line 2: no path"
    assert skipped[f"{path}:3"] == "line 3: no path"
    assert "'joy' is not canonical" in skipped[f"{path}:4"]
    assert "valence" in skipped[f"{path}:5"] and "outside the scale" in skipped[f"{path}:5"]
    assert skipped[f"{path}:6"] == f"line 6: label row has no audio file at {tmp_path / 'wav' / 'missing.wav'}"
    assert "gender 'x'" in skipped[f"{path}:7"]
    assert "style 'scripted'" in skipped[f"{path}:8"]
    assert "group '../escape'" in skipped[f"{path}:9"]
    assert "arousal" in skipped[f"{path}:10"]
    assert "not valid JSON" in skipped[f"{path}:12"]
    assert "expected a JSON object" in skipped[f"{path}:13"]


def test_bad_csv_rows_are_skipped_with_the_line_number(tmp_path):
    path = tmp_path / "m.csv"
    write_manifest(path, [{"path": "wav/ok.wav", "emotion": "neutral"}, {"path": "", "emotion": "sad"}])
    with open(path, "a") as f:
        f.write("wav/ok.wav,neutral,surplus\n")
    listing = manifest.read(path)
    assert [r.utt_id for r in listing.records] == ["ok"]
    assert [(s.input, s.reason) for s in listing.skipped] == [
        (f"{path}:3", "line 3: no path"),
        (f"{path}:4", "line 4: row has more fields than the header's 2")]


def test_csv_without_path_column_is_a_corpus_error(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("file,emotion\na.wav,sad\n")
    with pytest.raises(CorpusError, match=re.escape(f"{path} has no 'path' column")):
        manifest.read(path)


def test_missing_or_wrong_root_is_a_corpus_error(tmp_path):
    with pytest.raises(CorpusError, match=re.escape(f"expected a file at {tmp_path / 'none.jsonl'}")):
        manifest.read(tmp_path / "none.jsonl")
    with pytest.raises(CorpusError, match=re.escape(f"ROOT {tmp_path / 'none.jsonl'} does not exist")):
        read_corpus("manifest", tmp_path / "none.jsonl")
    with pytest.raises(CorpusError, match=re.escape(f"expected a file at {tmp_path}")):
        manifest.read(tmp_path)
    (tmp_path / "m.txt").write_text("path\n")
    with pytest.raises(CorpusError, match=r"should be a \.csv or \.jsonl file \(found \.txt\)"):
        manifest.read(tmp_path / "m.txt")


def test_unknown_option(tmp_path):
    path = tmp_path / "m.jsonl"
    write_manifest(path, [{"path": "x.wav"}])
    with pytest.raises(ValueError, match="unknown option 'n_folds'; allowed options: attribute_scale"):
        manifest.read(path, n_folds="5")


def test_duration_column_is_dropped_and_corpus_column_kept(tmp_path):
    path = tmp_path / "m.jsonl"
    write_manifest(path, [{"path": "x.wav", "duration": 99.0, "corpus": "crema-d"}])
    r, = manifest.read(path).records
    assert r.corpus == "crema-d" and "duration" not in r.labels()


def test_read_corpus_turns_a_duplicate_utt_id_into_a_skip(tmp_path):
    path = tmp_path / "m.jsonl"
    write_manifest(path, [{"path": "wav/1.wav", "utt_id": "same", "emotion": "sad"},
                          {"path": "wav/2.wav", "utt_id": "same", "emotion": "angry"}])
    listing = read_corpus("manifest", path)
    assert [(r.utt_id, r.emotion) for r in listing.records] == [("same", "sad")]
    assert [(s.input, s.reason) for s in listing.skipped] == [
        (str(tmp_path / "wav" / "2.wav"), "duplicate utterance id 'same'")]


def test_ingests_dser_synth_output(tmp_path):
    from dser.corpora.synthetic import synthesize

    path = synthesize(tmp_path / "acted", "acted", utterances=12, speakers=3, seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    listing = read_corpus("manifest", path)
    assert listing.skipped == []
    assert [r.utt_id for r in listing.records] == [row["utt_id"] for row in rows]
    for r, row in zip(listing.records, rows):
        assert r.path == path.parent / row["path"] and r.path.is_file()
        assert (r.emotion, r.speaker, r.gender, r.group, r.style) == (
            row["emotion"], row["speaker"], row["gender"], row["group"], "acted")
        assert (r.valence, r.arousal, r.dominance) == (row["valence"], row["arousal"], row["dominance"])


def test_a_file_whose_name_ends_in_whitespace_is_found_by_its_exact_name(tmp_path):
    # the property test's find: the path was stripped, so "clip\r" could not be named at all
    write_wav(tmp_path / "wav" / "clip.wav", seconds=0.3).rename(tmp_path / "wav" / "clip\r")
    write_wav(tmp_path / "wav" / "plain.wav", seconds=0.3)
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"path": "wav/clip\r", "emotion": "sad"}) + "\n"
                    + json.dumps({"path": " wav/plain.wav ", "emotion": "happy"}) + "\n")
    listing = manifest.read(path)
    assert not listing.skipped
    assert [r.path.name for r in listing.records] == ["clip\r", "plain.wav"]
