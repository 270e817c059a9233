"""DataLoader workers' lifetime: started from a forkserver, ended with their rank.

``dser.data.make_loader`` passes ``worker_context()`` as the DataLoader's
``multiprocessing_context`` and ``end_with_rank`` (bound to the rank's pid) as its
``worker_init_fn``. Why a forkserver and not a fork of the rank, why a worker watches the rank's
pidfd, and why USR1 and TERM are blocked (only the rank's own SIGTERM ends a worker): see
``worker_context`` and ``end_with_rank``.

Usage::

    DataLoader(dataset, num_workers=2, multiprocessing_context=worker_context(),
               worker_init_fn=partial(end_with_rank, os.getpid()))
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import select
import signal
import threading
import time


# What a rank stops on with a checkpoint (dser.train); the loader's helper processes block them.
STOP_SIGNALS = frozenset({signal.SIGUSR1, signal.SIGTERM})


def worker_context() -> multiprocessing.context.BaseContext:
    """How DataLoader workers start: forked from a forkserver, never from the rank itself.

    A rank is a threaded process by the time it evaluates (gloo's transport threads, the
    TensorBoard writer's thread on rank 0, CUDA's), and a fork copies only the calling thread:
    a lock another thread held at that moment stays held in the child for ever. A forked worker
    also inherits every open descriptor, the rendezvous store's listening socket among them: a
    worker that hung that way outlived its killed rank and held the job's rendezvous port, so the
    requeued job failed with EADDRINUSE on every restart. The forkserver is a fresh,
    single-threaded interpreter (started once per process, ~1 s, with ``dser.data`` and torch
    imported); each worker is a fork of it, and the dataset reaches it pickled.

    Slurm signals every process of a job step: ``--signal=USR1@…`` and ``scancel --signal``
    reach the workers, the forkserver and multiprocessing's resource tracker too, and SIGTERM
    comes before the kill. The rank checkpoints on those; the others must live on until it has
    (forked workers inherited the rank's handler; a fresh interpreter has the default: death).
    So the server and the tracker start with them blocked, a mask that their forks, the workers,
    inherit; blocked, not ignored, so a signal to the rank meanwhile waits for it and is not lost.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["dser.data"])  # no effect once the server runs: it has them
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        multiprocessing.resource_tracker.ensure_running()  # no-ops while they run
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # the tracker's start unblocked SIGTERM
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return ctx


def end_with_rank(rank_pid: int, _worker_id: int) -> None:
    """``worker_init_fn``: the worker lives exactly as long as the rank that made it.

    torch's own watchdog ends a worker whose *parent* changed, and a worker's parent is now the
    forkserver, which outlives a killed rank for as long as any of its workers runs (each holds
    the server's keep-alive pipe): without a watch on the rank itself, SIGKILL of a rank left its
    workers and the server waiting for ever, holding the job's output pipe.

    The stop signals arrive blocked (``worker_context``) and wait in a thread of their own: the
    rank's SIGTERM (multiprocessing's ``terminate()``, at its exit or the loader's shutdown) ends
    the worker as it always did; anybody else's (Slurm's, a shell's), and USR1, are dropped, so
    the worker serves its rank while the rank checkpoints.
    """
    for watch in (_wait_then_exit, _take_stop_signals):
        threading.Thread(target=watch, args=(rank_pid,), name=f"dser-{watch.__name__}", daemon=True).start()


def _take_stop_signals(rank_pid: int) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == rank_pid:
            os._exit(128 + signal.SIGTERM)


def _wait_then_exit(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)  # readable once the process has ended (Linux 5.3+)
    except OSError:  # gone already (ProcessLookupError), or no pidfds here: poll
        while _alive(pid):
            time.sleep(1.0)
    else:
        select.select([fd], [], [])
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now has the pid: ours has ended
        return False
    return True
