"""The main job on its embedded default: ``dser demo`` (what ``make demo`` runs).

Synthesizes an acted and a natural demo corpus, shards them, trains stage 1 on acted speech
and stage 2 on natural speech through the real DeepSpeed launcher (2 CPU ranks by default),
then prints UA on both test sets after each stage and where the logs and exports went.

Both configs (with ``--set``) are checked as ``dser train`` checks one, before anything is made
or launched: their keys before the corpora are synthesized; stage 1 whole
(``startup.check_config``) and stage 2 as far as it can be without its stage-1 run
(``startup.check_planned_run``) before stage 1 starts; stage 2 whole before it starts. Each
problem is one line (``dser demo: error: stage N: …``) and the exit status 2.

Paths (relative to the working directory, as the demo run configs expect them)::

    data/demo/{acted,natural}/      generated WAVs + manifest.jsonl
    shards/demo-{acted,natural}/    WebDataset shards + index.json
    runs/demo-stage{1,2}-<time>/    run directories
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dser.config import ConfigError
from dser.corpora import read_corpus
from dser.corpora.synthetic import synthesize
from dser.launch import launch_training
from dser.runconfig import default_config_path, resolve_config
from dser.startup import ConfigProblems, RecipeError, check_config, check_planned_run, parse_args
from dser.schema import FORMAT, INDEX_NAME, read_index_json
from dser.shards import build_shards

DEMO_SIZES = {"acted": dict(utterances=800, speakers=10, seed=1), "natural": dict(utterances=800, speakers=10, seed=2)}


def prepare_demo_shards(data_dir: Path = Path("data/demo"), shards_dir: Path = Path("shards"),
                        fresh: bool = False, utterances: int | None = None) -> dict[str, Path]:
    """Synthesize and shard the two demo corpora (reused when their index exists).

    Returns:
        style → shard directory.
    """
    out = {}
    for style, sizes in DEMO_SIZES.items():
        shard_dir = shards_dir / f"demo-{style}"
        out[style] = shard_dir
        found = read_index_json(shard_dir / INDEX_NAME)
        if found is not None and found["format"] == FORMAT and not fresh:
            print(f"reusing {shard_dir} (pass --fresh to regenerate)")
            continue
        if found is not None and found["format"] != FORMAT:
            print(f"re-sharding {shard_dir}: written by an older dser ({found['format']}, this one reads {FORMAT})")
        sizes = dict(sizes, utterances=utterances or sizes["utterances"])
        manifest = synthesize(data_dir / style, style, **sizes, overwrite=True)
        listing = read_corpus("manifest", manifest)
        build_shards(listing, shard_dir, corpus=f"demo-{style}", root=manifest, overwrite=True, reader="manifest",
                     max_shard_samples=64, workers=2)
    return out


def _latest_metrics(runs_dir: Path, name: str) -> dict:
    from dser.rundir import RunDir

    runs = sorted((p for p in runs_dir.glob(f"{name}-*/metrics.json") if RunDir(p.parent).finished()),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        raise RuntimeError(f"no finished run {name}-* under {runs_dir}")
    return json.loads(runs[-1].read_text())


def run_demo(ranks: int = 2, fresh: bool = False, overrides: list[str] = (), utterances: int | None = None,
             verbose: bool = False) -> int:
    """The whole demo; returns a process exit status.

    Args:
        ranks: CPU ranks (or GPUs) for the DeepSpeed launcher.
        fresh: regenerate the demo corpora and shards.
        overrides: ``KEY=VALUE`` overrides of both stage configs.
        utterances: clips per corpus when they are made (default: ``DEMO_SIZES``').
        verbose: DeepSpeed's own INFO lines too (``dser train --verbose``).
    """
    sets = [f"--set={o}" for o in overrides]
    stage_args = {stage: ["--stage", str(stage), "--config", str(default_config_path(stage)), *sets,
                          *(["--verbose"] if verbose else [])] for stage in (1, 2)}
    problems = []
    configs = {}
    for stage in (1, 2):  # a mistyped key, before minutes of synthesis
        try:
            configs[stage] = resolve_config(default_config_path(stage), list(overrides), stage)
        except (ConfigError, ValueError) as e:
            problems.append(f"stage {stage}: {e}")
    if problems:
        return _refuse(problems)
    prepare_demo_shards(fresh=fresh, utterances=utterances)
    try:
        check_config(parse_args(stage_args[1]), world_size=ranks)
    except (RecipeError, ConfigError, FileNotFoundError, ValueError) as e:
        problems += [f"stage 1: {line}" for line in _problems(e)]
    try:
        check_planned_run(configs[2], 2, stage1=configs[1], world_size=ranks)
    except RecipeError as e:
        problems += [f"stage 2: {line}" for line in _problems(e)]
    if problems:
        return _refuse(problems)
    for stage in (1, 2):
        if stage == 2:  # now with its stage-1 run
            try:
                check_config(parse_args(stage_args[2]), world_size=ranks)
            except (RecipeError, ConfigError, FileNotFoundError, ValueError) as e:
                return _refuse([f"stage 2: {line}" for line in _problems(e)])
        rc = launch_training(stage_args[stage], ranks=ranks, verbose=verbose)
        if rc != 0:
            how = "stopped before its end" if rc == 75 or rc > 128 else "failed"
            print(f"dser demo: stage {stage} {how} (exit {rc})")
            return rc
    runs = Path("runs")
    m1, m2 = _latest_metrics(runs, "demo-stage1"), _latest_metrics(runs, "demo-stage2")
    print()
    print("UA on the demo test sets")
    print(f"{'':24s}{'acted test':>12s}{'natural test':>14s}")
    for label, m in (("after stage 1 (acted)", m1), ("after stage 2 (natural)", m2)):
        print(f"{label:24s}{m['eval']['acted']['ua']:12.3f}{m['eval']['natural']['ua']:14.3f}")
    for label, m in (("stage 1", m1), ("stage 2", m2)):
        run = Path(m["run_dir"])
        print(f"{label}: tensorboard --logdir {run / 'tensorboard'}   export: {run / 'export'}")
    return 0


def _problems(e: Exception) -> list[str]:
    return e.problems if isinstance(e, ConfigProblems) else [str(e)]


def _refuse(problems: list[str]) -> int:
    """Print a check's problems, one line each (a few at most), and return the exit status 2."""
    for line in ConfigProblems(problems).lines():
        print(f"dser demo: error: {line}", file=sys.stderr, flush=True)
    return 2
