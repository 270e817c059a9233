"""Build the SER model: backbone → adaptors → head, and account for its parameters.

Usage::

    cfg = from_dict(ModelConfig, {"backbone": {"name": "tiny-wavlm"}, "adaptors": ["lora", "weighted_sum"]})
    model = build_model(cfg, num_classes=4, task="categorical")
    out = model(audio, attention_mask)            # {"logits": (B, 4), "attributes": None, "pooled": (B, 256)}
    loss, parts = model.loss(out, batch)
    model.log_summary()                           # targeted modules + trainable/total per adaptor

Everything outside the selected adaptors and the head is frozen (``full`` unfreezes the
backbone except its CNN front end, ``none`` trains the head alone).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from dser.config import knob
from dser.model.adaptors import ADAPTORS, FRESH, NAMES, PREFIXES
from dser.model.adaptors.bottleneck import BottleneckConfig
from dser.model.adaptors.lora import LoraConfig
from dser.model.adaptors.weight_gating import WeightGatingConfig
from dser.model.adaptors.weighted_sum import WeightedSumConfig
from dser.model.backbone import BackboneConfig, load_backbone
from dser.model.head import Head, HeadConfig, ser_loss

FEATURE_BUFFERS = ("backbone.feature_mean", "backbone.feature_std", "backbone.feature_frames")


@dataclass
class ModelConfig:
    backbone: BackboneConfig = knob(factory=BackboneConfig, help="the speech encoder")
    adaptors: list[str] = knob(["lora", "bottleneck", "weighted_sum", "weight_gating"],
                               f"adaptors to train, any combination of {', '.join(NAMES)}")
    lora: LoraConfig = knob(factory=LoraConfig, help="LoRA settings (when adaptors has lora)")
    bottleneck: BottleneckConfig = knob(factory=BottleneckConfig, help="bottleneck adapter settings")
    weighted_sum: WeightedSumConfig = knob(factory=WeightedSumConfig, help="weighted layer sum settings")
    weight_gating: WeightGatingConfig = knob(factory=WeightGatingConfig, help="weight-gating settings")
    head: HeadConfig = knob(factory=HeadConfig, help="projector, pooling, classifier / regressor")

    def __post_init__(self):
        unknown = [a for a in self.adaptors if a not in NAMES]
        if unknown:
            raise ValueError(f"unknown adaptor {unknown[0]!r}; choose from {', '.join(NAMES)}")
        if len(set(self.adaptors)) != len(self.adaptors):
            raise ValueError(f"adaptors lists one twice: {self.adaptors}")
        if ("full" in self.adaptors or "none" in self.adaptors) and len(self.adaptors) > 1 \
                and not set(self.adaptors) <= {"full", "weighted_sum"}:
            raise ValueError(f"{self.adaptors}: full and none do not combine with other adaptors "
                             f"(except full + weighted_sum)")


class SERModel(nn.Module):
    """Backbone + adaptors + head. ``forward(audio, attention_mask)`` → outputs dict."""

    def __init__(self, cfg: ModelConfig, task: str, num_classes: int | None):
        super().__init__()
        self.cfg, self.task, self.num_classes = cfg, task, num_classes
        self.backbone = load_backbone(cfg.backbone)
        self.hook_handles: list = []
        self.bneck_adapters = nn.ModuleDict()
        self.wsum_layers = None
        self.wgate_gates = None
        self.fresh: list[str] = []
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.targeted: dict[str, list[str]] = {}
        for name in cfg.adaptors:
            if name in ADAPTORS:
                self.targeted[name] = ADAPTORS[name].apply(self, getattr(cfg, name))
        if "full" in cfg.adaptors:
            front = {id(p) for p in self.backbone.front_end_parameters()} if cfg.backbone.freeze_feature_encoder else set()
            for p in self.backbone.parameters():
                if id(p) not in front:
                    p.requires_grad_(True)
            self.targeted["full"] = ["backbone (all but the frozen front end)"]
        self.head = Head(self.backbone.hidden_size, cfg.head, task, num_classes)

    # ---- forward and loss ---------------------------------------------------------------

    def forward(self, audio: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """audio (B, T) float, attention_mask (B, T) bool → logits (B, C) / attributes (B, 3)."""
        out = self.backbone(audio, attention_mask)
        if self.wsum_layers is not None:
            hidden = self.wsum_layers(out.hidden_states)  # (B, F, H)
        else:
            hidden = out.hidden_states[-1]
        return self.head(hidden, out.frame_mask)

    def loss(self, out: dict, batch: dict, class_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        return ser_loss(out, batch["emotion"], batch["attributes"], self.task,
                        self.cfg.head.attribute_loss_weight, class_weights)

    # ---- stage 2 ------------------------------------------------------------------------

    def add_fresh_adaptors(self, names: list[str]) -> None:
        """Stage 2: add a second, freshly initialised LoRA and/or bottleneck set (``stage2``)."""
        for name in names:
            if name not in FRESH:
                raise ValueError(f"stage2.fresh_adaptors: {name!r} cannot be added fresh; choose from {', '.join(FRESH)}")
            if name == "lora":
                self.targeted["lora (stage2)"] = ADAPTORS["lora"].apply(self, self.cfg.lora, adapter_name="stage2")
            else:
                self.targeted["bottleneck (stage2)"] = ADAPTORS["bottleneck"].apply(self, self.cfg.bottleneck,
                                                                                   set_name="stage2")
            self.fresh.append(name)

    def freeze(self, patterns: list[str]) -> list[str]:
        """Freeze every parameter whose name matches one of ``patterns`` (regular expressions or
        plain substrings, e.g. ``lora_A``, ``bneck_``, ``wgate_``, ``head``); returns the names.

        Raises:
            ValueError: a pattern that matches no trainable parameter (a typo would otherwise
                silently freeze nothing).
        """
        frozen = []
        for pat in patterns:
            hits = [n for n, p in self.named_parameters() if p.requires_grad and re.search(pat, n)]
            if not hits:
                raise ValueError(f"stage2.freeze: {pat!r} matches no trainable parameter")
            for n, p in self.named_parameters():
                if n in hits:
                    p.requires_grad_(False)
            frozen += hits
        return frozen

    # ---- accounting ---------------------------------------------------------------------

    def is_adaptor_param(self, name: str) -> bool:
        """Whether a parameter belongs to an adaptor or the head (what is saved and exported)."""
        return ("lora_" in name or name.startswith(("bneck_", "wsum_", "wgate_", "head."))
                or "full" in self.cfg.adaptors)

    def saved_state(self) -> dict[str, torch.Tensor]:
        """The tensors an adaptor checkpoint holds: adaptor + head parameters (all of them for
        full finetuning) and fitted feature-normalisation buffers."""
        state = self.state_dict()
        names = {n for n, _ in self.named_parameters() if self.is_adaptor_param(n)}
        names |= {n for n in FEATURE_BUFFERS if n in state}
        return {n: state[n] for n in sorted(names)}

    def _group(self, name: str) -> str:
        if "lora_" in name:
            return "lora"
        for adaptor, prefix in PREFIXES.items():
            if name.startswith(prefix):
                return adaptor
        if name.startswith("head."):
            return "head"
        return "backbone"

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        """Trainable and total parameters per group (lora, bottleneck, …, head, backbone, all)."""
        counts: dict[str, dict[str, int]] = {}
        for n, p in self.named_parameters():
            numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # ZeRO-3 partitions to 0
            g = counts.setdefault(self._group(n), {"trainable": 0, "total": 0})
            g["total"] += numel
            g["trainable"] += numel if p.requires_grad else 0
        counts["all"] = {k: sum(v[k] for v in counts.values()) for k in ("trainable", "total")}
        return counts

    def log_summary(self, print_fn=print) -> None:
        """Print the targeted modules and a trainable / total table per adaptor."""
        for name, mods in self.targeted.items():
            shown = ", ".join(mods[:6]) + (f", … ({len(mods)} in all)" if len(mods) > 6 else "")
            print_fn(f"{name}: {shown}")
        print_fn(format_parameter_table(self.parameter_counts()))


def format_parameter_table(counts: dict[str, dict[str, int]]) -> str:
    """A fixed-width table of ``parameter_counts``."""
    total = counts["all"]["total"] or 1
    lines = [f"{'part':14s}{'trainable':>14s}{'total':>14s}{'% of model':>12s}"]
    for g, c in counts.items():
        lines.append(f"{g:14s}{c['trainable']:14,d}{c['total']:14,d}{100 * c['trainable'] / total:11.3f}%")
    return "\n".join(lines)


def build_model(cfg: ModelConfig, num_classes: int | None, task: str = "categorical") -> SERModel:
    """Build backbone → adaptors → head.

    Args:
        cfg: the model config.
        num_classes: emotion classes (categorical / both), else None.
        task: ``categorical``, ``dimensional`` or ``both``.
    """
    return SERModel(cfg, task, num_classes)


def parameter_counts(backbone_config: str, adaptors: list[str], num_classes: int = 4,
                     task: str = "categorical") -> dict[str, dict[str, int]]:
    """``dser params``: trainable/total parameters of a real architecture (random weights).

    Args:
        backbone_config: a ``REAL_CONFIGS`` name (``wavlm-base-plus``, ``wavlm-large``…) or a
            tiny preset.
        adaptors: adaptor names.
    """
    from dser.model.backbone import REAL_CONFIGS

    name = f"random:{backbone_config}" if backbone_config in REAL_CONFIGS else backbone_config
    cfg = ModelConfig(backbone=BackboneConfig(name=name), adaptors=list(adaptors))
    with torch.device("meta"):
        model = build_model(cfg, num_classes, task)
    return model.parameter_counts()
