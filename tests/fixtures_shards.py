"""Tiny shard sets written in the exact ``dser shard`` format, for loader tests.

``write_test_shards`` writes ``OUT/<group>/<group>-NNNNNN.tar`` (``<key>.flac`` 16 kHz mono
16-bit + ``<key>.json``) and ``OUT/index.json`` itself, so loader tests do not depend on the
sharder. Import it as a plain function (``tests/`` is on ``sys.path`` because of
``tests/conftest.py``)::

    from fixtures_shards import write_test_shards
    records = write_test_shards(tmp_path, n_samples=30, n_shards=3)
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import soundfile as sf
import webdataset as wds

from dser.schema import Sample, TableRow, encode_table, group_summary, scan_tar, sha256_file

DEFAULT_EMOTIONS = ("neutral", "happy", "angry", "sad", "excited", "fear", None)


def shard_key(utt_id: str) -> str:
    """The tar key of an utterance: every character outside [A-Za-z0-9_-] becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", utt_id)


def flac_bytes(audio: np.ndarray, sample_rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def write_test_shards(out: Path, n_samples: int, n_shards: int, *, group: str = "fold0",
                      seed: int = 0, durations: list[float] | tuple[float, float] = (0.3, 1.5),
                      emotions=DEFAULT_EMOTIONS, styles=("acted", "natural"),
                      corrupt: set[int] = frozenset(), sample_rate: int = 16000,
                      prefix: str = "", old_format: bool = False) -> list[dict]:
    """Write ``n_samples`` generated clips into ``n_shards`` tar shards of one group.

    Args:
        out: the shard root (``out/<group>/…`` and ``out/index.json`` are written).
        n_samples: clips to write.
        n_shards: shards to spread them over (contiguously, as evenly as possible).
        group: the shard group name.
        seed: seeds audio, durations and attributes.
        durations: per-clip seconds, or a (low, high) range to draw from.
        emotions, styles: cycled over the clips (None = no agreed emotion).
        corrupt: clip indices whose .flac holds garbage bytes.
        sample_rate: the audio rate written.
        prefix: prepended to utt_ids (to keep several groups' ids distinct).
        old_format: write a ``dser-shards/1`` index (no per-sample tables), as older dser did.

    Calling it again on the same ``out`` with another group adds that group to the index.

    Returns:
        One dict per clip: the JSON labels plus ``audio`` (the int16 samples written).
    """
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / group).mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_samples):
        if isinstance(durations, tuple):
            n = int(rng.uniform(*durations) * sample_rate)
        else:
            n = int(round(durations[i] * sample_rate))
        audio = rng.integers(-12000, 12000, n, dtype=np.int16)
        audio[:2] = (-32768, 32767)  # the extremes must survive the round trip too
        attrs = [None, None, None] if i % 5 == 4 else [float(v) for v in rng.uniform(0, 1, 3).round(4)]
        records.append({
            # A dot in the id checks that keys are sanitised (webdataset splits on dots).
            "utt_id": f"{prefix}spk{i % 3}.utt{i:04d}", "corpus": "testcorpus", "group": group,
            "speaker": f"spk{i % 3}", "gender": "FM"[i % 2],
            "emotion": emotions[i % len(emotions)], "emotion_raw": str(emotions[i % len(emotions)]),
            "valence": attrs[0], "arousal": attrs[1], "dominance": attrs[2],
            "duration": n / sample_rate, "style": styles[i % len(styles)], "audio": audio,
        })
    bounds = np.linspace(0, n_samples, n_shards + 1).round().astype(int)
    shard_entries = []
    for k in range(n_shards):
        path = out / group / f"{group}-{k:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(bounds[k], bounds[k + 1]):
                r = records[i]
                meta = {key: v for key, v in r.items() if key != "audio"}
                flac = b"not a flac file at all" * 10 if i in corrupt else flac_bytes(r["audio"], sample_rate)
                sink.write({"__key__": shard_key(r["utt_id"]), "flac": flac,
                            "json": json.dumps(meta).encode()})
        shard_entries.append({"path": f"{group}/{path.name}", "samples": int(bounds[k + 1] - bounds[k]),
                              "bytes": path.stat().st_size, "sha256": sha256_file(path),
                              "seconds": round(sum(r["duration"] for r in records[bounds[k]:bounds[k + 1]]), 3)})
    if old_format:
        index = {"format": "dser-shards/1", "corpus": "testcorpus", "root": str(out), "sample_rate": sample_rate,
                 "groups": {group: {"shards": shard_entries, "samples": n_samples}}}
        (out / "index.json").write_text(json.dumps(index))
        return records
    # The per-sample table, from the tars as written (dser.schema.scan_tar finds the members).
    rows = []
    for k, entry in enumerate(shard_entries):
        spans = {m["name"]: (m["offset"], m["size"]) for m in scan_tar(out / entry["path"])}
        for r in records[bounds[k]:bounds[k + 1]]:
            key = shard_key(r["utt_id"])
            sample = Sample.from_json({k: v for k, v in r.items() if k != "audio"})
            rows.append(TableRow.of(sample, key, Path(entry["path"]).name, spans[f"{key}.flac"], spans[f"{key}.json"], 0))
    table = encode_table(rows)
    (out / group / "samples.jsonl").write_bytes(table)
    old = json.loads((out / "index.json").read_text()) if (out / "index.json").is_file() else {}
    groups = old.get("groups", {}) if old.get("format") == "dser-shards/2" else {}
    groups[group] = {"shards": shard_entries, "samples": n_samples,
                     "table": {"path": f"{group}/samples.jsonl", "sha256": hashlib.sha256(table).hexdigest(),
                               "bytes": len(table), "rows": len(rows)},
                     **group_summary(rows)}
    index = {"format": "dser-shards/2", "corpus": "testcorpus", "root": str(out), "sample_rate": sample_rate,
             "options": {"reader": "testcorpus"}, "groups": dict(sorted(groups.items()))}
    (out / "index.json").write_text(json.dumps(index))
    return records



def write_demo_shards(root: Path, utterances: int = 96, speakers: int = 6) -> Path:
    """Small demo corpora as ``dser demo`` makes them: ``root/data/{acted,natural}`` (WAV +
    manifest) synthesized and sharded by the real sharder into
    ``root/shards/demo-{acted,natural}/{train,valid,test}`` (8 clips a shard).

    Returns:
        ``root``.
    """
    from dser.corpora import read_corpus
    from dser.corpora.synthetic import synthesize
    from dser.shards import build_shards

    for style, seed in (("acted", 1), ("natural", 2)):
        out = root / "shards" / f"demo-{style}"
        if not (out / "index.json").is_file():
            manifest = synthesize(root / "data" / style, style, utterances=utterances, speakers=speakers, seed=seed,
                                  overwrite=True)
            build_shards(read_corpus("manifest", manifest), out, corpus=f"demo-{style}", root=manifest,
                         max_shard_samples=8, progress=False)
    return root
