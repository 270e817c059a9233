"""The process group and what ranks share through it, for the recipe (``dser.train``).

``init_process_group`` starts it (DeepSpeed's, with one timeout on every group); ``rank0_print``
and ``broadcast`` give rank 0's line and value; ``dead_peers`` names the ranks on this host whose
process is gone when a collective fails; ``gathered_call`` runs a function with the full
adaptor and head weights (ZeRO-3 partitions them).

Usage::

    init_process_group(deepspeed, dt.timedelta(minutes=30))
    peers = [None] * dist.get_world_size()
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    stamp = broadcast(dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    ...
    dead = dead_peers(peers)            # after a failed collective: [(rank, host, pid), …]
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from pathlib import Path

import torch.distributed as dist


def rank0_print(*a) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


def broadcast(obj):
    """Rank 0's value of ``obj`` on every rank."""
    box = [obj]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def init_process_group(deepspeed, timeout: dt.timedelta) -> None:
    """``deepspeed.init_distributed`` with ``timeout`` on every process group, and without
    DeepSpeed's CPU shared-memory all-reduce.

    The timeout bounds how long the others wait for a rank that hangs (a rank that dies
    closes its connections, and the next collective fails at once). init_distributed's own
    timeout covers only the default group; DeepSpeed's groups (ZeRO's data-parallel group
    reduces the gradient norm) come from ``new_group()``, which takes torch's module default
    (30 min), so that default is set first.

    DeepSpeed's CPU backend builds a shared-memory all-reduce (for inference) at start-up and
    never unlinks its buffers: every run left 66 MB per rank in /dev/shm, under names that
    carry the rendezvous port, until a few hundred runs had filled the memory. Training
    reduces through torch.distributed and never uses it, so it is not built.
    """
    import deepspeed.ops
    import torch.distributed.distributed_c10d as c10d

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), dt.timedelta):
        c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(timeout=timeout)


def dead_peers(peers: list[tuple[str, int]]) -> list[tuple[int, str, int]]:
    """(rank, host, pid) of the ranks on this host whose process is gone."""
    here = socket.gethostname()
    dead = []
    for r, (host, pid) in enumerate(peers):
        if host == here and pid != os.getpid():
            try:
                # A killed rank stays a zombie until its launcher reaps it: state Z is gone too.
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, IndexError):
                state = "gone"
            except OSError:
                continue
            if state in ("gone", "Z", "X"):
                dead.append((r, host, pid))
    return dead


def gathered_call(deepspeed, model, zero3: bool, rank: int, fn, modify: bool = False) -> None:
    """Run ``fn`` with the full adaptor and head weights: on rank 0 to read them, on every
    rank (ZeRO 0-2) or rank 0 then broadcast (ZeRO-3) to change them.

    Under ZeRO-3 a partitioned parameter is empty on each rank; GatheredParameters makes the
    full tensors visible (a collective), and with ``modifier_rank`` sends rank 0's changes back.
    """
    if zero3:
        params = [p for n, p in model.named_parameters() if p.requires_grad or model.is_adaptor_param(n)]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            if rank == 0:
                fn()
    elif rank == 0 or modify:
        fn()
    if dist.is_initialized():
        dist.barrier()
