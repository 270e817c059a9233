"""The model's config sections, importable without torch: ``model.backbone``, one section per
registered adaptor, ``model.head``, and ``ModelConfig`` (the ``model:`` section) that holds them.

Checking a run config (``dser.runconfig.resolve_config``, ``dser submit --dry-run``, the Slurm
planner) imports this module and never torch, transformers or peft; the code that uses these
configs imports them from here (``backbones/base.py``, ``head.py``, ``build.py``; each adaptor's
settings are in ``adaptors/configs.py``). ``tests/unit/test_cheap_imports.py`` keeps it so.

``ModelConfig``'s adaptor sections come from the adaptor registry (``dser.model.adaptors.ADAPTORS``):
each adaptor with settings gets the section ``model.<name>`` (``model.lora``, ``model.bottleneck``,
``model.weighted_sum``, ``model.weight_gating``, ``model.ia3``), so registering an adaptor adds its
section, with its help text, and nothing here changes.
"""

from __future__ import annotations

from dataclasses import dataclass, make_dataclass
from typing import Literal

from dser.config import knob
from dser.model.adaptors import ADAPTORS, check_adaptor_names

TASKS = ("categorical", "dimensional", "both")


@dataclass
class BackboneConfig:
    """Which speech encoder to load and how it runs."""

    name: str = knob(
        "tiny-wavlm",
        "hub id (microsoft/wavlm-base-plus), local directory, tiny preset (tiny-wavlm …) or "
        "random:<architecture> (random:wavlm-large) for random weights",
    )
    freeze_feature_encoder: bool = knob(True, "freeze the CNN front end (Whisper: conv1/conv2)")
    gradient_checkpointing: bool = knob(False, "recompute each transformer layer in backward to save memory")
    layerdrop: float = knob(0.0, "probability of skipping a transformer layer in training (LayerDrop)")
    mask_time_prob: float = knob(0.0, "SpecAugment time-masking probability in training (0 = off)")
    feature_norm: Literal["utterance", "global"] = knob(
        "utterance",
        "filterbank families only: 'utterance' = the family's stock per-utterance scaling, 'global' = "
        "per-bin mean/std fitted on training audio (fit_feature_stats), keeps absolute loudness",
    )
    attn_implementation: Literal["eager", "sdpa"] = knob(
        "eager", "attention kernel: 'eager' (plain matmuls) or 'sdpa' (torch scaled_dot_product_attention)"
    )
    seed: int = knob(0, "seed for the random weights of tiny presets and random: architectures")

    def __post_init__(self):
        if self.feature_norm not in ("utterance", "global"):
            raise ValueError(f"feature_norm must be 'utterance' or 'global', got {self.feature_norm!r}")
        if self.attn_implementation not in ("eager", "sdpa"):
            raise ValueError(f"attn_implementation must be 'eager' or 'sdpa', got {self.attn_implementation!r}")
        for key in ("layerdrop", "mask_time_prob"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)!r}")


@dataclass
class HeadConfig:
    """Head settings (``model.head``)."""

    projector_dim: int = knob(256, "width D of the frame-wise projector before pooling")
    activation: Literal["none", "relu", "gelu"] = knob("none", "non-linearity after the projector (none, as s3prl)")
    pooling: Literal["mean", "attentive_stats"] = knob(
        "mean", "mean: masked mean over valid frames; attentive_stats: attention-weighted mean + std (2D wide)"
    )
    attention_dim: int = knob(128, "hidden width of the attention scorer (attentive_stats only)")
    dropout: float = knob(0.1, "dropout on the pooled vector before the classifier / regressor")
    regressor_output: Literal["sigmoid", "linear"] = knob(
        "sigmoid", "sigmoid keeps attribute predictions in [0, 1]; linear leaves them unbounded"
    )
    attribute_loss_weight: float = knob(1.0, "task both: loss = cross-entropy + this * (1 - CCC)")

    def __post_init__(self):
        if self.projector_dim < 1 or self.attention_dim < 1:
            raise ValueError("head.projector_dim and head.attention_dim must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"head.dropout must be in [0, 1), got {self.dropout}")
        if self.attribute_loss_weight < 0:
            raise ValueError(f"head.attribute_loss_weight must be >= 0, got {self.attribute_loss_weight}")


def _check_model_config(self) -> None:
    check_adaptor_names(self.adaptors)


def _model_config_class() -> type:
    """``ModelConfig``: backbone, adaptors, one section per registered adaptor, head, freeze."""
    sections = [(a.name, a.config, knob(factory=a.config, help=a.help)) for a in ADAPTORS.values() if a.config]
    fields = [
        ("backbone", BackboneConfig, knob(factory=BackboneConfig, help="the speech encoder")),
        ("adaptors", list[str], knob(
            ["lora", "bottleneck", "weighted_sum", "weight_gating"],
            f"what trains besides the head, any combination of {', '.join(ADAPTORS)} (full and none are baselines)",
        )),
        *sections,
        ("head", HeadConfig, knob(factory=HeadConfig, help="projector, pooling, classifier / regressor")),
        ("freeze", list[str], knob(
            [], "parameter-name patterns (regular expressions, e.g. lora_A, bneck_, wgate_, head) frozen after building"
        )),
    ]
    cls = make_dataclass("ModelConfig", fields, namespace={
        "__doc__": "The model section of a run config (``model:``); its adaptor sections come from the registry.",
        "__post_init__": _check_model_config,
    })
    cls.__module__ = __name__  # make_dataclass would name the dataclasses module: pickling finds it here
    return cls


ModelConfig = _model_config_class()
