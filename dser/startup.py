"""What a run checks before it starts, and what it says about its precision when it does.

``check_config`` runs before any process group or compute, on every rank and in ``dser train``
before the launcher, so a bad config, path, shard group, label set, backbone, precision or rank
count is one line naming the key: it reads the run config (``read_run_config``: ``--resume``'s run
directory, or ``--config``/``--set`` and, for stage 2, the stage-1 run, ``latest_run``), checks the
schedule, a new ``--run-dir`` (``check_new_run_dir``) and the inputs (``check_inputs``;
``data_checks`` counts every set's clips per class from the shard indexes and asks
``shardfiles.ranks_problem`` whether the training sets feed the ranks). ``check_planned_run`` is
the same check for a run that starts later, elsewhere (``dser submit``, ``dser grid``, the demo's
stage 2): no stage-1 run, device or shards that a job before it writes are required.

A config that does not parse (an unknown key, a wrong type) is reported alone: nothing else can
be checked. Past that, every independent problem is found and reported together, one line each
(``ConfigProblems``: at most ``SHOWN_PROBLEMS`` lines, then "… and N more"). ``RecipeError`` is
what a user must fix. A run's start prints ``precision_notes`` after its precision line.

The module imports no torch, transformers or deepspeed (checks that need them import them
inside), so ``dser train`` reports a mistyped key in a fraction of a second and ``dser submit``
checks configs without them.

Usage::

    stage, cfg, recorded, schedule_notes, set_warnings = check_config(parse_args(argv), world_size=2)
    notes = check_planned_run(cfg2, 2, stage1=cfg1, world_size=8)   # dser submit's stage 2
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import yaml

from dser.config import ConfigError, from_dict
from dser.labels import get_label_set
from dser.model.backbone_names import TINY_PRESET_NAMES, backbone_problem, is_local_path, uncached_hub_id
from dser.precision import Precision, PrecisionError, check_device
from dser.rundir import RunDir, RunDirError
from dser.runconfig import (REQUIRE, RunConfig, check_schedule, ds_file_precision, recorded_precision,
                            resolve_config)
from dser.shardfiles import DataError, SetCounts, count_set, ranks_problem, resolve_shards

SHOWN_PROBLEMS = 5  # lines of one report; the rest are counted


class RecipeError(Exception):
    """A problem the user must fix (printed as one line by rank 0)."""


class ConfigProblems(RecipeError):
    """Independent problems one check found, one line each.

    Attributes:
        problems: every line found; ``lines()`` is what is printed.
    """

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        """At most ``SHOWN_PROBLEMS`` lines, the last saying how many more there are."""
        shown = self.problems[:SHOWN_PROBLEMS]
        if len(self.problems) > SHOWN_PROBLEMS:
            shown.append(f"… and {len(self.problems) - SHOWN_PROBLEMS} more")
        return shown


def error_lines(e: BaseException) -> list[str]:
    """What to print for an error of a check, one line each (``ConfigProblems`` has several)."""
    return e.lines() if isinstance(e, ConfigProblems) else [str(e)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The recipe's arguments (``dser/train.py``, and ``dser train`` checking them first)."""
    p = argparse.ArgumentParser(description="dser two-stage SER training on DeepSpeed")
    p.add_argument("--stage", type=int, choices=(1, 2), help="1: acted source data, 2: adapt to natural data")
    p.add_argument("--config", type=Path, help="run config YAML (default: the demo config of the stage)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--init-from", type=Path, help="stage 2: the stage-1 run directory")
    p.add_argument("--run-dir", type=Path, help="exact run directory (default: runs_dir/<name>-<time>)")
    p.add_argument("--resume", type=Path, help="continue the run in this directory from its latest checkpoint")
    p.add_argument("--verbose", action="store_true",
                   help="DeepSpeed's own INFO lines too (default: its warnings and errors only)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    args = p.parse_args(argv)
    if args.resume is None and args.stage is None:
        p.error("--stage 1 or --stage 2 is required (or --resume RUN_DIR)")
    return args


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


def check_config(args: argparse.Namespace, world_size: int | Callable[[], int] | None = None,
                 ) -> tuple[int, RunConfig, Precision | None, list[str], list[str]]:
    """Everything checked before a process group: the run config, its schedule, its inputs, the
    run directory and the ranks. ``dser train`` calls it too, before the launcher, so that a bad
    config is its lines and nothing else.

    Args:
        args: ``parse_args``' arguments.
        world_size: the ranks that will train (in a rank: ``WORLD_SIZE``; in ``dser train``:
            ``--ranks`` or the launcher's default, a function: counting GPUs imports torch, so it
            waits until a training set is there to compare); None leaves the ranks unchecked.

    Returns:
        The stage, the config, the recorded precision (resuming), the schedule notes and the
        label-set warnings.

    Raises:
        ConfigError, FileNotFoundError, ValueError, RecipeError: a config or run directory that
            cannot be read, one line naming the key or path (nothing more can be checked).
        ConfigProblems: everything else found, one line each.
    """
    stage, cfg, recorded = read_run_config(args)
    problems: list[str] = []
    try:
        cfg, schedule_notes = check_schedule(cfg)
    except ConfigError as e:
        problems.append(str(e))
        schedule_notes = []
    if args.run_dir and not args.resume:
        try:
            check_new_run_dir(Path(args.run_dir))
        except RecipeError as e:
            problems.append(str(e))
    set_warnings: list[str] = []
    try:
        set_warnings = check_inputs(cfg, stage, recorded, world_size=world_size)
    except ConfigProblems as e:
        problems += e.problems
    if problems:
        raise ConfigProblems(problems)
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
            from dser.safeload import check_checkpoint_dir  # torch: only a resume unpickles anything

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


def check_inputs(cfg: RunConfig, stage: int, recorded: Precision | None = None, *,
                 world_size: int | Callable[[], int] | None = None) -> list[str]:
    """Every shard group, the DeepSpeed config, a precision this machine can train in, the
    stage-1 run and its label set, the backbone and the ranks, before anything is computed.

    Args:
        cfg: the resolved run config.
        stage: 1 or 2 (stage 2: ``stage2.init_from`` is a finished stage-1 run).
        recorded: a resumed run's precision.
        world_size: the ranks that will train (or a function giving them, called only when
            the training set is there to compare); None leaves them unchecked.

    Returns:
        The label-set warnings (``data_checks``), for the run to print and record.

    Raises:
        ConfigProblems: one line per problem, naming the config key and what to do.
    """
    problems = _deepspeed_problems(cfg, recorded)
    if stage == 2:
        try:
            from dser.model.checkpoint_io import CheckpointError, export_labels

            init_export = RunDir(cfg.stage2.init_from).require_finished("stage2.init_from", "stage-1 run")
            problems += _stage2_head_problems(cfg, export_labels(init_export), str(cfg.stage2.init_from))
        except (RunDirError, CheckpointError) as e:
            problems.append(str(e))
    data_problems, set_warnings = data_checks(cfg, world_size)
    problems += data_problems
    name = cfg.model.backbone.name
    problem = backbone_problem(name)
    if problem:
        problems.append(f"config.model.backbone.name: {problem}")
    elif not _named_by_files(name):
        from dser.model.backbones import BackboneError, check_backbone  # transformers: a hub id's config

        try:
            check_backbone(cfg.model.backbone)
        except BackboneError as e:
            problems.append(f"config.model.backbone.name: {e}")
    if problems:
        raise ConfigProblems(problems)
    return set_warnings


def check_planned_run(cfg: RunConfig, stage: int, *, stage1: RunConfig | None = None,
                      world_size: int | None = None, gpus: int | None = None,
                      pending: Sequence[str | Path] = ()) -> list[str]:
    """``check_inputs`` for a run that starts later, elsewhere (a Slurm job, the demo's stage 2):
    what can be known here, from files alone (no torch, no transformers), the schedule included.

    Stage 2's stage-1 run does not exist yet: its label set is judged from the stage-1 config.
    Shard groups under a directory in ``pending`` (a shard job before it writes them) are not
    checked. The backbone is checked by its name or files; a hub id this machine's cache lacks
    gets a note, not an error. The precision is checked against the device only when the jobs'
    GPUs are known (``gpus``).

    Args:
        cfg: the run's resolved config.
        stage: 1 or 2.
        stage1: stage 2's stage-1 config (None: its head is not checked).
        world_size: the ranks the job will have; None leaves them unchecked.
        gpus: GPUs per rank's node (0: CPU ranks); None when unknown.
        pending: directories that jobs before this one write.

    Returns:
        Lines to print: the label-set warnings (``warning: …``) and what could not be checked
        here (``note: …``).

    Raises:
        ConfigProblems: one line per problem, naming the config key and what to do.
    """
    problems: list[str] = []
    try:
        cfg, _ = check_schedule(cfg)
    except ConfigError as e:
        problems.append(str(e))
    try:
        ds_file_precision(cfg.deepspeed.config)
        if gpus is not None:
            check_device(cfg.deepspeed.precision, gpus > 0)
    except (ConfigError, PrecisionError) as e:
        problems.append(str(e).replace("this machine has none", "the jobs have none (--gpus-per-node 0)"))
    if stage == 2 and stage1 is not None:
        trained = get_label_set(stage1.data.label_set).to_dict() if stage1.task != "dimensional" else None
        problems += _stage2_head_problems(cfg, trained, "its stage-1 config")
    data_problems, set_warnings = data_checks(cfg, world_size, pending=pending)
    problems += data_problems
    notes = [f"warning: {w}" for w in set_warnings]
    name = cfg.model.backbone.name
    problem = backbone_problem(name)
    if problem:
        problems.append(f"config.model.backbone.name: {problem}")
    elif uncached_hub_id(name):
        notes.append(f"note: config.model.backbone.name: {name!r} is a Hugging Face hub id that this machine's "
                     f"cache does not hold, so it is not checked here; the jobs load it from theirs "
                     f"(huggingface-cli download {name} where there is network)")
    if problems:
        raise ConfigProblems(problems)
    return notes


def _deepspeed_problems(cfg: RunConfig, recorded: Precision | None) -> list[str]:
    """The DeepSpeed config file and a precision this machine can train in."""
    problems = []
    try:
        ds_file_precision(cfg.deepspeed.config)  # reads the file: ConfigError naming the key and the shipped files
    except ConfigError as e:
        problems.append(str(e))
    name = recorded.name if recorded else cfg.deepspeed.precision
    if name == "fp16":  # the one precision that needs a GPU: torch is imported to ask only then
        import torch

        try:
            check_device(name, torch.cuda.is_available(), recorded)
        except PrecisionError as e:
            problems.append(str(e))
    return problems


def _named_by_files(name: str) -> bool:
    """A backbone that ``backbone_problem`` judges whole: a preset, ``random:``, a directory
    (a hub id needs transformers, which asks its cache or the hub)."""
    return name in TINY_PRESET_NAMES or name.startswith("random:") or is_local_path(name)


def _stage2_head_problems(cfg: RunConfig, trained: dict | None, where: str) -> list[str]:
    """Stage 2's label set against the one stage 1 trained its head on (``trained``)."""
    label_set = get_label_set(cfg.data.label_set) if cfg.task != "dimensional" else None
    if trained != (label_set.to_dict() if label_set else None) and not cfg.stage2.new_head:
        return [f"stage 2 label set {label_set and list(label_set.classes)} differs from stage 1's "
                f"{trained and trained['classes']} ({where}): set stage2.new_head: true "
                f"(--set stage2.new_head=true) to train a new head"]
    return []


def _is_pending(spec: str | Path, pending: Sequence[str | Path]) -> bool:
    """Whether a shard spec lies under one of the directories a job before the run writes."""
    where = os.path.abspath(os.path.expanduser(str(spec)))
    return any(where == p or where.startswith(p.rstrip(os.sep) + os.sep)
               for p in (os.path.abspath(str(d)) for d in pending))


def data_checks(cfg: RunConfig, world_size: int | Callable[[], int] | None = None,
                pending: Sequence[str | Path] = ()) -> tuple[list[str], list[str]]:
    """Every configured set: its shard groups and their indexes, its clips as the run's loaders
    would keep them (label set, styles, required labels; counted from the indexes), and whether
    the training and rehearsal sets feed ``world_size`` ranks (``shardfiles.ranks_problem``).

    Args:
        cfg: the resolved run config.
        world_size: the ranks that will train, or a function giving them (called once, when
            a set is there to compare); None leaves them unchecked.
        pending: directories that a job before the run writes: groups under them are not checked.

    Returns:
        ``(problems, warnings)``. Problems, one per set at most: an empty training or validation
        list, a missing or damaged group, a set with no clip for the run (naming its key, its
        groups and what they hold), too many ranks. Warnings: classes missing from training or
        from a test set, test classes that training never shows.
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
    problems: list[str] = []
    counts: dict[str, SetCounts] = {}
    for key, (specs, styles, styles_key) in sets.items():
        if not specs:
            if key in ("data.train", "data.valid"):
                problems.append(f"config.{key} is empty: name the shard groups to {key.split('.')[1]} on")
            continue
        here = [s for s in specs if not _is_pending(s, pending)]
        if not here:
            continue  # written by a job before the run
        try:
            resolve_shards(here)
            c = count_set(here, label_set, styles, require)
        except DataError as e:
            problems.append(f"config.{key}: {e}")
            continue
        if len(here) < len(specs):
            continue  # counted in part: nothing to conclude
        counts[key] = c
        if c.clips == 0 and not c.loose:
            where = ", ".join(c.groups) or ", ".join(map(str, specs))
            styled = f" in styles {list(styles)} ({styles_key})" if styles else ""
            problems.append(f"config.{key}: no clip with {wanted}{styled} in {where}; they hold {c.holds()}: "
                            f"fix data.label_set{', ' + styles_key if styles_key else ''} or the groups")
            continue
        if world_size and key in ("data.train", "data.rehearsal.shards"):
            world_size = world_size() if callable(world_size) else world_size
            problem = ranks_problem(here, world_size, c.clips, key)
            if problem:
                problems.append(problem)
    return problems, _class_warnings(label_set, counts)


def _class_warnings(label_set, counts: dict[str, SetCounts]) -> list[str]:
    """Classes missing from training or from a test set, test classes training never shows."""
    warnings: list[str] = []
    train = counts.get("data.train")
    if label_set is None:
        return warnings
    if train is not None and not train.loose:
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
        if train is not None and not train.loose:
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
