"""What a path a user gave turns out to be, for one-line errors that say what was found.

Every command that takes a path names it and what it expected there; ``found`` says what is
there instead, so that "a run directory where shards are expected" (and the reverse) reads as
such rather than as a missing file::

    raise UserError(f"{path}: expected a shard directory (index.json), found {found(path)}")
"""

from __future__ import annotations

from pathlib import Path

from dser.schema import INDEX_NAME, read_index_json


def found(path: str | Path, directory: bool = False) -> str:
    """A short description of what is at ``path``: nothing, a file, an empty directory, a
    shard directory, a run directory, a directory of runs, or some other directory.
    ``directory`` says a directory was expected, for the wording of "nothing there"."""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            return "a broken symbolic link"
        return "nothing (no such directory)" if directory else "nothing (not found)"
    if not path.is_dir():
        return "a file"
    try:
        entries = list(path.iterdir())
    except OSError as e:
        return f"a directory it cannot read ({e.strerror})"
    if not entries:
        return "an empty directory"
    if read_index_json(path / INDEX_NAME) is not None:
        return "a shard directory (written by dser shard)"
    if is_run_dir(path):
        return "a run directory"
    if any(p.is_dir() and is_run_dir(p) for p in entries):
        return "a directory of run directories"
    return "a directory holding neither"


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` looks like a dser run directory: its config.yaml beside checkpoints/,
    export/ or metrics.json."""
    return (path / "config.yaml").is_file() and any(
        (path / name).exists() for name in ("checkpoints", "export", "metrics.json"))
