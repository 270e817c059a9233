"""Run configs for the training recipe: the YAML schema, resolution, and the DeepSpeed config.

A run config is one YAML file (``dser/configs/*.yaml``, each opening with its launch command)
with the sections below; ``--set section.key=value`` overrides any key. Unknown or mistyped
keys fail with the key's name and the allowed keys (``dser.config.from_dict``).

Where DeepSpeed's values come from: the run config owns the batch (``data.max_batch_seconds``),
``optim.grad_accum``, ``optim.grad_clip``, the learning rate and its schedule, and fills the
``"auto"`` entries of the chosen ``ds_configs/*.json`` (micro-batch size is nominal: batches are
capped by audio seconds, so their clip count varies). The DeepSpeed file owns the ZeRO stage,
offload and communication buckets; the precision is ``deepspeed.precision``'s, decided once per
run by ``dser.precision`` (``auto``: from the hardware) and written into the file's ``bf16`` and
``fp16`` sections, whose ``enabled`` says ``"auto"`` in the shipped files. The names of the old
per-precision files (``zero2_bf16``, ``zero3_fp16`` …) still work, as aliases of their ZeRO
stage's file: under ``auto`` they no longer choose the precision.

Usage::

    cfg = resolve_config(Path("dser/configs/demo_stage1.yaml"), ["optim.lr=1e-3"], stage=1)
    ds = deepspeed_config(cfg, world_size=2, precision="bf16", cpu=True)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

from dser.config import ConfigError, apply_overrides, from_dict, knob, load_yaml, to_dict
from dser.model.adaptors import FRESH
from dser.model.config import ModelConfig  # no torch: checking a run config never imports it
from dser.precision import PRECISIONS, Precision

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIGS_DIR = PACKAGE_DIR / "configs"
# Package data (pyproject.toml): in a checkout dser/ds_configs links to the top-level ds_configs/
# that users name, so resolve it to that one copy; in an installed dser it is a real directory.
DS_CONFIGS_DIR = (PACKAGE_DIR / "ds_configs").resolve()


@dataclass
class RehearsalConfig:
    shards: list[str] = knob([], "source-domain shard groups mixed into stage-2 training (rehearsal)")
    share: float = knob(0.0, "fraction of stage-2 training batches drawn from the rehearsal shards (0 = off)")


@dataclass
class DataConfig:
    train: list[str] = knob([], "training shard groups: directories, .tar files or globs")
    valid: list[str] = knob([], "validation shard groups (best checkpoint, early stopping)")
    test: dict[str, list[str]] = knob({}, "named test sets evaluated after training, e.g. {acted: [...], natural: [...]}")
    test_styles: dict[str, list[str]] = knob({}, "style filter per test set, e.g. {scripted: [acted]} to split one session by style")
    label_set: str | list[str] | None = knob("4class", "emotion classes: a name (4class, 6class, 8class) or a list")
    styles: list[str] | None = knob(None, "keep only these styles (acted, natural); null keeps all")
    max_seconds: float = knob(6.0, "training clips are randomly cropped to at most this many seconds")
    eval_max_seconds: float = knob(30.0, "evaluation clips are cut to at most this many seconds")
    max_batch_seconds: float = knob(48.0, "cap on padded audio seconds per batch (batch size varies with length)")
    shuffle_buffer: int = knob(500, "samples held for shuffling during training on loose .tar files (indexed groups are shuffled whole by the global plan)")
    bucket_buffer: int = knob(200, "samples sorted by length together when forming batches")
    num_workers: int = knob(1, "data-loader worker processes per rank")
    rehearsal: RehearsalConfig = knob(factory=RehearsalConfig, help="stage 2: replay of source data against forgetting")


@dataclass
class OptimConfig:
    lr: float = knob(5e-4, "peak learning rate of AdamW")
    weight_decay: float = knob(0.01, "AdamW weight decay")
    betas: list[float] = knob([0.9, 0.98], "AdamW betas")
    eps: float = knob(1e-8, "AdamW epsilon")
    max_steps: int = knob(1000, "optimizer steps in this stage")
    warmup_steps: int = knob(100, "linear warm-up steps from 0 to lr")
    schedule: Literal["cosine", "linear", "constant"] = knob("cosine", "decay after warm-up, to min_lr_ratio * lr")
    min_lr_ratio: float = knob(0.05, "final learning rate as a fraction of lr")
    grad_accum: int = knob(1, "batches per optimizer step (DeepSpeed gradient_accumulation_steps)")
    grad_clip: float = knob(1.0, "global gradient-norm clip (DeepSpeed gradient_clipping); 0 disables")
    class_weighted_loss: bool = knob(False, "weight cross-entropy by inverse class frequency of the training set")


@dataclass
class TrainConfig:
    log_every: int = knob(10, "optimizer steps between TensorBoard scalars")
    eval_every: int = knob(200, "optimizer steps between validation runs (and at the end)")
    save_every: int = knob(200, "optimizer steps between DeepSpeed checkpoints")
    keep_last: int = knob(2, "checkpoints kept; older ones are pruned after a new one is complete")
    early_stopping: int = knob(0, "stop after this many evaluations without improvement (0 = never)")
    max_bad_samples: int = knob(100, "stop with an error once more corrupt samples than this were skipped")
    max_nonfinite_steps: int = knob(5, "stop once more than this many consecutive steps had a non-finite "
                                    "loss or gradient (each such step is skipped)")
    progress: bool = knob(True, "progress bar on rank 0")
    stop_after_steps: int = knob(0, "checkpoint and exit after this many steps of one launch, to be resumed "
                                    "with --resume (time-boxed jobs); 0 = run to max_steps")


@dataclass
class DeepSpeedConfig:
    config: str = knob("zero2", "a ds_configs/ name (zero0, zero1, zero2, zero3, zero3_offload) or a JSON path")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = knob(
        "auto", "auto: bf16 where the GPU or CPU has it natively, else fp16 (GPU) or fp32 (CPU); "
                "a resumed run keeps the precision it started in")
    timeout_minutes: float = knob(10.0, "collective timeout: a dead rank makes the others exit within this bound")


@dataclass
class Stage2Config:
    init_from: str | None = knob(None, "stage-1 run directory (null: the latest stage-1 run under runs_dir)")
    freeze: list[str] = knob([], "parameter-name patterns of loaded parts to freeze, e.g. [lora_, head]")
    fresh_adaptors: list[str] = knob([], f"adaptors added fresh on top of the loaded ones: {', '.join(FRESH)}")
    new_head: bool = knob(False, "start a new head (required when the label set differs from stage 1)")


@dataclass
class RunConfig:
    name: str = knob("run", "run name; the run directory is runs_dir/<name>")
    runs_dir: str = knob("runs", "where run directories are created")
    seed: int = knob(0, "seed for weights of new parts, data order and crops")
    task: Literal["categorical", "dimensional", "both"] = knob("categorical", "what the head predicts")
    source: str | None = knob(None, "name of the data.test set that is the source (acted) domain, for dser report")
    target: str | None = knob(None, "name of the data.test set that is the target (natural) domain, for dser report")
    data: DataConfig = knob(factory=DataConfig, help="shards, labels, batching")
    model: ModelConfig = knob(factory=ModelConfig, help="backbone, adaptors, head")
    optim: OptimConfig = knob(factory=OptimConfig, help="optimizer and schedule")
    train: TrainConfig = knob(factory=TrainConfig, help="logging, evaluation, checkpoints")
    deepspeed: DeepSpeedConfig = knob(factory=DeepSpeedConfig, help="DeepSpeed engine")
    stage2: Stage2Config = knob(factory=Stage2Config, help="stage 2 only: how to adapt a stage-1 run")


def default_config_path(stage: int) -> Path:
    """The demo config of a stage (what ``deepspeed dser/train.py --stage N`` uses alone)."""
    return CONFIGS_DIR / f"demo_stage{stage}.yaml"


# The labels a clip must have to be kept, per task (LoaderConfig.require).
REQUIRE = {"categorical": "emotion", "dimensional": "attributes", "both": "any"}

_DATA_STYLES = object()  # loader_config's default: the run's data.styles


def loader_config(cfg: RunConfig, shards: list[str], *, train: bool, styles=_DATA_STYLES, label_set=None):
    """The one road from a run config to a ``dser.data.LoaderConfig``, for the recipe,
    ``dser evaluate`` and ``dser predict``: training (random crops of ``data.max_seconds``,
    shuffled) or evaluation (clips cut to ``data.eval_max_seconds``, in order), with the run's
    batching (``data.max_batch_seconds``), buffers, workers and seed.

    Args:
        cfg: the run config.
        shards: shard specs to read.
        train: training or evaluation.
        styles: the style filter (default: ``data.styles``; None keeps every style).
        label_set: the label set (default: ``data.label_set``; none for a dimensional task).
    """
    from dser.data import LoaderConfig
    from dser.labels import get_label_set

    d = cfg.data
    if label_set is None and cfg.task != "dimensional":
        label_set = get_label_set(d.label_set)
    return LoaderConfig(shards=list(shards), label_set=label_set, styles=d.styles if styles is _DATA_STYLES else styles,
                        require=REQUIRE[cfg.task], train=train, seed=cfg.seed,
                        max_seconds=d.max_seconds if train else d.eval_max_seconds,
                        max_batch_seconds=d.max_batch_seconds, shuffle_buffer=d.shuffle_buffer,
                        bucket_buffer=d.bucket_buffer, num_workers=d.num_workers)


def final_eval_sets(cfg: RunConfig) -> dict[str, tuple[list[str], list[str] | None]]:
    """The sets a run evaluates at its end, each with its style filter: every ``data.test``
    set (``data.test_styles``, else every style), or the validation set when there is none."""
    if not cfg.data.test:
        return {"valid": (cfg.data.valid, cfg.data.styles)}
    return {name: (specs, cfg.data.test_styles.get(name)) for name, specs in cfg.data.test.items()}


def run_config_of_export(config: dict, where: str) -> RunConfig:
    """The run config an export recorded (``export/config.yaml``: ``stage`` plus the config).

    Raises:
        ConfigError: naming ``where`` and the key.
    """
    return from_dict(RunConfig, {k: v for k, v in config.items() if k != "stage"}, where=where)


def resolve_config(path: Path | None, overrides: list[str], stage: int) -> RunConfig:
    """Read a YAML run config, apply ``--set`` overrides and validate every key.

    Raises:
        ConfigError: unknown/mistyped keys (with the allowed ones) or a missing file.
    """
    path = Path(path) if path else default_config_path(stage)
    if not path.is_file() and (CONFIGS_DIR / path.name).is_file() and not path.parent.name:
        path = CONFIGS_DIR / path.name
    data = apply_overrides(load_yaml(path), overrides)
    cfg = from_dict(RunConfig, data, where="config")
    if cfg.task != "dimensional" and cfg.data.label_set is None:
        raise ConfigError("config.data.label_set: a categorical task needs a label set (e.g. 4class)")
    for name in cfg.data.test_styles:
        if name not in cfg.data.test:
            raise ConfigError(f"config.data.test_styles.{name}: no test set of that name; data.test has "
                              f"{', '.join(cfg.data.test) or 'none'}")
    for role in ("source", "target"):
        name = getattr(cfg, role)
        if name is not None and name not in cfg.data.test:
            raise ConfigError(f"config.{role}: {name!r} is not a test set; data.test has {', '.join(cfg.data.test) or 'none'}")
    if not 0.0 <= cfg.data.rehearsal.share < 1.0:
        raise ConfigError("config.data.rehearsal.share: must be in [0, 1)")
    return cfg


# Step counts of the schedule and the least value each may take.
_SCHEDULE_MINIMUM = {"optim.max_steps": 1, "optim.grad_accum": 1, "optim.warmup_steps": 0,
                     "train.log_every": 1, "train.eval_every": 1, "train.save_every": 1, "train.keep_last": 0,
                     "train.early_stopping": 0, "train.stop_after_steps": 0, "train.max_bad_samples": 0,
                     "train.max_nonfinite_steps": 0}
# Intervals: one longer than the run would never come round (save_every: no checkpoint at all).
_INTERVALS = ("train.log_every", "train.eval_every", "train.save_every")


def check_schedule(cfg: RunConfig) -> tuple[RunConfig, list[str]]:
    """Check the schedule's step counts before anything starts; clamp intervals longer than the run.

    Args:
        cfg: the resolved run config.

    Returns:
        ``(cfg, notes)``: the config with every interval (``train.log_every``, ``eval_every``,
        ``save_every``) at most ``optim.max_steps``, and one note per key clamped (or a warm-up
        longer than the run, left as it is).

    Raises:
        ConfigError: naming the key: ``optim.max_steps`` < 1, an interval < 1, a negative count,
            ``optim.min_lr_ratio`` outside [0, 1].
    """
    def field_of(key: str):
        section, name = key.split(".")
        obj = getattr(cfg, section)
        return obj, name, next(f for f in fields(obj) if f.name == name).metadata.get("help", "")

    for key, least in _SCHEDULE_MINIMUM.items():
        obj, name, help_text = field_of(key)
        value = getattr(obj, name)
        if value < least:
            raise ConfigError(f"config.{key} is {value}: it must be at least {least} ({help_text}); "
                              f"fix it in the config or with --set {key}=N")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"config.optim.min_lr_ratio is {cfg.optim.min_lr_ratio}: it must be in [0, 1]")
    steps, notes = cfg.optim.max_steps, []
    train = cfg.train
    for key in _INTERVALS:
        _, name, _ = field_of(key)
        value = getattr(train, name)
        if value > steps:
            train = replace(train, **{name: steps})
            notes.append(f"note: config.{key}={value} is longer than the run (optim.max_steps={steps}): "
                         f"clamped to {steps}")
    if cfg.optim.warmup_steps > steps:
        notes.append(f"note: config.optim.warmup_steps={cfg.optim.warmup_steps} is longer than the run "
                     f"(optim.max_steps={steps}): the learning rate never reaches optim.lr")
    return replace(cfg, train=train), notes


# The per-precision file names of dser <= 0.1 (zero2_bf16.json …): aliases of one file per stage.
_ALIAS = re.compile(r"^(zero[0-3]|zero3_offload)_(bf16|fp16)$")


def ds_config_path(name: str) -> Path:
    """Resolve a ds_configs name (``zero2``, or an old alias such as ``zero2_bf16``) or a JSON path."""
    p = Path(name)
    if p.suffix == ".json" and p.is_file():
        return p
    alias = _ALIAS.match(p.stem)
    candidate = DS_CONFIGS_DIR / f"{alias.group(1) if alias else p.stem}.json"
    if candidate.is_file():
        return candidate
    choices = ", ".join(sorted(q.stem for q in DS_CONFIGS_DIR.glob("*.json")))
    raise ConfigError(f"config.deepspeed.config: {name!r} is neither a JSON file nor one of {choices}")


def read_ds_config(name: str) -> dict:
    """The DeepSpeed config file ``name`` names, parsed.

    Raises:
        ConfigError: no such file, or not a JSON object.
    """
    path = ds_config_path(name)
    try:
        ds = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"config.deepspeed.config: {path} is not readable JSON ({e})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"config.deepspeed.config: {path} holds no JSON object")
    return ds


def ds_file_precision(name: str) -> str | None:
    """The precision a DeepSpeed config names, if any: an old alias's suffix (``zero2_bf16``),
    or a JSON file's ``bf16``/``fp16`` section with ``"enabled": true``; None for ``"auto"``."""
    alias = _ALIAS.match(Path(name).stem)
    if alias and not (Path(name).suffix == ".json" and Path(name).is_file()):
        return alias.group(2)
    ds = read_ds_config(name)
    for precision in ("bf16", "fp16"):
        if (ds.get(precision) or {}).get("enabled") is True:
            return precision
    return None


def deepspeed_config(cfg: RunConfig, world_size: int, precision: str, cpu: bool) -> dict:
    """The DeepSpeed config dict: the JSON file with its ``auto`` values filled from the run config.

    Args:
        cfg: the run config.
        world_size: ranks in the job.
        precision: the run's precision (``dser.precision``'s decision): bf16, fp16 or fp32.
        cpu: training on CPUs (offload sections are dropped).
    """
    ds = read_ds_config(cfg.deepspeed.config)
    ds["train_micro_batch_size_per_gpu"] = 1  # nominal: batches are capped by audio seconds
    ds["gradient_accumulation_steps"] = cfg.optim.grad_accum
    ds["train_batch_size"] = cfg.optim.grad_accum * world_size
    ds["gradient_clipping"] = cfg.optim.grad_clip
    if precision == "fp16" and cpu:
        raise ConfigError("config.deepspeed.precision: fp16 needs a GPU; on CPU use auto, bf16 or fp32 "
                          "(--set deepspeed.precision=auto)")
    # check_grad_overflow: a step whose gradients hold inf/NaN is skipped (and counted by the
    # recipe through engine.skipped_steps) rather than applied.
    ds["bf16"] = {**(ds.get("bf16") or {}), "enabled": precision == "bf16", "check_grad_overflow": True}
    ds["fp16"] = {**(ds.get("fp16") or {}), "enabled": precision == "fp16"}
    if cpu:
        # Offloading to the CPU is meaningless when training on it.
        zero = ds.get("zero_optimization", {})
        zero.pop("offload_optimizer", None)
        zero.pop("offload_param", None)
    return ds


def recorded_precision(meta: dict, where: str) -> Precision:
    """The precision a run directory's ``config.yaml`` (``meta``) records.

    Runs written before dser recorded it trained in what their DeepSpeed config said: the
    explicit ``deepspeed.precision``, else the file's ``bf16``/``fp16`` (an old alias such as
    ``zero2_bf16``, the default then), else fp32.

    Args:
        meta: the parsed ``RUN/config.yaml`` (``stage``, ``config``, ``precision``).
        where: the file, for the error message.

    Raises:
        PrecisionError: the record is not a precision.
        ConfigError: an old run's DeepSpeed config file is gone.
    """
    if "precision" in meta:
        return Precision.from_record(meta["precision"], where)
    ds = (meta.get("config") or {}).get("deepspeed") or {}
    requested, file = ds.get("precision", "auto"), str(ds.get("config", "zero2_bf16"))
    name = requested if requested in PRECISIONS else ds_file_precision(file) or "fp32"
    return Precision(name, f"as its DeepSpeed config {file} said; the run predates dser's precision record",
                     requested)


def config_as_dict(cfg: RunConfig) -> dict:
    return to_dict(cfg)
