"""The demo corpora generator: manifest contract, determinism, audio format, planted cues,
the acted/natural contrast, and argument checking. Small corpora keep it fast."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from dser.cli import main
from dser.corpora.synthetic import speaker_groups, synthesize
from dser.corpora.synthetic_speech import CLASSES, PROFILES, make_voices, measure_cues, render_clip

FIELDS = {"path", "utt_id", "emotion", "valence", "arousal", "dominance", "speaker", "gender",
          "group", "style"}
CUE_KEYS = ("level_db", "f0_hz", "f0_range_st", "voiced_ratio", "hf_db", "active_ratio")
# The cues emotion moves most (loudness, brightness, pitch range), free of speaker pitch.
EMOTION_KEYS = ("level_db", "hf_db", "f0_range_st")


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """80 clips by 5 speakers of each style, with each clip's audio and measured cues."""
    out = {}
    for style in ("acted", "natural"):
        manifest = synthesize(tmp_path_factory.mktemp(style), style, utterances=80, speakers=5, seed=3)
        rows = _rows(manifest)
        for r in rows:
            r["audio"], r["sr"] = sf.read(manifest.parent / r["path"], dtype="float64")
            r["info"] = sf.info(str(manifest.parent / r["path"]))
            r["cues"] = measure_cues(r["audio"], r["sr"])
        out[style] = (manifest, rows)
    return out


def nearest_centroid_accuracy(train: list[dict], test: list[dict], keys=CUE_KEYS) -> float:
    """Accuracy of a nearest-class-centroid classifier on standardised ``measure_cues`` features:
    a cheap probe of how separable the classes are."""
    def features(rows):
        return np.array([[r["cues"][k] for k in keys] for r in rows])

    x_train, x_test = features(train), features(test)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-9
    y_train = np.array([CLASSES.index(r["emotion"]) for r in train])
    y_test = np.array([CLASSES.index(r["emotion"]) for r in test])
    centroids = np.stack([((x_train - mu) / sd)[y_train == c].mean(0) for c in range(len(CLASSES))])
    dist = (((x_test - mu) / sd)[:, None, :] - centroids[None]) ** 2
    return float(np.mean(dist.sum(-1).argmin(1) == y_test))


def leave_one_speaker_out(rows: list[dict], keys=CUE_KEYS) -> float:
    speakers = sorted({r["speaker"] for r in rows})
    correct = [nearest_centroid_accuracy([r for r in rows if r["speaker"] != s],
                                         [r for r in rows if r["speaker"] == s], keys) for s in speakers]
    return float(np.mean(correct))


# --- manifest contract ------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["acted", "natural"])
def test_manifest_rows_have_the_contract_fields_and_ranges(corpora, style):
    manifest, rows = corpora[style]
    assert manifest.name == "manifest.jsonl" and len(rows) == 80
    for r in rows:
        assert FIELDS <= set(r)
        assert (manifest.parent / r["path"]).is_file() and not Path(r["path"]).is_absolute()
        assert r["path"].startswith("wav/") and r["path"].endswith(".wav")
        assert r["utt_id"].startswith(f"{style}_")
        assert r["emotion"] in CLASSES and r["style"] == style
        assert r["gender"] in ("F", "M") and r["group"] in ("train", "valid", "test")
        assert r["speaker"].startswith(f"{style}_spk")
        for a in ("valence", "arousal", "dominance"):
            assert isinstance(r[a], float) and 0.0 <= r[a] <= 1.0
    assert len({r["utt_id"] for r in rows}) == len(rows)
    assert len({r["path"] for r in rows}) == len(rows)
    # The manifest lists every WAV written and nothing else.
    written = sorted(p.name for p in (manifest.parent / "wav").iterdir())
    assert written == sorted(Path(r["path"]).name for r in rows)


@pytest.mark.parametrize("style", ["acted", "natural"])
def test_classes_are_balanced_per_speaker(corpora, style):
    _, rows = corpora[style]
    assert Counter(r["emotion"] for r in rows) == {c: 20 for c in CLASSES}
    per_speaker = Counter((r["speaker"], r["emotion"]) for r in rows)
    assert set(per_speaker.values()) == {4}                  # 5 speakers x 4 emotions x 4 clips


@pytest.mark.parametrize("style", ["acted", "natural"])
def test_groups_are_speaker_independent(corpora, style):
    _, rows = corpora[style]
    group_of, gender_of = {}, {}
    for r in rows:
        assert group_of.setdefault(r["speaker"], r["group"]) == r["group"]
        assert gender_of.setdefault(r["speaker"], r["gender"]) == r["gender"]
    assert sorted(Counter(group_of.values()).items()) == [("test", 1), ("train", 3), ("valid", 1)]


@pytest.mark.parametrize("speakers", [3, 4, 7, 10, 20, 33])
def test_speaker_groups_split_about_70_15_15_with_one_each(speakers):
    groups = speaker_groups(speakers)
    counts = Counter(groups)
    assert len(groups) == speakers and min(counts.values()) >= 1 and set(counts) == {"train", "valid", "test"}
    if speakers >= 10:
        assert 0.55 <= counts["train"] / speakers <= 0.8


def test_acted_and_natural_speakers_are_different_people(corpora):
    acted = {r["speaker"] for r in corpora["acted"][1]}
    natural = {r["speaker"] for r in corpora["natural"][1]}
    assert not acted & natural
    assert not {r["utt_id"] for r in corpora["acted"][1]} & {r["utt_id"] for r in corpora["natural"][1]}
    # Same seed, different voices: no natural speaker reuses an acted speaker's pitch or tract.
    va, vn = make_voices("acted", 10, 0), make_voices("natural", 10, 0)
    assert not {round(v.f0, 3) for v in va} & {round(v.f0, 3) for v in vn}
    assert not {round(v.tract, 4) for v in va} & {round(v.tract, 4) for v in vn}
    # Natural speakers vary more (wider pitch spread within a gender, varied expressiveness).
    va, vn = make_voices("acted", 40, 0), make_voices("natural", 40, 0)
    spread = lambda vs: np.std([np.log(v.f0) for v in vs if v.gender == "F"])   # noqa: E731
    assert spread(vn) > spread(va)
    assert np.std([v.expressivity for v in vn]) > 3 * np.std([v.expressivity for v in va])


# --- determinism ------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_audio(tmp_path):
    def files(d):
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    a = synthesize(tmp_path / "a", "natural", utterances=12, speakers=3, seed=7).parent
    b = synthesize(tmp_path / "b", "natural", utterances=12, speakers=3, seed=7).parent
    c = synthesize(tmp_path / "c", "natural", utterances=12, speakers=3, seed=8).parent
    fa, fb, fc = files(a), files(b), files(c)
    assert len(fa) == 14 and fa == fb  # 12 clips, the manifest, the marker
    assert fa.keys() == fc.keys()
    assert all(fa[k] != fc[k] for k in fa if k.endswith(".wav"))


def test_style_changes_the_audio_under_the_same_seed(tmp_path):
    a = synthesize(tmp_path / "a", "acted", utterances=12, speakers=3, seed=0).parent
    n = synthesize(tmp_path / "n", "natural", utterances=12, speakers=3, seed=0).parent
    assert (a / "wav/spk00_0000.wav").read_bytes() != (n / "wav/spk00_0000.wav").read_bytes()


# --- audio ------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["acted", "natural"])
def test_audio_is_16bit_mono_finite_in_range_and_not_silent(corpora, style):
    _, rows = corpora[style]
    durations = []
    for r in rows:
        a, info = r["audio"], r["info"]
        assert info.subtype == "PCM_16" and info.channels == 1 and info.samplerate == 16000
        assert a.ndim == 1 and np.all(np.isfinite(a)) and np.abs(a).max() <= 1.0
        assert np.sqrt(np.mean(a ** 2)) > 1e-3
        assert r["cues"]["voiced_ratio"] > 0.2                # it is voiced, not noise
        durations.append(len(a) / r["sr"])
    assert min(durations) >= 1.0 and max(durations) <= 4.5
    assert np.std(durations) > 0.3                            # lengths vary


def test_natural_clips_are_longer_on_average(corpora):
    mean = {s: np.mean([len(r["audio"]) for r in corpora[s][1]]) for s in ("acted", "natural")}
    assert mean["natural"] > 1.1 * mean["acted"]


def test_other_sample_rates(tmp_path):
    manifest = synthesize(tmp_path, "natural", utterances=12, speakers=3, sample_rate=8000)
    for r in _rows(manifest):
        info = sf.info(str(tmp_path / r["path"]))
        assert info.samplerate == 8000 and info.subtype == "PCM_16"


# --- cues -------------------------------------------------------------------------------------


def _mean_cue(rows, emotion, key):
    return float(np.mean([r["cues"][key] for r in rows if r["emotion"] == emotion]))


def test_acted_emotions_differ_the_way_emotions_do(corpora):
    _, rows = corpora["acted"]
    level = {c: _mean_cue(rows, c, "level_db") for c in CLASSES}
    assert level["angry"] > level["happy"] > level["neutral"] > level["sad"]
    assert level["angry"] - level["sad"] > 10
    f0 = {c: _mean_cue(rows, c, "f0_hz") for c in CLASSES}     # speakers balanced across classes
    assert f0["happy"] > f0["neutral"] > f0["sad"] and f0["angry"] > f0["neutral"]
    assert _mean_cue(rows, "angry", "hf_db") > _mean_cue(rows, "neutral", "hf_db") + 3   # tense = bright
    assert _mean_cue(rows, "happy", "f0_range_st") > _mean_cue(rows, "sad", "f0_range_st")


@pytest.mark.parametrize("style", ["acted", "natural"])
def test_attributes_are_consistent_with_the_classes(corpora, style):
    _, rows = corpora[style]
    mean = {(c, a): np.mean([r[a] for r in rows if r["emotion"] == c])
            for c in CLASSES for a in ("valence", "arousal", "dominance")}
    v = {c: mean[c, "valence"] for c in CLASSES}
    a = {c: mean[c, "arousal"] for c in CLASSES}
    d = {c: mean[c, "dominance"] for c in CLASSES}
    assert v["happy"] > v["neutral"] > max(v["angry"], v["sad"])
    assert min(a["angry"], a["happy"]) > a["neutral"] > a["sad"]
    assert d["angry"] > d["neutral"] > d["sad"]
    for c in CLASSES:   # centred on the class's position
        assert abs(mean[c, "arousal"] - PROFILES[c].arousal) < 0.15


def test_natural_has_a_noise_floor_acted_does_not(corpora):
    def lead_db(r):
        # Every clip opens with >= 120 ms of pause; take the first 60 ms.
        return 10 * np.log10(np.mean(r["audio"][:int(0.06 * r["sr"])] ** 2) + 1e-20)

    acted = [lead_db(r) - r["cues"]["level_db"] for r in corpora["acted"][1]]
    natural = [lead_db(r) - r["cues"]["level_db"] for r in corpora["natural"][1]]
    assert min(natural) > -28                # SNR is drawn from 5-25 dB
    assert np.median(acted) < np.median(natural) - 15
    # A quiet studio, but not digital zero (log-mel features stay finite).
    assert all(-100 < lead_db(r) < -65 for r in corpora["acted"][1])


def test_recording_level_varies_in_natural_more_than_acted(corpora):
    def within_class_sd(rows):
        return np.mean([np.std([r["cues"]["level_db"] for r in rows if r["emotion"] == c]) for c in CLASSES])

    assert within_class_sd(corpora["natural"][1]) > 2 * within_class_sd(corpora["acted"][1])


def test_acted_is_separable_and_natural_overlaps(corpora):
    # Unseen speakers each time. Over seeds 0-9 this probe gives acted 0.85-0.97 and natural
    # 0.41-0.62 (chance is 0.25).
    acc_acted = leave_one_speaker_out(corpora["acted"][1], EMOTION_KEYS)
    acc_natural = leave_one_speaker_out(corpora["natural"][1], EMOTION_KEYS)
    assert acc_acted >= 0.8
    assert 0.3 < acc_natural < acc_acted - 0.15


def test_acted_cues_do_not_carry_over_to_natural(corpora):
    # Domain shift: a probe fitted on acted speakers does far worse on natural clips than on
    # unseen acted speakers (over seeds 0-9 the gap is 0.34-0.52).
    acted, natural = corpora["acted"][1], corpora["natural"][1]
    assert nearest_centroid_accuracy(acted, natural) < leave_one_speaker_out(acted) - 0.2


def test_render_clip_is_a_pure_function_of_its_generator():
    voice = make_voices("acted", 3, 0)[1]
    a, attrs_a = render_clip(np.random.default_rng(5), voice, "sad", "acted", 16000)
    b, attrs_b = render_clip(np.random.default_rng(5), voice, "sad", "acted", 16000)
    assert a.dtype == np.float32 and np.array_equal(a, b) and attrs_a == attrs_b


# --- arguments and OUT ------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"style": "studio"}, "unknown style 'studio'"),
    ({"speakers": 2}, "--speakers must be an integer >= 3"),
    ({"utterances": 3}, "--utterances must be an integer >= 12"),
    ({"utterances": 11, "speakers": 3}, "every speaker says every emotion"),
    ({"seed": -1}, "--seed must be a non-negative integer"),
    ({"sample_rate": 4000}, "--sample-rate must be an integer between 8000 and 48000"),
    ({"utterances": 12.0}, "--utterances must be an integer"),
])
def test_bad_arguments_raise_one_clear_error(tmp_path, kwargs, message):
    args = {"style": "acted", "utterances": 12, "speakers": 3} | kwargs
    style = args.pop("style")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        synthesize(tmp_path / "out", style, **args)
    assert not (tmp_path / "out").exists()       # nothing written on a bad argument


def test_out_must_be_new_empty_or_an_earlier_synth_output(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        synthesize(tmp_path / "file", "acted", utterances=12, speakers=3)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds .*notes.txt, which dser synth did not write"):
        synthesize(tmp_path / "other", "acted", utterances=12, speakers=3)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "other"]  # no temporary left


def test_rerun_replaces_an_earlier_output_only_with_overwrite(tmp_path):
    out = tmp_path / "out"
    synthesize(out, "acted", utterances=24, speakers=3)
    with pytest.raises(ValueError, match="holds an earlier dser synth output; pass --overwrite"):
        synthesize(out, "natural", utterances=12, speakers=3)
    manifest = synthesize(out, "natural", utterances=12, speakers=3, overwrite=True)
    rows = _rows(manifest)
    assert len(rows) == 12 and {r["style"] for r in rows} == {"natural"}
    assert len(list((out / "wav").iterdir())) == 12          # no stale clips left behind


def _tree(root):
    import hashlib
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_users_manifest_and_wavs_are_never_deleted(tmp_path):
    """Our documented manifest format in the user's own directory: synth refuses, with and
    without --overwrite, and every file stays byte-identical."""
    user = tmp_path / "mycorpus"
    (user / "wav").mkdir(parents=True)
    rows = []
    for i in range(3):
        sf.write(user / "wav" / f"spk00_{i:04d}.wav", np.full(1600, 0.1 * (i + 1), dtype=np.float32), 16000)
        rows.append({"path": f"wav/spk00_{i:04d}.wav", "emotion": "happy", "speaker": "me"})
    (user / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = _tree(user)
    for extra in ([], ["--overwrite"]):
        result = CliRunner().invoke(main, ["synth", str(user), "--style", "acted", "--utterances", "12",
                                           "--speakers", "3", *extra])
        assert result.exit_code != 0 and "which dser synth did not write" in result.output
        assert str(user) in result.output and "Traceback" not in result.output
        assert _tree(user) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mycorpus"]


def test_a_file_dropped_into_a_synth_output_is_never_deleted(tmp_path):
    out = tmp_path / "out"
    synthesize(out, "acted", utterances=12, speakers=3)
    (out / "wav" / "mine.wav").write_bytes(b"my recording")
    before = _tree(out)
    with pytest.raises(ValueError, match=r"holds .*mine\.wav, which dser synth did not write"):
        synthesize(out, "acted", utterances=12, speakers=3, overwrite=True)
    assert _tree(out) == before
    # A synth file the user changed is theirs now, too.
    (out / "wav" / "mine.wav").unlink()
    first = sorted((out / "wav").iterdir())[0]
    first.write_bytes(first.read_bytes()[:-2] + b"\0\0")
    with pytest.raises(ValueError, match=f"holds .*{first.name}, which dser synth did not write"):
        synthesize(out, "acted", utterances=12, speakers=3, overwrite=True)


def test_an_older_synth_output_without_marker_is_replaced_only_when_identical(tmp_path):
    out = tmp_path / "out"
    synthesize(out, "acted", utterances=12, speakers=3, seed=4)
    (out / ".dser-synth.json").unlink()  # as an older dser left it
    synthesize(out, "acted", utterances=12, speakers=3, seed=4, overwrite=True)
    assert (out / ".dser-synth.json").is_file()
    (out / ".dser-synth.json").unlink()
    before = _tree(out)
    with pytest.raises(ValueError, match="differs from what this run generates"):
        synthesize(out, "acted", utterances=12, speakers=3, seed=5, overwrite=True)
    assert _tree(out) == before


def test_cli_synth_writes_the_corpus_and_reports_errors_in_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["synth", str(tmp_path / "c"), "--style", "acted",
                                  "--utterances", "12", "--speakers", "3", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "manifest.jsonl" in result.output and len(_rows(tmp_path / "c" / "manifest.jsonl")) == 12
    result = runner.invoke(main, ["synth", str(tmp_path / "d"), "--style", "acted", "--speakers", "2"])
    assert result.exit_code != 0
    assert result.output.strip().startswith("Error:") and len(result.output.strip().splitlines()) == 1


def test_a_folder_dropped_into_a_synth_output_and_a_taken_temporary_name_are_left_alone(tmp_path):
    out = tmp_path / "out"
    synthesize(out, "acted", utterances=12, speakers=3)
    (out / "mine").mkdir()
    with pytest.raises(ValueError, match=r"holds .*mine, which dser synth did not write"):
        synthesize(out, "acted", utterances=12, speakers=3, overwrite=True)
    assert (out / "mine").is_dir()
    (out / "mine").rmdir()
    # A folder that happens to bear synth's temporary names is someone else's.
    import os
    for kind in ("partial", "old"):
        taken = tmp_path / f".out.synth-{kind}-{os.getpid()}"
        taken.mkdir()
        (taken / "keep.txt").write_text(kind)
    synthesize(out, "natural", utterances=12, speakers=3, overwrite=True)
    for kind in ("partial", "old"):
        assert (tmp_path / f".out.synth-{kind}-{os.getpid()}" / "keep.txt").read_text() == kind
    assert {r["style"] for r in _rows(out / "manifest.jsonl")} == {"natural"}
