"""The whole bench: every section in order on one working directory, the machine and library
versions beside the numbers, the goals checked, and the console tables.

``run_bench`` is what ``dser bench`` calls; ``format_table`` prints its results. A section is
a module of this package (``SECTION_MODULES``) with ``NAME``, ``MEASURES`` (the fields goals may
name), its ``bench_<name>`` function and ``table(result)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import soundfile as sf
import torch

from dser import __version__
from dser.bench import balance, loading, padding, peft, pipeline, sharding, soak
from dser.bench.console import text_table
from dser.bench.goals import check_goals
from dser.bench.sizes import FULL, QUICK, BenchError, BenchSizes

FORMAT = "dser-bench/1"
# In the order they run: later sections reuse the corpora and shards earlier ones made.
SECTION_MODULES = {m.NAME: m for m in (sharding, loading, padding, peft, pipeline, soak, balance)}
SECTIONS = tuple(SECTION_MODULES)


def _measure(section: str, work: Path, sizes: BenchSizes, ranks: int, log: Callable[[str], None]) -> dict:
    """One section's results."""
    runners = {"sharding": lambda: sharding.bench_sharding(work, sizes, log),
               "loading": lambda: loading.bench_loading(work, sizes, log),
               "padding": lambda: padding.bench_padding(work, sizes, log),
               "peft": lambda: peft.bench_peft(work, sizes, ranks, log),
               "pipeline": lambda: pipeline.bench_pipeline(work, sizes, ranks, log),
               "soak": lambda: soak.bench_soak(work, sizes, ranks, log),
               "balance": lambda: balance.bench_balance(work, sizes, log)}
    return runners[section]()


def machine_info() -> dict:
    """CPU, cores, memory, GPU and load of this machine."""
    from dser.precision import cpu_model, decide_precision, detect_hardware

    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    auto = decide_precision("auto", detect_hardware())
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_bytes": memory, "platform": platform.platform(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "auto_precision": auto.name, "auto_precision_reason": auto.reason,
            "load_average": list(os.getloadavg())}


def versions() -> dict:
    """Versions of dser and of the libraries on the measured paths."""
    import deepspeed
    import peft as peft_library
    import soxr
    import transformers
    import webdataset

    return {"dser": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "peft": peft_library.__version__, "webdataset": getattr(webdataset, "__version__", "?"),
            "numpy": np.__version__, "soundfile": sf.__version__, "libsndfile": sf.__libsndfile_version__,
            "soxr": soxr.__version__}


# Written into every working directory the bench makes or takes: the bench writes, overwrites
# and removes fixed names there (corpora, shards, runs, logs), so it works only in a directory
# that is new, empty, or one an earlier bench made.
WORKDIR_MARKER = ".dser-bench"


def _working_directory(workdir: Path | None) -> Path:
    """``workdir`` made (absolute) and marked as the bench's, or a new temporary directory when
    it is None.

    Raises:
        BenchError: ``workdir`` is a file, cannot be made, or holds something while no earlier
            bench made it (no ``WORKDIR_MARKER``): the bench would overwrite or remove it.
    """
    if workdir is None:
        work = Path(tempfile.mkdtemp(prefix="dser-bench-"))
        (work / WORKDIR_MARKER).write_text("a dser bench working directory\n")
        return work
    work = Path(workdir).absolute()
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        from dser.paths import found

        raise BenchError(f"--workdir {workdir}: expected a directory for the bench's corpora, shards and runs, "
                         f"found {found(work)}")
    if work.is_dir() and not (work / WORKDIR_MARKER).is_file():
        held = sorted(p.name for p in work.iterdir())
        if held:
            raise BenchError(f"--workdir {workdir}: holds {held[0]!r}{f' and {len(held) - 1} more' if len(held) > 1 else ''}, "
                             f"which dser bench did not make (it writes and removes corpora, shards, runs and logs "
                             f"there by fixed names); give a new or empty directory, or one an earlier dser bench made")
    try:
        work.mkdir(parents=True, exist_ok=True)
        (work / WORKDIR_MARKER).write_text("a dser bench working directory: dser bench writes, overwrites and "
                                           "removes files here\n")
    except OSError as e:
        raise BenchError(f"--workdir {workdir}: cannot make it ({e.strerror}); give a writable directory") from None
    return work


def run_bench(out: Path | None = None, *, quick: bool = False, sections: Sequence[str] = SECTIONS,
              backbone: str | None = None, ranks: int = 2, workdir: Path | None = None, keep: bool = False,
              log: Callable[[str], None] = print) -> dict:
    """Run the benchmark and return (and with ``out``, write) its results.

    Args:
        out: JSON file to write (None: only return).
        quick: ``QUICK`` sizes (minutes on 2 cores) instead of ``FULL``.
        sections: which of ``SECTIONS`` to run.
        backbone: replace the training runs' backbone (e.g. ``tiny-wavlm`` for a smoke test).
        ranks: ranks of the dser training runs.
        workdir: where corpora, shards and runs go (default: a temporary directory).
        keep: keep the working directory (logs, run directories) instead of deleting it.
        log: progress lines.

    Returns:
        The results dict: ``format``, ``quick``, ``command``, ``sizes``, ``machine``,
        ``versions``, one entry per section, ``goals``, ``seconds``.

    Raises:
        BenchError: an unknown section, or a step that failed (naming its log).
    """
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise BenchError(f"unknown bench section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    sizes = QUICK if quick else FULL
    if backbone:
        sizes = replace(sizes, backbone=backbone)
    work = _working_directory(workdir)
    command = "dser bench" + (" --quick" if quick else "") + (f" --backbone {backbone}" if backbone else "") \
        + "".join(f" --only {s}" for s in sections if tuple(sections) != SECTIONS) + (f" --out {out}" if out else "")
    results: dict = {"format": FORMAT, "quick": quick, "command": command, "sizes": asdict(sizes),
                     "machine": machine_info(), "versions": versions(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    start = time.perf_counter()
    try:
        for section in SECTIONS:
            if section in sections:
                log(f"[{section}]")
                t = time.perf_counter()
                results[section] = _measure(section, work, sizes, ranks, log)
                results[section]["bench_seconds"] = time.perf_counter() - t
    finally:
        if workdir is None and not keep:
            shutil.rmtree(work, ignore_errors=True)
        elif keep:
            log(f"working directory kept: {work}")
    results["goals"] = check_goals(results)
    results["seconds"] = time.perf_counter() - start
    results["machine"]["load_average_end"] = list(os.getloadavg())
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_table(results: dict) -> str:
    """The results as fixed-width text tables, one per section, then the goals."""
    m, v = results["machine"], results["versions"]
    lines = [f"dser bench{' --quick' if results.get('quick') else ''}: {m['cpu']}, {m['cores']} cores; "
             f"torch {v['torch']}, deepspeed {v['deepspeed']}, transformers {v['transformers']}"]
    if m.get("auto_precision"):
        lines.append(f"precision auto here: {m['auto_precision']} ({m['auto_precision_reason']})")
    for name, module in SECTION_MODULES.items():
        if name in results:
            lines += module.table(results[name])
    goals = [g for g in results.get("goals", []) if g["value"] is not None]
    if goals:
        lines += text_table("goals", ["goal", "target", "measured", "met"],
                            [[g["goal"], g["target"], f"{g['value']:.3g}", "yes" if g["met"] else "NO"]
                             for g in goals])
    return "\n".join(lines)
