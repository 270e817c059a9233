"""Section 4, PEFT vs full: the recipe through the DeepSpeed launcher (2 CPU ranks, ZeRO-2) on
the WavLM Base+ architecture (random weights, ~94 M parameters) with adaptors full, lora and
the paper's combination lora+bottleneck+weighted_sum+weight_gating, side by side: samples/s,
peak memory per rank (VmHWM of each rank process), optimizer-state and checkpoint bytes, and
the activations autograd keeps for backward (in all and in the frozen CNN), each also as a
ratio to full.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from dser.bench.console import gib, mib, text_table
from dser.bench.sizes import CLASSES, PEFT_COMBINATION, SAMPLE_RATE, BenchSizes
from dser.bench.training import precision_label, train_run

NAME = "peft"
RUNS = {"full": ["full"], "lora": ["lora"], "combination": PEFT_COMBINATION}
# Each run's quantities as ratios to full's: ratio name -> quantity.
RATIOS = {"samples_per_s_ratio": "samples_per_s", "peak_rss_ratio": "peak_rss_bytes",
          "optimizer_state_bytes_ratio": "optimizer_state_bytes", "checkpoint_bytes_ratio": "checkpoint_bytes",
          "trainable_params_ratio": "trainable_params", "saved_activation_bytes_ratio": "saved_activation_bytes"}
# The numbers this section writes that goals and readers refer to (dotted, from the results' top).
MEASURES = tuple(f"peft.{run}.{k}" for run in RUNS
                 for k in (*RATIOS.values(), "front_end_saved_activation_bytes", *RATIOS))


def saved_activation_bytes(backbone: str, adaptors: list[str], seconds: float = 3.0, clips: int = 2,
                           backbone_options: dict | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """Bytes autograd keeps for backward in one training forward in ``dtype``, in all and in the
    CNN front end.

    Counted with ``torch.autograd.graph.saved_tensors_hooks``: every tensor saved for backward,
    once per storage, parameters left out (they exist anyway). A frozen front end that runs
    without building a graph keeps 0 bytes.

    Args:
        backbone: ``model.backbone.name`` of a waveform family (CNN front end, then ``feature_projection``).
        adaptors: ``model.adaptors``.
        seconds, clips: the batch, ``clips`` × ``seconds`` of noise.
        backbone_options: other ``model.backbone`` keys (e.g. ``freeze_feature_encoder``).
        dtype: the model's and the batch's dtype (the training runs' precision).

    Returns:
        ``{"saved_activation_bytes": int, "front_end_saved_activation_bytes": int}``.
    """
    from dser.config import from_dict
    from dser.model.build import ModelConfig, build_model

    torch.manual_seed(0)
    backbone_cfg = {"name": backbone, **(backbone_options or {})}
    model = build_model(from_dict(ModelConfig, {"backbone": backbone_cfg, "adaptors": list(adaptors)}),
                        num_classes=len(CLASSES)).to(dtype).train()
    params = {p.data_ptr() for p in model.parameters()}
    seen: set[tuple[int, int]] = set()
    where = {"front_end": False}
    totals = {"saved_activation_bytes": 0, "front_end_saved_activation_bytes": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.data_ptr() not in params and key not in seen:
            seen.add(key)
            totals["saved_activation_bytes"] += key[1]
            if where["front_end"]:
                totals["front_end_saved_activation_bytes"] += key[1]
        return t

    # The backbone runs the CNN layer by layer (not through feature_extractor's forward), so the
    # front end is everything from the model's start to the feature projection's.
    hooks = [model.register_forward_pre_hook(lambda *_: where.update(front_end=True)),
             model.backbone.hf_model.feature_projection.register_forward_pre_hook(
                 lambda *_: where.update(front_end=False))]
    audio = torch.randn(clips, int(seconds * SAMPLE_RATE), generator=torch.Generator().manual_seed(0)) * 0.1
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(audio.to(dtype), torch.ones(audio.shape, dtype=torch.bool))
    finally:
        for h in hooks:
            h.remove()
    return totals


def bench_peft(work: Path, sizes: BenchSizes, ranks: int, log: Callable[[str], None]) -> dict:
    """full, lora and the paper's combination through the recipe; ratios to full.

    Returns:
        ``backbone``, ``ranks``, ``steps``, ``warmup_steps``, ``precision``, and per run
        (``full``, ``lora``, ``combination``) what ``train_run`` measures, the ``adaptors``, the
        ``saved_activation_bytes`` counts, and ``<quantity>_ratio`` to full: ``samples_per_s``,
        ``peak_rss``, ``optimizer_state_bytes``, ``checkpoint_bytes``, ``trainable_params``,
        ``saved_activation_bytes``.
    """
    from dser.precision import Precision

    steps = sizes.warmup_steps + sizes.measured_steps
    result: dict = {"backbone": sizes.backbone, "ranks": ranks, "deepspeed": "zero2",
                    "steps": steps, "warmup_steps": sizes.warmup_steps}
    for key, adaptors in RUNS.items():
        result[key] = train_run(work, sizes, f"peft-{key}", [f"model.adaptors={json.dumps(adaptors)}",
                                                            f"train.save_every={steps}"], ranks, log)
        del result[key]["rss_series_per_rank"]
        result[key]["adaptors"] = adaptors
        # the activations kept for backward in the dtype this run trained in
        dtype = Precision(result[key]["precision"], "").dtype
        result[key].update(saved_activation_bytes(sizes.backbone, adaptors, seconds=sizes.max_seconds, dtype=dtype))
    result["precision"] = precision_label([result[k] for k in RUNS])
    full = result["full"]
    for key in RUNS:
        r = result[key]
        for ratio, quantity in RATIOS.items():
            r[ratio] = r[quantity] / full[quantity]
    return result


def table(result: dict) -> list[str]:
    """The section's console table."""
    rows = []
    for key in RUNS:
        r = result[key]
        rows.append(["+".join(r["adaptors"]), f"{r['trainable_params']:,}",
                     f"{r['samples_per_s']:.2f} ({r['samples_per_s_ratio']:.2f}x)",
                     f"{gib(r['peak_rss_bytes'])} ({r['peak_rss_ratio']:.2f}x)",
                     f"{mib(r['optimizer_state_bytes'])} ({r['optimizer_state_bytes_ratio']:.3f}x)",
                     f"{mib(r['checkpoint_bytes'])} ({r['checkpoint_bytes_ratio']:.3f}x)",
                     f"{mib(r['saved_activation_bytes'])} / {mib(r['front_end_saved_activation_bytes'])}"])
    return text_table(f"4. PEFT vs full: {result['backbone']}, {result['ranks']} ranks, ZeRO-2 {result['precision']}",
                      ["adaptors", "trainable", "samples/s", "peak RSS/rank", "optimizer state", "checkpoint",
                       "kept for backward / in CNN"], rows)
