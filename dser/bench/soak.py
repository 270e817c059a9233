"""Section 6, soak: resident memory (VmRSS) of each rank over a long tiny-model run of the recipe
(2,000 steps in a full run, evaluating and checkpointing on the way): its growth after warm-up,
so a leak shows as a ratio above 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from dser.bench.console import gib, text_table
from dser.bench.sizes import PEFT_COMBINATION, BenchError, BenchSizes
from dser.bench.training import tensorboard_scalars, train_run

NAME = "soak"
# The numbers this section writes that goals and readers refer to (dotted, from the results' top).
MEASURES = ("soak.rss_growth", "soak.rss_end_growth", "soak.samples_per_s")


def _step_times(run_dir: Path) -> list[tuple[int, float]]:
    """(step, wall time) of every ``train/loss`` event, in step order."""
    return sorted((e.step, e.wall_time) for e in tensorboard_scalars(run_dir, "train/loss"))


def bench_soak(work: Path, sizes: BenchSizes, ranks: int, log: Callable[[str], None]) -> dict:
    """A long tiny-model run (evaluating and checkpointing on the way): resident memory of
    each rank after warm-up, at the end and at its highest, so a leak shows as growth.

    Returns:
        Per rank ``rss_after_warmup_bytes_per_rank``, ``rss_max_after_warmup_bytes_per_rank``,
        ``rss_end_bytes_per_rank``, ``rss_growth_per_rank`` (highest / after warm-up) and
        ``rss_bytes_by_step_per_rank`` (about 20 ``[step, bytes]`` readings); over the ranks
        ``rss_growth`` and ``rss_end_growth`` (the worse rank's); and the run's settings.
    """
    steps, warmup = sizes.soak_steps, sizes.soak_warmup_steps
    overrides = [f"model.backbone.name={sizes.soak_backbone}", f"optim.max_steps={steps}",
                 f"train.log_every={max(1, steps // 100)}", f"train.eval_every={max(1, steps // 4)}",
                 f"train.save_every={max(1, steps // 4)}", "train.keep_last=1"]
    run = train_run(work, sizes, "soak", overrides, ranks, log, warmup_steps=warmup)
    series = run.pop("rss_series_per_rank")
    # TensorBoard's wall times date the warm-up and the steps of the memory readings.
    times = _step_times(work / "runs" / "soak")
    after_warmup = [t for step, t in times if step >= warmup]
    if not after_warmup:
        raise BenchError(f"soak: no train/loss scalar at or after step {warmup}")
    t0 = after_warmup[0]
    at_warmup, at_end, highest, by_step = [], [], [], []
    for readings in series:
        by_step.append([[step, next((b for t, b in readings if t >= when), readings[-1][1])]
                        for step, when in times[:: max(1, len(times) // 20)]])
        after = [b for t, b in readings if t >= t0]
        if len(after) < 2:
            raise BenchError(f"soak: too few memory readings after step {warmup} ({len(after)})")
        at_warmup.append(after[0])
        at_end.append(after[-1])
        highest.append(max(after))
    growth = [h / w for h, w in zip(highest, at_warmup)]
    result = {"backbone": sizes.soak_backbone, "adaptors": PEFT_COMBINATION, "steps": steps, "warmup_steps": warmup,
              "ranks": ranks, "rss_after_warmup_bytes_per_rank": at_warmup, "rss_end_bytes_per_rank": at_end,
              "rss_max_after_warmup_bytes_per_rank": highest,
              "rss_growth_per_rank": growth, "rss_growth": max(growth),
              "rss_end_growth": max(e / w for e, w in zip(at_end, at_warmup)),
              "samples_per_s": run["samples_per_s"], "wall_seconds": run["wall_seconds"],
              "precision": run["precision"],
              "readings_per_rank": min(len(r) for r in series),
              "rss_bytes_by_step_per_rank": by_step}
    log(f"  soak: RSS {gib(max(at_warmup))} after step {warmup}, at most {gib(max(highest))} after it, "
        f"{gib(max(at_end))} at step {steps} (growth {result['rss_growth']:.3f}x)")
    return result


def table(result: dict) -> list[str]:
    """The section's console table."""
    rows = [[f"rank {r}", gib(w), gib(h), gib(e), f"{h / w:.3f}x"]
            for r, (w, h, e) in enumerate(zip(result["rss_after_warmup_bytes_per_rank"],
                                              result["rss_max_after_warmup_bytes_per_rank"],
                                              result["rss_end_bytes_per_rank"]))]
    return text_table(f"6. soak: {result['backbone']}, {result['steps']} steps ({result['warmup_steps']} warm-up), "
                      f"{result['precision']}, resident memory per rank",
                      ["rank", "after warm-up", "highest after", "at the end", "growth"], rows)
