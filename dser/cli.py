"""The ``dser`` command line: each command parses its arguments and calls one library function.

Errors a user can cause surface as one line (``Error: …``) and a non-zero exit, never a
traceback from deep inside a library.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dser import __version__
from dser.labels import STYLES


class UserError(click.ClickException):
    """A mistake the user can fix; printed as one line."""


def _parse_kv(pairs: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise UserError(f"{what} {p!r} is not KEY=VALUE")
        k, v = p.split("=", 1)
        out[k.strip()] = v
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dser")
def main():
    """dser: parameter-efficient finetuning of speech foundation models for emotion recognition."""


@main.command()
@click.argument("corpus")
@click.argument("root", type=click.Path(path_type=Path))
@click.argument("out", required=False, type=click.Path(path_type=Path))
@click.option("--sample-rate", default=16000, show_default=True, type=int,
              help="Output sample rate (Hz): 8000, 16000, 22050, 24000, 32000, 44100 or 48000; training resamples "
                   "to the backbones' 16 kHz.")
@click.option("--max-shard-mb", default=256.0, show_default=True, help="Start a new shard past this size.")
@click.option("--max-shard-samples", default=None, type=int, help="Start a new shard past this many samples.")
@click.option("--min-duration", default=0.25, show_default=True, help="Skip clips shorter than this (s).")
@click.option("--max-duration", default=None, type=float,
              help="Skip clips longer than this (s), judged from the header before decoding (default: no limit).")
@click.option("--max-clipped", default=0.01, show_default=True,
              help="Skip clips with more than this share of samples past full scale (float audio above 0 dBFS).")
@click.option("--workers", default=1, show_default=True, help="Parallel encoding processes.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
@click.option("--strict", is_flag=True, help="Fail (non-zero exit) if any input is skipped.")
@click.option("--option", "reader_options", multiple=True, metavar="KEY=VALUE",
              help="Reader option, e.g. --option include_song=true for ravdess.")
def shard(corpus, root, out, sample_rate, max_shard_mb, max_shard_samples, min_duration, max_duration, max_clipped,
          workers,
          overwrite, strict, reader_options):
    """Turn CORPUS at ROOT into WebDataset shards in OUT (default shards/CORPUS).

    CORPUS is one of iemocap, msp-podcast, crema-d, ravdess, emodb, manifest (ROOT is then a
    CSV or JSONL file).
    """
    from dser.corpora import CorpusError, read_corpus
    import signal

    from dser.shards import ShardError, Stopped, build_shards

    out = out or Path("shards") / corpus
    try:
        listing = read_corpus(corpus, root, **_parse_kv(reader_options, "--option"))
        build_shards(listing, out, corpus=corpus, root=root, sample_rate=sample_rate,
                     max_shard_mb=max_shard_mb, max_shard_samples=max_shard_samples,
                     min_duration=min_duration, max_duration=max_duration, max_clipped=max_clipped,
                     workers=workers,
                     overwrite=overwrite, strict=strict, reader=corpus)
    except (CorpusError, ShardError, TypeError, ValueError) as e:
        raise UserError(str(e)) from e
    except (Stopped, KeyboardInterrupt) as e:
        # 128 + N, as a shell reports a process killed by signal N.
        signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
        click.echo(f"dser shard: stopped by {signal.Signals(signum).name}; {out} was not written "
                   f"(its temporary .partial directory was removed)", err=True)
        sys.exit(128 + signum)


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--style", type=click.Choice(STYLES), required=True)
@click.option("--utterances", default=800, show_default=True, help="Number of clips.")
@click.option("--speakers", default=10, show_default=True, help="Number of speakers.")
@click.option("--seed", default=0, show_default=True)
@click.option("--sample-rate", default=16000, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an earlier dser synth output in OUT.")
def synth(out, style, utterances, speakers, seed, sample_rate, overwrite):
    """Generate a synthetic emotional-speech corpus (WAV + manifest.jsonl) in OUT."""
    from dser.corpora.synthetic import synthesize

    try:
        manifest = synthesize(out, style, utterances=utterances, speakers=speakers, seed=seed,
                              sample_rate=sample_rate, overwrite=overwrite)
    except ValueError as e:
        raise UserError(str(e)) from e
    click.echo(f"wrote {manifest}")


VERBOSE_HELP = ("Show DeepSpeed's own INFO lines, the launcher's and the ranks' (by default only its warnings and "
                "errors, and one line when a rank fails).")


@main.command()
@click.option("--stage", type=click.Choice(["1", "2"]), help="1: acted source data, 2: adapt to natural data.")
@click.option("--config", type=click.Path(path_type=Path), help="Run config YAML (default: the stage's demo config).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.option("--init-from", type=click.Path(path_type=Path), help="Stage 2: the stage-1 run directory.")
@click.option("--run-dir", type=click.Path(path_type=Path), help="Exact run directory.")
@click.option("--resume", type=click.Path(path_type=Path), help="Continue this run from its latest checkpoint.")
@click.option("--ranks", type=click.IntRange(min=1), help="Processes on this node (default: GPUs, or 1 on CPU).")
@click.option("--master-port", type=int, help="Rendezvous port (default: a free one).")
@click.option("--verbose", is_flag=True, help=VERBOSE_HELP)
def train(stage, config, overrides, init_from, run_dir, resume, ranks, master_port, verbose):
    """Train a stage through the DeepSpeed launcher (deepspeed dser/train.py …).

    The whole config is checked here first (keys, schedule, shard groups and label sets, the
    backbone, the precision, the ranks against the data): each problem is one line and the exit
    status 2, before the launcher starts.
    """
    if not stage and not resume:
        raise UserError("give --stage 1|2 (or --resume RUN_DIR)")
    args = []
    if stage:
        args += ["--stage", stage]
    if config:
        args += ["--config", str(config)]
    for o in overrides:
        args += ["--set", o]
    for flag, value in (("--init-from", init_from), ("--run-dir", run_dir), ("--resume", resume)):
        if value:
            args += [flag, str(value)]
    if verbose:
        args.append("--verbose")
    # The recipe's own checks, here first: a bad config or path is its lines, not the launcher's
    # start-up and teardown around them. The ranks check again (nothing changes in between here).
    # Nothing imports torch until the config has parsed, so a mistyped key is reported at once.
    from dser.config import ConfigError
    from dser.launch import default_ranks
    from dser.startup import RecipeError, check_config, error_lines, parse_args

    try:
        check_config(parse_args(args), world_size=ranks or default_ranks)
    except (RecipeError, ConfigError, FileNotFoundError, ValueError) as e:
        for line in error_lines(e):
            click.echo(f"dser train: error: {line}", err=True)
        sys.exit(2)
    from dser.launch import launch_training

    sys.exit(launch_training(args, ranks=ranks, master_port=master_port, verbose=verbose))


@main.command()
@click.option("--ranks", default=2, show_default=True, type=click.IntRange(min=1),
              help="CPU ranks (or GPUs) for the DeepSpeed launcher.")
@click.option("--fresh", is_flag=True, help="Regenerate the demo corpora and shards.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a key of both demo configs.")
@click.option("--utterances", type=click.IntRange(min=40), default=None,
              help="Clips per demo corpus when they are made (the first time, or with --fresh); default 800, "
                   "at least 40 (4 emotions x 10 speakers). Fewer: a quicker, noisier demo.")
@click.option("--verbose", is_flag=True, help=VERBOSE_HELP)
def demo(ranks, fresh, overrides, utterances, verbose):
    """The main job: synthesize + shard the demo corpora, stage 1 (acted) then stage 2 (natural).

    Both stages' configs are checked before anything is made (their keys) and before stage 1
    starts (all of it): each problem is one line and the exit status 2.
    """
    from dser.demo import run_demo

    sys.exit(run_demo(ranks=ranks, fresh=fresh, overrides=list(overrides), utterances=utterances, verbose=verbose))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--shards", "shards", multiple=True, required=True, help="Shard group(s) to evaluate (repeatable).")
@click.option("--styles", "styles", multiple=True, type=click.Choice(STYLES),
              help="Keep only clips of this style (repeatable; default: every style, as a run evaluates a test "
                   "set without data.test_styles).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--workers", type=int, default=None, help="Loader workers (default: the run's data.num_workers).")
def evaluate(run_dir, shards, styles, as_json, workers):
    """Evaluate a finished run's exported model on shard groups, batched as the run evaluated
    (its data.eval_max_seconds, data.max_batch_seconds and buffers): a run's own test set, with
    its data.test_styles as --styles, gives the run's numbers."""
    import json

    from dser.evaluate import evaluate_run, format_metrics

    try:
        m = evaluate_run(run_dir, list(shards), styles=list(styles) or None, num_workers=workers)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from e
    click.echo(json.dumps(m, indent=2) if as_json else format_metrics(",".join(shards), m))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON Lines: one object per file, with an error field on a file that failed.")
@click.option("--max-seconds", default=60.0, show_default=True, help="Refuse clips longer than this.")
def predict(run_dir, files, as_json, max_seconds):
    """Predict emotions of audio FILES (any format soundfile reads, any sample rate).

    A file that cannot be predicted is one line naming it (on stderr, or as an object with
    an error field under --json); the other files are still predicted, and the exit status
    is 1 when any file failed.
    """
    import json

    from dser.predict import PredictError, predict_files

    try:
        results = predict_files(run_dir, list(files), max_seconds=max_seconds, errors="record")
    except PredictError as e:
        raise UserError(str(e)) from e
    for r in results:
        if as_json:
            click.echo(json.dumps(r, ensure_ascii=False))
        elif "error" in r:
            click.echo(f"Error: {r['error']}", err=True)
        else:
            parts = [r["file"]]
            if "emotion" in r:
                parts.append(r["emotion"])
                parts.append(" ".join(f"{c}={p:.2f}" for c, p in r["probabilities"].items()))
            if "valence" in r:
                parts.append(f"V={r['valence']:.2f} A={r['arousal']:.2f} D={r['dominance']:.2f}")
            click.echo("  ".join(parts))
    failed = sum("error" in r for r in results)
    if failed:
        click.echo(f"Error: {failed} of {len(results)} file(s) could not be predicted", err=True)
        sys.exit(1)


@main.command("run-status")
@click.argument("run_dir", type=click.Path(path_type=Path))
def run_status(run_dir):
    """Say whether RUN_DIR finished: "finished", "stopped at TAG" (a checkpoint to resume from),
    "started" (no checkpoint yet) or "none" (no run there). The Slurm scripts ask this;
    RUN_DIR/finished.json, written last, is what decides."""
    from dser.rundir import RunDir

    run = RunDir(run_dir)
    status = run.status()
    note = run.note()
    if note:
        click.echo(note, err=True)
    click.echo(status)


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
def verify(out):
    """Check every shard in OUT against its index.json: sha256, decoding, counts, durations."""
    from dser.shards import ShardError
    from dser.verify import verify_shards

    try:
        report = verify_shards(out)
    except ShardError as e:
        raise UserError(str(e)) from e
    for p in report.problems:
        click.echo(p)
    click.echo(f"{report.shards} shards, {report.samples} samples, {report.seconds / 3600:.3f} h: "
               f"{'OK' if report.ok else f'{len(report.problems)} problems'}")
    sys.exit(0 if report.ok else 1)


@main.command()
@click.option("--backbone-config", required=True,
              help="Architecture: wavlm-base-plus, wavlm-large, hubert-large, or a tiny preset (tiny-wavlm …).")
@click.option("--adaptors", required=True, help="Comma-separated adaptors, e.g. lora,bottleneck (none: head only).")
@click.option("--num-classes", default=4, show_default=True, help="Emotion classes of the head.")
@click.option("--task", type=click.Choice(["categorical", "dimensional", "both"]), default="categorical",
              show_default=True)
def params(backbone_config, adaptors, num_classes, task):
    """Print trainable / total parameters per adaptor (random weights on the meta device, no download)."""
    from dser.model.build import format_parameter_table, parameter_counts

    names = [a.strip() for a in adaptors.split(",") if a.strip()]
    try:
        rows = parameter_counts(backbone_config, names, num_classes=num_classes, task=task)
    except ValueError as e:
        raise UserError(str(e)) from e
    click.echo(format_parameter_table(rows))


@main.command()
@click.argument("runs_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Where to write report.md/.csv and the heatmap "
              "(default: RUNS_DIR).")
def report(runs_dir, out):
    """Table every source -> target pair of the runs under RUNS_DIR (Markdown, CSV, heatmap)."""
    from dser.report import ReportError, write_report

    try:
        rep = write_report(runs_dir, out)
    except ReportError as e:
        raise UserError(str(e)) from e
    click.echo(rep.text())


@main.command()
@click.option("--stage1", "stage1_config", type=click.Path(path_type=Path), help="Stage-1 run config.")
@click.option("--stage2", "stage2_config", type=click.Path(path_type=Path), help="Stage-2 run config.")
@click.option("--grid", type=click.Path(path_type=Path), help="Grid file (YAML, like slurm/grid.yaml): a whole "
              "source x target grid instead of one pair.")
@click.option("--nodes", type=int, help="Nodes per training job [slurm/stage1.sh's #SBATCH lines: 1].")
@click.option("--gpus-per-node", type=int, help="GPUs per node; 0 trains on CPUs [1].")
@click.option("--ntasks-per-node", type=int, help="Ranks per node (default: one per GPU, or 1 on CPUs).")
@click.option("--cpus-per-task", type=int, help="CPUs per rank (data workers, OpenMP threads) [8].")
@click.option("--time", "time_limit", help="Time limit per job, e.g. 12:00:00 [24:00:00].")
@click.option("--partition", help="Slurm partition.")
@click.option("--account", help="Slurm account.")
@click.option("--sbatch-option", "extra", multiple=True, metavar="OPTION",
              help="Further sbatch option for every job, verbatim (repeatable), e.g. --sbatch-option=--qos=high.")
@click.option("--stage-sbatch", metavar="OPTIONS", default="",
              help="sbatch options for the training jobs only, as one shell-quoted string (cross_corpus.sh's "
                   "STAGE_SBATCH), e.g. '--gpus-per-node=4 --ntasks-per-node=4'.")
@click.option("--shard-sbatch", metavar="OPTIONS", default="",
              help="sbatch options for the shard tasks only, likewise (SHARD_SBATCH).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a key of both configs.")
@click.option("--runs-dir", type=click.Path(path_type=Path), help="Where run directories go.")
@click.option("--name", help="Run group: runs go to RUNS_DIR/NAME/stage1, …/stage2.")
@click.option("--dry-run", is_flag=True, help="Print the sbatch commands (a shell script) instead of submitting.")
@click.option("--wait", is_flag=True, help="Wait for every job to end, print each one's result (and a grid's "
              "report); exit non-zero unless all completed.")
@click.option("--poll", default=30.0, show_default=True, help="Seconds between job-state checks with --wait.")
def submit(stage1_config, stage2_config, grid, nodes, gpus_per_node, ntasks_per_node, cpus_per_task, time_limit,
           partition, account, extra, stage_sbatch, shard_sbatch, overrides, runs_dir, name, dry_run, wait, poll):
    """Submit stage 1 and the dependent stage 2 (or a whole grid) to Slurm with sbatch.

    This is dser's one Slurm planner: slurm/cross_corpus.sh calls it. Resources not given
    are the job scripts' #SBATCH defaults (in brackets). Every run is checked first, as far as
    files tell (shard groups, label sets, the backbone, the ranks the options ask for): each
    problem is one line and the exit status 2, and nothing is queued.
    """
    import shlex

    from dser.config import ConfigError
    from dser.submit import (GridError, Resources, SubmitError, format_dry_run, format_submitted, load_grid,
                             plan_jobs, runs_root, submit_jobs)

    def options(flag, text):
        try:
            return shlex.split(text)
        except ValueError as e:
            raise UserError(f"{flag} {text!r}: not shell words ({e})") from e

    try:
        resources = Resources(nodes=nodes, gpus_per_node=gpus_per_node, ntasks_per_node=ntasks_per_node,
                              cpus_per_task=cpus_per_task, time=time_limit, partition=partition,
                              account=account, extra=list(extra), stage_extra=options("--stage-sbatch", stage_sbatch),
                              shard_extra=options("--shard-sbatch", shard_sbatch))
        jobs = plan_jobs(stage1_config, stage2_config, grid=load_grid(grid) if grid else None,
                         resources=resources, overrides=list(overrides), runs_dir=runs_dir, name=name)
        _check_plan(jobs, resources)
        if dry_run:
            click.echo(format_dry_run(jobs))
            return
        runs = runs_root(jobs)
        if grid:
            runs.mkdir(parents=True, exist_ok=True)  # dser report's directory, even before a run starts
        ids = submit_jobs(jobs)
    except (GridError, SubmitError, ConfigError, ValueError) as e:
        raise UserError(str(e)) from e
    click.echo(format_submitted(jobs, ids))
    click.echo(f"dser: submitted {len(jobs)} jobs; afterwards: dser report {runs}")
    if wait:
        sys.exit(_wait_for_submitted(jobs, ids, poll, runs if grid else None))


def _check_plan(jobs, resources=None) -> None:
    """``dser.submit.check_plan``: its warnings and notes on stderr; its problems one line each
    on stderr and exit 2."""
    from dser.startup import ConfigProblems
    from dser.submit import check_plan

    try:
        notes = check_plan(jobs, resources)
    except ConfigProblems as e:
        for line in e.lines():
            click.echo(f"Error: {line}", err=True)
        sys.exit(2)
    for line in notes:
        click.echo(line, err=True)


def _wait_for_submitted(jobs, ids, poll, report_dir) -> int:
    """``dser submit --wait``: wait, print each job's result (and the report), return the exit status."""
    import os

    from dser.submit import format_results, job_results, runs_root, wait_for_jobs

    sys.stdout.flush()
    states = wait_for_jobs(ids, poll=poll, echo=lambda m: click.echo(f"dser: {m}"))
    results = job_results(jobs, states)
    click.echo("\n" + format_results(results, ids) + "\n")
    failed = sum(res != "ok" or not states[j.key] or set(states[j.key]) != {"COMPLETED"} for j, _, res in results)
    if report_dir is not None:
        from dser.report import ReportError, write_report

        try:
            click.echo(write_report(report_dir).text())
        except ReportError as e:
            click.echo(f"Error: {e}", err=True)
            failed += 1
    logs = os.path.commonpath([str(Path(j.log).parent) for j in jobs])
    if failed:
        click.echo(f"dser: {failed} of {len(jobs)} job(s) did not complete; logs: {logs}, runs: {runs_root(jobs)}",
                   err=True)
        return 1
    click.echo(f"dser: grid complete: {report_dir}" if report_dir else f"dser: all {len(jobs)} jobs completed")
    return 0


@main.command("grid-shard")
@click.argument("grid_file", type=click.Path(path_type=Path))
@click.argument("task", required=False)
@click.option("--workers", default=1, show_default=True, help="Parallel encoding processes.")
@click.option("--overwrite", is_flag=True, help="Rebuild shards that exist (index.json).")
@click.option("--synth-args", default="", metavar="OPTIONS",
              help="dser synth options for the demo corpora, one shell-quoted string (SYNTH_ARGS).")
def grid_shard(grid_file, task, workers, overwrite, synth_args):
    """Shard corpus TASK (its place under corpora:) of GRID_FILE: one task of slurm/shard.sh's array.

    Runs `dser shard --workers N [its shard: options] -- READER ROOT $SHARDS_DIR/NAME`; a demo
    corpus (synth-acted, synth-natural) is generated first with `dser synth` into ROOT. Shards
    that exist are kept unless --overwrite. Errors in the grid or the task exit 2.
    """
    import shlex

    from dser.grid import GridError, load_grid, shard_task

    try:
        plan = shard_task(load_grid(grid_file), task, workers=workers, overwrite=overwrite,
                          synth_args=shlex.split(synth_args))
    except (GridError, ValueError) as e:
        error = UserError(str(e))
        error.exit_code = 2  # the job script's usage error, as before
        raise error from e
    if plan.kept:
        click.echo(f"dser: {plan.out} exists (index.json): kept (RESHARD=1, or --overwrite, rebuilds it)")
        return
    if plan.synth:
        synth.main(plan.synth, prog_name="dser synth", standalone_mode=False)
    c = plan.corpus
    click.echo(f"dser: task {plan.task}: {c.name} ({plan.shard[-3]} {plan.shard[-2]}) -> {plan.out}")
    shard.main(plan.shard, prog_name="dser shard", standalone_mode=False)


@main.command()
@click.argument("grid_file", type=click.Path(path_type=Path))
@click.argument("query", nargs=-1)
@click.option("--null", is_flag=True, help="End each value with a NUL byte instead of a newline (for bash: "
              "mapfile -d '' -t ARRAY).")
def grid(grid_file, query, null):
    """Check GRID_FILE (YAML, like slurm/grid.yaml) and print what it holds, or one QUERY's values.

    Without QUERY it checks the grid and every run (as dser submit does: the configs, the shard
    groups that exist, label sets, the backbone; no torch) and prints the corpora and runs. With one, it prints that query's values, one per line:
    name, corpora, sources, targets, set, stage1_config, stage2_config; corpus NAME FIELD
    (FIELD: reader, root, train, valid, test, shard: its dser shard arguments); sets SOURCE
    [TARGET]: the --set values of stage 1 on SOURCE, or of stage 2 from SOURCE onto TARGET.
    slurm/cross_corpus.sh and slurm/shard.sh read them this way, as data: nothing in a grid
    is ever executed.
    """
    from dser.grid import GridError, format_grid, grid_values, load_grid

    try:
        g = load_grid(grid_file)
        if query:
            end = "\0" if null else "\n"
            sys.stdout.write("".join(v + end for v in grid_values(g, list(query))))
            return
        from dser.config import ConfigError
        from dser.submit import plan_jobs

        try:
            jobs = plan_jobs(None, None, grid=g)
        except (ConfigError, ValueError) as e:
            raise UserError(f"{g.path}: {e}") from e
    except GridError as e:
        raise UserError(str(e)) from e
    _check_plan(jobs)
    click.echo(format_grid(g))
    click.echo(f"checked: the grid and the config of each of its {sum(j.script.name != 'shard.sh' for j in jobs)} "
               f"runs")


@main.command()
@click.option("--quick", is_flag=True, help="Small sizes: a few minutes on a 2-core machine.")
@click.option("--out", type=click.Path(path_type=Path), help="Write the results as JSON here.")
@click.option("--only", "sections", multiple=True, help="Run only this section (repeatable): sharding, loading, "
              "padding, peft, pipeline, soak, balance.")
@click.option("--backbone", help="Backbone of the training sections (default: random:wavlm-base-plus).")
@click.option("--ranks", default=2, show_default=True, help="Ranks of the dser training runs.")
@click.option("--workdir", type=click.Path(path_type=Path), help="Keep corpora, shards, runs and logs here.")
@click.option("--write-goals", "goals_file", type=click.Path(path_type=Path),
              help="Rewrite the goals part of this markdown file (BENCHMARKS.md) from the results.")
@click.option("--results", "results_file", type=click.Path(path_type=Path),
              help="With --write-goals: take the results from this file (a --out file) instead of running.")
def bench(quick, out, sections, backbone, ranks, workdir, goals_file, results_file):
    """Measure sharding, loading, padding, PEFT vs full and dser vs the usual pipeline, side by side."""
    from dser.bench import SECTIONS, BenchError, check_goals_file, format_table, read_results, run_bench, write_goals

    if results_file is not None and goals_file is None:
        raise UserError(f"--results {results_file}: only --write-goals reads it; add --write-goals BENCHMARKS.md")
    if results_file is not None:
        ignored = [name for name, given in (("--quick", quick), ("--out", out), ("--only", sections),
                                            ("--backbone", backbone), ("--workdir", workdir)) if given]
        if ignored:
            raise UserError(f"--results {results_file}: nothing runs, so {', '.join(ignored)} would do nothing; "
                            f"drop {'it' if len(ignored) == 1 else 'them'}, or drop --results to run the bench")
    try:
        if results_file is not None:
            write_goals(goals_file, read_results(results_file), source=str(results_file))
            click.echo(f"goals: {goals_file} (from {results_file})")
            return
        if goals_file is not None:
            check_goals_file(goals_file)  # before the run, not after its minutes
        results = run_bench(out, quick=quick, sections=list(sections) or SECTIONS, backbone=backbone, ranks=ranks,
                            workdir=workdir, keep=workdir is not None, log=lambda m: click.echo(m, err=True))
        click.echo(format_table(results))
        if out:
            click.echo(f"results: {out}")
        if goals_file is not None:
            write_goals(goals_file, results, source=str(out) if out else None)
            click.echo(f"goals: {goals_file}")
    except BenchError as e:
        raise UserError(str(e)) from e


if __name__ == "__main__":
    sys.exit(main())
