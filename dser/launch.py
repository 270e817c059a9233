"""Start the training recipe through the real DeepSpeed launcher (what ``dser train`` does).

Users need not remember the launcher's flags: this picks a free master port, the number of
ranks (GPUs, or ``--ranks`` CPU processes), one OpenMP thread per core per rank on CPU, and
runs ``deepspeed [--num_accelerators N] --master_port P --log_level=warning dser/train.py ARGS``
(the train.py of the dser that runs this, checkout or installed).

The launcher's own lines say nothing a dser user needs: its INFO lines (the command it runs,
``Setting CUDA_VISIBLE_DEVICES``, …) are off (``--log_level=warning``), and ``LauncherOutput``
copies its stdout, which the ranks share, leaving out the hostfile warning (dser launches on this
node only) and turning "[…] exits with return code = N" into one line naming the rank. With
``verbose`` the launcher runs as it would alone, its INFO lines and all.

Usage::

    rc = launch_training(["--stage", "1"], ranks=2)
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# The recipe beside this module, in a checkout or an installed package alike: launched as a file,
# not `--module dser.train`, whose ranks would import a `dser/` in their working directory first.
TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"

# Exit statuses of a rank that stopped with a checkpoint (dser.train: 75, 128 + SIGUSR1 / SIGTERM).
STOPPED = (75, 128 + signal.SIGUSR1, 128 + signal.SIGTERM)


def free_port() -> int:
    """A TCP port nobody listens on right now (for the rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_ranks() -> int:
    """The launcher's ranks when none are asked for: this node's GPUs, or 1 on a CPU-only one."""
    import torch

    return torch.cuda.device_count() or 1


def deepspeed_executable() -> list[str]:
    """The launcher next to this Python (a venv's ``bin/deepspeed``), else the module form.

    Never a ``deepspeed`` found elsewhere on PATH: it may belong to another environment, whose
    Python would run the ranks with another dser (the launcher starts them with its own
    interpreter).
    """
    exe = Path(sys.executable).with_name("deepspeed")
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-m", "deepspeed.launcher.runner"]


def launch_command(train_args: list[str], ranks: int | None = None, master_port: int | None = None,
                   script: Path = TRAIN_SCRIPT, verbose: bool = False) -> tuple[list[str], dict]:
    """The launcher command line and environment for ``train_args``.

    Args:
        train_args: arguments for dser/train.py (``--stage 1 --config …``).
        ranks: processes on this node (default: the GPUs, or 1 on a CPU-only machine).
        master_port: rendezvous port (default: a free one).
        script: the recipe to launch.
        verbose: keep the launcher's INFO lines (its default); otherwise ``--log_level=warning``.
    """
    import torch

    env = dict(os.environ)
    gpus = torch.cuda.device_count()
    if ranks is None:
        ranks = gpus or 1
    if not gpus:
        env.setdefault("DS_ACCELERATOR", "cpu")
        # Oversubscribed OpenMP threads make CPU ranks ~10x slower (measured: 10 steps 3 s vs 0.3 s).
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    cmd = deepspeed_executable() + ["--num_accelerators", str(ranks),
                                    "--master_port", str(master_port or free_port()),
                                    *([] if verbose else ["--log_level=warning"]),
                                    str(script), *train_args]
    return cmd, env


class LauncherOutput:
    """Copies the DeepSpeed launcher's stdout (which its ranks inherit) to ours as it comes,
    leaving out the launcher's own noise.

    Lines go through whole and in order; text without a newline yet (a prompt, a ``\\r``
    progress update) goes at once, unless it begins with ``[`` and may be the launcher's log
    line still being written. Left out: the hostfile warning. Kept aside: "[…] exits with return
    code = N", the launcher's line when a rank fails, which ``summary()`` says in one line.
    """

    # DeepSpeed's log lines: "[2026-12-08 01:55:44,043] [WARNING] [runner.py:214:fetch_hostfile] …"
    HOSTFILE = re.compile(rb"^\[[^\]]*\] \[WARNING\] \[runner\.py:\d+:fetch_hostfile\] Unable to find hostfile")
    RANK_EXIT = re.compile(rb"^\[[^\]]*\] \[ERROR\] \[launch\.py:\d+:\w+\] (.*) exits with return code = (-?\d+)")

    def __init__(self, pipe, out=None):
        self.pipe = pipe
        self.out = out or sys.stdout
        self.exits: list[tuple[int | None, int]] = []  # (rank, status) of failed ranks, as the launcher saw them
        self.mid_line = False  # the last text copied did not end its line
        self.thread = threading.Thread(target=self._copy, name="launcher-output", daemon=True)
        self.thread.start()

    def _write(self, data: bytes) -> None:
        self.mid_line = not data.endswith((b"\n", b"\r"))
        buffer = getattr(self.out, "buffer", None)
        if buffer is not None:
            buffer.write(data)
            buffer.flush()
        else:
            self.out.write(data.decode(errors="replace"))
            self.out.flush()

    def _line(self, line: bytes) -> None:
        if self.HOSTFILE.match(line):
            return
        failed = self.RANK_EXIT.match(line)
        if failed:
            rank = re.search(rb"--local_rank=(\d+)", failed.group(1))
            self.exits.append((int(rank.group(1)) if rank else None, int(failed.group(2))))
            return
        self._write(line)

    def _copy(self) -> None:
        fd = self.pipe.fileno()
        held = b""  # the start of a line that may be the launcher's, until its newline
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            *lines, rest = (held + chunk).split(b"\n")
            held = b""
            for line in lines:
                self._line(line + b"\n")
            if rest.startswith(b"[") and len(rest) < 65536:
                held = rest
            elif rest:
                self._write(rest)
        if held:
            self._line(held)

    def wait(self, timeout: float = 10.0) -> None:
        """Until the pipe is drained: every process holding it has ended (at most ``timeout``
        seconds, for a straggler that keeps it open)."""
        self.thread.join(timeout)

    def summary(self, stopped: bool) -> str | None:
        """One line for the ranks the launcher saw fail, or None (none did; or the run stopped
        with a checkpoint, whose own line says so)."""
        failed = [(r, s) for r, s in self.exits if not (stopped and s in STOPPED)]
        if not failed:
            return None
        rank, status = failed[0]
        who = f"rank {rank}" if rank is not None else "a rank"
        return ("\n" if self.mid_line else "") + f"dser: {who} exited with status {status}; the DeepSpeed launcher ended the other ranks"


def launch_training(train_args: list[str], ranks: int | None = None, master_port: int | None = None,
                    verbose: bool = False, script: Path = TRAIN_SCRIPT) -> int:
    """Run the recipe under the DeepSpeed launcher; returns its exit status.

    SIGTERM and SIGUSR1 sent to this process (``timeout``, ``docker stop``, ``kill``) are passed
    to every rank, which checkpoints and stops (exit 128 + the signal's number; the DeepSpeed
    launcher itself would kill the ranks without a checkpoint, so it runs in a session of its
    own and a signal to our process group reaches only us). SIGINT goes to the launcher's whole
    process group, as a terminal would send it. A run that stopped before its end prints
    ``stopped at step N by …; resume with …`` as the last line.

    Args:
        train_args: arguments for the recipe (``--stage 1 --config …``).
        ranks: processes on this node (default: ``default_ranks()``).
        master_port: rendezvous port (default: a free one).
        verbose: the launcher's own lines as it prints them (``--verbose`` of ``dser train``);
            otherwise they are left out (``LauncherOutput``).
        script: the recipe to launch.
    """
    import psutil

    cmd, env = launch_command(train_args, ranks, master_port, script=script, verbose=verbose)
    print("+", " ".join(cmd), flush=True)
    with tempfile.TemporaryDirectory(prefix="dser-train-") as tmp:
        env["DSER_STOP_FILE"] = str(Path(tmp) / "stopped")
        # A session of its own: a signal to our process group (`timeout`, a terminal's Ctrl-C)
        # would otherwise reach the DeepSpeed launcher too, which kills the ranks' process trees
        # with no checkpoint (SIGKILL after 30 s) and exits 1, whatever the ranks were doing.
        proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                                stdout=None if verbose else subprocess.PIPE)
        output = LauncherOutput(proc.stdout) if proc.stdout is not None else None

        def forward(signum, _frame):
            if signum == signal.SIGINT:  # Ctrl-C: to the launcher's whole tree, as the terminal would
                try:
                    os.killpg(proc.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
                return
            try:
                kids = psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error:
                kids = []
            # before any rank runs there is nothing to checkpoint: then the signal goes to all
            targets = [k for k in kids if _is_rank(k)] or [*kids, proc]
            for t in targets:
                try:
                    t.send_signal(signum)
                except (psutil.Error, ProcessLookupError):
                    pass

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        try:
            rc = proc.wait()
            if output is not None:
                output.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        stopped = Path(env["DSER_STOP_FILE"])
        line = output.summary(stopped.is_file()) if output is not None and rc != 0 else None
        if line:
            print(line, flush=True)
        if rc != 0 and stopped.is_file():
            print(stopped.read_text().strip(), flush=True)  # after the launcher's own lines
    return rc


def _is_rank(process) -> bool:
    """Whether a process below the launcher is a rank: the DeepSpeed launcher gives each its
    ``--local_rank=N``, which its parent lacks (a rank's data-loader workers are forks of it,
    with its command line)."""
    def has_rank(p) -> bool:
        return any(arg.startswith("--local_rank=") for arg in p.cmdline())
    try:
        return has_rank(process) and not has_rank(process.parent())
    except Exception:  # psutil.Error: gone, or not ours to read
        return False
