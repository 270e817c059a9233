"""Checking configs imports no torch: loading and checking a run config (``resolve_config``,
``check_schedule``), a config error, ``dser submit --dry-run`` of the demo stages (their shards,
label sets and backbone checked) and of the repository's grid, ``dser grid``, and ``dser train``
refusing a mistyped key or a missing shard group run in a fresh interpreter, after which none of
torch, transformers, peft or deepspeed is in ``sys.modules``. The config dataclasses live in
modules that import nothing heavy (``dser.model.config``, ``dser.model.adaptors`` and its
``configs``), and so do the start-up checks (``dser.startup``, ``dser.model.backbone_names``)."""

from __future__ import annotations

import json
import subprocess
import sys

from fixtures_shards import write_demo_shards

from dser.runconfig import CONFIGS_DIR
from dser.submit import CHECKOUT

HEAVY = ("torch", "transformers", "peft", "deepspeed")

SCRIPT = r"""
import json, sys
from pathlib import Path

from dser.config import ConfigError
from dser.runconfig import check_schedule, resolve_config

configs, grid, runs = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
for stage in (1, 2):
    path = configs / f"demo_stage{stage}.yaml"
    cfg, _ = check_schedule(resolve_config(path, [], stage=stage))
    ia3 = resolve_config(path, ["model.adaptors=[ia3, lora]", "model.ia3.layers=[0]"], stage=stage)
    assert ia3.model.adaptors == ["ia3", "lora"] and ia3.model.ia3.layers == [0], ia3.model
try:
    resolve_config(configs / "demo_stage1.yaml", ["model.ia3.layer=[0]"], stage=1)
    raise SystemExit("a bad key passed")
except ConfigError as e:
    assert "model.ia3.layer" in str(e), e

from dser.cli import main

for args, code in ((["submit", "--stage1", str(configs / "demo_stage1.yaml"), "--stage2",
                     str(configs / "demo_stage2.yaml"), "--gpus-per-node", "0", "--ntasks-per-node", "2",
                     "--runs-dir", runs, "--dry-run"], 0),
                   (["submit", "--grid", grid, "--gpus-per-node", "0", "--runs-dir", runs, "--dry-run"], 0),
                   (["grid", grid], 0),
                   (["train", "--stage", "1", "--set", "optim.lrr=1"], 2),
                   (["train", "--stage", "1", "--set", "data.train=shards/no-such-group"], 2)):
    try:
        main(args, standalone_mode=False)
    except SystemExit as e:
        assert e.code == code or (code == 0 and e.code is None), (args, e.code)
print("\nloaded: " + json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(%r))))
""" % (HEAVY,)


def test_checking_configs_and_submit_dry_run_import_no_torch(tmp_path):
    write_demo_shards(tmp_path)  # the demo configs' shards/demo-*, which dser submit checks
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(CONFIGS_DIR), str(CHECKOUT / "slurm" / "grid.yaml"),
                        str(tmp_path / "runs")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "dser train: error: unknown key config.optim.lrr" in r.stderr
    assert "dser train: error: config.data.train: shard spec 'shards/no-such-group': no such file" in r.stderr
    assert "sbatch --parsable" in r.stdout and "checked: the grid and the config of each of its" in r.stdout
    loaded = json.loads(r.stdout.rsplit("loaded: ", 1)[1])
    assert loaded == [], f"checking configs imported {', '.join(loaded)}"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "logs").exists()  # a dry run creates nothing
