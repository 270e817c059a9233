"""What a run checks before it starts, and what it says about its precision when it does.

``check_config`` runs before any process group or compute, on every rank and in ``dser train``
before the launcher, so a bad config, path, shard group, label set, backbone or precision is one
line naming the key: it reads the run config (``read_run_config``: ``--resume``'s run directory,
or ``--config``/``--set`` and, for stage 2, the stage-1 run, ``latest_run``), checks the
schedule, a new ``--run-dir`` (``check_new_run_dir``) and the inputs (``check_inputs``;
``label_set_checks`` counts every set's clips per class from the shard indexes). A run's start
prints ``precision_notes`` after its precision line. ``RecipeError`` is what a user must fix.

Usage::

    stage, cfg, recorded, schedule_notes, set_warnings = check_config(parse_args(argv))  # dser.train's
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from dser.config import from_dict
from dser.labels import get_label_set
from dser.model.backbones import BackboneError, check_backbone
from dser.model.checkpoint_io import export_labels
from dser.precision import Precision, PrecisionError, check_device
from dser.rundir import RunDir, RunDirError
from dser.runconfig import (REQUIRE, RunConfig, check_schedule, ds_file_precision, recorded_precision,
                            resolve_config)
from dser.safeload import check_checkpoint_dir
from dser.shardfiles import DataError, count_set, resolve_shards


class RecipeError(Exception):
    """A problem the user must fix (printed as one line by rank 0)."""


def latest_run(runs_dir: Path, stage: int) -> Path:
    """The most recently finished run of ``stage`` under ``runs_dir`` (``RunDir.finished``)."""
    done = []
    for cfg_file in Path(runs_dir).glob("*/config.yaml"):
        run = RunDir(cfg_file.parent)
        if (run.meta() or {}).get("stage") == stage and run.finished():
            done.append((run.path.stat().st_mtime, run.path))
    if not done:
        raise RecipeError(f"no finished stage-{stage} run under {runs_dir}; run stage {stage} first "
                          f"or pass --init-from RUN_DIR")
    return max(done)[1]


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
        try:
            init_export = RunDir(cfg.stage2.init_from).require_finished("stage2.init_from", "stage-1 run")
        except RunDirError as e:
            raise RecipeError(str(e)) from None
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
