"""Memory of the rank processes of a launched training run, read from /proc from outside.

``PeakMemory`` polls every rank's peak (``VmHWM``) and current (``VmRSS``) resident set size
while the run goes on; the peft section reports the peaks, the soak section the series.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

def _children() -> dict[int, list[int]]:
    """Parent pid → child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # The command name may hold spaces and parentheses: the ppid follows the last ")".
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _runs_script(pid: int, script: str) -> bool:
    """Whether a process is ``python [-flags] …/script …`` (not ``python -m launcher … script``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except OSError:
        return False
    program = next((a for a in args[1:] if not a.startswith("-")), "")
    return Path(program).name == script and "-m" not in args[1:args.index(program)]


def _vm_status(pid: int, field: str = "VmHWM") -> int | None:
    """A memory field of a process in bytes (``VmHWM``: peak resident set size, ``VmRSS``:
    resident now), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Polls the peak RSS (VmHWM) and the RSS now (VmRSS) of the rank processes under a
    launcher, from outside.

    A rank is a descendant process whose program is ``script`` and whose parent's is not (the
    DataLoader workers a rank forks have the rank's command line and are left out). VmHWM only
    grows, so the last reading before a rank exits is its peak up to the polling interval.
    ``rss[pid]`` is the series of ``(time.time(), bytes)`` readings.
    """

    def __init__(self, root_pid: int, script: str, interval: float = 0.2):
        self.root, self.script, self.interval = root_pid, script, interval
        self.peaks: dict[int, int] = {}
        self.rss: dict[int, list[tuple[float, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            tree = _children()
            stack, seen = [self.root], set()
            while stack:
                pid = stack.pop()
                for child in tree.get(pid, []):
                    if child in seen:
                        continue
                    seen.add(child)
                    stack.append(child)
                    if _runs_script(child, self.script) and not _runs_script(pid, self.script):
                        hwm, rss = _vm_status(child, "VmHWM"), _vm_status(child, "VmRSS")
                        if hwm is not None:
                            self.peaks[child] = max(self.peaks.get(child, 0), hwm)
                        if rss is not None:
                            self.rss.setdefault(child, []).append((time.time(), rss))
            self._stop.wait(self.interval)
