"""The precision decision table, with the hardware and the matmul probe injected."""

from __future__ import annotations

import pytest
import torch

from dser.precision import (Hardware, MatmulProbe, Precision, PrecisionError, decide_precision, detect_hardware,
                            keep_precision, probe_cpu_matmul)

H100 = Hardware(cuda=True, device="NVIDIA H100", cuda_bf16=True)
V100 = Hardware(cuda=True, device="Tesla V100", cuda_bf16=False)
CPU_BF16 = Hardware(cuda=False, device="AMD EPYC", cpu_capability="AVX512", cpu_avx512_bf16=True)
CPU_AMX = Hardware(cuda=False, device="Xeon", cpu_capability="AVX512", cpu_amx=True)
CPU_AVX2 = Hardware(cuda=False, device="AMD EPYC", cpu_capability="AVX2")

FAST = MatmulProbe(256, fp32_seconds=6e-4, bf16_seconds=2e-4)   # native bf16: 3x fp32
SLOW = MatmulProbe(256, fp32_seconds=6e-4, bf16_seconds=4e-2)   # emulated: ~67x slower


class Probe:
    """A probe that counts its calls."""

    def __init__(self, result: MatmulProbe):
        self.result, self.calls = result, 0

    def __call__(self) -> MatmulProbe:
        self.calls += 1
        return self.result


def no_probe() -> MatmulProbe:
    raise AssertionError("the matmul probe must not run here")


# ---- auto -------------------------------------------------------------------------------

def test_auto_on_a_gpu_with_bf16_is_bf16():
    p = decide_precision("auto", H100, no_probe)
    assert (p.name, p.warning) == ("bf16", None)
    assert p.reason == "auto: NVIDIA H100 computes bf16 natively"
    assert p.line() == "precision: bf16 (auto: NVIDIA H100 computes bf16 natively)"


def test_auto_on_a_gpu_without_bf16_is_fp16_with_loss_scaling_never_fp32():
    p = decide_precision("auto", V100, no_probe)
    assert (p.name, p.warning) == ("fp16", None)
    assert "Tesla V100 has no native bf16" in p.reason and "loss scaling" in p.reason


@pytest.mark.parametrize("hw", [CPU_BF16, CPU_AMX], ids=["avx512-bf16", "amx"])
def test_auto_on_a_cpu_with_native_bf16_confirmed_by_the_probe_is_bf16(hw):
    probe = Probe(FAST)
    p = decide_precision("auto", hw, probe)
    assert p.name == "bf16" and probe.calls == 1
    assert p.reason.startswith("auto: this CPU has native bf16 (")
    assert hw.cpu_bf16_features() in p.reason and "3.0x fp32's speed" in p.reason


def test_auto_on_a_cpu_that_reports_bf16_but_runs_it_slowly_is_fp32():
    p = decide_precision("auto", CPU_BF16, Probe(SLOW))
    assert p.name == "fp32"
    assert p.reason == "auto: bf16 matmul 67x slower than fp32 on this CPU (capability AVX512) although it " \
                       "reports AVX-512 BF16"


def test_auto_on_a_cpu_without_native_bf16_is_fp32_without_probing():
    p = decide_precision("auto", CPU_AVX2, no_probe)
    assert (p.name, p.warning) == ("fp32", None)
    assert p.line() == "precision: fp32 (auto: this CPU has no native bf16, capability AVX2)"


def test_a_bf16_probe_exactly_as_fast_as_fp32_still_picks_bf16():
    p = decide_precision("auto", CPU_BF16, Probe(MatmulProbe(256, 1e-3, 1e-3)))
    assert p.name == "bf16"  # "bf16 must not be slower"


# ---- explicit choices -------------------------------------------------------------------

@pytest.mark.parametrize("hw, requested, slow", [
    (CPU_AVX2, "bf16", True),     # ~60x slower than fp32 there
    (CPU_AVX2, "fp32", False),
    (CPU_BF16, "bf16", False),
    (CPU_BF16, "fp32", True),     # native bf16 is faster
    (H100, "fp32", True),
    (H100, "fp16", False),
    (H100, "bf16", False),
    (V100, "bf16", True),         # emulated
    (V100, "fp16", False),
    (V100, "fp32", True),
])
def test_an_explicit_precision_always_wins_and_warns_when_it_is_the_slow_choice(hw, requested, slow):
    p = decide_precision(requested, hw, Probe(FAST))
    assert (p.name, p.requested) == (requested, requested)
    assert p.reason == f"deepspeed.precision: {requested} in the run config"
    if slow:
        assert p.warning and f"precision={requested}" in p.warning and "auto would pick" in p.warning
        assert "\n" not in p.warning
    else:
        assert p.warning is None


def test_explicit_bf16_on_a_cpu_without_it_names_the_capability():
    p = decide_precision("bf16", CPU_AVX2, no_probe)
    assert "no native bf16, capability AVX2" in p.warning and "auto would pick fp32" in p.warning


def test_explicit_bf16_on_a_cpu_whose_probe_finds_it_slow_says_how_slow():
    p = decide_precision("bf16", CPU_BF16, Probe(SLOW))
    assert p.name == "bf16" and "67x slower than fp32" in p.warning


def test_fp16_on_a_cpu_is_an_error_naming_the_key():
    for hw in (CPU_AVX2, CPU_BF16):
        with pytest.raises(PrecisionError, match=r"config.deepspeed.precision: fp16 needs a GPU.*"
                                                 r"--set deepspeed.precision=auto"):
            decide_precision("fp16", hw, no_probe)


def test_an_unknown_precision_is_an_error():
    with pytest.raises(PrecisionError, match="'fp8' is not one of auto, bf16, fp16, fp32"):
        decide_precision("fp8", H100, no_probe)


# ---- resume -----------------------------------------------------------------------------

def test_resume_of_a_bf16_run_where_auto_would_now_say_fp32_keeps_bf16_and_says_so():
    started = decide_precision("auto", CPU_BF16, Probe(FAST))
    recorded = Precision.from_record(started.record(), "RUN/config.yaml")
    p = keep_precision(recorded, CPU_AVX2, no_probe)
    assert p.name == "bf16" and p.requested == "auto"
    assert p.reason == f"kept from the run's start: {started.reason}"
    assert p.warning.startswith("resuming in bf16, the precision the run started in; on this machine auto "
                                "would pick fp32 (this CPU has no native bf16, capability AVX2)")


def test_resume_of_a_gpu_bf16_run_on_a_cpu_without_bf16_goes_on_in_bf16():
    recorded = decide_precision("auto", H100, no_probe)
    p = keep_precision(recorded, CPU_AVX2, no_probe)
    assert p.name == "bf16" and "auto would pick fp32" in p.warning


def test_resume_of_an_fp32_run_on_a_bf16_machine_keeps_fp32():
    recorded = decide_precision("auto", CPU_AVX2, no_probe)
    p = keep_precision(recorded, CPU_BF16, Probe(FAST))
    assert p.name == "fp32" and "auto would pick bf16" in p.warning


def test_resume_on_the_same_kind_of_machine_says_nothing_more():
    recorded = decide_precision("auto", CPU_AVX2, no_probe)
    p = keep_precision(recorded, CPU_AVX2, no_probe)
    assert p.name == "fp32" and p.warning is None


def test_resume_of_an_fp16_run_without_a_gpu_refuses_in_one_line():
    recorded = decide_precision("auto", V100, no_probe)
    with pytest.raises(PrecisionError, match=r"this run trained in fp16 \(auto: Tesla V100 .*\), which needs a "
                                             r"GPU, and this machine has none: resume it on a GPU"):
        keep_precision(recorded, CPU_BF16, Probe(FAST))


def test_a_record_round_trips_and_a_bad_one_names_its_file():
    p = Precision("fp32", "auto: this CPU has no native bf16, capability AVX2", "auto", warning="dropped")
    back = Precision.from_record(p.record(), "x")
    assert (back.name, back.reason, back.requested, back.warning) == (p.name, p.reason, "auto", None)
    for bad in ({"name": "fp64"}, "bf16", None):
        with pytest.raises(PrecisionError, match="runs/a/config.yaml: 'precision' is not a recorded precision"):
            Precision.from_record(bad, "runs/a/config.yaml")


def test_dtype():
    assert [Precision(n, "").dtype for n in ("bf16", "fp16", "fp32")] == [torch.bfloat16, torch.float16,
                                                                         torch.float32]


# ---- the real probes --------------------------------------------------------------------

def test_detect_hardware_reads_this_machine():
    hw = detect_hardware()
    assert hw.cuda == torch.cuda.is_available()
    if not hw.cuda:
        assert hw.cpu_capability == torch.backends.cpu.get_cpu_capability()
        assert hw.cpu_avx512_bf16 == torch.cpu._is_avx512_bf16_supported()
        assert hw.device


def test_the_real_matmul_probe_times_both_precisions():
    m = probe_cpu_matmul(size=64, budget_seconds=0.05)
    assert m.size == 64 and m.fp32_seconds > 0 and m.bf16_seconds > 0
    assert m.bf16_speedup == pytest.approx(m.fp32_seconds / m.bf16_seconds)
