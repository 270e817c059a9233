"""Property test: random manifests and random audio through ``dser shard manifest`` and the loader.

Hypothesis writes a corpus (valid WAVs at random rates, channels and lengths; random bytes
under audio names; missing files; paths that climb out of the corpus), a CSV or JSONL manifest
over it (random label values, stray columns, broken lines), and runs the real CLI in-process.
What must hold for every input:

- no traceback: the command ends with exit 0, or exit 1 and one ``Error:`` line;
- every manifest row is either sharded or skipped with a reason (none vanishes);
- the loader reads back exactly the sharded clips, each with its manifest labels;
- nothing is written outside OUT (the corpus folder is hashed before and after), and a
  failed run leaves no OUT and no ``.partial`` folder.

``max_examples`` is bounded (``PROFILE_EXAMPLES``) so the test adds well under a minute; the
examples are derandomized (the same ones on every run and machine) and no example database is
written. Run it with ``-s`` to see how many corpora were sharded and how many refused.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dser.cli import main
from dser.data import LoaderConfig, make_loader
from dser.labels import EMOTIONS
from dser.schema import ShardIndex
from dser.shards import shard_key

# DSER_PROPERTY_EXAMPLES=N searches N random (not derandomized) examples instead: a longer hunt.
PROFILE_EXAMPLES = int(os.environ.get("DSER_PROPERTY_EXAMPLES", 300))
DERANDOMIZE = "DSER_PROPERTY_EXAMPLES" not in os.environ

# -- the corpus: audio files -------------------------------------------------------------------

wav_audio = st.fixed_dictionaries({
    "kind": st.just("wav"),
    "rate": st.sampled_from([8000, 16000, 22050, 44100, 48000]),
    "channels": st.integers(1, 2),
    "seconds": st.sampled_from([*[0.3, 0.6] * 4, 0.0, 0.05]),  # the first is what shrinking aims at
    "subtype": st.sampled_from(["PCM_16", "PCM_24", "FLOAT", "PCM_U8"]),
    "format": st.sampled_from(["WAV", "FLAC"]),
    "level": st.sampled_from([*[0.3] * 6, 0.0, 1.5]),  # speech-like, silence, clipped (float only)
})
junk_audio = st.fixed_dictionaries({"kind": st.just("junk"), "data": st.binary(max_size=200)})
missing_audio = st.fixed_dictionaries({"kind": st.just("missing")})

text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
label_value = st.one_of(st.none(), text, st.integers(-5, 10), st.floats(allow_nan=True, allow_infinity=True),
                        st.booleans(), st.lists(st.integers(), max_size=2))

VALID = {  # values a clean row takes: every one is accepted by the manifest reader
    "emotion": st.sampled_from([*EMOTIONS, "ANGRY", None]),
    "valence": st.one_of(st.none(), st.floats(0, 1)),
    "arousal": st.one_of(st.none(), st.floats(0, 1)),
    "speaker": st.one_of(st.none(), text),
    "gender": st.sampled_from([None, "F", "m", "female"]),
    "group": st.sampled_from(["train", "valid", "test", None]),
    "style": st.sampled_from([None, "acted", "natural"]),
    "utt_id": st.one_of(st.none(), text),
}
NOISY = {  # anything at all, now and then a value the reader must refuse in one line
    **{k: st.one_of(v, label_value) for k, v in VALID.items()},
    "emotion": st.one_of(VALID["emotion"], st.just("contempt"), label_value),
    "group": st.one_of(VALID["group"], st.sampled_from(["a b", ".hidden", "é", "../x"]), label_value),
}


def rows_of(values: dict, clean: bool):
    return st.fixed_dictionaries({
        "clean": st.just(clean),
        "audio": st.deferred(lambda: audio),
        "name": st.one_of(st.sampled_from(["a.wav", "b.flac", "sub/c.wav", "d e.wav"]),
                          st.text(st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters="/\0"),
                                  min_size=1, max_size=10)),
        "path_as": st.sampled_from(["relative"] * 5 + ["absolute", "outside", "empty"]),
        **values,
        "extra": st.dictionaries(st.sampled_from(["session", "duration", "notes"]), label_value, max_size=2),
    })


def weighted(*pairs):
    """One of the strategies, chosen with the given weights (``one_of`` would treat repeats as one)."""
    table = [strategy for weight, strategy in pairs for _ in range(weight)]
    return st.sampled_from(range(len(table))).flatmap(lambda i: table[i])


audio = weighted((6, wav_audio), (1, junk_audio), (1, missing_audio))
row = weighted((4, rows_of(VALID, True)), (1, rows_of(NOISY, False)))

corpus = st.fixed_dictionaries({
    "rows": st.lists(row, min_size=1, max_size=8),
    "format": st.sampled_from(["csv", "jsonl"]),
    # no quote: an unbalanced one would make the CSV reader join lines into one (skipped) row
    "broken_lines": weighted((3, st.just([])), (1, st.lists(st.binary(max_size=30).map(lambda b: b.replace(b'"', b"'")), max_size=2))),
    "sample_rate": st.sampled_from([16000, 8000]),
})


def _write_audio(path: Path, spec: dict, seed: int) -> None:
    if spec["kind"] == "missing":
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if spec["kind"] == "junk":
        path.write_bytes(spec["data"])
        return
    n = int(spec["rate"] * spec["seconds"])
    t = np.arange(n) / spec["rate"]
    wave = spec["level"] * np.sin(2 * np.pi * (180 + 40 * seed) * t)
    data = np.repeat(wave[:, None], spec["channels"], axis=1)
    subtype = spec["subtype"]
    if spec["format"] == "FLAC" and subtype in ("FLOAT", "PCM_U8"):
        subtype = "PCM_16"  # FLAC holds integers only
    if subtype != "FLOAT":
        data = np.clip(data, -1, 1 - 2 ** -15)
    sf.write(str(path), data, spec["rate"], subtype=subtype, format=spec["format"])


def _row_fields(r: dict, corpus_dir: Path, outside: Path, i: int) -> dict:
    name = f"{i:02d}_{r['name']}"
    target = (outside if r["path_as"] == "outside" else corpus_dir) / "audio" / name
    _write_audio(target, r["audio"], i)
    path = {"relative": f"audio/{name}", "absolute": str(target), "outside": f"../outside/audio/{name}",
            "empty": ""}[r["path_as"]]
    fields = {"path": path, **{k: r[k] for k in ("emotion", "valence", "arousal", "speaker", "gender",
                                                    "group", "style", "utt_id")}, **r["extra"]}
    return fields


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return json.dumps(v) if isinstance(v, list) else str(v)


def _write_manifest(spec: dict, corpus_dir: Path, outside: Path) -> Path:
    rows = [_row_fields(r, corpus_dir, outside, i) for i, r in enumerate(spec["rows"])]
    # stray lines (random bytes, possibly not UTF-8) first, after a CSV's header
    stray = b"".join(b.replace(b"\n", b" ").replace(b"\r", b" ") + b"\n" for b in spec["broken_lines"])
    if spec["format"] == "jsonl":
        manifest = corpus_dir / "manifest.jsonl"
        manifest.write_bytes(stray + b"".join(json.dumps(r, allow_nan=True).encode() + b"\n" for r in rows))
        return manifest
    columns = sorted({k for r in rows for k in r} | {"path"})
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, columns)  # lineterminator \r\n: a field holding \r or \n is quoted
    w.writerow(dict(zip(columns, columns)))
    header = buf.getvalue().encode()
    buf.seek(0)
    buf.truncate()
    for r in rows:
        w.writerow({k: _csv_value(r.get(k)) for k in columns})
    manifest = corpus_dir / "manifest.csv"
    manifest.write_bytes(header + stray + buf.getvalue().encode())
    return manifest


def _utt_id(r: dict, i: int, fmt: str) -> str:
    """The id the manifest reader gives row ``i``: its ``utt_id`` as text, else its file's stem
    (in JSONL a list or boolean id is a bad row: a name no other row can have)."""
    v = r["utt_id"]
    if fmt == "csv":
        v = _csv_value(v)
    elif isinstance(v, (list, dict, bool)):
        return f"<bad row {i}>"
    text = "" if v is None else str(v).strip()
    return text or Path(f"{i:02d}_{r['name']}").stem


def _good_ids(spec: dict) -> set[str]:
    """Ids of the rows that must be sharded: clean labels, a file that decodes to at least 0.3 s
    of unclipped sound, and an id whose tar key (``shard_key``) no other row has: of two
    colliding ids the second is skipped with a reason, before any audio is read."""
    ids = [shard_key(_utt_id(r, i, spec["format"])) for i, r in enumerate(spec["rows"])]
    good = set()
    for i, r in enumerate(spec["rows"]):
        a = r["audio"]
        if r["clean"] and r["path_as"] != "empty" and a["kind"] == "wav" and a["seconds"] >= 0.3 \
                and a["level"] == 0.3 and ids.count(ids[i]) == 1:
            good.add(_utt_id(r, i, spec["format"]))
    return good


def _tree(root: Path, skip: Path | None = None) -> dict[str, str]:
    """{relative path: sha256 (or 'dir')} of everything under ``root``, ``skip`` left out."""
    tree = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        tree[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return tree


TRIED = {"examples": 0, "sharded": 0, "refused": 0, "rows": 0, "rows_sharded": 0}


@settings(max_examples=PROFILE_EXAMPLES, deadline=None, derandomize=DERANDOMIZE, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=corpus)
def test_any_manifest_is_sharded_or_skipped_with_a_reason_and_nothing_leaks(spec):
    with tempfile.TemporaryDirectory(prefix="dser-prop-") as tmp:
        work = Path(tmp)
        corpus_dir, outside, out = work / "corpus", work / "outside", work / "corpus" / "shards"
        corpus_dir.mkdir()
        outside.mkdir()
        manifest = _write_manifest(spec, corpus_dir, outside)
        before = _tree(work)

        result = CliRunner().invoke(main, ["shard", "manifest", str(manifest), str(out), "--min-duration", "0.1",
                                           "--sample-rate", str(spec["sample_rate"])], catch_exceptions=True)
        TRIED["examples"] += 1
        TRIED["rows"] += len(spec["rows"])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception  # a traceback: the property is broken
        assert _tree(work, skip=out) == before  # nothing written or removed outside OUT
        errors = [ln for ln in result.output.splitlines() if ln.startswith("Error: ")]

        if result.exit_code != 0:
            TRIED["refused"] += 1
            assert result.exit_code == 1 and len(errors) == 1, result.output
            assert not out.exists() and not list(work.rglob("*.partial*")), result.output
            return

        TRIED["sharded"] += 1
        assert not errors, result.output
        index = ShardIndex.load(out)
        # a stray line is a row too, unless blank (both readers pass blank lines over)
        stray = [b for b in spec["broken_lines"] if (b if spec["format"] == "csv" else b.strip())]
        manifest_rows = len(spec["rows"]) + len(stray)
        assert index.totals["samples"] + len(index.skipped) >= manifest_rows  # no row vanishes
        assert all(s.reason for s in index.skipped)
        json.dumps(index.data["skipped"], ensure_ascii=False).encode("utf-8")  # every reason saves and prints

        cfg = LoaderConfig(shards=[str(out)], label_set=None, require=None, train=False, num_workers=0,
                           max_seconds=None, max_batch_seconds=60.0, sample_rate=spec["sample_rate"])
        loaded = [u for batch in make_loader(cfg) for u in batch["utt_id"]]
        assert len(loaded) == len(set(loaded)) == index.totals["samples"]
        # a clean row over good audio (long enough, not silent, not clipped) is never skipped
        missed = sorted(_good_ids(spec) - set(loaded))
        assert not missed, (missed, [(s.input, s.reason) for s in index.skipped])
        TRIED["rows_sharded"] += len(loaded)


def teardown_module(module):
    print(f"\nproperty test: {TRIED['examples']} corpora ({TRIED['rows']} rows): {TRIED['sharded']} sharded "
          f"({TRIED['rows_sharded']} clips loaded back), {TRIED['refused']} refused with one line")
