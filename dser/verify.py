"""``dser verify OUT``: check a shard directory end to end before a long job trusts it.

Checks, against ``index.json``:

- every listed file (shards and per-sample tables): present, of the listed size and sha256;
- nothing else under OUT: an unlisted file (a stray backup tar, a copy) is reported, since
  training never reads it;
- every tar member read, every FLAC decoded, every JSON parsed; each shard's sample count and
  audio seconds, each clip's duration;
- the per-sample table against the tars: one row per sample, in shard order, with the member
  offsets and sizes, labels and duration the tar holds;
- every number the index states: group and total samples, hours, per-emotion, per-style,
  per-speaker, emotion × style, attribute and clipped counts.

Every problem is reported with its file and key; the command exits non-zero when there is any.

Usage::

    report = verify_shards(Path("shards/iemocap"))
    report.ok, report.problems
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from dser.data import decode_flac
from dser.schema import (INDEX_NAME, SAMPLE_FIELDS, Sample, SampleError, ShardError, ShardIndex, TableRow,
                         group_summary, unlisted_files)


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


def _check_sample(shard: Path, key: str, parts: dict[str, bytes], sample_rate: int) -> tuple[list[str], float, Sample | None]:
    """Problems of one sample, its decoded duration in seconds, and its JSON (None: unreadable)."""
    where = f"{shard}:{key}"
    problems = [f"{where}: no .{ext} member" for ext in ("flac", "json") if ext not in parts]
    meta, seconds = None, 0.0
    if "json" in parts:
        try:
            meta = Sample.from_json(parts["json"], required=SAMPLE_FIELDS)
        except SampleError as e:
            problems.append(f"{where}: JSON {e}")
    if "flac" in parts:
        try:
            seconds = len(decode_flac(parts["flac"], sample_rate)) / sample_rate
        except ValueError as e:
            problems.append(f"{where}: {e}")
            return problems, 0.0, meta
        if meta is not None and not meta.matches(round(seconds * sample_rate), sample_rate):
            problems.append(f"{where}: audio lasts {seconds:.4f} s, its JSON says {meta.duration:.4f} s")
    return problems, seconds, meta


def _read_tar(shard: Path) -> tuple[dict[str, dict], str | None]:
    """key → {"parts": {ext: bytes}, "spans": {ext: [offset, size]}} in member order, and the
    read error that cut it short (if any)."""
    samples: dict[str, dict] = {}
    last = None  # (sample, ext, offset) of the member whose span ends where the next begins
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if last is not None:
                    last[0]["spans"][last[1]] = [last[2], member.offset - last[2]]
                    last = None
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                sample = samples.setdefault(key, {"parts": {}, "spans": {}})
                sample["parts"][ext] = tar.extractfile(member).read()
                last = (sample, ext, member.offset)
            if last is not None:
                last[0]["spans"][last[1]] = [last[2], tar.offset - last[2]]
    except (tarfile.TarError, OSError, EOFError) as e:
        return samples, f"truncated or unreadable tar ({e}); {len(samples)} samples read before it"
    return samples, None


def _compare(what: str, stated, actual, problems: list[str]) -> None:
    if stated != actual:
        problems.append(f"{what}: the index says {stated}, the shards hold {actual}")


def verify_shards(out: Path, progress: bool = True) -> VerifyReport:
    """Verify every shard and table of ``out`` against its ``index.json``.

    Raises:
        dser.shards.ShardError: no readable index in ``out`` (or one in an older format).
    """
    index = ShardIndex.load(out)
    report = VerifyReport()
    report.problems.extend(index.verify())
    report.problems.extend(f"{p}: not listed in {index.out / INDEX_NAME}, so training and evaluation never read it; "
                           f"move it out of {index.out}" for p in unlisted_files(index, index.out))
    entries = [(g, s) for g in index.groups for s in index.group(g)["shards"]]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(entries), desc="verify", unit="shard")
    rows_found: dict[str, list[TableRow]] = {g: [] for g in index.groups}  # table rows as the tars say
    for group, entry in entries:
        shard = index.out / entry["path"]
        report.shards += 1
        if bar is not None:
            bar.update(1)
        if not shard.is_file():
            continue  # reported by index.verify()
        samples, error = _read_tar(shard)
        if error:
            report.problems.append(f"{shard}: {error}")
        seconds = 0.0
        for key, sample in samples.items():
            problems, s, meta = _check_sample(shard, key, sample["parts"], index.sample_rate)
            report.problems.extend(problems)
            seconds += s
            if meta is not None and set(sample["spans"]) >= {"flac", "json"}:
                rows_found[group].append(TableRow.of(meta, key, shard.name, sample["spans"]["flac"],
                                                     sample["spans"]["json"], 0))
        report.samples += len(samples)
        report.seconds += seconds
        if len(samples) != entry["samples"]:
            report.problems.append(f"{shard}: {len(samples)} samples, the index says {entry['samples']}")
        if "seconds" in entry and abs(seconds - entry["seconds"]) > 0.01 + 1e-6 * entry["seconds"]:
            report.problems.append(f"{shard}: {seconds:.2f} s of audio, the index says {entry['seconds']:.2f} s")
    if bar is not None:
        bar.close()
    for group in index.groups:
        report.problems.extend(_check_group(index, group, rows_found[group]))
    report.problems.extend(_check_totals(index))
    return report


def _check_group(index: ShardIndex, group: str, found: list[TableRow]) -> list[str]:
    """The group's table against the rows its tars give, and its stated counts against the table."""
    entry = index.group(group)
    problems: list[str] = []
    try:
        rows = index.table(group)
    except ShardError as e:
        return [str(e)]
    table = index.table_path(group)
    by_id = {r.utt_id: r for r in rows}
    for want in found:
        row = by_id.get(want.utt_id)
        if row is None:
            problems.append(f"{table}: no row for {want.utt_id!r} (in {want.shard})")
            continue
        for k, v in want.to_json().items():
            if k != "clipped" and row.to_json()[k] != v:
                problems.append(f"{table}: {want.utt_id!r} has {k} {row.to_json()[k]!r}, the shard says {v!r}")
    found_ids = {r.utt_id for r in found}
    problems.extend(f"{table}: row {r.utt_id!r} names no sample in the shards" for r in rows
                    if r.utt_id not in found_ids)
    if [r.utt_id for r in rows if r.utt_id in found_ids] != [r.utt_id for r in found]:
        problems.append(f"{table}: rows are not in shard order")
    where = f"{index.out / INDEX_NAME}: group {group}"
    _compare(f"{where} samples", entry["samples"], len(rows), problems)
    _compare(f"{where} table rows", entry["table"].get("rows"), len(rows), problems)
    _compare(f"{where} samples (sum over its shards)", sum(s["samples"] for s in entry["shards"]), len(rows), problems)
    _compare(f"{where} hours", entry["hours"], round(sum(s["seconds"] for s in entry["shards"]) / 3600, 6), problems)
    summary = group_summary(rows)
    for key in ("speakers", "emotion_style", "attributes", "clipped"):
        _compare(f"{where} {key}", entry.get(key), summary[key], problems)
    emotions = {e: sum(per.values()) for e, per in summary["emotion_style"].items()}
    styles: dict[str, int] = {}
    for per in summary["emotion_style"].values():
        for s, n in per.items():
            styles[s] = styles.get(s, 0) + n
    _compare(f"{where} emotions", {k: v for k, v in entry["emotions"].items() if v}, emotions, problems)
    _compare(f"{where} styles", {k: v for k, v in entry["styles"].items() if v}, styles, problems)
    return problems


def _check_totals(index: ShardIndex) -> list[str]:
    problems: list[str] = []
    totals, groups = index.totals, [index.group(g) for g in index.groups]
    where = f"{index.out / INDEX_NAME}: totals"
    _compare(f"{where} samples", totals["samples"], sum(g["samples"] for g in groups), problems)
    _compare(f"{where} shards", totals["shards"], sum(len(g["shards"]) for g in groups), problems)
    for key in ("emotions", "styles"):
        summed: dict[str, int] = {}
        for g in groups:
            for k, v in g[key].items():
                summed[k] = summed.get(k, 0) + v
        _compare(f"{where} {key}", {k: v for k, v in totals[key].items() if v},
                 {k: v for k, v in summed.items() if v}, problems)
    if "clipped" in totals:
        _compare(f"{where} clipped", totals["clipped"],
                 {k: sum(g["clipped"][k] for g in groups) for k in ("samples", "clips")}, problems)
    return problems
