"""Start the training recipe through the real DeepSpeed launcher (what ``dser train`` does).

Users need not remember the launcher's flags: this picks a free master port, the number of
ranks (GPUs, or ``--ranks`` CPU processes), one OpenMP thread per core per rank on CPU, and
runs ``deepspeed [--num_accelerators N] --master_port P dser/train.py ARGS`` (the train.py of
the dser that runs this, checkout or installed).

Usage::

    rc = launch_training(["--stage", "1"], ranks=2)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# The recipe beside this module, in a checkout or an installed package alike: launched as a file,
# not `--module dser.train`, whose ranks would import a `dser/` in their working directory first.
TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"


def free_port() -> int:
    """A TCP port nobody listens on right now (for the rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
                   script: Path = TRAIN_SCRIPT) -> tuple[list[str], dict]:
    """The launcher command line and environment for ``train_args``.

    Args:
        train_args: arguments for dser/train.py (``--stage 1 --config …``).
        ranks: processes on this node (default: the GPUs, or 1 on a CPU-only machine).
        master_port: rendezvous port (default: a free one).
        script: the recipe to launch.
    """
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
                                    str(script), *train_args]
    return cmd, env


def launch_training(train_args: list[str], ranks: int | None = None, master_port: int | None = None) -> int:
    """Run the recipe under the DeepSpeed launcher; returns its exit status.

    SIGTERM and SIGUSR1 sent to this process (``timeout``, ``docker stop``, ``kill``) are passed
    to every rank, which checkpoints and stops (exit 128 + the signal's number; the DeepSpeed
    launcher itself would kill the ranks without a checkpoint, so it runs in a session of its
    own and a signal to our process group reaches only us). SIGINT goes to the launcher's whole
    process group, as a terminal would send it. A run that stopped before its end prints
    ``stopped at step N by …; resume with …`` as the last line.
    """
    import psutil

    cmd, env = launch_command(train_args, ranks, master_port)
    print("+", " ".join(cmd), flush=True)
    with tempfile.TemporaryDirectory(prefix="dser-train-") as tmp:
        env["DSER_STOP_FILE"] = str(Path(tmp) / "stopped")
        # A session of its own: a signal to our process group (`timeout`, a terminal's Ctrl-C)
        # would otherwise reach the DeepSpeed launcher too, which kills the ranks' process trees
        # with no checkpoint (SIGKILL after 30 s) and exits 1, whatever the ranks were doing.
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)

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
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        stopped = Path(env["DSER_STOP_FILE"])
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
