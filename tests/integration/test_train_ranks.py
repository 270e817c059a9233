"""More ranks than shards through the real DeepSpeed launcher: 4 CPU ranks train on a training
group written as one shard (as an IEMOCAP session is), which the loader before the global plan
refused ("1 training shard(s) … for 4 ranks")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures_shards import write_demo_shards

from dser.corpora import read_corpus
from dser.runconfig import default_config_path
from dser.schema import ShardIndex
from dser.shards import build_shards

pytestmark = pytest.mark.integration


def test_four_ranks_train_on_one_shard(tmp_path):
    from test_train import SHORT, run_train

    root = write_demo_shards(tmp_path)
    manifest = root / "data" / "acted" / "manifest.jsonl"
    build_shards(read_corpus("manifest", manifest), root / "shards" / "one", corpus="one", root=manifest,
                 progress=False)  # the default shard size: the whole corpus in one shard per group
    index = ShardIndex.load(root / "shards" / "one")
    assert [len(index.group(g)["shards"]) for g in ("train", "valid")] == [1, 1]
    run_train(root, "--stage", "1", "--config", str(default_config_path(1)), *SHORT,
              "--set", "optim.max_steps=3", "--set", "train.eval_every=3", "--set", "train.save_every=3",
              "--set", "data.train=shards/one/train", "--set", "data.valid=shards/one/valid",
              "--run-dir", "runs/four", ranks=4)
    m = json.loads((root / "runs" / "four" / "metrics.json").read_text())
    assert m["steps"] == 3 and m["provenance"]["ranks"] == 4
    assert m["repeated_clips"] == 0  # the demo's training set fills whole steps without repeats
    assert m["bad_samples"]["count"] == 0
