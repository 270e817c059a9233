"""Shared helpers for the model tests: tiny models, generated audio, label batches, perturbations.

    from fixtures_model import audio_batch, build, finished_run, perturb, trainable
"""

from __future__ import annotations

import math

import torch

from dser.config import from_dict
from dser.model.build import ModelConfig, SERModel, build_model

SR = 16000
NUM_CLASSES = 4


def audio_batch(seconds: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two clips (tone + noise), the second 30 % shorter and zero-padded: audio (2, T), mask (2, T)."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * SR)
    t = torch.arange(n) / SR
    audio = 0.3 * torch.sin(2 * math.pi * 220.0 * t)[None].repeat(2, 1) + 0.05 * torch.randn(2, n, generator=g)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, int(0.7 * n):] = False
    return audio * mask, mask


def label_batch() -> dict:
    """Labels for ``audio_batch``: both clips have an emotion and attributes."""
    return {"emotion": torch.tensor([1, 3]), "attributes": torch.tensor([[0.2, 0.7, 0.4], [0.8, 0.3, 0.5]])}


def model_config(preset: str, adaptors: list[str], **sections) -> ModelConfig:
    """A ModelConfig for a tiny preset (strictly loaded, as a run config would be)."""
    return from_dict(ModelConfig, {"backbone": {"name": preset}, "adaptors": adaptors, **sections}, where="model")


def build(preset: str, adaptors: list[str], seed: int = 0, task: str = "categorical", **sections) -> SERModel:
    """A tiny model in eval mode (no dropout: outputs are deterministic); new parts seeded by ``seed``."""
    torch.manual_seed(seed)
    classes = NUM_CLASSES if task != "dimensional" else None
    return build_model(model_config(preset, adaptors, **sections), num_classes=classes, task=task).eval()


@torch.no_grad()
def perturb(model: SERModel, keep=lambda name: True, scale: float = 0.2, seed: int = 1) -> list[str]:
    """Add noise to the model's trainable-by-design parameters whose names pass ``keep``.

    Zero-initialised parts (LoRA B, bottleneck up-projections) become non-zero, so every
    adaptor both contributes to the output and passes gradient to its other weights.

    Returns:
        The names changed.
    """
    g = torch.Generator().manual_seed(seed)
    changed = []
    for name, p in model.named_parameters():
        if model.is_adaptor_param(name) and keep(name):
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
            changed.append(name)
    return changed


def trainable(model: SERModel) -> set[str]:
    """Names of the parameters that train (``requires_grad``)."""
    return {n for n, p in model.named_parameters() if p.requires_grad}


def outputs(model: SERModel, audio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Everything the model predicts, concatenated: (2, C + 3 + D)."""
    with torch.no_grad():
        out = model(audio, mask)
    return torch.cat([v for k in ("logits", "attributes", "pooled") if (v := out[k]) is not None], dim=-1)


def finished_run(run_dir, run_config: dict | None = None):
    """``run_dir`` as a finished run looks to ``dser evaluate`` / ``dser predict``: a trained
    (perturbed) tiny-wavlm LoRA model exported to ``run_dir/export`` with the 4-class label set."""
    from dser.labels import get_label_set
    from dser.model.checkpoint_io import export_model

    model = build("tiny-wavlm", ["lora"])
    perturb(model)
    config = run_config or {"task": "categorical", "model": {"adaptors": ["lora"]},
                            "data": {"eval_max_seconds": 30.0}}
    export_model(model, run_dir / "export", config, get_label_set("4class").to_dict())
    return run_dir
