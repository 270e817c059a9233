"""The adaptors' settings: one dataclass per adaptor, the ``model.<adaptor>`` section of a run config.

They live here, apart from the code that applies them, because this module imports nothing
heavy: the registry (``dser.model.adaptors``) puts each one into ``ModelConfig`` and a run config
is checked without importing torch (``dser submit --dry-run``, the Slurm planner). Each adaptor's
module imports its own class from here. Every field has help text; each class checks its values
(``from_dict`` turns a ``ValueError`` into a ``ConfigError`` naming the section).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dser.config import knob

BOTTLENECK_ACTIVATIONS = ("relu", "gelu", "silu")


@dataclass
class LoraConfig:
    """LoRA settings (``model.lora``)."""

    rank: int = knob(8, "LoRA rank r")
    alpha: float = knob(16.0, "LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)")
    dropout: float = knob(0.0, "dropout on the LoRA branch input (0.05 is common; 0 = off)")
    target_modules: list[str] | None = knob(
        None, "module names (suffixes, as peft matches them) to adapt; null = the family's attention "
        "projections (q_proj, k_proj, v_proj, out_proj; w2v-BERT: linear_q, linear_k, linear_v, linear_out)"
    )
    layers: list[int] | None = knob(None, "transformer layer indices to adapt (0-based); null = all layers")
    use_dora: bool = knob(False, "DoRA: weight-decomposed LoRA (adds a magnitude vector per adapted module)")
    use_rslora: bool = knob(False, "rank-stabilised LoRA: scale the update by alpha / sqrt(r)")

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora.rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("lora.target_modules is an empty list; give module names or null for the default")


@dataclass
class BottleneckConfig:
    """Bottleneck adapter settings (``model.bottleneck``)."""

    dim: int = knob(64, "bottleneck width (hidden → dim → hidden)")
    activation: Literal["relu", "gelu", "silu"] = knob("relu", "non-linearity between down- and up-projection")
    layers: list[int] | None = knob(None, "transformer layer indices to adapt (0-based); null = all layers")
    after_attention: bool = knob(False, "also adapt each attention block's output (not only the feed-forward's)")

    def __post_init__(self):
        if self.dim < 1:
            raise ValueError(f"bottleneck.dim must be at least 1, got {self.dim}")
        if self.activation not in BOTTLENECK_ACTIVATIONS:
            raise ValueError(f"bottleneck.activation must be one of {', '.join(BOTTLENECK_ACTIVATIONS)}, "
                             f"got {self.activation!r}")


@dataclass
class WeightedSumConfig:
    """Weighted layer sum settings (``model.weighted_sum``)."""

    layer_norm: bool = knob(False, "layer-normalise each hidden state before the sum (s3prl does not)")


@dataclass
class WeightGatingConfig:
    """Weight-gating settings (``model.weight_gating``)."""

    variant: Literal["identity", "paper"] = knob(
        "identity",
        "identity: h * 2*sigmoid(g), g = 0 at start (starts as the backbone); "
        "paper: h * sigmoid(g), g = 1 at start (the paper's code; gates start at 0.73)",
    )
    layers: list[int] | None = knob(None, "transformer layer indices to gate (0-based); null = all layers")

    def __post_init__(self):
        if self.variant not in ("identity", "paper"):
            raise ValueError(f"weight_gating.variant must be 'identity' or 'paper', got {self.variant!r}")


@dataclass
class IA3Config:
    """IA³ settings (``model.ia3``); the names follow peft's ``IA3Config``."""

    target_modules: list[str] | None = knob(
        None, "linear modules to rescale, as names (suffixes) inside a transformer layer; null = the family's "
        "key and value projections and feed-forward output layers (k_proj, v_proj, output_dense; Whisper: fc2; "
        "w2v-BERT: linear_k, linear_v and both feed-forward blocks' output_dense)"
    )
    feedforward_modules: list[str] | None = knob(
        None, "which targets are feed-forward output layers: their input (the activations) is rescaled, the "
        "others' output; null = the family's feed-forward output layers (output_dense; Whisper: fc2)"
    )
    layers: list[int] | None = knob(None, "transformer layer indices to rescale (0-based); null = all layers")

    def __post_init__(self):
        for key in ("target_modules", "feedforward_modules"):
            if getattr(self, key) is not None and not getattr(self, key):
                raise ValueError(f"ia3.{key} is an empty list; give module names or null for the default")
        if self.target_modules is not None and self.feedforward_modules is not None:
            extra = [m for m in self.feedforward_modules if m not in self.target_modules]
            if extra:
                raise ValueError(f"ia3.feedforward_modules {extra} are not in ia3.target_modules "
                                 f"{self.target_modules}; as in peft, they must be a subset")
