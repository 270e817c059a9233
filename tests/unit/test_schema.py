"""dser.schema holds the shard sample contract once: the writer's records, the loader, verify
and the model's loss all use its definitions."""

import dataclasses
import json
import math
from pathlib import Path

import pytest

import dser.data
import dser.planning
import dser.shards
import dser.evaluate
import dser.model.head
import dser.verify
from dser import schema
from dser.corpora import Record


def test_a_records_sample_json_has_exactly_the_schemas_fields():
    r = Record(utt_id="u1", path=Path("a.wav"), corpus="demo", group="train", speaker="s1", gender="F",
               emotion="happy", emotion_raw="hap", valence=0.5, arousal=None, dominance=None, style="acted")
    assert set(r.labels()) | {"duration"} == set(schema.SAMPLE_FIELDS)
    extra = Record(utt_id="u2", path=Path("b.wav"), corpus="demo", group="train", extra={"dialog": "d1"})
    assert set(extra.labels()) | {"duration"} == set(schema.SAMPLE_FIELDS) | {"dialog"}
    assert set(schema.LABEL_KEYS) < set(schema.SAMPLE_FIELDS)


def test_one_definition_of_each_constant():
    assert dser.data.IGNORE_INDEX is schema.IGNORE_INDEX is dser.model.head.IGNORE_INDEX
    assert dser.evaluate.IGNORE_INDEX is schema.IGNORE_INDEX
    assert dser.planning.LABEL_KEYS is schema.LABEL_KEYS
    assert dser.verify.SAMPLE_FIELDS is schema.SAMPLE_FIELDS
    # one parser of the sample JSON (with its tolerance) for the writer, the loader and verify
    assert dser.planning.Sample is dser.verify.Sample is dser.shards.Sample is schema.Sample
    assert dser.verify.TableRow is dser.shards.TableRow is schema.TableRow
    assert schema.TABLE_FIELDS == tuple(f.name for f in dataclasses.fields(schema.TableRow))


def test_the_duration_tolerance_admits_milliseconds_and_nothing_more():
    for sr in (8000, 16000, 48000):
        n = 12345
        assert schema.duration_matches(n, n / sr, sr)
        assert schema.duration_matches(n, round(n / sr, 3), sr)  # written to the millisecond
        assert not schema.duration_matches(n, n / sr + 0.002, sr)
        assert not schema.duration_matches(n + int(0.002 * sr), n / sr, sr)


def _labels(**kw) -> dict:
    r = Record(utt_id="u1", path=Path("a.wav"), corpus="demo", group="train", speaker="s1", gender="F",
               emotion="happy", emotion_raw="hap", valence=0.5, arousal=None, dominance=0.25, style="acted",
               extra={"dialog": "d1"})
    return {**r.labels(), "duration": 1.25, **kw}


def test_a_sample_json_round_trips_in_the_writers_key_order():
    sample = schema.Sample.from_json(json.dumps(_labels()).encode())
    assert sample.extra == {"dialog": "d1"} and sample.duration == 1.25
    assert list(json.loads(sample.encode())) == list(_labels())  # the bytes dser shard wrote before
    assert schema.Sample.from_json(sample.encode()) == sample
    assert sample.labelled_attributes == ["valence", "dominance"]
    assert sample.attributes[0] == 0.5 and math.isnan(sample.attributes[1])
    assert sample.matches(20000, 16000) and not sample.matches(20000 + 33, 16000)
    # numpy scalars (a reader's extra fields, a rescaled attribute) are plain numbers
    np = pytest.importorskip("numpy")
    assert json.loads(schema.Sample.from_json(_labels(valence=np.float32(0.5), n=np.int64(3))).encode())["n"] == 3


@pytest.mark.parametrize("raw, says", [
    (b"{not json", "does not parse as JSON"),
    (b"[1, 2]", "is a JSON list, not an object"),
    (json.dumps({k: v for k, v in _labels().items() if k != "style"}), "lacks style"),
    (json.dumps(_labels(duration=0)), "duration 0 is not a positive number"),
    (json.dumps(_labels(duration="1.2")), "duration '1.2' is not a positive number"),
    (json.dumps(_labels(arousal="high")), "arousal 'high' is neither a number nor null"),
    (json.dumps(_labels(valence=True)), "valence True is neither a number nor null"),
    (json.dumps(_labels(emotion=3)), "emotion 3 is neither text nor null"),
])
def test_a_sample_json_that_breaks_the_contract_names_the_key(raw, says):
    with pytest.raises(schema.SampleError, match=says):
        schema.Sample.from_json(raw)


def test_the_loader_needs_only_the_label_keys_and_duration():
    s = schema.Sample.from_json({"emotion": None, "valence": None, "arousal": None, "dominance": None,
                                 "duration": 0.5, "speaker": 7}, required=schema.LABEL_KEYS)
    assert s.utt_id is None and s.speaker == "7"
    with pytest.raises(schema.SampleError, match="lacks duration"):
        schema.Sample.from_json({k: None for k in schema.LABEL_KEYS}, required=schema.LABEL_KEYS)


def test_a_table_row_round_trips_and_a_broken_one_names_the_field():
    sample = schema.Sample.from_json(_labels())
    row = schema.TableRow.of(sample, "u1", "train-000000.tar", (0, 2048), (2048, 1024), 3)
    line = row.to_json()
    assert list(line) == list(schema.TABLE_FIELDS) and line["flac"] == [0, 2048]
    assert line["attributes"] == ["valence", "dominance"]
    assert schema.TableRow.from_json(json.loads(json.dumps(line))) == row
    for broken, says in [({**line, "flac": [0]}, "flac .* is not \\[offset, size\\]"),
                         ({**line, "clipped": -1}, "clipped -1 is not a count"),
                         ({**line, "attributes": ["joy"]}, "attributes .* is not a list of"),
                         ({k: v for k, v in line.items() if k != "shard"}, "lacks shard"),
                         ({**line, "extra": 1}, "unknown fields extra")]:
        with pytest.raises(schema.SampleError, match=says):
            schema.TableRow.from_json(broken)
