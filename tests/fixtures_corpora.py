"""Writers of tiny corpus trees in each corpus's published layout, with short generated WAVs.

The reader tests (``tests/unit/corpora``) and the sharding tests use them to build inputs on
disk; each writer returns the audio paths it wrote. Import them as plain functions
(``tests/`` is on ``sys.path`` because of ``tests/conftest.py``)::

    from fixtures_corpora import write_ravdess
    write_ravdess(tmp_path / "ravdess", actors=(1, 2), sample_rate=48000)

Clips are a quiet tone plus noise, ``seconds`` long at ``sample_rate``, 16-bit PCM; each
clip's content depends on its name, so different clips differ.
"""

from __future__ import annotations

import csv
import json
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import soundfile as sf


def write_wav(path: Path, seconds: float = 0.3, sample_rate: int = 16000, seed: int | None = None) -> Path:
    """Write a mono 16-bit WAV of a tone plus noise (seeded by the file name unless given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()) if seed is None else seed)
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    audio = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) + 0.05 * rng.standard_normal(t.size)
    sf.write(path, audio.astype(np.float32), sample_rate, subtype="PCM_16")
    return path


# ------------------------------------------------------------------------------------ IEMOCAP

# (turn id, emotion code, (valence, arousal, dominance) on 1-5)
IEMOCAP_TURNS = (
    ("Ses01F_impro01_F000", "neu", (2.5, 2.5, 2.5)),
    ("Ses01F_impro01_M001", "ang", (1.5, 4.0, 4.5)),   # spoken by Ses01M in a Ses01F dialog
    ("Ses01F_script01_1_F002", "xxx", (3.0, 3.0, 3.0)),
    ("Ses01M_script02_2_M000", "fru", (2.0, 3.5, 3.0)),
    ("Ses02F_impro03_F000", "exc", (4.0, 4.0, 3.5)),
    ("Ses02F_impro03_M001", "sad", (1.0, 1.5, 1.0)),
)

IEMOCAP_HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]"


def write_iemocap(root: Path, turns=IEMOCAP_TURNS, *, missing_audio=(), seconds: float = 0.3,
                  sample_rate: int = 16000) -> list[Path]:
    """Write ``Session{n}/dialog/EmoEvaluation/<dialog>.txt`` and ``sentences/wav/`` as published.

    Each label file opens with the ``%`` header and a blank line; each turn's row is followed
    by ``C-E2:``/``C-E3:``/``A-E1:`` annotator lines and a blank line. The per-annotator
    subfolders (``Categorical/``, ``Attribute/``, ``Self-evaluation/``) are written too.

    Args:
        root: the release directory to create.
        turns: (turn id, code, (V, A, D)); the session and dialog come from the turn id.
        missing_audio: turn ids whose label row is written but whose WAV is not.
        seconds, sample_rate: the clips' length and rate.

    Returns:
        The WAV paths written.
    """
    root = Path(root)
    by_dialog: dict[str, list] = defaultdict(list)
    for turn in turns:
        by_dialog[turn[0].rsplit("_", 1)[0]].append(turn)
    wavs = []
    for dialog, dialog_turns in by_dialog.items():
        session = root / f"Session{int(dialog[3:5])}"
        labels = session / "dialog" / "EmoEvaluation"
        for sub in ("Categorical", "Attribute", "Self-evaluation"):
            (labels / sub).mkdir(parents=True, exist_ok=True)
        lines = [IEMOCAP_HEADER, ""]
        cat_lines = []
        for i, (utt, code, (v, a, d)) in enumerate(dialog_turns):
            start = 1.0 + 3.0 * i
            lines += [f"[{start:.4f} - {start + seconds:.4f}]\t{utt}\t{code}\t[{v:.4f}, {a:.4f}, {d:.4f}]",
                      f"C-E2:\tNeutral state;\t()", f"C-E3:\tNeutral state;\t()",
                      f"A-E1:\tval {round(v)}; act {round(a)}; dom  {round(d)};\t()", ""]
            cat_lines.append(f"{utt} :Neutral state; ()")
            if utt not in missing_audio:
                wavs.append(write_wav(session / "sentences" / "wav" / dialog / f"{utt}.wav",
                                      seconds, sample_rate))
        (labels / f"{dialog}.txt").write_text("\n".join(lines) + "\n")
        (labels / "Categorical" / f"{dialog}_e2_cat.txt").write_text("\n".join(cat_lines) + "\n")
    return wavs


# ------------------------------------------------------------------------------ MSP-Podcast

MSP_HEADER = ("FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set")

# FileName, EmoClass, EmoAct, EmoVal, EmoDom (1-7), SpkrID, Gender, Split_Set
MSP_ROWS = (
    ("MSP-PODCAST_0001_0008.wav", "N", "4.0", "4.0", "4.0", "127", "Female", "Train"),
    ("MSP-PODCAST_0001_0019.wav", "A", "6.5", "1.5", "5.5", "127", "Female", "Train"),
    ("MSP-PODCAST_0002_0003.wav", "H", "5.0", "7.0", "4.5", "128", "Male", "Development"),
    ("MSP-PODCAST_0003_0001.wav", "X", "3.0", "3.5", "3.0", "Unknown", "Unknown", "Test1"),
    ("MSP-PODCAST_0004_0002.wav", "C", "2.5", "2.0", "5.0", "131", "Male", "Test1"),
)


def write_msp_podcast(root: Path, rows=MSP_ROWS, *, missing_audio=(), header=MSP_HEADER,
                      seconds: float = 0.3, sample_rate: int = 16000) -> list[Path]:
    """Write ``Labels/labels_consensus.csv`` and ``Audios/<FileName>``.

    Args:
        root: the release directory to create.
        rows: label rows (strings, in ``header`` order).
        missing_audio: file names whose row is written but whose WAV is not.
        header: the CSV header to write (change it to test a wrong one).
        seconds, sample_rate: the clips' length and rate.

    Returns:
        The WAV paths written.
    """
    root = Path(root)
    (root / "Labels").mkdir(parents=True, exist_ok=True)
    (root / "Audios").mkdir(parents=True, exist_ok=True)
    with open(root / "Labels" / "labels_consensus.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        out.writerows(rows)
    return [write_wav(root / "Audios" / row[0], seconds, sample_rate)
            for row in rows if row[0] not in missing_audio]


# ---------------------------------------------------------------------------------- CREMA-D

CREMA_ACTORS = ("1001", "1002", "1003", "1004", "1005", "1006", "1007")


def crema_names(actors=CREMA_ACTORS) -> list[str]:
    """File names covering every emotion and level; actor 1001 has two extra clips."""
    items = [("DFA", "ANG", "XX"), ("IEO", "HAP", "HI"), ("TIE", "SAD", "LO")]
    names = [f"{a}_{s}_{e}_{lv}.wav" for a in actors for s, e, lv in items]
    if "1001" in actors:
        names += ["1001_IEO_FEA_MD.wav", "1001_MTI_DIS_XX.wav", "1001_WSI_NEU_XX.wav"]
    return names


def write_crema_d(root: Path, names=None, *, demographics: dict[str, str] | None = None,
                  seconds: float = 0.3, sample_rate: int = 16000) -> list[Path]:
    """Write ``AudioWAV/<name>`` and, when ``demographics`` is given, ``VideoDemographics.csv``.

    Args:
        root: the corpus directory to create.
        names: WAV file names (default ``crema_names()``).
        demographics: actor id → ``Male``/``Female``; None writes no demographics file.
        seconds, sample_rate: the clips' length and rate.

    Returns:
        The WAV paths written.
    """
    root = Path(root)
    (root / "AudioWAV").mkdir(parents=True, exist_ok=True)
    if demographics is not None:
        with open(root / "VideoDemographics.csv", "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["ActorID", "Age", "Sex", "Race", "Ethnicity"])
            for actor, sex in demographics.items():
                out.writerow([actor, 30, sex, "Caucasian", "Not Hispanic"])
    return [write_wav(root / "AudioWAV" / n, seconds, sample_rate) for n in (names or crema_names())]


# ---------------------------------------------------------------------------------- RAVDESS

def ravdess_name(actor: int, emotion: str, *, modality: str = "03", channel: str = "01",
                 intensity: str = "01", statement: str = "01", repetition: str = "01") -> str:
    """``MM-VV-EE-II-SS-RR-AA.wav`` for one clip."""
    return f"{modality}-{channel}-{emotion}-{intensity}-{statement}-{repetition}-{actor:02d}.wav"


def write_ravdess(root: Path, actors=(1, 2, 3, 4, 5, 6), emotions=("01", "03", "05"), *,
                  song: bool = True, speech_folder: str | None = "Audio_Speech_Actors_01-24",
                  song_folder: str | None = "Audio_Song_Actors_01-24", seconds: float = 0.3,
                  sample_rate: int = 48000) -> list[Path]:
    """Write ``<folder>/Actor_NN/*.wav``: speech (and song) clips for each actor and emotion.

    Args:
        root: the directory to create.
        actors: actor numbers (odd = male).
        emotions: emotion codes ``01`` … ``08``; each actor says each once (intensity 01)
            and, for emotions other than neutral, once more at intensity 02.
        song: also write sung clips (vocal channel 02, same emotions).
        speech_folder, song_folder: the unpacked download folders; None puts ``Actor_NN``
            directly under ``root``.
        seconds, sample_rate: the clips' length and rate (RAVDESS is 48 kHz).

    Returns:
        The WAV paths written.
    """
    root = Path(root)
    wavs = []
    channels = [("01", speech_folder)] + ([("02", song_folder)] if song else [])
    for channel, folder in channels:
        base = root / folder if folder else root
        for actor in actors:
            for emotion in emotions:
                for intensity in ("01",) if emotion == "01" else ("01", "02"):
                    name = ravdess_name(actor, emotion, channel=channel, intensity=intensity)
                    wavs.append(write_wav(base / f"Actor_{actor:02d}" / name, seconds, sample_rate))
    return wavs


# ------------------------------------------------------------------------------------ EmoDB

# <speaker><text><emotion><version>: every emotion letter, male and female speakers.
EMODB_NAMES = (
    "03a01Fa.wav", "03a01Wa.wav", "03b10Nc.wav", "08a02Lb.wav", "08a04Ea.wav",
    "09b03Ta.wav", "09b01Aa.wav", "10a07Wb.wav", "11b09Na.wav", "13a05Fc.wav",
    "14b02Td.wav", "16a01Ab.wav",
)


def write_emodb(root: Path, names=EMODB_NAMES, *, seconds: float = 0.3,
                sample_rate: int = 16000) -> list[Path]:
    """Write ``wav/<name>`` for each name.

    Returns:
        The WAV paths written.
    """
    return [write_wav(Path(root) / "wav" / n, seconds, sample_rate) for n in names]


# --------------------------------------------------------------------------------- manifest

def write_manifest(path: Path, rows: list[dict], *, missing_audio=(), seconds: float = 0.3,
                   sample_rate: int = 16000) -> list[Path]:
    """Write a manifest (CSV or JSONL, by ``path``'s extension) and the WAVs its rows name.

    Args:
        path: the manifest file (``.csv`` or ``.jsonl``).
        rows: one dict per row, written as given (None → empty CSV cell / JSON null). A row's
            ``path`` relative to the manifest's directory (or absolute) gets a WAV.
        missing_audio: row paths whose WAV is not written.
        seconds, sample_rate: the clips' length and rate.

    Returns:
        The WAV paths written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with open(path, "w", newline="") as f:
            out = csv.DictWriter(f, columns)
            out.writeheader()
            out.writerows(rows)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    wavs = []
    for row in rows:
        audio = row.get("path")
        if isinstance(audio, str) and audio and audio not in missing_audio:
            wavs.append(write_wav(path.parent / audio, seconds, sample_rate))
    return wavs
