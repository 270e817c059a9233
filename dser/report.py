"""Cross-corpus results of many runs as one table: what ``dser report RUNS_DIR`` writes.

Every run directory under RUNS_DIR (at any depth: a directory holding ``metrics.json``, or the
``config.yaml`` the recipe writes first) is read; each finished stage-2 run is paired with the
stage-1 run it started from (``init_from`` in its metrics.json), and one row per pair goes to

    OUT/report.md         the table, the heatmap, and the runs left out of the table with why
    OUT/report.csv        the same rows, one column per number (empty where unknown)
    OUT/target_gain.png   heatmap: source corpus x target corpus -> target-domain gain

A row is ``source -> target``: UA and WA (categorical runs) and/or mean CCC (dimensional runs)
on the source and on the target test set, after stage 1 and after stage 2, then the target
gain (stage 2 - stage 1 on the target test set, the point of stage 2) and the source change
(the same on the source test set: negative means forgetting), and the precision each stage
trained in (``bf16``, or ``bf16 -> fp32`` when they differ). Which test set is whose comes
from the run configs' ``source`` and ``target`` keys (the stage-1 run's ``source``, the
stage-2 run's ``target``); ``slurm/cross_corpus.sh`` sets both.

Nothing is dropped silently: runs without metrics.json (failed, or still running), unreadable
ones, stage-2 runs whose stage 1 cannot be found, and finished stage-1 runs that no finished
stage 2 started from are listed under "Runs not in the table".

Usage::

    report = write_report(Path("runs/cross-corpus"))     # writes the three files there
    print(report.text())                                   # the table and the left-out runs
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dser.rundir import FINISHED, LAYOUT, RunDir

# Metrics a row can carry, in column order, with their display names.
METRICS = {"ua": "UA", "wa": "WA", "ccc_mean": "CCC"}
CELLS = [(1, "source"), (1, "target"), (2, "source"), (2, "target")]


class ReportError(ValueError):
    """RUNS_DIR holds nothing to report (the message names the directory)."""


@dataclass
class Run:
    """One run directory as found on disk.

    Attributes:
        path: the directory.
        stage: 1 or 2 (None when not even config.yaml says).
        config: the resolved run config (metrics.json's, else config.yaml's).
        metrics: metrics.json, or None when the run has not finished.
        problem: why the run cannot be used (None when it can).
        precision: what it trained in (metrics.json's, else config.yaml's record; None when
            neither says, as in runs from before dser recorded it).
    """

    path: Path
    stage: int | None
    config: dict
    metrics: dict | None
    problem: str | None = None
    precision: str | None = None


@dataclass
class PairRow:
    """One source -> target pair: a finished stage-2 run and its stage-1 run.

    ``values`` maps column keys (``stage1_source_ua``, ``stage2_target_ccc_mean``,
    ``target_gain_ua``, ``source_change_ua`` …) to numbers; None where the run has no such
    test set or metric. ``precisions`` is (stage 1's, stage 2's), None where unrecorded.
    """

    source: str
    target: str
    stage1_run: Path
    stage2_run: Path
    values: dict[str, float | None]
    precisions: tuple[str | None, str | None] = (None, None)

    def precision(self) -> str:
        """``bf16`` when both stages trained in it, ``bf16 -> fp32`` when they differ."""
        a, b = (p or "?" for p in self.precisions)
        return a if a == b else f"{a} -> {b}"


@dataclass
class LeftOut:
    """A run not in the table, and why."""

    run: Path
    stage: int | None
    reason: str
    precision: str | None = None


@dataclass
class Report:
    """What ``write_report`` found and wrote.

    Attributes:
        runs_dir: the directory that was searched.
        rows: one per source -> target pair, in (source, target, run) order.
        left_out: runs not in the table (incomplete, failed, unpaired), with the reason.
        metrics: the metric keys shown (``ua``, ``wa``, ``ccc_mean``; those any run has).
        gain_metric: the metric of the gain columns and the heatmap (``ua`` or ``ccc_mean``).
        files: name -> path of what was written (``markdown``, ``csv``, ``heatmap``).
    """

    runs_dir: Path
    rows: list[PairRow]
    left_out: list[LeftOut]
    metrics: list[str]
    gain_metric: str | None
    files: dict[str, Path] = field(default_factory=dict)
    provenance: dict[Path, dict | None] = field(default_factory=dict)  # run in the table -> its record

    def columns(self) -> list[tuple[str, str]]:
        """(key, header) of every numeric column, in table order."""
        cols = [(f"stage{stage}_{dom}_{m}", f"S{stage} {dom} {METRICS[m]}")
                for stage, dom in CELLS for m in self.metrics]
        if self.gain_metric:
            name = METRICS[self.gain_metric]
            cols += [(f"target_gain_{self.gain_metric}", f"target gain {name}"),
                     (f"source_change_{self.gain_metric}", f"source change {name}")]
        return cols

    def table(self) -> str:
        """The rows as a Markdown table (numbers to 3 decimals, gains signed)."""
        cols = self.columns()
        head = ["source", "target", *(h for _, h in cols), "precision", "runs"]
        lines = ["| " + " | ".join(head) + " |",
                 "|" + "|".join(["---"] * 2 + ["---:"] * len(cols) + ["---", "---"]) + "|"]
        for r in self.rows:
            cells = [r.source, r.target]
            for key, _ in cols:
                cells.append(_fmt(r.values.get(key), signed=key.startswith(("target_gain", "source_change"))))
            cells.append(r.precision())
            cells.append(f"{self._rel(r.stage1_run)} -> {self._rel(r.stage2_run)}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def left_out_table(self) -> str:
        """The left-out runs as a Markdown table (empty string when there are none)."""
        if not self.left_out:
            return ""
        lines = ["| run | stage | precision | why |", "|---|---|---|---|"]
        for x in self.left_out:
            lines.append(f"| {self._rel(x.run)} | {x.stage if x.stage is not None else '?'} | "
                         f"{x.precision or '?'} | {x.reason} |")
        return "\n".join(lines)

    def markdown(self) -> str:
        """The whole report.md."""
        parts = [f"# dser report: {self.runs_dir}", ""]
        if self.rows:
            what = " / ".join(METRICS[m] for m in self.metrics)
            parts += [f"{what} on each pair's source and target test sets after stage 1 (S1) and "
                      f"stage 2 (S2). Target gain = S2 - S1 on the target test set; source change = "
                      f"S2 - S1 on the source test set (negative: forgetting).", "", self.table(), ""]
            if "heatmap" in self.files:
                parts += [f"![target-domain gain]({self.files['heatmap'].name})", ""]
        else:
            parts += ["No finished source -> target pair yet.", ""]
        if self.left_out:
            parts += ["## Runs not in the table", "", self.left_out_table(), ""]
        if self.provenance:
            parts += ["## Provenance", "", self.provenance_table(), ""]
        return "\n".join(parts)

    def provenance_table(self) -> str:
        """Per run in the table: dser and its commit, the libraries, the device and ranks, the
        config's hash and how many shard indexes it read (``metrics.json`` ``provenance``)."""
        lines = ["| run | dser | commit | torch | deepspeed | transformers | peft | device | ranks | config sha256 "
                 "| shard indexes |", "|" + "---|" * 11]
        for run, p in sorted(self.provenance.items(), key=lambda kv: str(kv[0])):
            if not p:
                lines.append(f"| {self._rel(run)} | not recorded (a run of an older dser) |" + " |" * 9)
                continue
            v = p.get("versions") or {}
            cells = [self._rel(run), v.get("dser"), (p.get("git_commit") or "-")[:12], v.get("torch"),
                     v.get("deepspeed"), v.get("transformers"), v.get("peft"), p.get("device"), p.get("ranks"),
                     (p.get("config_sha256") or "")[:12], len(p.get("shard_indexes") or {})]
            lines.append("| " + " | ".join("?" if c is None else str(c) for c in cells) + " |")
        return "\n".join(lines)

    def text(self) -> str:
        """What ``dser report`` prints: the table, the left-out runs, the files written."""
        parts = [self.table() if self.rows else f"no finished source -> target pair under {self.runs_dir}"]
        if self.left_out:
            parts += ["", f"runs not in the table ({len(self.left_out)}):", self.left_out_table()]
        if self.files:
            parts += ["", "wrote " + ", ".join(str(p) for p in self.files.values())]
        return "\n".join(parts)

    def _rel(self, p: Path) -> str:
        try:
            return str(Path(p).resolve().relative_to(self.runs_dir.resolve()))
        except ValueError:
            return str(p)


def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


# ------------------------------------------------------------------------------------------
# finding and reading runs
# ------------------------------------------------------------------------------------------

def _read_yaml(path: Path) -> dict | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _is_run_config(path: Path) -> bool:
    # The recipe's RUN_DIR/config.yaml is {"stage", "config"}; export/config.yaml has no "config".
    data = _read_yaml(path)
    return data is not None and "stage" in data and isinstance(data.get("config"), dict)


def find_run_dirs(runs_dir: Path) -> list[Path]:
    """Every run directory under ``runs_dir`` (itself included), outermost only, sorted."""
    runs_dir = Path(runs_dir)
    found = {p.parent for p in runs_dir.rglob("metrics.json")}
    found |= {p.parent for p in runs_dir.rglob("config.yaml") if _is_run_config(p)}
    # A run's own subdirectories (export/, best/) are not runs.
    return sorted(d for d in found if not any(o != d and o in d.parents for o in found))


def read_run(path: Path) -> Run:
    """Read one run directory; ``problem`` says why it cannot be used, if it cannot."""
    path = Path(path)
    meta = _read_yaml(path / "config.yaml") or {}
    stage = meta.get("stage")
    config = meta.get("config") or {}
    record = meta.get("precision")
    precision = record.get("name") if isinstance(record, dict) else None
    metrics_file = path / "metrics.json"
    run = RunDir(path)
    if metrics_file.is_file() and run.layout() >= LAYOUT and not run.finished_file.is_file():
        return Run(path, stage, config, None, f"no {FINISHED}: it stopped after metrics.json, before its export was "
                                              f"complete; resume it with dser train --resume {path}", precision)
    if not metrics_file.is_file():
        latest = path / "checkpoints" / "latest"
        where = f"; last checkpoint {latest.read_text().strip()} (stopped before its end? resume it with " \
                f"dser train --resume {path})" if latest.is_file() else ""
        return Run(path, stage, config, None, f"no metrics.json: failed, stopped or still running{where}", precision)
    try:
        metrics = json.loads(metrics_file.read_text())
    except (OSError, ValueError) as e:
        return Run(path, stage, config, None, f"metrics.json unreadable: {e}", precision)
    if not isinstance(metrics, dict) or not isinstance(metrics.get("eval"), dict):
        return Run(path, stage, config, None, "metrics.json has no 'eval' section", precision)
    stage = metrics.get("stage", stage)
    return Run(path, stage, metrics.get("config") or config, metrics, precision=metrics.get("precision", precision))


def _norm(p: str | os.PathLike) -> str:
    return os.path.normpath(str(p))


def _find_stage1(init_from: str, stage1_runs: list[Run], stage2_path: Path) -> Run | None:
    """The stage-1 run a stage-2 run started from.

    ``init_from`` is the path as given at training time, possibly relative to that job's
    working directory. Match it against the stage-1 runs' own recorded ``run_dir`` (when
    exactly one has it), else find it on disk (from here, or from an ancestor of the stage-2
    run: the job's working directory) and load it even when it lies outside RUNS_DIR.
    """
    recorded = [r for r in stage1_runs if _norm(r.metrics.get("run_dir", "")) == _norm(init_from)]
    if len(recorded) == 1:
        return recorded[0]
    target = Path(init_from)
    candidates = [target] if target.is_absolute() else [*(a / target for a in stage2_path.parents), target]
    for c in candidates:
        if not c.is_dir():
            continue
        for r in stage1_runs:
            if r.path.resolve() == c.resolve():
                return r
        r = read_run(c)
        if r.metrics is not None and r.stage == 1:
            return r
    return recorded[0] if recorded else None


def _value(run: Run, test_set: str | None, metric: str) -> float | None:
    if test_set is None:
        return None
    v = run.metrics["eval"].get(test_set, {}).get(metric)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def collect(runs_dir: Path) -> Report:
    """Find, read and pair the runs under ``runs_dir`` (writes nothing).

    Raises:
        ReportError: ``runs_dir`` is missing or holds no run directory.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        from dser.paths import found

        raise ReportError(f"{runs_dir}: expected the directory that holds your run directories, "
                          f"found {found(runs_dir, directory=True)}")
    runs = [read_run(d) for d in find_run_dirs(runs_dir)]
    if not runs:
        from dser.paths import found

        raise ReportError(f"{runs_dir}: no run directories (none holds metrics.json or a run config.yaml): "
                          f"found {found(runs_dir)}")

    left_out = [LeftOut(r.path, r.stage, r.problem, r.precision) for r in runs if r.problem]
    done = [r for r in runs if not r.problem]
    stage1 = [r for r in done if r.stage == 1]
    used_stage1: set[Path] = set()
    pairs: list[tuple[Run, Run, str, str]] = []
    for s2 in (r for r in done if r.stage == 2):
        init_from = s2.metrics.get("init_from") or (s2.config.get("stage2") or {}).get("init_from")
        s1 = _find_stage1(init_from, stage1, s2.path) if init_from else None
        if s1 is None:
            left_out.append(LeftOut(s2.path, 2, f"its stage-1 run {init_from} was not found or has not finished",
                                    s2.precision))
            continue
        used_stage1.add(s1.path)
        source = s1.config.get("source") or s2.config.get("source")
        target = s2.config.get("target")
        if not source or not target:
            missing = "source" if not source else "target"
            left_out.append(LeftOut(s2.path, 2, f"config key '{missing}' is not set: which test set is the "
                                                f"{missing} domain? (set {missing}: <data.test name>)", s2.precision))
            continue
        pairs.append((s1, s2, source, target))
    for r in done:
        if r.stage == 1 and r.path not in used_stage1:
            left_out.append(LeftOut(r.path, 1, "finished stage 1, but no finished stage-2 run started from it",
                                    r.precision))
        elif r.stage not in (1, 2):
            left_out.append(LeftOut(r.path, r.stage, f"stage {r.stage!r} is neither 1 nor 2", r.precision))

    evals = [m for s1, s2, _, _ in pairs for run in (s1, s2) for m in run.metrics["eval"].values()
             if isinstance(m, dict)]
    metrics = [m for m in METRICS if any(m in e for e in evals)]
    gain_metric = "ua" if "ua" in metrics else "ccc_mean" if "ccc_mean" in metrics else None

    rows = []
    for s1, s2, source, target in pairs:
        values: dict[str, float | None] = {}
        for stage, dom in CELLS:
            run, test_set = (s1, s2)[stage - 1], {"source": source, "target": target}[dom]
            for m in metrics:
                values[f"stage{stage}_{dom}_{m}"] = _value(run, test_set, m)
        if gain_metric:
            for key, dom in ((f"target_gain_{gain_metric}", "target"), (f"source_change_{gain_metric}", "source")):
                a, b = values[f"stage1_{dom}_{gain_metric}"], values[f"stage2_{dom}_{gain_metric}"]
                values[key] = b - a if a is not None and b is not None else None
        rows.append(PairRow(source, target, s1.path, s2.path, values, (s1.precision, s2.precision)))
    rows.sort(key=lambda r: (r.source, r.target, str(r.stage2_run)))
    left_out.sort(key=lambda x: str(x.run))
    provenance = {run.path: run.metrics.get("provenance") for s1, s2, _, _ in pairs for run in (s1, s2)}
    return Report(runs_dir, rows, left_out, metrics, gain_metric, provenance=provenance)


# ------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------

def write_csv(report: Report, path: Path) -> None:
    """One row per pair: source, target, every numeric column, both precisions, both run directories."""
    cols = report.columns()
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source", "target", *(k for k, _ in cols), "stage1_precision", "stage2_precision",
                    "stage1_run", "stage2_run"])
        for r in report.rows:
            nums = ["" if r.values.get(k) is None else f"{r.values[k]:.6g}" for k, _ in cols]
            w.writerow([r.source, r.target, *nums, *(p or "" for p in r.precisions), str(r.stage1_run),
                        str(r.stage2_run)])


def gain_matrix(report: Report) -> tuple[list[str], list[str], list[list[float]]]:
    """Sources, targets and the target gain per cell (mean over repeated pairs; NaN where none)."""
    sources = sorted({r.source for r in report.rows})
    targets = sorted({r.target for r in report.rows})
    key = f"target_gain_{report.gain_metric}"
    cells: dict[tuple[str, str], list[float]] = {}
    for r in report.rows:
        if r.values.get(key) is not None:
            cells.setdefault((r.source, r.target), []).append(r.values[key])
    grid = [[sum(cells[(s, t)]) / len(cells[(s, t)]) if (s, t) in cells else float("nan") for t in targets]
            for s in sources]
    return sources, targets, grid


def write_heatmap(report: Report, path: Path) -> None:
    """PNG heatmap of the target gain: rows sources, columns targets, 0 white, no pair grey."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt
    import numpy as np

    sources, targets, grid = gain_matrix(report)
    g = np.asarray(grid, dtype=float)  # (sources, targets)
    bound = float(np.nanmax(np.abs(g))) if np.isfinite(g).any() else 1.0
    bound = bound or 1.0
    fig, ax = plt.subplots(figsize=(max(5.0, 2.8 + 1.2 * len(targets)), max(3.5, 1.8 + 0.7 * len(sources))))
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="0.85")  # grey: no pair (white reads as 0)
    im = ax.imshow(np.ma.masked_invalid(g), cmap=cmap, vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(len(targets)), targets, rotation=20, ha="right")
    ax.set_yticks(range(len(sources)), sources)
    ax.set_xlabel("target corpus (stage 2)")
    ax.set_ylabel("source corpus (stage 1)")
    for i in range(len(sources)):
        for j in range(len(targets)):
            v = g[i, j]
            dark = np.isfinite(v) and abs(v) > 0.6 * bound  # white text on the saturated colours
            ax.text(j, i, f"{v:+.3f}" if np.isfinite(v) else "-", ha="center", va="center",
                    color="white" if dark else "black")
    name = METRICS[report.gain_metric]
    ax.set_title(f"Target-domain gain of stage 2 ({name})")
    fig.colorbar(im, ax=ax, label=f"S2 - S1, {name}")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_report(runs_dir: Path, out_dir: Path | None = None) -> Report:
    """Collect the runs under ``runs_dir`` and write report.md, report.csv and target_gain.png.

    Args:
        runs_dir: the directory holding run directories (any depth).
        out_dir: where to write (default: ``runs_dir``); created if missing.

    Returns:
        The :class:`Report` (rows, left-out runs, paths written in ``files``). The heatmap is
        written only when at least one pair has a gain.

    Raises:
        ReportError: ``runs_dir`` is missing or holds no run directory.
    """
    report = collect(runs_dir)
    out_dir = Path(out_dir) if out_dir is not None else Path(runs_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if report.gain_metric and any(r.values.get(f"target_gain_{report.gain_metric}") is not None
                                  for r in report.rows):
        report.files["heatmap"] = out_dir / "target_gain.png"
        write_heatmap(report, report.files["heatmap"])
    report.files["csv"] = out_dir / "report.csv"
    write_csv(report, report.files["csv"])
    report.files["markdown"] = out_dir / "report.md"
    report.files["markdown"].write_text(report.markdown())
    return report
