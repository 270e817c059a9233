"""dser/train.py with one fault injected, for the fault-injection tests.

Run under the real DeepSpeed launcher in place of dser/train.py (same arguments); the recipe
itself is unchanged, the fault is patched in from outside::

    DSER_FAULT=nan_loss:3 deepspeed --num_accelerators 2 tests/integration/faulty_train.py --stage 1 …

DSER_FAULT is one of

    nan_loss:B[,B…]     the loss of these training batches (1-based, per rank) is NaN
    nan_loss_from:B     … of every batch from B on
    nan_grad:B[,B…]     the loss stays finite but its gradients are NaN
    kill_in_save:N      SIGKILL in the N-th checkpoint save: after DeepSpeed wrote its files,
                        before dser's own state and the publishing rename
    hardware:KIND       the precision decision sees other hardware than this machine's:
                        cpu-no-bf16 (capability AVX2) or cpu-bf16 (AVX-512 BF16, bf16 matmul 3x
                        faster than fp32); training itself runs on the real CPU

and DSER_FAULT_RANK (default: every rank) picks the rank it hits.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's dser

import torch  # noqa: E402

from dser import train  # noqa: E402
from dser.model.build import SERModel  # noqa: E402

kind, _, arg = os.environ.get("DSER_FAULT", "").partition(":")
if kind not in ("", "nan_loss", "nan_loss_from", "nan_grad", "kill_in_save", "hardware"):
    raise SystemExit(f"faulty_train: unknown DSER_FAULT {kind!r}")
hits_me = os.environ.get("DSER_FAULT_RANK") in (None, os.environ.get("RANK", "0"))

if kind in ("nan_loss", "nan_loss_from", "nan_grad") and hits_me:
    batches = {int(b) for b in arg.split(",")} if kind != "nan_loss_from" else set()
    real_loss = SERModel.loss
    calls = [0]

    def loss(self, *a, **kw):
        total, parts = real_loss(self, *a, **kw)
        calls[0] += 1
        if calls[0] in batches or (kind == "nan_loss_from" and calls[0] >= int(arg)):
            if kind == "nan_grad":
                # finite value (sqrt(0) = 0), NaN gradient (0 * d sqrt(u)/du at 0 = 0 * inf)
                p = next(q for q in self.parameters() if q.requires_grad)
                total = total + 0.0 * torch.sqrt((p - p.detach()).sum())
            else:
                total = total * float("nan")
        return total, parts

    SERModel.loss = loss

elif kind == "kill_in_save" and hits_me:
    from deepspeed.runtime.engine import DeepSpeedEngine

    real_save = DeepSpeedEngine.save_checkpoint
    saves = [0]

    def save_checkpoint(self, *a, **kw):
        out = real_save(self, *a, **kw)
        saves[0] += 1
        if saves[0] == int(arg):
            print(f"faulty_train: SIGKILL in checkpoint save {saves[0]}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    DeepSpeedEngine.save_checkpoint = save_checkpoint

elif kind == "hardware" and hits_me:
    from dser import precision

    pretend = {"cpu-no-bf16": precision.Hardware(cuda=False, device="pretend CPU", cpu_capability="AVX2"),
               "cpu-bf16": precision.Hardware(cuda=False, device="pretend CPU", cpu_capability="AVX512",
                                              cpu_avx512_bf16=True)}[arg]
    train.detect_hardware = lambda: pretend
    precision.probe_cpu_matmul = lambda: precision.MatmulProbe(256, fp32_seconds=3e-4, bf16_seconds=1e-4)

if __name__ == "__main__":
    sys.exit(train.main())
