"""Corpus readers: one file per corpus, each turning a corpus as published into records.

A reader is a module with ``NAME`` (the CLI name) and ``read(root: Path, **options) ->
Listing``. It never decodes audio: it parses label files and names, checks that each audio
file exists, and returns ``Record``s plus the inputs it had to skip (with a reason). Audio
problems (truncated, silent, too short …) are found later, when ``dser.shards`` encodes.

What the readers share lives here: ``Record``, ``Skip`` and ``Listing``; ``assign_folds``
(speaker-independent folds); ``audio_file_problem``; ``read_named_wavs``, the whole scan of the
corpora whose file names carry the labels (CREMA-D, RAVDESS, EmoDB: each gives it a pattern and
a function from a match to a record or a skip reason); ``require_dir`` / ``require_file``.

Usage::

    from dser.corpora import read_corpus
    listing = read_corpus("crema-d", Path("/data/CREMA-D"))
    listing.records[0].emotion      # 'angry'
"""

from __future__ import annotations

import errno
import importlib
import os
import re
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dser.labels import EMOTIONS, STYLES


class CorpusError(Exception):
    """A corpus cannot be read at all (missing ROOT, missing label file): the message says
    what was expected where."""


@dataclass
class Record:
    """One utterance as a reader found it.

    Attributes:
        utt_id: unique id within the corpus.
        path: the audio file.
        corpus: reader name (``iemocap``, ``crema-d`` …).
        group: shard group (``Session1``, ``fold3``, ``Train`` …).
        speaker: speaker id, or None when unknown.
        gender: ``"F"``, ``"M"`` or None.
        emotion: canonical emotion (``dser.labels.EMOTIONS``) or None (no agreed label).
        emotion_raw: the corpus's own code, kept verbatim.
        valence, arousal, dominance: in [0, 1] or None.
        style: ``"acted"``, ``"natural"`` or None.
        extra: corpus-specific fields kept in the sample JSON (e.g. IEMOCAP dialog, times).
    """

    utt_id: str
    path: Path
    corpus: str
    group: str
    speaker: str | None = None
    gender: str | None = None
    emotion: str | None = None
    emotion_raw: str | None = None
    valence: float | None = None
    arousal: float | None = None
    dominance: float | None = None
    style: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.emotion is not None and self.emotion not in EMOTIONS:
            raise ValueError(f"{self.utt_id}: {self.emotion!r} is not a canonical emotion")
        if self.style is not None and self.style not in STYLES:
            raise ValueError(f"{self.utt_id}: style {self.style!r} is not one of {STYLES}")
        if self.gender is not None and self.gender not in ("F", "M"):
            raise ValueError(f"{self.utt_id}: gender {self.gender!r} is not F or M")

    def labels(self) -> dict:
        """The JSON label dict stored beside the audio (duration is added by the sharder)."""
        d = asdict(self)
        d.pop("path")
        extra = d.pop("extra")
        d.update(extra)
        return d


@dataclass
class Skip:
    """An input left out, and why (recorded in ``index.json`` and printed)."""

    input: str
    reason: str


@dataclass
class Listing:
    """What a reader returns: the records to shard and the inputs it skipped."""

    records: list[Record]
    skipped: list[Skip] = field(default_factory=list)

    def drop_duplicate_ids(self) -> None:
        """Keep the first record of each utt_id; later ones become skips (never silently)."""
        seen: set[str] = set()
        kept: list[Record] = []
        for r in self.records:
            if r.utt_id in seen:
                self.skipped.append(Skip(str(r.path), f"duplicate utterance id {r.utt_id!r}"))
            else:
                seen.add(r.utt_id)
                kept.append(r)
        self.records = kept


def assign_folds(speaker_of: dict[str, str | None], n_folds: int = 5) -> dict[str, str]:
    """Deterministic speaker-independent folds.

    Speakers are taken largest first (ties by id) and each goes to the fold holding the fewest
    clips so far, so folds are balanced and a speaker's clips all land in one fold.

    Args:
        speaker_of: utt_id → speaker id (None counts as its own speaker ``unknown``).
        n_folds: number of folds.

    Returns:
        utt_id → ``fold0`` … ``fold{n_folds-1}``.
    """
    counts = Counter(s or "unknown" for s in speaker_of.values())
    load = [0] * n_folds
    fold_of_speaker: dict[str, int] = {}
    for spk, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        f = min(range(n_folds), key=lambda i: (load[i], i))
        fold_of_speaker[spk] = f
        load[f] += n
    return {u: f"fold{fold_of_speaker[s or 'unknown']}" for u, s in speaker_of.items()}


def audio_file_problem(path: Path) -> str | None:
    """Why an audio entry a reader found cannot be read as a file (a broken or looping symbolic
    link, a directory), or None when it is a readable file. Readers skip such an entry with
    this reason, so every input is either a record or a listed skip."""
    try:
        st = os.stat(path)  # follows links
    except OSError as e:
        if path.is_symlink():
            if e.errno == errno.ELOOP:
                return "symbolic link loop: the link resolves to itself"
            return f"broken symbolic link to {os.readlink(path)} (its target is missing)"
        return f"cannot be read ({e.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return "a directory, not an audio file" + (" (a symbolic link to one)" if path.is_symlink() else "")
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return None


def read_named_wavs(folders: list[Path], name: re.Pattern, expected: str,
                    record_of: Callable[[Path, re.Match], Record | str], n_folds: int) -> Listing:
    """The reading a corpus does whose file names carry every label (CREMA-D, RAVDESS, EmoDB).

    Every ``.wav`` in ``folders`` (each in name order) is an input; other and hidden files
    (videos, ``.DS_Store`` …) are not. An input that is not a readable file
    (``audio_file_problem``), whose stem ``name`` does not match, or that ``record_of`` turns
    down is skipped with the reason; the records are grouped into speaker-independent folds
    (``assign_folds``), so that the group of each is ``fold0`` … ``fold{n_folds-1}``.

    Args:
        folders: the folders holding the clips, in the order to read them.
        name: the file-name pattern, matched against the stem; its groups hold the labels.
        expected: the name's form for the skip reason ``name is not {expected}``.
        record_of: the record of a well-named clip (given its match), or why it is skipped.
        n_folds: number of folds.

    Returns:
        The records and the skipped inputs, in reading order.
    """
    listing = Listing([])
    for folder in folders:
        for wav in sorted(folder.iterdir()):
            if wav.suffix.lower() != ".wav" or wav.name.startswith("."):
                continue
            result = audio_file_problem(wav)
            if result is None:
                m = name.match(wav.stem)
                result = record_of(wav, m) if m else f"name is not {expected}"
            if isinstance(result, str):
                listing.skipped.append(Skip(str(wav), result))
            else:
                listing.records.append(result)
    folds = assign_folds({r.utt_id: r.speaker for r in listing.records}, n_folds)
    for r in listing.records:
        r.group = folds[r.utt_id]
    return listing


def require_dir(path: Path, what: str) -> Path:
    """Fail with a CorpusError naming what was expected, unless ``path`` is a directory."""
    if not path.is_dir():
        from dser.paths import found

        raise CorpusError(f"{what}: expected a directory at {path}, found {found(path, directory=True)}")
    return path


def require_file(path: Path, what: str) -> Path:
    """Fail with a CorpusError naming what was expected, unless ``path`` is a file."""
    if not path.is_file():
        from dser.paths import found

        raise CorpusError(f"{what}: expected a file at {path}, found {found(path)}")
    return path


# CLI name → module under dser.corpora
READERS: dict[str, str] = {
    "iemocap": "iemocap",
    "msp-podcast": "msp_podcast",
    "crema-d": "crema_d",
    "ravdess": "ravdess",
    "emodb": "emodb",
    "manifest": "manifest",
}


def read_corpus(name: str, root: Path, **options) -> Listing:
    """Read corpus ``name`` at ``root``; duplicates are turned into skips.

    Raises:
        CorpusError: unknown corpus name, missing ROOT or label files.
    """
    if name not in READERS:
        raise CorpusError(f"unknown corpus {name!r}; choose one of {', '.join(READERS)}")
    module = importlib.import_module(f"dser.corpora.{READERS[name]}")
    if not Path(root).exists():
        raise CorpusError(f"{name}: ROOT {root} does not exist")
    if name != "manifest" and not Path(root).is_dir():
        raise CorpusError(f"{name}: ROOT {root} is a file; give the corpus folder (a CSV or JSONL list of clips "
                          f"is read with `dser shard manifest FILE`)")
    listing = module.read(Path(root), **options)
    listing.drop_duplicate_ids()
    return listing
