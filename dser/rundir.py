"""The run directory: its layout, and the one answer to "is this run finished, where is its export".

::

    runs/<name>/
      config.yaml       {stage, precision, config, layout}: written when the run starts
      checkpoints/      step<N>/ (DeepSpeed's files + dser_rank<r>.pt) and latest (the tag)
      best/             adaptors.safetensors of the best validation so far
      tensorboard/      the event files
      metrics.json      the final metrics, with provenance
      export/           the model to use: what stage 2, evaluate and predict read
      finished.json     written last, atomically: the run finished

A run is finished when ``finished.json`` is there: the recipe writes it after metrics.json and
the export, by rename, so a crash anywhere before leaves a run that is not finished (and
resumes). Nothing else (metrics.json, export/…) says so. Runs from dser before this layout
(``config.yaml`` without ``layout``) have no ``finished.json``; they are read by the rule of
their time, metrics.json beside an export/, and ``note`` says so in one line.

Usage::

    run = RunDir(path)
    run.finished()                 # bool
    run.status()                   # "finished", "stopped at step00000040", "started", …
    run.require_finished("stage2.init_from")  # the export directory, or one line saying why not
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

LAYOUT = 2  # config.yaml's ``layout``: 2 has finished.json; before it (no key) is 1
FINISHED = "finished.json"


class RunDirError(ValueError):
    """A run directory that is not what the caller needs (one line naming it)."""


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory, and what state the run is in."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    # ---- layout --------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def best(self) -> Path:
        return self.path / "best"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    @property
    def export(self) -> Path:
        return self.path / "export"

    @property
    def finished_file(self) -> Path:
        return self.path / FINISHED

    def eval_dir(self, name: str) -> Path:
        """Where a test set's evaluation outputs go."""
        return self.path / "eval" / name

    # ---- state ---------------------------------------------------------------------------
    def meta(self) -> dict | None:
        """config.yaml as written when the run started; None when it is missing or unreadable."""
        try:
            meta = yaml.safe_load(self.config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None
        return meta if isinstance(meta, dict) else None

    def layout(self) -> int:
        meta = self.meta() or {}
        layout = meta.get("layout", 1)
        return layout if isinstance(layout, int) else 1

    def legacy(self) -> bool:
        """A run of an older dser (no finished.json by design) that finished by the rule of
        its time: metrics.json beside an export/."""
        return (not self.finished_file.is_file() and self.layout() < LAYOUT and self.metrics_file.is_file()
                and self.export.is_dir())

    def finished(self) -> bool:
        """Whether the run finished: finished.json (or, for an older run, ``legacy``)."""
        return self.finished_file.is_file() or self.legacy()

    def note(self) -> str | None:
        """One line for a run read by the old rule, else None."""
        if not self.legacy():
            return None
        return (f"note: {self.path} is a run of an older dser (no {FINISHED}): read as finished because it has "
                f"metrics.json and export/")

    def latest_checkpoint(self) -> str | None:
        """The tag in checkpoints/latest, or None."""
        try:
            return (self.checkpoints / "latest").read_text().strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def status(self) -> str:
        """``finished``, ``stopped at TAG`` (a checkpoint, not finished), ``started`` (config
        only), or ``none`` (no config.yaml)."""
        if self.finished():
            return "finished"
        if not self.config_file.is_file():
            return "none"
        tag = self.latest_checkpoint()
        return f"stopped at {tag}" if tag else "started"

    def require_finished(self, what: str, kind: str = "run") -> Path:
        """The export directory of a finished run.

        Args:
            what: the option or key that named this run (``stage2.init_from``, ``RUN_DIR``), for
                the message.
            kind: what the run is, for the message (``stage-1 run``).

        Raises:
            RunDirError: one line saying what is there instead and what to do.
        """
        if self.finished():
            return self.export
        tag = self.latest_checkpoint()
        if tag and self.config_file.is_file():
            raise RunDirError(f"{what} {self.path}: that {kind} stopped before its end (last checkpoint {tag}); "
                              f"finish it first with dser train --resume {self.path}")
        if self.config_file.is_file():
            raise RunDirError(f"{what} {self.path}: that {kind} has not finished (no {FINISHED}, no checkpoint): "
                              f"it failed or is still running")
        from dser.paths import found

        raise RunDirError(f"{what} {self.path}: expected a finished {kind} directory (with export/), found "
                          f"{found(self.path, directory=True)}")

    # ---- writing -------------------------------------------------------------------------
    def write_config(self, meta: dict) -> None:
        """config.yaml at the start of a run (``layout`` added)."""
        self.path.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.config_file, yaml.safe_dump({**meta, "layout": LAYOUT}, sort_keys=False))

    def write_finished(self, record: dict) -> None:
        """finished.json, by rename: call last, after metrics.json and the export."""
        _write_atomic(self.finished_file, json.dumps(record, indent=2) + "\n")

    def read_finished(self) -> dict | None:
        try:
            data = json.loads(self.finished_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        return data if isinstance(data, dict) else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
