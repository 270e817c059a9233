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
    deepspeed dser/train.py --stage 1 --verbose               # DeepSpeed's INFO lines too

``main`` checks the config (``dser.startup.check_config``, before any process group, against the
launcher's ``WORLD_SIZE``), keeps DeepSpeed's logging to warnings and errors (``--verbose``: its
INFO lines too), starts the process group (``dser.distributed``) and runs a ``Recipe``: ``setup()``
(precision, run directory, model, engine, resume, data, logging) →
``train()`` (the loop, written out: ``train_step`` per batch, log, evaluate, checkpoint) →
``finish()`` (best weights, every test set, metrics.json, the export, finished.json last) →
``cleanup()``. ``TrainState`` is everything a resume needs besides DeepSpeed's own files.
DeepSpeed does backward and step; ``dser.rundir`` owns the run directory's layout.
"""

# Longer than dser's 700-line guide on purpose: the recipe is one class whose loop is written out,
# to read top to bottom (STYLE.md, rule 2). What is not the recipe lives beside it: the checks
# before a run (dser/startup.py) and the process-group helpers (dser/distributed.py).

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
from dataclasses import asdict, dataclass, field, fields, replace
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

from dser.config import ConfigError, to_dict
from dser.data import DataError, LoaderConfig, TrainStream, make_loader
from dser.indexed_set import indexed_set
from dser.distributed import broadcast, dead_peers, gathered_call, init_process_group, rank0_print
from dser.evaluate import evaluate_loader, format_metrics, write_json
from dser.labels import LabelSet, get_label_set
from dser.model.build import build_model
from dser.model.checkpoint_io import CheckpointError, export_model, load_adaptors, load_export_weights, save_adaptors
from dser.provenance import provenance
from dser.rundir import RunDir
from dser.precision import Precision, PrecisionError, decide_precision, detect_hardware, keep_precision
from dser.runconfig import RunConfig, deepspeed_config, final_eval_sets, loader_config
from dser.safeload import UnsafeCheckpointError, safe_load, use_safe_loads
from dser.startup import RecipeError, check_config, error_lines, parse_args, precision_notes  # noqa: F401 (parse_args: dser.train's)


class RankError(RecipeError):
    """A problem only some ranks see (printed by each rank that hits it)."""


# ----------------------------------------------------------------------------------------
# setup helpers
# ----------------------------------------------------------------------------------------

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
        stage, cfg, recorded, schedule_notes, set_warnings = check_config(
            args, world_size=int(os.environ.get("WORLD_SIZE", 1)))
    except (RecipeError, ConfigError, FileNotFoundError, ValueError) as e:
        if env_rank == 0:
            for line in error_lines(e):
                print(f"dser train: error: {line}", file=sys.stderr, flush=True)
        return 2
    if env_rank == 0 and schedule_notes:
        print("\n".join(schedule_notes), flush=True)

    # ---- process group -----------------------------------------------------------------
    import deepspeed  # only the recipes import DeepSpeed

    from deepspeed.utils import set_log_level_from_string

    # DeepSpeed's INFO lines (its engine's configuration, …) only with --verbose.
    set_log_level_from_string("info" if args.verbose else "warning")

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
        return Recipe(args, stage, cfg, recorded, set_warnings, deepspeed=deepspeed, device=device).run()
    except (RecipeError, ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        # One line per user-fixable error, from rank 0; a non-zero exit on every rank.
        if rank == 0 or isinstance(e, RankError):
            for line in error_lines(e):
                print(f"dser train: error: {line}", file=sys.stderr, flush=True)
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


@dataclass
class TrainState:
    """Everything a resumed run needs beyond DeepSpeed's own checkpoint (weights, optimizer,
    schedule): one per rank, saved as ``checkpoints/<tag>/dser_rank<r>.pt``.

    ``state_dict()`` holds plain values and tensors only, so ``torch.load(weights_only=True)``
    reads it back; its keys are those of checkpoints written before this class existed.
    """

    step: int = 0                     # optimizer steps done
    best: float | None = None         # best validation score so far (UA, or mean CCC)
    evals_since_best: int = 0         # validations since it (early stopping)
    history: list[dict] = field(default_factory=list)   # validation metrics, one per evaluation
    # Steps skipped for a non-finite loss (every rank drops the batch) or gradient (DeepSpeed's
    # overflow check drops the update): {"step", "why"}.
    skipped: list[dict] = field(default_factory=list)
    bad_total: int = 0                # corrupt training samples skipped, summed over ranks
    stream: dict | None = None        # TrainStream.state_dict(): this rank's place in its data
    rng: dict | None = None           # rng_state(): python, numpy and torch generators

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def load_state_dict(self, state: dict) -> "TrainState":
        missing = [f.name for f in fields(self) if f.name not in state]
        if missing:
            raise RecipeError(f"the checkpoint's training state lacks {', '.join(missing)}: it is not one "
                              f"dser wrote")
        for f in fields(self):
            setattr(self, f.name, state[f.name])
        return self


class Recipe:
    """One rank's part of a run: ``setup()`` → ``train()`` → ``finish()`` → ``cleanup()``.

    ``run()`` does all four. ``train()`` is the loop, written out; each optimizer step is
    ``optim.grad_accum`` calls of ``train_step(batch)``; ``evaluate(sets)`` runs the evaluation
    loop on every rank; ``save()`` / ``load()`` write and read a checkpoint (DeepSpeed's files
    plus this rank's ``TrainState``). Everything that resume needs lives in ``self.state``.

    Call on every rank of an initialised process group (one rank is a gloo group of one).
    """

    def __init__(self, args: argparse.Namespace, stage: int, cfg: RunConfig, recorded: Precision | None,
                 set_warnings: list[str], *, deepspeed, device: torch.device):
        self.args, self.stage, self.cfg, self.recorded = args, stage, cfg, recorded
        self.set_warnings, self.deepspeed, self.device = set_warnings, deepspeed, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.cpu = device.type == "cpu"
        self.state = TrainState()
        self.stop_signal: int | None = None  # the signal this rank got (preemption)
        self.writer = self.bar = None
        self._old_handlers: dict = {}

    # ---- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        """Precision, run directory, seeds, model, engine, resume, data, logging, signals."""
        self.precision = agree_on_precision(self.cfg, self.recorded, self.rank)
        self._setup_run_dir()
        self._setup_model()
        self._setup_engine()
        if self.args.resume:
            self.load()
        self._setup_data()
        self._setup_logging()
        # Preemption (Slurm's USR1 warning, SIGTERM): finish the current step, checkpoint,
        # exit. The flag travels with the per-batch all-reduce, so a signal that reached only
        # some ranks still stops them all at the same step.
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self.stop_signal = signum

    def _setup_run_dir(self) -> None:
        cfg = self.cfg
        if self.args.resume:
            self.run_dir = Path(self.args.resume)
        else:
            stamp = broadcast(dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
            self.run_dir = Path(self.args.run_dir) if self.args.run_dir else Path(cfg.runs_dir) / f"{cfg.name}-{stamp}"
        self.rundir = RunDir(self.run_dir)
        self.ckpt_dir, self.tb_dir, self.export_dir = self.rundir.checkpoints, self.rundir.tensorboard, self.rundir.export
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not self.args.resume:
                self.rundir.write_config({"stage": self.stage, "precision": self.precision.record(),
                                          "config": to_dict(cfg)})
        dist.barrier()
        rank0_print(f"dser: stage {self.stage} run in {self.run_dir} ({self.world} rank"
                    f"{'s' if self.world > 1 else ''}, {'CPU' if self.cpu else 'GPU'})")
        notes = precision_notes(cfg, self.precision, self.stage) if self.rank == 0 else []
        self.precision_text = [self.precision.line()] + notes
        rank0_print("\n".join(self.precision_text))
        if self.set_warnings:  # from check_inputs (data_checks), before any process group
            rank0_print("\n".join(f"warning: {w}" for w in self.set_warnings))

        random.seed(cfg.seed + self.rank)
        np.random.seed(cfg.seed + self.rank)
        torch.manual_seed(cfg.seed)  # same new-part weights on every rank
        self.label_set: LabelSet | None = get_label_set(cfg.data.label_set) if cfg.task != "dimensional" else None
        self.num_classes = self.label_set.num_classes if self.label_set else None

    def loader_cfg(self, shards: list[str], train: bool) -> LoaderConfig:
        """The loader config of a training (random crops, shuffled) or evaluation set, with
        ``data.styles`` (``runconfig.loader_config``)."""
        return loader_config(self.cfg, shards, train=train, label_set=self.label_set)

    def _setup_model(self) -> None:
        """Build; stage 2 loads its stage-1 export, adds fresh adaptors, freezes."""
        cfg = self.cfg
        model = self.model = build_model(cfg.model, num_classes=self.num_classes, task=cfg.task)
        if self.stage == 2:
            init_export = Path(cfg.stage2.init_from) / "export"  # checked by check_inputs
            load_export_weights(model, init_export, skip_prefixes=("head.",) if cfg.stage2.new_head else ())
            model.add_fresh_adaptors(cfg.stage2.fresh_adaptors)
            model.freeze(cfg.stage2.freeze)
        elif hasattr(model.backbone, "feature_frames"):
            # Filterbank front end with global normalisation: fit per-bin statistics on training
            # data. Every rank reads the same first batches (rank 0's view of all shards), so the
            # statistics agree without communication.
            fit_cfg = replace(self.loader_cfg(cfg.data.train, train=False), rank=0, world_size=1, num_workers=0,
                              skip_damaged_shards=True)
            batches = []
            for b in make_loader(fit_cfg):
                if b["utt_id"]:  # a batch whose clips were all corrupt is empty
                    batches.append((b["audio"], b["attention_mask"]))
                if len(batches) >= 16:
                    break
            if not batches:
                raise RecipeError(f"config.data.train: no readable clip to fit the backbone's feature statistics "
                                  f"on (every clip read was corrupt); run `dser verify` on {cfg.data.train}")
            model.backbone.fit_feature_stats(batches)
        model.log_summary(print_fn=rank0_print)
        self.params = model.parameter_counts()

    def _setup_engine(self) -> None:
        """AdamW (no decay on biases and norms), the LR schedule, DeepSpeed's engine."""
        cfg = self.cfg
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in self.trainable if p.ndim >= 2]
        no_decay = [p for p in self.trainable if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        ds_config = deepspeed_config(cfg, self.world, self.precision.name, self.cpu)
        self.engine, self.optimizer, _, self.scheduler = self.deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.dtype = self.precision.dtype
        self.zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
        self.overflow_checked = self.precision.name in ("bf16", "fp16")
        self.class_weights = None
        if cfg.optim.class_weighted_loss and self.label_set is not None:
            self.class_weights = _class_weights(self.loader_cfg(cfg.data.train, train=False), self.num_classes)
            rank0_print("class weights:", [round(w, 3) for w in self.class_weights.tolist()])

    def _setup_data(self) -> None:
        cfg = self.cfg
        rehearsal = None
        if cfg.data.rehearsal.shards:
            rehearsal = replace(self.loader_cfg(cfg.data.rehearsal.shards, train=True), seed=cfg.seed + 1)
        self.stream = TrainStream(self.loader_cfg(cfg.data.train, train=True), rehearsal, cfg.data.rehearsal.share,
                                  cfg.seed)
        if self.state.stream is not None:
            self.stream.load_state_dict(self.state.stream)

    def _setup_logging(self) -> None:
        cfg, step = self.cfg, self.state.step
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.tb_dir))
            self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False) + "\n```", step)
            self.writer.add_text("precision", "\n\n".join(self.precision_text), step)
        if self.rank == 0 and cfg.train.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.optim.max_steps, initial=step, desc=f"stage {self.stage}", dynamic_ncols=True,
                            mininterval=0.5 if sys.stderr.isatty() else 30.0)

    # ---- checkpoints ---------------------------------------------------------------------

    def save(self) -> None:
        """A checkpoint of this step (atomic: see ``_save_checkpoint``); every rank calls it."""
        self.state.stream = self.stream.state_dict()
        self.state.rng = rng_state()
        _save_checkpoint(self.engine, self.ckpt_dir, f"step{self.state.step:08d}", self.state.state_dict(),
                         self.rank, self.cfg.train.keep_last)

    def load(self) -> bool:
        """Continue from ``checkpoints/latest``, if there is one (False: there is none yet)."""
        latest = self.ckpt_dir / "latest"
        if not latest.is_file():
            rank0_print(f"no checkpoint in {self.ckpt_dir} yet: starting from the beginning")
            return False
        tag = latest.read_text().strip()
        # Every file is unpickled with weights_only, allowing only DeepSpeed's own classes
        # (dser.safeload); read_run_config checked them all already.
        use_safe_loads(self.engine)
        try:
            self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag, load_module_strict=False)
            state = safe_load(self.ckpt_dir / tag / f"dser_rank{self.rank}.pt")
        except UnsafeCheckpointError as e:  # changed since the check: only this rank knows
            raise RankError(str(e)) from None
        self.state = TrainState().load_state_dict(state)
        set_rng_state(self.state.rng)
        rank0_print(f"resumed from {self.ckpt_dir / tag} at step {self.state.step}")
        return True

    # ---- one batch -----------------------------------------------------------------------

    def forward(self, audio: torch.Tensor, mask: torch.Tensor) -> dict:
        """The engine on ``audio (B, T)`` and ``mask (B, T)``, moved to the device (and dtype)."""
        return self.engine(audio.to(self.device, self.dtype), mask.to(self.device))

    def train_step(self, batch: dict) -> dict:
        """One batch: forward, loss, the per-batch all-reduce, backward and DeepSpeed's step
        (which updates the weights every ``optim.grad_accum`` batches).

        The all-reduce sums, over ranks, the ranks whose loss is non-finite, the ranks that got a
        stop signal and the corrupt samples newly skipped (``batch["bad_samples"]``), so every
        rank takes the same decisions.

        Returns:
            ``loss`` (this rank's, a float; None when non-finite), ``parts`` (its named parts,
            floats), ``skipped`` (None, or ``"loss"`` / ``"gradient"`` when some rank's was
            non-finite and the batch or update was dropped), ``stop`` (a stop signal reached
            some rank) and ``new_bad`` (corrupt samples skipped on all ranks).
        """
        on_device = {k: v.to(self.device) if torch.is_tensor(v) and k != "audio" else v for k, v in batch.items()}
        out = self.engine(batch["audio"].to(self.device, self.dtype), on_device["attention_mask"])
        loss, parts = self.model.loss(out, on_device, class_weights=self.class_weights)
        flags = torch.cat([(~torch.isfinite(loss.detach())).float().reshape(1),
                           torch.tensor([float(self.stop_signal is not None), float(len(batch["bad_samples"]))],
                                        device=self.device)])
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        nonfinite_loss, stop, new_bad = flags.tolist()
        skipped, value = None, None
        if nonfinite_loss:
            # Every rank must run backward (gradients are reduced collectively), from the
            # parameters themselves: a graph through NaN activations would give NaN
            # gradients on this rank only. With bf16/fp16, DeepSpeed's overflow check
            # drops a step whose gradients are NaN on any rank (optimizer moments and
            # schedule untouched): make them NaN on purpose. In fp32 there is no such
            # check: backpropagate zero, which drops the batch but not AdamW's momentum.
            loss = sum(p.sum() for p in self.trainable) * (math.nan if self.overflow_checked else 0.0)
            skipped = "loss"
        else:
            value = float(loss.detach().float().cpu())
        skipped_before = self.engine.skipped_steps
        self.engine.backward(loss)
        self.engine.step()
        if self.engine.skipped_steps > skipped_before and skipped is None:
            skipped = "gradient"  # DeepSpeed found inf/NaN gradients and dropped the update
        return {"loss": value, "parts": {k: float(v.float().cpu()) for k, v in parts.items()} if value is not None
                else {}, "skipped": skipped, "stop": bool(stop), "new_bad": int(new_bad)}

    def evaluate(self, sets: dict[str, tuple[list[str], list[str] | None]]) -> dict[str, dict]:
        """Metrics of each named set: ``name -> (shard specs, style filter)``, batched by
        ``runconfig.loader_config`` as ``dser evaluate`` batches (every rank calls it; the model
        is put back in training mode afterwards)."""
        self.engine.eval()
        results = {}
        for name, (shards, styles) in sets.items():
            cfg = loader_config(self.cfg, shards, train=False, styles=styles, label_set=self.label_set)
            results[name] = evaluate_loader(self.forward, cfg, self.cfg.task, device=str(self.device),
                                            dtype=self.dtype)
        self.engine.train()
        return results

    def score(self, m: dict) -> float:
        """The number the best checkpoint is chosen by."""
        return m["ua"] if self.cfg.task != "dimensional" else m["ccc_mean"]

    def _next_batch(self) -> dict:
        try:
            return self.stream.next()
        except DataError as e:  # only this rank may have run dry
            raise RankError(str(e)) from None

    # ---- the loop ------------------------------------------------------------------------

    def train(self) -> int | None:
        """Train to ``optim.max_steps`` (or early stopping): None. A run stopped before its end
        (a signal, ``train.stop_after_steps``) checkpoints and returns its exit status."""
        cfg, st = self.cfg, self.state
        self.engine.train()
        start_step = st.step
        t_log, samples_log, seconds_log = time.time(), 0, 0.0
        loss_sum, loss_n, parts_sum = 0.0, 0, {}
        nonfinite_run = 0
        while st.step < cfg.optim.max_steps:
            step_skipped, stop_now = None, False
            for _ in range(cfg.optim.grad_accum):
                batch = self._next_batch()
                r = self.train_step(batch)
                stop_now = stop_now or r["stop"]
                st.bad_total += r["new_bad"]
                if st.bad_total > cfg.train.max_bad_samples:
                    latest = self.stream.bad_samples[-1] if self.stream.bad_samples else "on another rank"
                    raise RecipeError(f"{st.bad_total} corrupt training samples skipped, more than "
                                      f"train.max_bad_samples={cfg.train.max_bad_samples} (at step {st.step + 1}; "
                                      f"latest: {latest}). Run dser verify on the shards")
                if r["loss"] is not None:
                    loss_sum, loss_n = loss_sum + r["loss"], loss_n + 1
                    for k, v in r["parts"].items():
                        parts_sum[k] = parts_sum.get(k, 0.0) + v
                step_skipped = step_skipped or r["skipped"]
                samples_log += len(batch["utt_id"])
                seconds_log += batch["duration_s"]
            if step_skipped is not None:
                st.skipped.append({"step": st.step + 1, "why": f"non-finite {step_skipped}"})
                nonfinite_run += 1
                rank0_print(f"step {st.step + 1}: non-finite {step_skipped}, step skipped "
                            f"({nonfinite_run} in a row, {len(st.skipped)} in all)")
                if nonfinite_run > cfg.train.max_nonfinite_steps:
                    raise RecipeError(f"non-finite {step_skipped} for {nonfinite_run} steps in a row at step "
                                      f"{st.step + 1} (more than train.max_nonfinite_steps="
                                      f"{cfg.train.max_nonfinite_steps}); lower optim.lr or check the data")
            else:
                nonfinite_run = 0
            st.step += 1
            if self.bar is not None:
                self.bar.update(1)

            if st.step % cfg.train.log_every == 0 or st.step == cfg.optim.max_steps:
                elapsed = time.time() - t_log
                mean_loss = loss_sum / max(1, loss_n)
                lr = self.scheduler.get_last_lr()[0]
                gnorm = self.engine.get_global_grad_norm()
                if self.writer is not None:
                    w = self.writer
                    w.add_scalar("train/loss", mean_loss, st.step)
                    for k, v in parts_sum.items():  # cross-entropy and CCC parts of the loss
                        w.add_scalar(f"train/loss/{k}", v / max(1, loss_n), st.step)
                    w.add_scalar("train/lr", lr, st.step)
                    if gnorm is not None:
                        w.add_scalar("train/grad_norm", float(gnorm), st.step)
                    w.add_scalar("train/samples_per_s", samples_log * self.world / elapsed, st.step)
                    w.add_scalar("train/audio_seconds_per_s", seconds_log * self.world / elapsed, st.step)
                    w.add_scalar("train/bad_samples", st.bad_total, st.step)
                    w.add_scalar("train/skipped_steps", len(st.skipped), st.step)
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}")
                t_log, samples_log, seconds_log = time.time(), 0, 0.0
                loss_sum, loss_n, parts_sum = 0.0, 0, {}

            if st.step % cfg.train.eval_every == 0 or st.step == cfg.optim.max_steps:
                m = self.evaluate({"valid": (cfg.data.valid, cfg.data.styles)})["valid"]
                st.history.append({"step": st.step, **{k: v for k, v in m.items() if k != "confusion"}})
                if self.writer is not None:
                    _log_metrics(self.writer, "valid", m, st.step)
                if st.best is None or self.score(m) > st.best:
                    st.best, st.evals_since_best = self.score(m), 0
                    self._gathered(lambda: save_adaptors(self.model, self.run_dir / "best" / "adaptors.safetensors"))
                else:
                    st.evals_since_best += 1
                rank0_print(f"step {st.step}: {format_metrics('valid', m)}  (best {st.best:.3f})")
                if cfg.train.early_stopping and st.evals_since_best >= cfg.train.early_stopping:
                    rank0_print(f"early stopping at step {st.step}: {st.evals_since_best} evaluations without "
                                f"improvement")
                    break

            time_boxed = cfg.train.stop_after_steps and st.step - start_step >= cfg.train.stop_after_steps \
                and st.step < cfg.optim.max_steps
            if st.step % cfg.train.save_every == 0 or stop_now or time_boxed:
                self.save()
                if stop_now or time_boxed:
                    return self._stop(stop_now)
        return None

    def _stop(self, by_signal: bool) -> int:
        """Every rank stops here, at the same step, with the same status; the barrier holds them
        until all have written their part (the launcher kills the others as soon as one exits
        non-zero)."""
        sig = torch.tensor([self.stop_signal or 0])
        dist.all_reduce(sig, op=dist.ReduceOp.MAX)  # the signal, even if it reached another rank
        sig = int(sig) or None
        why = f"{signal.Signals(sig).name}{'' if self.stop_signal else ' (sent to another rank)'}" \
            if by_signal else f"train.stop_after_steps={self.cfg.train.stop_after_steps}"
        line = f"stopped at step {self.state.step} by {why}; resume with dser train --resume {self.run_dir}"
        # Every rank is here, so every rank's save() returned. The stop file tells the launchers
        # (dser train prints it again, last; slurm/launch.sh requeues only on it) that this was a
        # stop at a checkpoint and not a rank's failure, whatever status srun reports.
        if self.rank == 0 and os.environ.get("DSER_STOP_FILE"):
            Path(os.environ["DSER_STOP_FILE"]).write_text(line + "\n")
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        dist.barrier()
        rank0_print(line)
        return 128 + sig if by_signal else EXIT_STOPPED

    # ---- the end -------------------------------------------------------------------------

    def finish(self) -> None:
        """Best weights back, every test set, metrics.json, the export."""
        cfg, st = self.cfg, self.state
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._gathered(lambda: load_adaptors(self.model, self.run_dir / "best" / "adaptors.safetensors"), modify=True)
        results = self.evaluate(final_eval_sets(cfg))
        for name, m in results.items():
            rank0_print(format_metrics(name, m))
            if self.writer is not None:
                _log_metrics(self.writer, f"test/{name}", m, st.step)
        bad_lists, repeated = [None] * self.world, [None] * self.world
        dist.all_gather_object(bad_lists, self.stream.bad_samples)
        dist.all_gather_object(repeated, self.stream.repeated)
        record = None
        if self.rank == 0:
            record = self.provenance()
            bad_samples = [f"rank {r}: {b}" for r, lst in enumerate(bad_lists) for b in lst]
            write_json(self.rundir.metrics_file, {
                "stage": self.stage, "run_dir": str(self.run_dir), "steps": st.step, "best_valid": st.best,
                "precision": self.precision.name, "precision_reason": self.precision.reason,
                "warnings": self.set_warnings, "init_from": cfg.stage2.init_from if self.stage == 2 else None,
                "params": self.params, "config": to_dict(cfg), "valid_history": st.history,
                "bad_samples": {"count": st.bad_total, "samples": bad_samples},
                "skipped_steps": {"count": len(st.skipped), "steps": st.skipped},
                "repeated_clips": sum(repeated),
                "eval": {name: dict(m) for name, m in results.items()}, "provenance": record})
        self._gathered(lambda: export_model(
            self.model, self.export_dir, run_config={"stage": self.stage, **to_dict(cfg)},
            label_set=self.label_set.to_dict() if self.label_set else None))
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.rank == 0:  # last: the one marker that the run finished (RunDir.finished)
            self.rundir.write_finished({"stage": self.stage, "steps": st.step,
                                        "finished_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                                        "metrics": self.rundir.metrics_file.name, "export": self.export_dir.name,
                                        "provenance": record})
        rank0_print(f"metrics: {self.rundir.metrics_file}\nexport: {self.export_dir}\n"
                    f"tensorboard: {self.tb_dir}")
        dist.barrier()

    def provenance(self) -> dict:
        """The run's provenance record (``dser.provenance``), for metrics.json and finished.json."""
        cfg = self.cfg
        sets = {"data.train": cfg.data.train, "data.valid": cfg.data.valid, "data.rehearsal": cfg.data.rehearsal.shards,
                **{f"data.test.{k}": v for k, v in cfg.data.test.items()}}
        device = torch.cuda.get_device_name(self.device) if not self.cpu else detect_hardware().device
        return provenance(config=to_dict(cfg), precision_name=self.precision.name,
                          precision_reason=self.precision.reason, device=device, ranks=self.world, shard_sets=sets)

    def cleanup(self) -> None:
        """Close the logs and put the signal handlers back."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}

    def run(self) -> int:
        """setup → train → finish → cleanup; the exit status (0: finished)."""
        try:
            self.setup()
            status = self.train()
            if status is None:
                self.finish()
            return status or 0
        finally:
            self.cleanup()

    def _gathered(self, fn, modify: bool = False) -> None:
        gathered_call(self.deepspeed, self.model, self.zero3, self.rank, fn, modify=modify)


def _class_weights(cfg: LoaderConfig, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights over the training set's labels (normalised to mean 1): counted
    from the shard tables when the set is indexed, else by reading it."""
    counts = torch.zeros(num_classes)
    found = indexed_set(cfg.shards, cfg.label_set, cfg.styles, cfg.require)
    if found is not None:
        for row in found.rows:
            k = cfg.label_set.index(row.emotion)
            if k is not None:
                counts[k] += 1
    else:
        for b in make_loader(replace(cfg, rank=0, world_size=1, skip_damaged_shards=True)):
            e = b["emotion"][b["emotion"] >= 0]
            counts += torch.bincount(e, minlength=num_classes).float()
    w = counts.sum() / counts.clamp(min=1) / num_classes
    return w / w.mean()


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
