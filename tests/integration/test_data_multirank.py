"""2 ranks × 2 DataLoader workers under the real DeepSpeed launcher (CPU, gloo) read every
sample exactly once per epoch, with a shard count (7) that does not divide evenly."""

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
def test_two_ranks_two_workers_read_every_sample_once(tmp_path):
    records = write_test_shards(tmp_path / "shards", 50, 7)
    everything = {r["utt_id"] for r in records}
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [str(DEEPSPEED), "--num_accelerators", "2", "--master_port", str(free_port()),
           str(SCRIPT), "--shards", str(tmp_path / "shards"), "--out", str(out), "--workers", "2"]
    # The first launch on a machine JIT-builds DeepSpeed's CPU communication op (about a minute).
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for name in ("train0", "train1", "eval"):
        per_rank = [r["read"][name] for r in ranks]
        assert all(per_rank), f"{name}: a rank read nothing: the shards were not split by rank"
        counts = collections.Counter(u for ids in per_rank for u in ids)
        duplicates = [u for u, c in counts.items() if c > 1]
        assert not duplicates, f"{name}: read more than once: {duplicates}"
        assert set(counts) == everything, f"{name}: never read: {sorted(everything - set(counts))}"
    # Training reshuffles shards each epoch, so the ranks' shares change between epochs.
    assert set(ranks[0]["read"]["train0"]) != set(ranks[0]["read"]["train1"])
