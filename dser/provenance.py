"""What a reader needs to trust a run's numbers: which code, which libraries, which hardware,
which config and exactly which data.

``provenance(...)`` is recorded in ``metrics.json`` and ``finished.json`` (``provenance``);
``dser report`` shows it per run. The shard indexes are hashed (sha256 of each ``index.json``
the run read), so two runs that name the same directories but read different shards differ.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "deepspeed", "transformers", "peft")


def git_commit(where: Path | None = None) -> str | None:
    """The commit of the checkout dser runs from (with ``+dirty`` when it has changes), or
    None when dser is not in a git checkout (an installed wheel)."""
    where = where or Path(__file__).resolve().parent.parent
    if not (where / ".git").exists():
        return None
    try:
        run = dict(cwd=where, capture_output=True, text=True, timeout=10)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **run)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str | None]:
    """dser's, Python's and the training libraries' versions (None: not installed)."""
    import dser

    out: dict[str, str | None] = {"dser": dser.__version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def config_sha256(config: dict) -> str:
    """The sha256 of a resolved run config, as canonical JSON (key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def index_hashes(shard_sets: dict[str, list[str]]) -> dict[str, str]:
    """The sha256 of every shard index (``index.json``) the named sets read: path → hash.

    Loose ``.tar`` files (no index) have no entry.
    """
    from dser.shardfiles import shard_files

    out: dict[str, str] = {}
    for specs in shard_sets.values():
        if not specs:
            continue
        for f in shard_files(specs):
            if f.index and f.index not in out:
                out[f.index] = hashlib.sha256(Path(f.index).read_bytes()).hexdigest()
    return dict(sorted(out.items()))


def provenance(*, config: dict, precision_name: str, precision_reason: str, device: str, ranks: int,
               shard_sets: dict[str, list[str]]) -> dict:
    """The provenance record of a run.

    Args:
        config: the resolved run config (``to_dict``).
        precision_name, precision_reason: what the run trained in and why.
        device: the GPU's or CPU's name.
        ranks: the number of ranks.
        shard_sets: every set of shard specs the run read (train, valid, tests, rehearsal).
    """
    return {"versions": versions(), "git_commit": git_commit(), "precision": precision_name,
            "precision_reason": precision_reason, "device": device, "ranks": ranks,
            "config_sha256": config_sha256(config), "shard_indexes": index_hashes(shard_sets)}
