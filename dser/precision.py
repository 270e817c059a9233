"""Which precision a run trains in: decided once, from the hardware, and kept for the run.

``deepspeed.precision`` in a run config is ``auto``, ``bf16``, ``fp16`` or ``fp32``:

    auto on a GPU    bf16 where the GPU has it natively (``torch.cuda.is_bf16_supported``),
                     else fp16 with DeepSpeed's dynamic loss scaling; never fp32 silently
    auto on a CPU    bf16 only where it is native (AVX-512 BF16 or AMX) *and* a short matmul
                     probe finds bf16 no slower than fp32; else fp32. Without native support a
                     bf16 matmul runs ~60x slower than fp32 (0.8 vs 51 GFLOP/s measured on an
                     AVX2 EPYC), with it ~7x faster.
    bf16/fp16/fp32   always win, with a one-line warning when the choice is the slow one on
                     this hardware; fp16 on a CPU is an error.

The recipe decides on rank 0 after the process group starts and broadcasts the decision, so
ranks never disagree; the decision (name, reason, what was asked) is written to the run
directory's ``config.yaml`` and a resumed run keeps it whatever ``auto`` would say on the new
machine (``keep_precision``). The probes are plain functions (``detect_hardware``,
``probe_cpu_matmul``) so that tests inject their own hardware.

Usage::

    p = decide_precision("auto", detect_hardware())
    print(p.line())          # precision: fp32 (auto: this CPU has no native bf16, capability AVX2)
    if p.warning:
        print("warning:", p.warning)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PRECISIONS = ("bf16", "fp16", "fp32")
REQUESTS = ("auto", *PRECISIONS)


class PrecisionError(ValueError):
    """A precision this machine cannot train in (one line, naming the key and what to do)."""


@dataclass(frozen=True)
class Hardware:
    """What the decision looks at. ``detect_hardware`` reads it from torch; tests build their own.

    Attributes:
        cuda: training runs on a CUDA GPU.
        device: the GPU's name or the CPU's model name.
        cuda_bf16: the GPU computes bf16 natively (not emulated).
        cpu_capability: ``torch.backends.cpu.get_cpu_capability()`` (``AVX2``, ``AVX512``, …).
        cpu_avx512_bf16: the CPU reports AVX-512 BF16.
        cpu_amx: the CPU reports AMX tiles.
    """

    cuda: bool
    device: str = ""
    cuda_bf16: bool = False
    cpu_capability: str = ""
    cpu_avx512_bf16: bool = False
    cpu_amx: bool = False

    def cpu_bf16_features(self) -> str:
        """The CPU's bf16 features in words (``AVX-512 BF16, AMX``), empty when it has none."""
        return ", ".join(n for n, on in (("AVX-512 BF16", self.cpu_avx512_bf16), ("AMX", self.cpu_amx)) if on)


@dataclass(frozen=True)
class MatmulProbe:
    """Best single-thread-setting time of one ``size`` x ``size`` matmul in fp32 and in bf16."""

    size: int
    fp32_seconds: float
    bf16_seconds: float

    @property
    def bf16_speedup(self) -> float:
        """fp32 time / bf16 time: above 1 when bf16 is faster."""
        return self.fp32_seconds / max(self.bf16_seconds, 1e-12)

    def words(self) -> str:
        s = self.bf16_speedup
        return f"bf16 matmul {s:.1f}x fp32's speed" if s >= 1 else f"bf16 matmul {1 / s:.0f}x slower than fp32"


@dataclass(frozen=True)
class Precision:
    """The precision of a run and why.

    Attributes:
        name: ``bf16``, ``fp16`` or ``fp32``.
        reason: why, in words (``auto: this CPU has no native bf16, capability AVX2``).
        requested: what the config asked for (``auto`` or the name).
        warning: one line when the choice is the slow one here (None otherwise).
    """

    name: str
    reason: str
    requested: str = "auto"
    warning: str | None = None

    def line(self) -> str:
        """``precision: NAME (REASON)``, what every run prints at its start."""
        return f"precision: {self.name} ({self.reason})"

    def record(self) -> dict:
        """What the run directory keeps: ``name``, ``reason``, ``requested``."""
        return {"name": self.name, "reason": self.reason, "requested": self.requested}

    @classmethod
    def from_record(cls, data: object, where: str) -> "Precision":
        """The inverse of ``record``; ``where`` names the file in the error."""
        if not isinstance(data, dict) or data.get("name") not in PRECISIONS:
            raise PrecisionError(f"{where}: 'precision' is not a recorded precision ({data!r}); "
                                 f"expected name: one of {', '.join(PRECISIONS)}")
        return cls(data["name"], str(data.get("reason", "")), str(data.get("requested", data["name"])))

    @property
    def dtype(self):
        """The torch dtype of the model under this precision."""
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.name]


# ----------------------------------------------------------------------------------------
# probes
# ----------------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "CPU"


def detect_hardware() -> Hardware:
    """This machine as the decision sees it (a GPU when CUDA is available, else the CPU)."""
    import torch

    if torch.cuda.is_available():
        return Hardware(cuda=True, device=torch.cuda.get_device_name(),
                        cuda_bf16=bool(torch.cuda.is_bf16_supported(including_emulation=False)))
    # Private helpers of torch.cpu (they read cpuinfo); treat a torch without them as "no".
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return Hardware(cuda=False, device=cpu_model(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                    cpu_avx512_bf16=bool(avx512_bf16()), cpu_amx=bool(amx()))


def probe_cpu_matmul(size: int = 256, budget_seconds: float = 0.3) -> MatmulProbe:
    """Time one matmul in fp32 and bf16 with this process's thread setting: best of a few.

    A CPU can report AVX-512 BF16 and still run bf16 slowly (a kernel library restricted to
    AVX2, a hypervisor hiding the instructions from it), so the flags alone do not decide.
    At 256 x 256 the native path runs ~3x faster than fp32 and the emulated one ~30-60x
    slower; the whole probe takes milliseconds, at most about ``budget_seconds``.
    """
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)

    def best(x, y) -> float:
        x @ y  # first call: kernel selection, oneDNN primitive creation
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < 3 or (len(times) < 10 and time.perf_counter() - start < budget_seconds / 4):
            t = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t)
            if time.perf_counter() - start > budget_seconds / 2:
                break
        return min(times)

    return MatmulProbe(size, best(a, b), best(a.bfloat16(), b.bfloat16()))


# ----------------------------------------------------------------------------------------
# the decision
# ----------------------------------------------------------------------------------------

def _cpu_auto(hw: Hardware, probe: Callable[[], MatmulProbe] | None) -> tuple[str, str]:
    """(name, reason) of ``auto`` on a CPU."""
    features = hw.cpu_bf16_features()
    if not features:
        return "fp32", f"auto: this CPU has no native bf16, capability {hw.cpu_capability}"
    measured = (probe or probe_cpu_matmul)()
    if measured.bf16_speedup >= 1.0:
        return "bf16", (f"auto: this CPU has native bf16 ({features}, capability {hw.cpu_capability}; "
                        f"{measured.words()})")
    return "fp32", (f"auto: {measured.words()} on this CPU (capability {hw.cpu_capability}) "
                    f"although it reports {features}")


def check_device(name: str, cuda: bool, resumed: Precision | None = None) -> None:
    """fp16 needs a GPU: one line naming what to do when ``name`` cannot train here.

    Args:
        name: the requested or recorded precision.
        cuda: this machine trains on a GPU.
        resumed: the recorded precision of a run being resumed (changes the advice).

    Raises:
        PrecisionError: fp16 without a GPU.
    """
    if name != "fp16" or cuda:
        return
    if resumed is not None:
        raise PrecisionError(f"this run trained in fp16 ({resumed.reason}), which needs a GPU, and this machine "
                             f"has none: resume it on a GPU")
    raise PrecisionError("config.deepspeed.precision: fp16 needs a GPU and this machine has none; "
                         "use auto, bf16 or fp32 (--set deepspeed.precision=auto)")


def decide_precision(requested: str, hw: Hardware, probe: Callable[[], MatmulProbe] | None = None) -> Precision:
    """The precision a new run trains in.

    Args:
        requested: ``deepspeed.precision``: auto, bf16, fp16 or fp32.
        hw: the machine (``detect_hardware()``).
        probe: the bf16-vs-fp32 matmul probe (default ``probe_cpu_matmul``), called only on a CPU
            that reports native bf16.

    Raises:
        PrecisionError: fp16 without a GPU, or an unknown name.
    """
    if requested not in REQUESTS:
        raise PrecisionError(f"config.deepspeed.precision: {requested!r} is not one of {', '.join(REQUESTS)}")
    check_device(requested, hw.cuda)
    if hw.cuda:
        auto = "bf16" if hw.cuda_bf16 else "fp16"
        auto_reason = (f"auto: {hw.device} computes bf16 natively" if hw.cuda_bf16 else
                       f"auto: {hw.device} has no native bf16; fp16 with DeepSpeed's dynamic loss scaling")
        if requested == "auto":
            return Precision(auto, auto_reason)
        warning = None
        if requested == "fp32":
            warning = (f"deepspeed.precision=fp32 on {hw.device}: mixed precision trains several times faster "
                       f"(auto would pick {auto})")
        elif requested == "bf16" and not hw.cuda_bf16:
            warning = f"deepspeed.precision=bf16 on {hw.device}, which only emulates bf16: slow (auto would pick fp16)"
        return Precision(requested, f"deepspeed.precision: {requested} in the run config", requested, warning)

    if requested == "auto":
        name, reason = _cpu_auto(hw, probe)
        return Precision(name, reason)
    warning = None
    if requested in ("bf16", "fp32"):
        auto, auto_reason = _cpu_auto(hw, probe)
        if auto != requested:
            why = auto_reason.removeprefix("auto: ")
            warning = (f"deepspeed.precision={requested} here is the slow choice ({why}); "
                       f"auto would pick {auto}")
    return Precision(requested, f"deepspeed.precision: {requested} in the run config", requested, warning)


def keep_precision(recorded: Precision, hw: Hardware, probe: Callable[[], MatmulProbe] | None = None) -> Precision:
    """The precision of a run being resumed: the one it started in, checked against this machine.

    A run moved to hardware where ``auto`` would pick otherwise goes on in its own precision
    (its checkpoint, optimizer state and loss scale are of that precision) and says so in
    ``warning``; an fp16 run cannot go on without a GPU.

    Raises:
        PrecisionError: the run trained in fp16 and this machine has no GPU.
    """
    check_device(recorded.name, hw.cuda, resumed=recorded)
    now = decide_precision("auto", hw, probe)
    warning = None
    if now.name != recorded.name:
        warning = (f"resuming in {recorded.name}, the precision the run started in; on this machine auto would "
                   f"pick {now.name} ({now.reason.removeprefix('auto: ')})")
    return Precision(recorded.name, f"kept from the run's start: {recorded.reason}", recorded.requested, warning)

