"""``dser verify OUT``: check a shard directory end to end before a long job trusts it.

Checks every shard's size and sha256 against ``index.json``, reads every tar member, decodes
every FLAC, parses every JSON, and compares each shard's sample count and audio seconds (and
each clip's duration) with what the index and the clip's JSON say. Every problem is reported
with its shard and key; the command exits non-zero when there is any.

Usage::

    report = verify_shards(Path("shards/iemocap"))
    report.ok, report.problems
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from dser.data import decode_flac
from dser.shards import ShardIndex

REQUIRED_FIELDS = ("utt_id", "corpus", "group", "speaker", "gender", "emotion", "emotion_raw",
                   "valence", "arousal", "dominance", "duration", "style")


@dataclass
class VerifyReport:
    """What ``verify_shards`` found."""

    shards: int = 0
    samples: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_sample(shard: Path, key: str, parts: dict[str, bytes], sample_rate: int) -> tuple[list[str], float]:
    """Problems of one sample and its decoded duration in seconds."""
    where = f"{shard}:{key}"
    problems = [f"{where}: no .{ext} member" for ext in ("flac", "json") if ext not in parts]
    meta, seconds = None, 0.0
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
            missing = [k for k in REQUIRED_FIELDS if k not in meta]
            if missing:
                problems.append(f"{where}: JSON lacks {', '.join(missing)}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problems.append(f"{where}: JSON does not parse ({e})")
            meta = None
    if "flac" in parts:
        try:
            seconds = len(decode_flac(parts["flac"], sample_rate)) / sample_rate
        except ValueError as e:
            problems.append(f"{where}: {e}")
            return problems, 0.0
        if meta and isinstance(meta.get("duration"), (int, float)) and abs(meta["duration"] - seconds) > 1.5 / sample_rate:
            problems.append(f"{where}: audio lasts {seconds:.4f} s, its JSON says {meta['duration']:.4f} s")
    return problems, seconds


def verify_shards(out: Path, progress: bool = True) -> VerifyReport:
    """Verify every shard of ``out`` against its ``index.json``.

    Raises:
        dser.shards.ShardError: no readable index in ``out``.
    """
    index = ShardIndex.load(out)
    report = VerifyReport()
    report.problems.extend(index.verify())
    entries = [(g, s) for g in index.groups for s in index.group(g)["shards"]]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(entries), desc="verify", unit="shard")
    for group, entry in entries:
        shard = index.out / entry["path"]
        report.shards += 1
        if bar is not None:
            bar.update(1)
        if not shard.is_file():
            continue  # reported by index.verify()
        samples: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.partition(".")
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            report.problems.append(f"{shard}: truncated or unreadable tar ({e}); "
                                   f"{len(samples)} samples read before it")
        seconds = 0.0
        for key, parts in samples.items():
            problems, s = _check_sample(shard, key, parts, index.sample_rate)
            report.problems.extend(problems)
            seconds += s
        report.samples += len(samples)
        report.seconds += seconds
        if len(samples) != entry["samples"]:
            report.problems.append(f"{shard}: {len(samples)} samples, the index says {entry['samples']}")
        if "seconds" in entry and abs(seconds - entry["seconds"]) > 0.01 + 1e-6 * entry["seconds"]:
            report.problems.append(f"{shard}: {seconds:.2f} s of audio, the index says {entry['seconds']:.2f} s")
    if bar is not None:
        bar.close()
    return report
