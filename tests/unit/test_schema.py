"""dser.schema holds the shard sample contract once: the writer's records, the loader, verify
and the model's loss all use its definitions."""

from pathlib import Path

import dser.data
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
    assert dser.data.LABEL_KEYS is schema.LABEL_KEYS and dser.data.ATTRIBUTES is schema.ATTRIBUTES
    assert dser.verify.SAMPLE_FIELDS is schema.SAMPLE_FIELDS
    assert dser.data.duration_matches is dser.verify.duration_matches is schema.duration_matches


def test_the_duration_tolerance_admits_milliseconds_and_nothing_more():
    for sr in (8000, 16000, 48000):
        n = 12345
        assert schema.duration_matches(n, n / sr, sr)
        assert schema.duration_matches(n, round(n / sr, 3), sr)  # written to the millisecond
        assert not schema.duration_matches(n, n / sr + 0.002, sr)
        assert not schema.duration_matches(n + int(0.002 * sr), n / sr, sr)
