"""Ranks × 2 DataLoader workers under the real DeepSpeed launcher (CPU, gloo) read every sample
once per epoch: 2 ranks on 7 shards (a count that does not divide evenly), 4 ranks on one shard."""

import collections
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_shards import write_test_shards

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "data_multirank_script.py"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
@pytest.mark.parametrize("ranks, n_shards", [(2, 7), (4, 1)])
def test_ranks_and_workers_read_every_sample_once(tmp_path, ranks, n_shards):
    """7 shards over 2 ranks (not a multiple), and one shard over 4 ranks: training follows the
    global plan (every rank the same number of batches, every clip once, repeats only as
    counted), evaluation splits the shards (a rank may get none)."""
    records = write_test_shards(tmp_path / "shards", 50, n_shards)
    everything = {r["utt_id"] for r in records}
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [str(DEEPSPEED), "--num_accelerators", str(ranks), "--master_port", str(free_port()),
           str(SCRIPT), "--shards", str(tmp_path / "shards"), "--out", str(out), "--workers", "2"]
    # The first launch on a machine JIT-builds DeepSpeed's CPU communication op (about a minute).
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    assert [r["world_size"] for r in per_rank] == [ranks] * ranks
    for name in ("train0", "train1", "eval"):
        read = [r["read"][name] for r in per_rank]
        counts = collections.Counter(u for ids in read for u in ids)
        assert set(counts) == everything, f"{name}: never read: {sorted(everything - set(counts))}"
        if name == "eval":
            assert sum(counts.values()) == len(everything), f"eval: read more than once: {counts.most_common(3)}"
            continue
        assert all(read), f"{name}: a rank read nothing"
        assert len({r["batches"][name] for r in per_rank}) == 1, f"{name}: ranks got different batch counts"
        repeated = sum(r["repeated"][name] for r in per_rank)
        assert sum(counts.values()) == len(everything) + repeated, f"{name}: uncounted repeats"
    # Each epoch has its own plan, so the ranks' shares change between epochs.
    assert set(per_rank[0]["read"]["train0"]) != set(per_rank[0]["read"]["train1"])
