"""The two-stage SER recipe on DeepSpeed.

Stage 1 trains the configured adaptors and head on acted speech; stage 2 loads a stage-1 run
and adapts it to natural speech (optionally freezing loaded parts, adding fresh adaptors,
rehearsing source data). Both stream shards into a DeepSpeed ZeRO engine and end by evaluating
every test set (source and target), so "target improves without losing the source" is visible.

Launch::

    deepspeed dser/train.py --stage 1                        # the demo, stage 1
    deepspeed dser/train.py --stage 2                        # the demo, stage 2 (latest stage-1 run)
    deepspeed --num_accelerators 2 dser/train.py --stage 1 --config dser/configs/iemocap_loso.yaml \
        --set optim.lr=1e-4
    deepspeed dser/train.py --stage 2 --init-from runs/demo-stage1-20261124-010203 --config CONFIG
    deepspeed dser/train.py --resume runs/demo-stage1-20261124-010203      # continue a run
    dser train --stage 1 --ranks 2                            # the same through the CLI

The recipe reads top to bottom: setup (config, process group, run dir, data, model, engine,
resume) → train loop (written out: forward, loss, backward, step, log, evaluate, checkpoint) →
final evaluation, metrics.json and export. DeepSpeed does backward and step.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

if __name__ == "__main__" and sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # `deepspeed dser/train.py` puts dser/ itself on sys.path; its modules must not shadow
    # top-level packages (dser/config.py vs anything named `config`).
    sys.path.pop(0)

import warnings

import numpy as np
import torch
import torch.distributed as dist
import yaml

# DeepSpeed 0.19 calls a torch.distributed function torch 2.13 deprecates, once per step.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)

from dser.config import ConfigError, from_dict, to_dict
from dser.data import DataError, LoaderConfig, count_set, make_loader, resolve_shards
from dser.evaluate import evaluate_shards, format_metrics, write_json
from dser.labels import LabelSet, get_label_set
from dser.model.backbone import BackboneError, check_backbone
from dser.model.build import build_model
from dser.model.checkpoint_io import (CheckpointError, export_labels, export_model, load_adaptors,
                                      load_export_weights, save_adaptors)
from dser.precision import Precision, PrecisionError, check_device, decide_precision, detect_hardware, keep_precision
from dser.runconfig import (RunConfig, check_schedule, deepspeed_config, ds_file_precision, recorded_precision,
                            resolve_config)
from dser.safeload import UnsafeCheckpointError, check_checkpoint_dir, safe_load, use_safe_loads

REQUIRE = {"categorical": "emotion", "dimensional": "attributes", "both": "any"}


class RecipeError(Exception):
    """A problem the user must fix (printed as one line by rank 0)."""


class RankError(RecipeError):
    """A problem only some ranks see (printed by each rank that hits it)."""


# ----------------------------------------------------------------------------------------
# setup helpers
# ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="dser two-stage SER training on DeepSpeed")
    p.add_argument("--stage", type=int, choices=(1, 2), help="1: acted source data, 2: adapt to natural data")
    p.add_argument("--config", type=Path, help="run config YAML (default: the demo config of the stage)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--init-from", type=Path, help="stage 2: the stage-1 run directory")
    p.add_argument("--run-dir", type=Path, help="exact run directory (default: runs_dir/<name>-<time>)")
    p.add_argument("--resume", type=Path, help="continue the run in this directory from its latest checkpoint")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    args = p.parse_args(argv)
    if args.resume is None and args.stage is None:
        p.error("--stage 1 or --stage 2 is required (or --resume RUN_DIR)")
    return args


def rank0_print(*a) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


def broadcast(obj):
    """Rank 0's value of ``obj`` on every rank."""
    box = [obj]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def latest_run(runs_dir: Path, stage: int) -> Path:
    """The most recently finished run of ``stage`` under ``runs_dir`` (has an export)."""
    done = []
    for cfg_file in Path(runs_dir).glob("*/config.yaml"):
        run = cfg_file.parent
        meta = yaml.safe_load(cfg_file.read_text()) or {}
        if meta.get("stage") == stage and (run / "export" / "config.yaml").is_file():
            done.append((run.stat().st_mtime, run))
    if not done:
        raise RecipeError(f"no finished stage-{stage} run under {runs_dir}; run stage {stage} first "
                          f"or pass --init-from RUN_DIR")
    return max(done)[1]


def lr_lambda(cfg: RunConfig):
    """Linear warm-up to 1, then cosine/linear decay to min_lr_ratio (or constant)."""
    o = cfg.optim

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape
    return f


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values, so ``torch.load(weights_only=True)`` reads it."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(s["torch"])


class TrainStream:
    """Endless training batches over epochs, and where it is (epoch, batches done) for resume.

    With rehearsal, a second stream of source-domain batches is mixed in: each batch comes
    from it with probability ``share``, drawn from a generator seeded by (seed, batch number)
    so a resumed run makes the same choices.
    """

    def __init__(self, main: LoaderConfig, rehearsal: LoaderConfig | None, share: float, seed: int,
                 state: dict | None = None):
        self.cfgs = {"main": main, "rehearsal": rehearsal}
        self.share, self.seed = share, seed
        self.pos = (state or {}).get("pos", {"main": [0, 0], "rehearsal": [0, 0]})
        self.drawn = (state or {}).get("drawn", 0)
        self.bad_samples: list[str] = list((state or {}).get("bad_samples", []))
        self.iters = {}

    def _next(self, which: str) -> dict:
        while True:
            if which not in self.iters:
                epoch, skip = self.pos[which]
                self.iters[which] = iter(make_loader(self.cfgs[which], epoch=epoch, skip_batches=skip))
            batch = next(self.iters[which], None)
            if batch is not None:
                self.pos[which][1] += 1
                self.bad_samples.extend(batch["bad_samples"])
                if not batch["utt_id"]:  # every clip of this batch was corrupt
                    continue
                return batch
            if self.pos[which][1] == 0:
                rank = dist.get_rank() if dist.is_initialized() else 0
                raise RankError(f"rank {rank} got no {which} training data from "
                                  f"{self.cfgs[which].shards}: are there fewer shards than ranks x workers?")
            del self.iters[which]
            self.pos[which] = [self.pos[which][0] + 1, 0]

    def next(self) -> dict:
        use_rehearsal = False
        if self.cfgs["rehearsal"] is not None and self.share > 0:
            g = np.random.default_rng([self.seed, 7919, self.drawn])
            use_rehearsal = g.random() < self.share
        self.drawn += 1
        return self._next("rehearsal" if use_rehearsal else "main")

    def state(self) -> dict:
        return {"pos": {k: list(v) for k, v in self.pos.items()}, "drawn": self.drawn,
                "bad_samples": list(self.bad_samples)}


# ----------------------------------------------------------------------------------------
# the recipe
# ----------------------------------------------------------------------------------------

# Exit statuses of a run that checkpointed and stopped before optim.max_steps: it is not finished
# (no metrics.json, no export) and resumes with --resume. A signal (SIGTERM, SIGUSR1) gives
# 128 + its number, as a shell reports a process the signal killed; train.stop_after_steps gives
# 75 (EX_TEMPFAIL of sysexits.h: "try again later"). 2 is a user error, 3 a lost rank.
EXIT_STOPPED = 75


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env_rank = int(os.environ.get("RANK", 0))

    # ---- config, checked before any process group or compute ---------------------------
    try:
        stage, cfg, recorded, schedule_notes, set_warnings = check_config(args)
    except (RecipeError, ConfigError, FileNotFoundError, ValueError) as e:
        if env_rank == 0:
            print(f"dser train: error: {e}", file=sys.stderr, flush=True)
        return 2
    if env_rank == 0 and schedule_notes:
        print("\n".join(schedule_notes), flush=True)

    # ---- process group -----------------------------------------------------------------
    import deepspeed  # only the recipes import DeepSpeed

    cpu = not torch.cuda.is_available()
    init_process_group(deepspeed, dt.timedelta(minutes=cfg.deepspeed.timeout_minutes))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu") if cpu else torch.device("cuda", local_rank)
    if not cpu:
        torch.cuda.set_device(device)
    peers = [None] * world
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))

    try:
        return _run(args, stage, cfg, recorded, set_warnings, deepspeed, rank, world, device, cpu)
    except (RecipeError, ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        # One line per user-fixable error, from rank 0; a non-zero exit on every rank.
        if rank == 0 or isinstance(e, RankError):
            print(f"dser train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (dist.DistError, RuntimeError) as e:
        dead = dead_peers(peers)
        # NCCL raises DistError; gloo (CPU) a plain RuntimeError from its sources, a timeout
        # included ("…/gloo/transport/tcp/…: Timed out waiting …").
        if not dead and not isinstance(e, dist.DistError) and "gloo" not in str(e):
            raise
        who = ", ".join(f"rank {r} (pid {pid} on {host})" for r, host, pid in dead) or \
            "another rank (on another host, or hung)"
        print(f"dser train: error: rank {rank}: a collective failed ({str(e).splitlines()[0][:200]}); "
              f"{who} is gone. Resume with --resume once it is fixed", file=sys.stderr, flush=True)
        # The process group is broken: exit now rather than hang in its teardown.
        os._exit(3)


def init_process_group(deepspeed, timeout: dt.timedelta) -> None:
    """``deepspeed.init_distributed`` with ``timeout`` on every process group, and without
    DeepSpeed's CPU shared-memory all-reduce.

    The timeout bounds how long the others wait for a rank that hangs (a rank that dies
    closes its connections, and the next collective fails at once). init_distributed's own
    timeout covers only the default group; DeepSpeed's groups (ZeRO's data-parallel group
    reduces the gradient norm) come from ``new_group()``, which takes torch's module default
    (30 min), so that default is set first.

    DeepSpeed's CPU backend builds a shared-memory all-reduce (for inference) at start-up and
    never unlinks its buffers: every run left 66 MB per rank in /dev/shm, under names that
    carry the rendezvous port, until a few hundred runs had filled the memory. Training
    reduces through torch.distributed and never uses it, so it is not built.
    """
    import deepspeed.ops
    import torch.distributed.distributed_c10d as c10d

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), dt.timedelta):
        c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(timeout=timeout)


def check_config(args: argparse.Namespace) -> tuple[int, RunConfig, Precision | None, list[str], list[str]]:
    """Everything checked before a process group: the run config, its schedule, its inputs and
    the run directory. ``dser train`` calls it too, before the launcher, so that a bad config
    is its one line and nothing else.

    Returns:
        The stage, the config, the recorded precision (resuming), the schedule notes and the
        label-set warnings.

    Raises:
        RecipeError, ConfigError, FileNotFoundError, ValueError: one line naming the key or path.
    """
    stage, cfg, recorded = read_run_config(args)
    cfg, schedule_notes = check_schedule(cfg)
    if args.run_dir and not args.resume:
        check_new_run_dir(Path(args.run_dir))
    set_warnings = check_inputs(cfg, stage, recorded)
    return stage, cfg, recorded, schedule_notes, set_warnings


def check_new_run_dir(run_dir: Path) -> None:
    """``--run-dir`` must be new (or an empty directory): dser never writes a run into a folder
    holding anything else, a user's shards or another run included."""
    from dser.paths import found, is_run_dir

    if not run_dir.exists() and not run_dir.is_symlink():
        return
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        return
    if run_dir.is_dir() and is_run_dir(run_dir):
        raise RecipeError(f"--run-dir {run_dir}: expected a new directory, found a run directory; continue it with "
                          f"--resume {run_dir}, or give a new --run-dir")
    raise RecipeError(f"--run-dir {run_dir}: expected a new directory, found {found(run_dir)}; give a new --run-dir "
                      f"(dser writes a run only into a folder of its own)")


def read_run_config(args: argparse.Namespace) -> tuple[int, RunConfig, Precision | None]:
    """The stage, the resolved run config, and (resuming) the precision the run started in:
    from --resume's run directory, or --config/--set."""
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            from dser.paths import found

            raise RecipeError(f"--resume {run_dir}: expected a run directory with config.yaml, found {found(run_dir, directory=True)}")
        where = run_dir / "config.yaml"
        try:
            meta = yaml.safe_load(where.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise RecipeError(f"--resume {run_dir}: {where} cannot be read as YAML "
                              f"({str(e).splitlines()[0]}); it is the file dser wrote when the run started") from None
        if not isinstance(meta, dict) or meta.get("stage") not in (1, 2) or not isinstance(meta.get("config"), dict):
            raise RecipeError(f"--resume {run_dir}: {where} is not a run's config (expected the keys stage: 1|2 and "
                              f"config: {{...}} that dser writes when a run starts)")
        recorded = recorded_precision(meta, str(where))
        latest = run_dir / "checkpoints" / "latest"
        if latest.is_file():
            # Every file the resume unpickles, on every rank, before any process group: a tampered
            # one (even one only some rank reads) stops them all with one line naming it.
            check_checkpoint_dir(run_dir / "checkpoints" / latest.read_text().strip())
        return meta["stage"], from_dict(RunConfig, meta["config"], where="config"), recorded
    cfg = resolve_config(args.config, args.overrides, args.stage)
    if args.stage == 2:
        init_from = args.init_from or (Path(cfg.stage2.init_from) if cfg.stage2.init_from else None)
        init_from = init_from or latest_run(Path(cfg.runs_dir), stage=1)
        cfg = replace(cfg, stage2=replace(cfg.stage2, init_from=str(Path(init_from).resolve())))
    return args.stage, cfg, None


def check_inputs(cfg: RunConfig, stage: int, recorded: Precision | None = None) -> list[str]:
    """Every shard group, the DeepSpeed config, a precision this machine can train in, the
    stage-1 run and its label set, before anything is computed.

    Returns:
        The label-set warnings (``label_set_checks``), for the run to print and record.

    Raises:
        RecipeError: naming the config key and what to do.
    """
    ds_file_precision(cfg.deepspeed.config)  # reads the file: ConfigError naming the key and the shipped files
    try:
        check_device(recorded.name if recorded else cfg.deepspeed.precision, torch.cuda.is_available(), recorded)
    except PrecisionError as e:
        raise RecipeError(str(e)) from None
    if stage == 2:
        init_export = Path(cfg.stage2.init_from) / "export"
        if not (init_export / "export.json").is_file():
            latest = Path(cfg.stage2.init_from) / "checkpoints" / "latest"
            if latest.is_file() and not (Path(cfg.stage2.init_from) / "metrics.json").is_file():
                raise RecipeError(f"stage2.init_from {cfg.stage2.init_from}: that stage-1 run stopped before its end "
                                  f"(last checkpoint {latest.read_text().strip()}); finish it first with "
                                  f"dser train --resume {cfg.stage2.init_from}")
            from dser.paths import found

            raise RecipeError(f"stage2.init_from {cfg.stage2.init_from}: expected a finished stage-1 run directory "
                              f"(with export/), found {found(cfg.stage2.init_from, directory=True)}; did its stage 1 finish?")
        label_set = get_label_set(cfg.data.label_set) if cfg.task != "dimensional" else None
        src = export_labels(init_export)
        if src != (label_set.to_dict() if label_set else None) and not cfg.stage2.new_head:
            raise RecipeError(f"stage 2 label set {label_set and list(label_set.classes)} differs from stage 1's "
                              f"{src and src['classes']} ({cfg.stage2.init_from}): set stage2.new_head: true "
                              f"(--set stage2.new_head=true) to train a new head")
    groups = {"data.train": cfg.data.train, "data.valid": cfg.data.valid,
              **{f"data.test.{k}": v for k, v in cfg.data.test.items()}}
    if cfg.data.rehearsal.shards:
        groups["data.rehearsal.shards"] = cfg.data.rehearsal.shards
    for key in ("data.train", "data.valid"):
        if not groups[key]:
            raise RecipeError(f"config.{key} is empty: name the shard groups to {key.split('.')[1]} on")
    for key, specs in groups.items():
        try:
            resolve_shards(specs)
        except DataError as e:
            raise RecipeError(f"config.{key}: {e}") from None
    set_warnings = label_set_checks(cfg)
    try:
        check_backbone(cfg.model.backbone)
    except BackboneError as e:
        raise RecipeError(f"config.model.backbone.name: {e}") from None
    return set_warnings


def label_set_checks(cfg: RunConfig) -> list[str]:
    """Count every configured set's clips per class from its shard indexes, as the run's loaders
    would keep them (label set, styles, required labels).

    Returns:
        Warnings: classes missing from training or from a test set, test classes that training
        never shows.

    Raises:
        RecipeError: an empty training, validation, test or rehearsal set, naming its config key,
            its groups and what they hold.
    """
    label_set = get_label_set(cfg.data.label_set) if cfg.task != "dimensional" else None
    require = REQUIRE[cfg.task]
    sets = {"data.train": (cfg.data.train, cfg.data.styles, "data.styles"),
            "data.valid": (cfg.data.valid, cfg.data.styles, "data.styles")}
    for name, specs in cfg.data.test.items():
        sets[f"data.test.{name}"] = (specs, cfg.data.test_styles.get(name),
                                     f"data.test_styles.{name}" if name in cfg.data.test_styles else None)
    if cfg.data.rehearsal.shards:
        sets["data.rehearsal.shards"] = (cfg.data.rehearsal.shards, cfg.data.styles, "data.styles")
    wanted = {"emotion": f"a class of label set {label_set and label_set.name} "
                         f"({', '.join(label_set.classes) if label_set else ''})",
              "attributes": "all three attributes (valence, arousal, dominance)",
              "any": f"a class of label set {label_set and label_set.name} or all three attributes"}[require]
    counts = {}
    for key, (specs, styles, styles_key) in sets.items():
        try:
            c = counts[key] = count_set(specs, label_set, styles, require)
        except DataError as e:
            raise RecipeError(f"config.{key}: {e}") from None
        if c.clips == 0 and not c.loose:
            where = ", ".join(c.groups) or ", ".join(map(str, specs))
            styled = f" in styles {list(styles)} ({styles_key})" if styles else ""
            raise RecipeError(f"config.{key}: no clip with {wanted}{styled} in {where}; they hold {c.holds()}: "
                              f"fix data.label_set{', ' + styles_key if styles_key else ''} or the groups")
    warnings: list[str] = []
    if label_set is None:
        return warnings
    train = counts["data.train"]
    if not train.loose:
        missing = [k for k, n in train.classes.items() if n == 0]
        if missing:
            warnings.append(f"config.data.train has no clips of class {', '.join(missing)} (label set "
                            f"{label_set.name}): the model never learns {'it' if len(missing) == 1 else 'them'}")
    for key, c in counts.items():
        if not key.startswith("data.test.") or c.loose:
            continue
        missing = [k for k, n in c.classes.items() if n == 0]
        if missing:
            warnings.append(f"config.{key} has no clips of class {', '.join(missing)}: its UA and macro-F1 "
                            f"average over the classes it has")
        if not train.loose:
            unseen = [f"{k} ({n})" for k, n in c.classes.items() if n and train.classes[k] == 0]
            if unseen:
                warnings.append(f"config.{key} has clips of class {', '.join(unseen)}, which config.data.train "
                                f"never shows the model")
    return warnings


def dead_peers(peers: list[tuple[str, int]]) -> list[tuple[int, str, int]]:
    """(rank, host, pid) of the ranks on this host whose process is gone."""
    here = socket.gethostname()
    dead = []
    for r, (host, pid) in enumerate(peers):
        if host == here and pid != os.getpid():
            try:
                # A killed rank stays a zombie until its launcher reaps it: state Z is gone too.
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, IndexError):
                state = "gone"
            except OSError:
                continue
            if state in ("gone", "Z", "X"):
                dead.append((r, host, pid))
    return dead


def agree_on_precision(cfg: RunConfig, recorded: Precision | None, rank: int) -> Precision:
    """The run's precision, decided once on rank 0 (probing its hardware) and broadcast, so no
    two ranks can disagree; a resumed run keeps ``recorded``, the precision it started in."""
    answer = None
    if rank == 0:
        try:
            hw = detect_hardware()
            p = keep_precision(recorded, hw) if recorded else decide_precision(cfg.deepspeed.precision, hw)
            answer = ("ok", asdict(p))
        except PrecisionError as e:
            answer = ("error", str(e))
    kind, value = broadcast(answer)
    if kind == "error":
        raise RecipeError(value)
    return Precision(**value)


def precision_notes(cfg: RunConfig, precision: Precision, stage: int) -> list[str]:
    """What the start of a run says about its precision beyond ``precision.line()``: the slow-
    choice warning, an old DeepSpeed file name that no longer decides, a stage-1 run that
    trained in another precision."""
    notes = [f"warning: {precision.warning}"] if precision.warning else []
    named = ds_file_precision(cfg.deepspeed.config)
    if precision.requested == "auto" and named and named != precision.name:
        notes.append(f"note: deepspeed.config {cfg.deepspeed.config} names {named}, but the precision is "
                     f"deepspeed.precision's (auto: {precision.name}); set deepspeed.precision={named} to train in "
                     f"{named}")
    if stage == 2:
        meta_file = Path(cfg.stage2.init_from) / "config.yaml"
        try:
            s1 = recorded_precision(yaml.safe_load(meta_file.read_text()) or {}, str(meta_file))
        except (OSError, ValueError, yaml.YAMLError) as e:  # informative only: never stop a run for it
            notes.append(f"note: the precision of stage-1 run {cfg.stage2.init_from} is unknown ({e})")
            return notes
        if s1.name != precision.name:
            notes.append(f"note: stage 2 trains in {precision.name}; its stage-1 run {cfg.stage2.init_from} "
                         f"trained in {s1.name} ({s1.reason})")
    return notes


def _run(args, stage: int, cfg: RunConfig, recorded: Precision | None, set_warnings: list[str], deepspeed,
         rank: int, world: int, device: torch.device, cpu: bool) -> int:
    precision = agree_on_precision(cfg, recorded, rank)

    # ---- run directory -----------------------------------------------------------------
    if args.resume:
        run_dir = Path(args.resume)
    else:
        stamp = broadcast(dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
        run_dir = Path(args.run_dir) if args.run_dir else Path(cfg.runs_dir) / f"{cfg.name}-{stamp}"
    ckpt_dir, tb_dir, export_dir = run_dir / "checkpoints", run_dir / "tensorboard", run_dir / "export"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(
                {"stage": stage, "precision": precision.record(), "config": to_dict(cfg)}, sort_keys=False))
    if dist.is_initialized():
        dist.barrier()
    rank0_print(f"dser: stage {stage} run in {run_dir} ({world} rank{'s' if world > 1 else ''}, "
                f"{'CPU' if cpu else 'GPU'})")
    precision_text = [precision.line()] + (precision_notes(cfg, precision, stage) if rank == 0 else [])
    rank0_print("\n".join(precision_text))
    if set_warnings:  # from check_inputs (label_set_checks), before any process group
        rank0_print("\n".join(f"warning: {w}" for w in set_warnings))

    # ---- seeds, labels, data ------------------------------------------------------------
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed)  # same new-part weights on every rank
    label_set: LabelSet | None = get_label_set(cfg.data.label_set) if cfg.task != "dimensional" else None
    num_classes = label_set.num_classes if label_set else None

    def loader_cfg(shards: list[str], train: bool) -> LoaderConfig:
        d = cfg.data
        return LoaderConfig(shards=list(shards), label_set=label_set, styles=d.styles,
                            require=REQUIRE[cfg.task], train=train, seed=cfg.seed,
                            max_seconds=d.max_seconds if train else d.eval_max_seconds,
                            max_batch_seconds=d.max_batch_seconds, shuffle_buffer=d.shuffle_buffer,
                            bucket_buffer=d.bucket_buffer, num_workers=d.num_workers)

    # ---- model: build, stage-2 loading, freezing ---------------------------------------
    model = build_model(cfg.model, num_classes=num_classes, task=cfg.task)
    if stage == 2:
        init_export = Path(cfg.stage2.init_from) / "export"  # checked by check_inputs
        load_export_weights(model, init_export, skip_prefixes=("head.",) if cfg.stage2.new_head else ())
        model.add_fresh_adaptors(cfg.stage2.fresh_adaptors)
        model.freeze(cfg.stage2.freeze)
    elif hasattr(model.backbone, "feature_frames"):
        # Filterbank front end with global normalisation: fit per-bin statistics on training
        # data. Every rank reads the same first batches (rank 0's view of all shards), so the
        # statistics agree without communication.
        fit_cfg = replace(loader_cfg(cfg.data.train, train=False), rank=0, world_size=1, num_workers=0,
                          skip_damaged_shards=True)
        batches = []
        for i, b in enumerate(make_loader(fit_cfg)):
            batches.append((b["audio"], b["attention_mask"]))
            if i >= 15:
                break
        model.backbone.fit_feature_stats(batches)
    model.log_summary(print_fn=rank0_print)
    params = model.parameter_counts()

    # ---- engine ------------------------------------------------------------------------
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    ds_config = deepspeed_config(cfg, world, precision.name, cpu)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    dtype = precision.dtype
    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    overflow_checked = precision.name in ("bf16", "fp16")

    class_weights = None
    if cfg.optim.class_weighted_loss and label_set is not None:
        class_weights = _class_weights(loader_cfg(cfg.data.train, train=False), num_classes)
        rank0_print("class weights:", [round(w, 3) for w in class_weights.tolist()])

    # ---- resume ------------------------------------------------------------------------
    step, best, evals_since_best, stream_state = 0, None, 0, None
    history: list[dict] = []
    # Steps skipped for a non-finite loss (every rank drops the batch) or gradient (DeepSpeed's
    # overflow check drops the update), with the step each happened at.
    skipped: list[dict] = []
    bad_total = 0  # corrupt training samples skipped, summed over ranks
    if args.resume:
        latest = ckpt_dir / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
            # Every file is unpickled with weights_only, allowing only DeepSpeed's own classes
            # (dser.safeload); read_run_config checked them all already.
            use_safe_loads(engine)
            try:
                engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=False)
                state = safe_load(ckpt_dir / tag / f"dser_rank{rank}.pt")
            except UnsafeCheckpointError as e:  # changed since the check: only this rank knows
                raise RankError(str(e)) from None
            step, best = state["step"], state["best"]
            evals_since_best, history = state["evals_since_best"], state["history"]
            stream_state, skipped, bad_total = state["stream"], state["skipped"], state["bad_total"]
            set_rng_state(state["rng"])
            rank0_print(f"resumed from {ckpt_dir / tag} at step {step}")
        else:
            rank0_print(f"no checkpoint in {ckpt_dir} yet: starting from the beginning")

    rehearsal_cfg = loader_cfg(cfg.data.rehearsal.shards, train=True) if cfg.data.rehearsal.shards else None
    if rehearsal_cfg is not None:
        rehearsal_cfg = replace(rehearsal_cfg, seed=cfg.seed + 1)
    stream = TrainStream(loader_cfg(cfg.data.train, train=True), rehearsal_cfg, cfg.data.rehearsal.share,
                         cfg.seed, stream_state)

    # ---- logging -----------------------------------------------------------------------
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(tb_dir))
        writer.add_text("config", "```yaml\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False) + "\n```", step)
        writer.add_text("precision", "\n\n".join(precision_text), step)
    bar = None
    if rank == 0 and cfg.train.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.optim.max_steps, initial=step, desc=f"stage {stage}", dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 30.0)

    def forward(audio, mask):
        return engine(audio.to(device, dtype), mask.to(device))

    def evaluate(sets: dict[str, list[str]], styles: dict[str, list[str] | None]) -> dict[str, dict]:
        engine.eval()
        results = {}
        for name, shards in sets.items():
            results[name] = evaluate_shards(forward, shards, label_set, cfg.task, styles=styles.get(name),
                                            max_seconds=cfg.data.eval_max_seconds,
                                            max_batch_seconds=cfg.data.max_batch_seconds,
                                            num_workers=cfg.data.num_workers, device=str(device), dtype=dtype)
        engine.train()
        return results

    def score(m: dict) -> float:
        return m["ua"] if cfg.task != "dimensional" else m["ccc_mean"]

    def save_best():
        _gathered_call(deepspeed, model, zero3, rank,
                       lambda: save_adaptors(model, run_dir / "best" / "adaptors.safetensors"))

    # Preemption (Slurm's USR1 warning, SIGTERM): finish the current step, checkpoint, exit.
    # The flag travels with the finite-loss all-reduce, so a signal that reached only some
    # ranks still stops them all at the same step.
    stop_signal = {"sig": None}

    def on_signal(signum, _frame):
        stop_signal["sig"] = signum
    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def checkpoint():
        state = {"step": step, "best": best, "evals_since_best": evals_since_best, "history": history,
                 "stream": stream.state(), "skipped": skipped, "bad_total": bad_total,
                 "rng": rng_state()}
        _save_checkpoint(engine, ckpt_dir, f"step{step:08d}", state, rank, cfg.train.keep_last)

    # ---- train loop --------------------------------------------------------------------
    engine.train()
    start_step = step
    t_log, samples_log, seconds_log, loss_sum, loss_n = time.time(), 0, 0.0, torch.zeros(()), 0
    nonfinite_run, stop_now = 0, False
    while step < cfg.optim.max_steps:
        step_skipped = None
        for _ in range(cfg.optim.grad_accum):
            bad_before = len(stream.bad_samples)
            batch = stream.next()
            out = forward(batch["audio"], batch["attention_mask"])
            loss, parts = model.loss(out, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()},
                                     class_weights=class_weights)
            # One small all-reduce per batch, summed over ranks: ranks with a non-finite loss,
            # ranks with a stop signal, corrupt samples newly skipped.
            flags = torch.cat([(~torch.isfinite(loss.detach())).float().reshape(1),
                               torch.tensor([float(stop_signal["sig"] is not None),
                                             float(len(stream.bad_samples) - bad_before)], device=device)])
            dist.all_reduce(flags, op=dist.ReduceOp.SUM)
            nonfinite_loss, stop_now, new_bad = flags.tolist()
            bad_total += int(new_bad)
            if bad_total > cfg.train.max_bad_samples:
                latest = stream.bad_samples[-1] if stream.bad_samples else "on another rank"
                raise RecipeError(f"{bad_total} corrupt training samples skipped, more than "
                                  f"train.max_bad_samples={cfg.train.max_bad_samples} (at step {step + 1}; "
                                  f"latest: {latest}). Run dser verify on the shards")
            if nonfinite_loss:
                # Every rank must run backward (gradients are reduced collectively), from the
                # parameters themselves: a graph through NaN activations would give NaN
                # gradients on this rank only. With bf16/fp16, DeepSpeed's overflow check
                # drops a step whose gradients are NaN on any rank (optimizer moments and
                # schedule untouched): make them NaN on purpose. In fp32 there is no such
                # check: backpropagate zero, which drops the batch but not AdamW's momentum.
                loss = sum(p.sum() for p in trainable) * (math.nan if overflow_checked else 0.0)
                step_skipped = "loss"
            else:
                loss_sum += loss.detach().float().cpu()
                loss_n += 1
            skipped_before = engine.skipped_steps
            engine.backward(loss)
            engine.step()
            if engine.skipped_steps > skipped_before and step_skipped is None:
                step_skipped = "gradient"  # DeepSpeed found inf/NaN gradients and dropped the update
            samples_log += len(batch["utt_id"])
            seconds_log += batch["duration_s"]
        if step_skipped is not None:
            skipped.append({"step": step + 1, "why": f"non-finite {step_skipped}"})
            nonfinite_run += 1
            rank0_print(f"step {step + 1}: non-finite {step_skipped}, step skipped "
                        f"({nonfinite_run} in a row, {len(skipped)} in all)")
            if nonfinite_run > cfg.train.max_nonfinite_steps:
                raise RecipeError(f"non-finite {step_skipped} for {nonfinite_run} steps in a row at step {step + 1} "
                                  f"(more than train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); "
                                  f"lower optim.lr or check the data")
        else:
            nonfinite_run = 0
        step += 1
        if bar is not None:
            bar.update(1)

        if step % cfg.train.log_every == 0 or step == cfg.optim.max_steps:
            elapsed = time.time() - t_log
            mean_loss = (loss_sum / max(1, loss_n)).item()
            gnorm = engine.get_global_grad_norm()
            if writer is not None:
                writer.add_scalar("train/loss", mean_loss, step)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                if gnorm is not None:
                    writer.add_scalar("train/grad_norm", float(gnorm), step)
                writer.add_scalar("train/samples_per_s", samples_log * world / elapsed, step)
                writer.add_scalar("train/audio_seconds_per_s", seconds_log * world / elapsed, step)
                writer.add_scalar("train/bad_samples", bad_total, step)
                writer.add_scalar("train/skipped_steps", len(skipped), step)
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            t_log, samples_log, seconds_log, loss_sum, loss_n = time.time(), 0, 0.0, torch.zeros(()), 0

        if step % cfg.train.eval_every == 0 or step == cfg.optim.max_steps:
            m = evaluate({"valid": cfg.data.valid}, {"valid": cfg.data.styles})["valid"]
            history.append({"step": step, **{k: v for k, v in m.items() if k != "confusion"}})
            if writer is not None:
                _log_metrics(writer, "valid", m, step)
            if best is None or score(m) > best:
                best, evals_since_best = score(m), 0
                save_best()
            else:
                evals_since_best += 1
            rank0_print(f"step {step}: {format_metrics('valid', m)}  (best {best:.3f})")
            if cfg.train.early_stopping and evals_since_best >= cfg.train.early_stopping:
                rank0_print(f"early stopping at step {step}: {evals_since_best} evaluations without improvement")
                break

        time_boxed = cfg.train.stop_after_steps and step - start_step >= cfg.train.stop_after_steps \
            and step < cfg.optim.max_steps
        if step % cfg.train.save_every == 0 or stop_now or time_boxed:
            checkpoint()
            if stop_now or time_boxed:
                # Every rank stops here, at the same step, with the same status; the barrier
                # holds them until all have written their part (the launcher kills the others
                # as soon as one exits non-zero).
                sig = torch.tensor([stop_signal["sig"] or 0])
                dist.all_reduce(sig, op=dist.ReduceOp.MAX)  # the signal, even if it reached another rank
                sig = int(sig) or None
                if writer is not None:
                    writer.close()
                dist.barrier()
                why = f"{signal.Signals(sig).name}{'' if stop_signal['sig'] else ' (sent to another rank)'}" \
                    if stop_now else f"train.stop_after_steps={cfg.train.stop_after_steps}"
                line = f"stopped at step {step} by {why}; resume with dser train --resume {run_dir}"
                rank0_print(line)
                if rank == 0 and os.environ.get("DSER_STOP_FILE"):  # dser train prints it again, last
                    Path(os.environ["DSER_STOP_FILE"]).write_text(line + "\n")
                return 128 + sig if stop_now else EXIT_STOPPED
    if bar is not None:
        bar.close()

    # ---- final: best weights, test sets, metrics.json, export ---------------------------
    _gathered_call(deepspeed, model, zero3, rank,
                   lambda: load_adaptors(model, run_dir / "best" / "adaptors.safetensors"), modify=True)
    test_sets = dict(cfg.data.test) or {"valid": cfg.data.valid}
    results = evaluate(test_sets, {"valid": cfg.data.styles, **cfg.data.test_styles})
    for name, m in results.items():
        rank0_print(format_metrics(name, m))
        if writer is not None:
            _log_metrics(writer, f"test/{name}", m, step)
    bad_lists = [None] * world
    dist.all_gather_object(bad_lists, stream.bad_samples)
    if rank == 0:
        bad_samples = [f"rank {r}: {b}" for r, lst in enumerate(bad_lists) for b in lst]
        write_json(run_dir / "metrics.json", {
            "stage": stage, "run_dir": str(run_dir), "steps": step, "best_valid": best,
            "precision": precision.name, "precision_reason": precision.reason, "warnings": set_warnings,
            "init_from": cfg.stage2.init_from if stage == 2 else None,
            "params": params, "config": to_dict(cfg), "valid_history": history,
            "bad_samples": {"count": bad_total, "samples": bad_samples},
            "skipped_steps": {"count": len(skipped), "steps": skipped},
            "eval": {name: {k: v for k, v in m.items()} for name, m in results.items()}})
    _gathered_call(deepspeed, model, zero3, rank, lambda: export_model(
        model, export_dir, run_config={"stage": stage, **to_dict(cfg)},
        label_set=label_set.to_dict() if label_set else None))
    if writer is not None:
        writer.close()
    rank0_print(f"metrics: {run_dir / 'metrics.json'}\nexport: {export_dir}\ntensorboard: {tb_dir}")
    dist.barrier()
    return 0


def _class_weights(cfg: LoaderConfig, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights over the training set's labels (normalised to mean 1)."""
    counts = torch.zeros(num_classes)
    cfg = replace(cfg, rank=0, world_size=1, skip_damaged_shards=True)
    for b in make_loader(cfg):
        e = b["emotion"][b["emotion"] >= 0]
        counts += torch.bincount(e, minlength=num_classes).float()
    w = counts.sum() / counts.clamp(min=1) / num_classes
    return w / w.mean()


def _gathered_call(deepspeed, model, zero3: bool, rank: int, fn, modify: bool = False) -> None:
    """Run ``fn`` with the full adaptor and head weights: on rank 0 to read them, on every
    rank (ZeRO 0-2) or rank 0 then broadcast (ZeRO-3) to change them.

    Under ZeRO-3 a partitioned parameter is empty on each rank; GatheredParameters makes the
    full tensors visible (a collective), and with ``modifier_rank`` sends rank 0's changes back.
    """
    if zero3:
        params = [p for n, p in model.named_parameters() if p.requires_grad or model.is_adaptor_param(n)]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            if rank == 0:
                fn()
    elif rank == 0 or modify:
        fn()
    if dist.is_initialized():
        dist.barrier()


def _save_checkpoint(engine, ckpt_dir: Path, tag: str, state: dict, rank: int, keep_last: int) -> None:
    """Atomic checkpoint: written under a temporary name, published by rename, then `latest`.

    A kill during the save leaves the previous checkpoint and its `latest` pointer intact; old
    checkpoints are pruned only after the new one is complete.
    """
    tmp_root = ckpt_dir / ".incoming"
    if rank == 0:
        shutil.rmtree(tmp_root / tag, ignore_errors=True)
        tmp_root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp_root), tag=tag, save_latest=False, exclude_frozen_parameters=True)
    torch.save(state, tmp_root / tag / f"dser_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        final = ckpt_dir / tag
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp_root / tag, final)
        pointer = ckpt_dir / "latest.tmp"
        pointer.write_text(tag)
        os.replace(pointer, ckpt_dir / "latest")
        tags = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()


def _log_metrics(writer, prefix: str, m: dict, step: int) -> None:
    for k, v in m.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("samples", "labelled"):
            writer.add_scalar(f"{prefix}/{k}", v, step)
    if "confusion" in m:
        writer.add_figure(f"{prefix}/confusion", _confusion_figure(m["confusion"], m.get("classes")), step)


def _confusion_figure(conf: list[list[int]], classes: list[str] | None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = np.asarray(conf)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(c, cmap="Blues")
    names = classes or [str(i) for i in range(len(c))]
    ax.set_xticks(range(len(c)), names, rotation=45)
    ax.set_yticks(range(len(c)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    for i in range(len(c)):
        for j in range(len(c)):
            ax.text(j, i, int(c[i, j]), ha="center", va="center", fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
