"""RAVDESS: audio-only speech by default, song on request, Actor_* folders found at any depth."""

from __future__ import annotations

import re
from collections import defaultdict

import pytest
import soundfile as sf
from fixtures_corpora import ravdess_name, write_ravdess, write_wav

from dser.corpora import CorpusError, ravdess, read_corpus

ACTORS = (1, 2, 3, 4, 5, 6)
# Per actor: neutral once, happy and angry at two intensities.
CLIPS_PER_ACTOR = 5


def test_reads_speech_and_skips_song_by_default(ravdess_root):
    listing = ravdess.read(ravdess_root)
    assert len(listing.records) == len(ACTORS) * CLIPS_PER_ACTOR
    assert all(r.extra["vocal_channel"] == "speech" for r in listing.records)
    assert len(listing.skipped) == len(ACTORS) * CLIPS_PER_ACTOR
    song_dir = ravdess_root / "Audio_Song_Actors_01-24"
    assert all(s.input.startswith(str(song_dir)) and "include_song=true" in s.reason for s in listing.skipped)

    r = next(r for r in listing.records if r.utt_id == "03-01-05-02-01-01-03")
    assert r.path == ravdess_root / "Audio_Speech_Actors_01-24" / "Actor_03" / "03-01-05-02-01-01-03.wav"
    assert (r.corpus, r.speaker, r.gender, r.style) == ("ravdess", "Actor_03", "M", "acted")
    assert (r.emotion, r.emotion_raw) == ("angry", "05")
    assert r.extra == {"vocal_channel": "speech", "intensity": "strong", "statement": "01", "repetition": "01"}
    assert {r.gender for r in listing.records if r.speaker == "Actor_02"} == {"F"}
    assert sf.info(r.path).samplerate == 48000


@pytest.mark.parametrize("value", ["true", "1", "yes", "True", True])
def test_include_song(ravdess_root, value):
    listing = ravdess.read(ravdess_root, include_song=value)
    assert listing.skipped == []
    channels = [r.extra["vocal_channel"] for r in listing.records]
    assert channels.count("song") == channels.count("speech") == len(ACTORS) * CLIPS_PER_ACTOR


@pytest.mark.parametrize("value", ["false", "0", "no", "NO"])
def test_include_song_false(ravdess_root, value):
    assert len(ravdess.read(ravdess_root, include_song=value).records) == len(ACTORS) * CLIPS_PER_ACTOR


def test_bad_option_value_or_name(ravdess_root):
    with pytest.raises(ValueError, match="'maybe' for option include_song.*allowed options: include_song, n_folds"):
        ravdess.read(ravdess_root, include_song="maybe")
    with pytest.raises(ValueError, match="unknown option 'song'; allowed options: include_song, n_folds"):
        ravdess.read(ravdess_root, song="true")


def test_every_emotion_code_maps(tmp_path):
    codes = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry",
             "06": "fear", "07": "disgust", "08": "surprise"}
    write_ravdess(tmp_path, actors=(7,), emotions=tuple(codes), song=False, speech_folder=None, sample_rate=16000)
    assert {r.emotion_raw: r.emotion for r in ravdess.read(tmp_path).records} == codes


def test_folds_are_speaker_independent_and_deterministic(ravdess_root):
    a = ravdess.read(ravdess_root, include_song="true")
    b = ravdess.read(ravdess_root, include_song="true")
    assert [(r.utt_id, r.group) for r in a.records] == [(r.utt_id, r.group) for r in b.records]
    folds = defaultdict(set)
    for r in a.records:
        folds[r.speaker].add(r.group)
    assert sorted(folds) == [f"Actor_{n:02d}" for n in ACTORS]
    assert all(len(f) == 1 for f in folds.values())
    assert {r.group for r in a.records} == {f"fold{i}" for i in range(5)}


def test_other_modalities_and_bad_names_are_skipped(tmp_path):
    write_ravdess(tmp_path, actors=(1,), emotions=("03",), song=False, speech_folder=None)
    actor = tmp_path / "Actor_01"
    video = write_wav(actor / ravdess_name(1, "03", modality="01"))
    odd = write_wav(actor / "take2.wav")
    unknown = write_wav(actor / ravdess_name(1, "09"))
    (actor / "01-01-03-01-01-01-01.mp4").write_bytes(b"\0")  # a video is not an input at all
    listing = ravdess.read(tmp_path)
    skipped = {s.input: s.reason for s in listing.skipped}
    assert set(skipped) == {str(video), str(odd), str(unknown)}
    assert "modality 01 is not audio-only" in skipped[str(video)]
    assert "MM-VV-EE-II-SS-RR-AA" in skipped[str(odd)]
    assert "unknown emotion code '09'" in skipped[str(unknown)]
    assert len(listing.records) == 2


def test_actor_folders_at_the_root_and_a_duplicate_copy(tmp_path):
    # Some downloads hold Actor_NN both at the top and inside Audio_Speech_Actors_01-24.
    write_ravdess(tmp_path, actors=(1, 2), song=False, speech_folder=None)
    write_ravdess(tmp_path, actors=(1,), song=False)
    listing = read_corpus("ravdess", tmp_path)
    assert len(listing.records) == 2 * CLIPS_PER_ACTOR
    assert len(listing.skipped) == CLIPS_PER_ACTOR
    assert all(s.reason.startswith("duplicate utterance id") for s in listing.skipped)


def test_no_actor_folders_is_a_corpus_error(tmp_path):
    (tmp_path / "Audio_Speech_Actors_01-24").mkdir()
    with pytest.raises(CorpusError, match=re.escape(f"Actor_01 … Actor_24 directories in {tmp_path}")):
        ravdess.read(tmp_path)
