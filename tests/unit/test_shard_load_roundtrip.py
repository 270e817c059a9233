"""dser shard → dser.data loader: audio bit-exact after FLAC, labels equal (the foundation's contract)."""

import json

import numpy as np
import soundfile as sf
import torch
from fixtures_corpora import write_iemocap

from dser.corpora import read_corpus
from dser.data import LoaderConfig, make_loader
from dser.shards import build_shards


def test_iemocap_tree_sharded_then_loaded_is_bit_exact(tmp_path):
    root = tmp_path / "IEMOCAP"
    write_iemocap(root, seconds=0.6)
    listing = read_corpus("iemocap", root)
    out = tmp_path / "shards"
    index = build_shards(listing, out, corpus="iemocap", root=root, max_shard_samples=3, progress=False)
    originals = {r.utt_id: r for r in listing.records}
    cfg = LoaderConfig(shards=[str(out)], label_set=None, require=None, train=False, num_workers=0,
                       max_seconds=4.0, max_batch_seconds=8.0)
    seen = {}
    for batch in make_loader(cfg):
        for i, utt in enumerate(batch["utt_id"]):
            n = int(batch["lengths"][i])
            seen[utt] = (batch["audio"][i, :n], batch["attributes"][i])
            assert not batch["attention_mask"][i, n:].any()
    assert set(seen) == set(originals) and index.totals["samples"] == len(originals)
    for utt, (audio, attrs) in seen.items():
        rec = originals[utt]
        wav, sr = sf.read(rec.path, dtype="int16")
        assert sr == 16000
        np.testing.assert_array_equal((audio * 32768).round().to(torch.int32).numpy(), wav.astype(np.int32))
        expected = [np.nan if v is None else v for v in (rec.valence, rec.arousal, rec.dominance)]
        np.testing.assert_allclose(attrs.numpy(), np.array(expected, dtype=np.float32), equal_nan=True)


def test_sample_json_holds_the_record_labels(tmp_path):
    import tarfile
    root = tmp_path / "IEMOCAP"
    write_iemocap(root, seconds=0.6)
    listing = read_corpus("iemocap", root)
    out = tmp_path / "shards"
    build_shards(listing, out, corpus="iemocap", root=root, progress=False)
    by_id = {r.utt_id: r.labels() for r in listing.records}
    for shard in out.glob("*/*.tar"):
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    want = by_id[meta["utt_id"]]
                    assert {k: meta[k] for k in want} == want
                    assert meta["duration"] > 0
