"""IEMOCAP reader (Busso et al., 2008): five sessions of dyadic, scripted and improvised speech.

The layout as published (only the parts read here)::

    ROOT/
      Session1/ … Session5/                       a missing session is simply not read
        dialog/EmoEvaluation/
          Ses01F_impro01.txt                       one label file per dialog
          Categorical/ Attribute/ Self-evaluation/ per-annotator files: not read
        sentences/wav/
          Ses01F_impro01/Ses01F_impro01_F000.wav   16 kHz mono, one file per turn

A label file holds one block per turn; only its first line is read::

    % [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]      (header, ignored)
    [6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]
    C-E2:<TAB>Neutral;<TAB>()                                  (annotator lines, ignored)
    A-E3:<TAB>val 3; act 2; dom  2;<TAB>()

Emotion codes map onto ``dser.labels.EMOTIONS``; ``xxx`` (the annotators did not agree) gives
``emotion=None`` with the raw code kept, so the clip still serves attribute regression.
Valence, arousal and dominance are the annotators' mean on 1-5, rescaled to [0, 1].

The speaker is the session plus the gender letter of the turn id's *last* part: in
``Ses01F_impro01_M003`` the female actor leads the dialog but the turn is spoken by ``Ses01M``.
Groups are the sessions (``Session1`` … ``Session5``), so leave-one-session-out is
speaker-independent. Scripted dialogs are ``acted``, improvised ones ``natural``.

Usage::

    listing = read(Path("/data/IEMOCAP_full_release"))

Options: none.
"""

from __future__ import annotations

import re
from pathlib import Path

from dser.corpora import CorpusError, Listing, Record, Skip, require_dir
from dser.corpora.options import Option, parse_options
from dser.labels import rescale_attribute

NAME = "iemocap"

OPTIONS: dict[str, Option] = {}

CODES: dict[str, str | None] = {
    "neu": "neutral", "hap": "happy", "exc": "excited", "ang": "angry", "sad": "sad",
    "fru": "frustrated", "sur": "surprise", "fea": "fear", "dis": "disgust", "oth": "other",
    "xxx": None,
}

SCALE = (1.0, 5.0)

# [start - end] <tab> turn id <tab> code <tab> [v, a, d]; whitespace is loose on purpose.
_TURN = re.compile(r"^\[\s*([\d.]+)\s*-\s*([\d.]+)\s*\]\s+(\S+)\s+(\S+)\s+\[([^\]]*)\]\s*$")
_TURN_ID = re.compile(r"^(Ses0[1-5])[FM]_.+_([FM])\d+$")


def read(root: Path, **options) -> Listing:
    """Read every ``Session*/dialog/EmoEvaluation/*.txt`` under ``root``.

    Args:
        root: the IEMOCAP release directory (holding ``Session1`` … ``Session5``).
        **options: none are accepted.

    Returns:
        One record per labelled turn; unparseable rows, unknown codes and turns without a WAV
        are skipped with the label file and line.

    Raises:
        CorpusError: no ``Session{1..5}`` directory, or a session without its label folder.
        ValueError: any option.
    """
    parse_options(NAME, options, OPTIONS)
    root = Path(root)
    sessions = [root / f"Session{n}" for n in range(1, 6) if (root / f"Session{n}").is_dir()]
    if not sessions:
        raise CorpusError(f"iemocap: expected Session1 … Session5 directories in {root}, found none")

    listing = Listing([])
    for session in sessions:
        labels = require_dir(session / "dialog" / "EmoEvaluation", f"iemocap {session.name} label folder")
        # Only the top-level files are the consensus labels; the subfolders are per-annotator.
        files = sorted(p for p in labels.glob("*.txt") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise CorpusError(f"iemocap: expected label files (*.txt) in {labels}, found none")
        for txt in files:
            _read_label_file(txt, session, listing)
    return listing


def _read_label_file(txt: Path, session: Path, listing: Listing) -> None:
    for lineno, line in enumerate(txt.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.startswith("["):
            continue  # header, annotator lines (C-E2:, A-E3: …), blank lines
        where = f"{txt}:{lineno}"
        m = _TURN.match(line)
        if not m:
            listing.skipped.append(Skip(where, f"unparseable label line {line.strip()!r}"))
            continue
        start, end, utt, code, vad = m.groups()
        who = _TURN_ID.match(utt)
        if not who:
            listing.skipped.append(Skip(where, f"turn id {utt!r} is not like Ses01F_impro01_M003"))
            continue
        if code not in CODES:
            listing.skipped.append(Skip(where, f"{utt}: unknown emotion code {code!r}; "
                                               f"expected one of {', '.join(CODES)}"))
            continue
        try:
            times = float(start), float(end)
        except ValueError:
            listing.skipped.append(Skip(where, f"{utt}: bad times [{start} - {end}]"))
            continue
        try:
            values = [float(v) for v in vad.split(",")]
            if len(values) != 3:
                raise ValueError(f"expected 3 values [V, A, D], got {len(values)}")
            valence, arousal, dominance = (rescale_attribute(v, *SCALE) for v in values)
        except ValueError as e:
            listing.skipped.append(Skip(where, f"{utt}: bad attributes [{vad}]: {e}"))
            continue
        dialog = utt.rsplit("_", 1)[0]
        wav = session / "sentences" / "wav" / dialog / f"{utt}.wav"
        if not wav.is_file():
            listing.skipped.append(Skip(where, f"label row has no audio file at {wav}"))
            continue
        style = "natural" if "impro" in dialog else "acted" if "script" in dialog else None
        gender = who.group(2)
        listing.records.append(Record(
            utt_id=utt, path=wav, corpus=NAME, group=session.name,
            speaker=who.group(1) + gender, gender=gender,
            emotion=CODES[code], emotion_raw=code,
            valence=valence, arousal=arousal, dominance=dominance, style=style,
            extra={"dialog": dialog, "start": times[0], "end": times[1]}))
