"""The bench's goals, in one table (``GOALS``): what each measured ratio or rate must reach.

``dser bench`` checks its results against it (``check_goals``, the console's ``goals`` block
and the JSON's ``goals``), and the goals part of BENCHMARKS.md is generated from it and a
results file (``goals_markdown``, ``write_goals``)::

    dser bench --out BENCHMARKS.json --write-goals BENCHMARKS.md           # after a new full run
    dser bench --results BENCHMARKS.json --write-goals BENCHMARKS.md       # after editing GOALS

``tests/unit/test_bench.py`` checks that the committed BENCHMARKS.md is what this module
generates from the committed BENCHMARKS.json, and that every goal's field is one a section
declares it measures (its ``MEASURES``).
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dser.bench.sizes import BenchError


def value_at(results: dict, dotted: str):
    """The value at a dotted path of the results (``peft.combination.peak_rss_ratio``), or None."""
    node = results
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


@dataclass(frozen=True)
class Goal:
    """One goal: a measurement, the side of a threshold it must be on, and how it is written.

    Attributes:
        field: the measurement, a dotted path into the results: ``<section>.<…>``.
        op: ``">="`` or ``"<="``.
        threshold: the number the measurement must reach.
        unit: how BENCHMARKS.md writes the target and the value: ``"x"`` (a ratio or a rate,
            ``3.43×``), ``"%"`` (a share, ``90.0 %``) or ``"bytes"``.
        digits: decimals of the measured value in BENCHMARKS.md.
        name: its label in the console's ``goals`` block and the JSON's ``goals``.
        wording: its wording in BENCHMARKS.md, as the issue put it (default: ``name``).
        detail: the figures BENCHMARKS.md gives beside the value, from the other results.
    """

    field: str
    op: str
    threshold: float
    unit: str
    digits: int
    name: str
    wording: str = ""
    detail: Callable[[dict], str] | None = None

    def __post_init__(self):
        if not self.wording:
            object.__setattr__(self, "wording", self.name)

    def met(self, value) -> bool | None:
        """Whether ``value`` reaches the goal (None: not measured)."""
        if value is None:
            return None
        return value >= self.threshold if self.op == ">=" else value <= self.threshold

    def written(self, value: float) -> str:
        """A measured value in the goal's unit, as BENCHMARKS.md writes it."""
        if self.unit == "%":
            return f"{100 * value:.{self.digits}f} %"
        if self.unit == "bytes":
            return f"{value:,.{self.digits}f} bytes"
        return f"{value:.{self.digits}f}×"

    def target(self) -> str:
        """The target as BENCHMARKS.md writes it: ``≥ 1.5×``, ``≥ 90 %``, ``0 bytes``."""
        shown = {"%": f"{100 * self.threshold:g} %", "bytes": f"{self.threshold:g} bytes"}.get(
            self.unit, f"{self.threshold:g}×")
        if self.op == "<=" and self.threshold == 0:
            return shown  # nothing is under 0: "0 bytes", not "≤ 0 bytes"
        return f"{'≥' if self.op == '>=' else '≤'} {shown}"


# ---- the figures beside a measured value in BENCHMARKS.md ------------------------------------

def _against_bf16_autocast(r: dict) -> str:
    x = value_at(r, "pipeline.speedup_vs_bf16_baseline")
    if x is None:
        return "(fp32 baseline; no bf16-autocast variant: no native bf16 here)"
    return f"(fp32 baseline); {x:.2f}× against its bf16-autocast variant"


def _peak_memory(r: dict) -> str:
    combination, full = value_at(r, "peft.combination.peak_rss_bytes"), value_at(r, "peft.full.peak_rss_bytes")
    return "" if None in (combination, full) else f"({combination / 2 ** 30:.2f} vs {full / 2 ** 30:.2f} GiB)"


def _checkpoint(r: dict) -> str:
    combination, full = value_at(r, "peft.combination.checkpoint_bytes"), value_at(r, "peft.full.checkpoint_bytes")
    return "" if None in (combination, full) else f"({combination / 2 ** 20:.1f} vs {full / 2 ** 20:.1f} MiB)"


def _padding_overall(r: dict) -> str:
    real, at_90 = (value_at(r, f"padding.cropped.dser.{k}") for k in ("real_fraction", "batches_at_least_90"))
    if None in (real, at_90):
        return "worst batch"
    return f"worst batch ({100 * real:.1f} % overall; {100 * at_90:.0f} % of batches reach 90 %)"


def _reader_rates(r: dict) -> str:
    random_access, streaming = (value_at(r, f"loading.reader.{k}.warm_x_realtime") for k in ("random_access", "streaming"))
    return "" if None in (random_access, streaming) else f"({random_access:.0f}× vs {streaming:.0f}× real time)"


def _loader_rates(r: dict) -> str:
    planned, streaming = (value_at(r, f"loading.{k}.per_worker_x_realtime") for k in ("dser", "streaming"))
    return "" if None in (planned, streaming) else f"({planned:.0f}× vs {streaming:.0f}× real time)"


def _growth_per_rank(r: dict) -> str:
    growth = value_at(r, "soak.rss_growth_per_rank")
    if not growth:
        return ""
    worst = max(range(len(growth)), key=growth.__getitem__)
    others = "; ".join(f"rank {i} {g:.3f}×" for i, g in enumerate(growth) if i != worst)
    return f"(rank {worst}" + (f"; {others})" if others else ")")


def _per_rank_balance(r: dict) -> str:
    old = value_at(r, "balance.recipe.per_rank.ranks_8.step_balance")
    return "" if old is None else f"(per-rank planning, as before: {100 * old:.1f} %)"


GOALS: tuple[Goal, ...] = (
    # Goal(field, op, threshold, unit, digits, console name, BENCHMARKS.md wording (default: the name), detail)
    Goal("pipeline.speedup", ">=", 1.5, "x", 2, "dser vs usual pipeline, audio-s/s",
         "dser vs the usual pipeline, audio-seconds/s", _against_bf16_autocast),
    Goal("peft.combination.samples_per_s_ratio", ">=", 1.3, "x", 2, "PEFT combination vs full, samples/s"),
    Goal("peft.combination.peak_rss_ratio", "<=", 0.7, "x", 2, "PEFT combination vs full, peak memory per rank",
         detail=_peak_memory),
    Goal("peft.combination.checkpoint_bytes_ratio", "<=", 0.05, "x", 3, "PEFT combination vs full, checkpoint bytes",
         detail=_checkpoint),
    Goal("loading.dser.per_worker_x_realtime", ">=", 500.0, "x", 0, "loader, x real time per worker",
         "loader, × real time per worker"),
    Goal("loading.ratio_planned_to_streaming", ">=", 0.9, "x", 2,
         "global plan vs streaming loader, per worker, warm cache",
         "training loader: global plan + random access vs streaming (the loader before), × real time per worker (warm cache)",
         _loader_rates),
    Goal("loading.reader.ratio_random_to_streaming_warm", ">=", 0.9, "x", 2,
         "random access vs streaming reader, per worker, warm cache",
         "random access by table offsets vs streaming, × real time per worker (warm cache)",
         _reader_rates),
    Goal("padding.cropped.dser.min_batch_real_fraction", ">=", 0.9, "%", 1, "bucketing, real audio in every batch",
         "bucketing: real audio ≥ 90 % of *every* batch", _padding_overall),
    Goal("peft.full.front_end_saved_activation_bytes", "<=", 0, "bytes", 0, "frozen CNN keeps no activations (bytes)",
         "frozen CNN builds no graph", lambda r: "kept for backward in the CNN, even under full finetuning"),
    Goal("soak.rss_growth", "<=", 1.10, "x", 3, "resident memory after warm-up, growth",
         "resident memory flat after warm-up (2,000 steps)", _growth_per_rank),
    Goal("balance.recipe.global.ranks_8.step_balance", ">=", 0.97, "%", 1, "global plan, step balance at 8 ranks",
         "global batch plan: a step's 8 ranks average ≥ 97 % of its slowest's padded seconds (15 s crops, 160 s cap)",
         _per_rank_balance),
)


def check_goals(results: dict) -> list[dict]:
    """Each goal with its measured value and whether it is met (None: not measured)."""
    out = []
    for g in GOALS:
        value = value_at(results, g.field)
        out.append({"goal": g.name, "field": g.field, "target": f"{g.op} {g.threshold:g}", "value": value,
                    "met": g.met(value)})
    return out


# ---- BENCHMARKS.md's goals part ---------------------------------------------------------------

BEGIN = "<!-- goals: generated by dser bench --write-goals from GOALS in dser/bench/goals.py; do not edit by hand -->"
END = "<!-- end of the generated goals -->"


def goals_markdown(results: dict, source: str | None = None, goals: tuple[Goal, ...] = GOALS) -> str:
    """The goals part of BENCHMARKS.md: the table of goals with what ``results`` measured.

    Args:
        results: a ``dser bench`` results dict (``run_bench``'s, or a ``--out`` file read back).
        source: the file the results are in, named in the text (None: not written to one).
        goals: the table to write (``GOALS``).

    Returns:
        Markdown from the ``BEGIN`` line to the ``END`` line, with a final newline.
    """
    run = f"`{results.get('command', 'dser bench')}`" + (f", started {results['started']}"
                                                        if results.get("started") else "")
    about = ("The goals are one table, `GOALS` in `dser/bench/goals.py`: `dser bench` checks every run against it, "
             f"and this section is generated from it and the results of a run, here {run}"
             + (f" (`{source}`)." if source else ".")
             + " After a full run `dser bench --out BENCHMARKS.json --write-goals BENCHMARKS.md` rewrites it; after "
             "an edit of the table, `dser bench --results BENCHMARKS.json --write-goals BENCHMARKS.md`.")
    lines = [BEGIN, "## Goals", "", *textwrap.wrap(about, 100, break_on_hyphens=False), "",
             "| goal (from the issue) | target | measured | met | result field |", "|---|---|---|---|---|"]
    for g in goals:
        value = value_at(results, g.field)
        if value is None:
            measured, met = "not measured", "-"
        else:
            detail = g.detail(results) if g.detail else ""
            measured = f"**{g.written(value)}**" + (f" {detail}" if detail else "")
            met = "yes" if g.met(value) else "**no**"
        lines.append(f"| {g.wording} | {g.target()} | {measured} | {met} | `{g.field}` |")
    return "\n".join([*lines, END]) + "\n"


def read_results(path: Path) -> dict:
    """A results file (``dser bench --out``) read back.

    Raises:
        BenchError: the file is missing or not a JSON object.
    """
    try:
        results = json.loads(Path(path).read_text())
    except OSError as e:
        raise BenchError(f"--results {path}: cannot read it ({e.strerror}); give a file dser bench --out wrote") \
            from None
    except json.JSONDecodeError as e:
        raise BenchError(f"--results {path}: not JSON ({e.msg}, line {e.lineno}); give a file dser bench --out "
                         "wrote") from None
    if not isinstance(results, dict):
        raise BenchError(f"--results {path}: expected a JSON object of bench results, found {type(results).__name__}")
    return results


def _goals_span(markdown: str) -> tuple[int, int]:
    """Where the goals part is: from the start of its ``BEGIN`` line to past its ``END`` line.

    Raises:
        BenchError: the text has no goals part (or only one of its two lines).
    """
    begin, end = markdown.find(BEGIN), markdown.find(END)
    if begin < 0 or end < begin:
        raise BenchError(f"no generated goals part to replace: the file needs a line {BEGIN!r} and, after it, "
                         f"a line {END!r}")
    end += len(END)
    return begin, end + 1 if markdown[end: end + 1] == "\n" else end


def with_goals(markdown: str, results: dict, source: str | None = None) -> str:
    """``markdown`` with its goals part (from the ``BEGIN`` line to the ``END`` line) generated
    anew from ``results``; the rest is kept as it is.

    Raises:
        BenchError: the text has no goals part.
    """
    begin, end = _goals_span(markdown)
    return markdown[:begin] + goals_markdown(results, source) + markdown[end:]


def check_goals_file(path: Path) -> None:
    """Fail now, before a long run, if ``write_goals(path, …)`` would fail.

    Raises:
        BenchError: the file exists and has no goals part, or is not readable text.
    """
    path = Path(path)
    try:
        if path.exists():
            _goals_span(path.read_text())
    except (BenchError, OSError, UnicodeDecodeError) as e:
        raise BenchError(f"--write-goals {path}: {e}") from None


def write_goals(path: Path, results: dict, source: str | None = None) -> None:
    """Rewrite the goals part of a markdown file (BENCHMARKS.md) from ``results`` (read from the
    file ``source``, when they were); a file that does not exist yet gets the goals part alone.

    Raises:
        BenchError: the file exists and has no goals part to replace.
    """
    check_goals_file(path)
    path = Path(path)
    path.write_text(with_goals(path.read_text(), results, source) if path.exists()
                    else goals_markdown(results, source))
