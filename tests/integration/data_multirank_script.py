"""Run under the DeepSpeed launcher by test_data_multirank.py: each rank writes the utt_ids it read,
its batch count and the clips it was given twice, per epoch.

    deepspeed --num_accelerators 2 tests/integration/data_multirank_script.py --shards DIR --out DIR
"""

import argparse
import datetime as dt
import json
import os
from pathlib import Path

import deepspeed
import torch.distributed as dist

from dser.data import LoaderConfig, make_loader
from dser.distributed import init_process_group


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--local_rank", type=int, default=0)  # passed by the launcher
    args = ap.parse_args()
    init_process_group(deepspeed, dt.timedelta(minutes=5))  # the recipe's, leaving no /dev/shm buffers
    rank, world = dist.get_rank(), dist.get_world_size()
    # RANK/WORLD_SIZE removed: the loader must take the rank from the process group.
    os.environ.pop("RANK", None)
    os.environ.pop("WORLD_SIZE", None)
    read, batches, repeated = {}, {}, {}
    for name, train, epoch in (("train0", True, 0), ("train1", True, 1), ("eval", False, 0)):
        cfg = LoaderConfig(shards=[args.shards], label_set=None, require=None, train=train,
                           max_seconds=1.0 if train else None, max_batch_seconds=4.0,
                           num_workers=args.workers, seed=3)
        got = list(make_loader(cfg, epoch=epoch))
        read[name] = [u for batch in got for u in batch["utt_id"]]
        batches[name] = len(got)
        repeated[name] = sum(batch.get("repeated", 0) for batch in got)
    out = Path(args.out) / f"rank{rank}.json"
    out.write_text(json.dumps({"rank": rank, "world_size": world, "read": read, "batches": batches,
                               "repeated": repeated}))
    dist.barrier()


if __name__ == "__main__":
    main()
