"""Save a DeepSpeed checkpoint with each ds_configs/ file in each CPU precision and load it back
through dser's safe loading; print one JSON line per pair. Run by test_tampered.py::

    python tests/integration/checkpoint_globals_script.py zero0,zero1 fp32,bf16

A one-process gloo group and a toy model (a frozen layer, as dser's frozen backbone, and a trained
one) under dser's own DeepSpeed config, AdamW with two parameter groups and a LambdaLR schedule,
as the recipe builds them: DeepSpeed's files hold the same classes whatever the model is.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's dser


def main(configs: list[str], precisions: list[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    from dser.config import from_dict
    from dser.runconfig import RunConfig, deepspeed_config
    from dser.safeload import check_checkpoint_dir, use_safe_loads

    deepspeed.init_distributed(dist_backend="gloo")
    for name in configs:
        for precision in precisions:
            cfg = from_dict(RunConfig, {"deepspeed": {"config": name}}, where="config")

            def engine():
                torch.manual_seed(0)
                model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
                model[0].requires_grad_(False)
                trainable = [p for p in model.parameters() if p.requires_grad]
                opt = torch.optim.AdamW([{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": 0.01},
                                         {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}],
                                        lr=1e-3, betas=(0.9, 0.98))
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
                eng, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                               config=deepspeed_config(cfg, 1, precision, cpu=True))
                return eng

            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            saved = engine()
            for _ in range(3):
                saved.backward(saved(torch.randn(2, 8, dtype=dtype)).float().pow(2).mean())
                saved.step()
            root = Path(tempfile.mkdtemp())
            saved.save_checkpoint(str(root), tag="t", save_latest=False, exclude_frozen_parameters=True)
            files = sorted(p.name for p in (root / "t").glob("*.pt"))
            globals_ = sorted({g for f in files
                               for g in torch.serialization.get_unsafe_globals_in_checkpoint(root / "t" / f)})
            check_checkpoint_dir(root / "t")
            loaded = engine()
            use_safe_loads(loaded)
            loaded.load_checkpoint(str(root), tag="t", load_module_strict=False)
            print(json.dumps({"config": name, "precision": precision, "files": files, "globals": globals_,
                              "global_steps": loaded.global_steps,
                              "lr_steps": loaded.lr_scheduler.state_dict()["last_epoch"]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(","), sys.argv[2].split(","))
