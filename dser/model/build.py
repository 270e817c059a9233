"""Build the SER model (backbone → adaptors → head) and account for its parameters.

Usage::

    cfg = from_dict(ModelConfig, {"backbone": {"name": "tiny-wavlm"}, "adaptors": ["lora", "weighted_sum"]})
    model = build_model(cfg, num_classes=4, task="categorical")
    out = model(audio, attention_mask)        # logits (B, 4), attributes None, pooled (B, 256)
    loss, parts = model.loss(out, batch)
    model.log_summary()                       # targeted modules + trainable / total per adaptor

    # stage 2, after loading stage-1 weights (dser.model.checkpoint_io):
    model.add_fresh_adaptors(["lora"])        # a second LoRA set, "stage2", trains beside the loaded one
    model.freeze(["lora_A.default", "lora_B.default", "head"])

    print(format_parameter_table(parameter_counts("wavlm-large", ["lora", "bottleneck"])))  # dser params

``SERModel`` knows no adaptor by name: it applies registered ones (``dser.model.adaptors.ADAPTORS``)
in the listed order, each adding its own modules and hooks, and its ``forward`` is backbone →
``readout`` (the last layer, or what an adaptor put there: ``weighted_sum``) → head. The parameter
table's groups are the registry's adaptor names. ``ModelConfig`` is defined without torch in
``dser.model.config`` (imported here too).

Which parameters train is decided here, by name, after every adaptor is applied: a parameter
trains iff it belongs to an applied adaptor (its ``pattern`` in the registry), to the head, or to
the backbone under ``full``, and no freeze pattern caught it. Everything else (the pretrained
backbone) is frozen.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from dser.config import ConfigError
from dser.model.adaptors import ADAPTORS, DEFAULT_SET, FRESH, FRESH_SET, check_adaptor_names
from dser.model.backbones import REAL_CONFIGS, TINY_PRESETS, Backbone, load_backbone
from dser.model.config import ModelConfig  # noqa: F401  (defined without torch; imported from here too)
from dser.model.head import TASKS, Head

log = logging.getLogger(__name__)


@dataclass
class ParameterRow:
    """One row of the parameter table: a group (``backbone``, ``lora``, ``lora (stage2)``, …, ``head``, ``all``)."""

    group: str
    trainable: int
    total: int


def _canonical(name: str) -> str:
    """A parameter name without peft's ``.base_layer`` (added when LoRA wraps a layer)."""
    return name.replace(".base_layer.", ".")


def _numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 partitions leave numel() == 0


def last_hidden_state(hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """What the head reads unless an adaptor replaces ``SERModel.readout``: the last layer (B, F, H)."""
    return hidden_states[-1]


class SERModel(nn.Module):
    """Backbone + adaptors + head.

    Each adaptor owns its modules: it adds them under its parameter prefix (``wsum_layers``,
    ``wgate_gates``; LoRA inside ``backbone.model``), or into the ``ModuleDict`` of sets the model
    creates for it (``Adaptor.sets``: ``bneck_adapters``, ``ia3_vectors``), and hooks them into
    the backbone. The model knows none of them by name.

    Attributes:
        backbone: the ``Backbone`` (LoRA lives inside ``backbone.model``).
        head: the ``Head``.
        readout: what turns the backbone's hidden states into the frames the head reads: the last
            layer (``last_hidden_state``) unless an adaptor sets it (``weighted_sum``).
        hook_handles: the handles of every adaptor hook.
        cfg, task, num_classes: what the model was built with.
        adaptors: applied adaptor names (``cfg.adaptors``); ``fresh_adaptors``: those added fresh in stage 2.
        targets: targeted module names per adaptor set (``lora``, ``lora (stage2)``, …).
        full_names: backbone parameter names that train under ``full`` (empty otherwise).
        frozen: parameter names frozen by ``freeze``.
    """

    def __init__(self, backbone: Backbone, cfg: ModelConfig, task: str, num_classes: int | None):
        super().__init__()
        self.cfg, self.task, self.num_classes = cfg, task, num_classes
        self.backbone = backbone
        # Set containers come before the head: the parameter order is the order of the
        # optimizer state in checkpoints, and bottleneck parameters always preceded the head's.
        for adaptor in ADAPTORS.values():
            if adaptor.sets:
                self.add_module(adaptor.sets, nn.ModuleDict())
        self.head = Head(backbone.hidden_size, cfg.head, task, num_classes)
        self.readout: Callable[[tuple[torch.Tensor, ...]], torch.Tensor] = last_hidden_state
        self.hook_handles: list = []
        self.adaptors: list[str] = []
        self.fresh_adaptors: list[str] = []
        self.targets: dict[str, list[str]] = {}
        self.full_names: frozenset[str] = frozenset()
        self.frozen: set[str] = set()

    # ---- forward and loss -----------------------------------------------------------------

    def forward(self, audio: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        """Predict emotions / attributes.

        Args:
            audio: (B, T) float, 16 kHz, padded at the end.
            attention_mask: (B, T) bool, True on real samples; None means no padding.

        Returns:
            ``logits`` (B, C) or None, ``attributes`` (B, 3) or None, ``pooled`` (B, D).
        """
        out = self.backbone(audio, attention_mask)
        hidden = self.readout(out.hidden_states)  # (B, F, H)
        return self.head(hidden, out.frame_mask)

    def loss(
        self, outputs: dict, batch: dict, class_weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss; see ``Head.loss`` (batch needs ``emotion`` and/or ``attributes``)."""
        return self.head.loss(outputs, batch, class_weights)

    # ---- adaptors -------------------------------------------------------------------------

    def module_name(self, module: nn.Module) -> str:
        """The name of a submodule in this model (for logging what an adaptor targeted)."""
        for name, m in self.named_modules():
            if m is module:
                return name
        raise KeyError(f"{type(module).__name__} is not a submodule of the model")

    def apply_adaptor(self, name: str, set_name: str = DEFAULT_SET) -> list[str]:
        """Apply a registered adaptor and update which parameters train.

        Args:
            name: a ``dser.model.adaptors.ADAPTORS`` key.
            set_name: ``default``, or ``stage2`` for a fresh set.

        Returns:
            The targeted module names (also kept in ``targets``).
        """
        adaptor = ADAPTORS[name]
        cfg = getattr(self.cfg, adaptor.name) if adaptor.config else None  # its section model.<name>
        targets = adaptor.apply(self, cfg, set_name)
        self.targets[adaptor.group(set_name)] = targets
        self.refresh_trainable()
        return targets

    def add_fresh_adaptors(self, names: list[str]) -> None:
        """Stage 2: add a second, freshly initialised set (``stage2``) of each named adaptor.

        The fresh sets train; ``freeze`` never touches them. Call after loading the stage-1 weights.

        Raises:
            ConfigError: an adaptor that cannot be added fresh, or one added twice.
        """
        for name in names:
            if name not in FRESH:
                raise ConfigError(
                    f"stage2.fresh_adaptors: {name!r} cannot be added fresh; choose from {', '.join(FRESH)}"
                )
            if name in self.fresh_adaptors:
                raise ConfigError(f"stage2.fresh_adaptors lists {name!r} twice")
            self.apply_adaptor(name, FRESH_SET)
            self.fresh_adaptors.append(name)

    def parameter_group(self, name: str) -> str:
        """A parameter's group: an adaptor set (``lora``, ``bottleneck (stage2)``, …), ``head`` or ``backbone``."""
        if name.startswith("head."):
            return "head"
        for adaptor in ADAPTORS.values():
            match = re.search(adaptor.pattern, name) if adaptor.pattern else None
            if match:
                return adaptor.group(match.groupdict().get("set") or DEFAULT_SET)
        return "backbone"

    def is_adaptor_param(self, name: str) -> bool:
        """Whether a parameter is trainable by design (adaptor, head, or backbone under ``full``).

        These are what ``save_adaptors`` stores, frozen ones included (a frozen stage-1 set is
        still part of a stage-2 model).
        """
        return self.parameter_group(name) != "backbone" or _canonical(name) in self.full_names

    def is_fresh_param(self, name: str) -> bool:
        """Whether a parameter belongs to a fresh stage-2 set."""
        return self.parameter_group(name).endswith(f"({FRESH_SET})")

    def refresh_trainable(self) -> None:
        """Set ``requires_grad``: adaptor / head / full parameters train unless frozen; the rest is frozen."""
        for name, p in self.named_parameters():
            p.requires_grad_(self.is_adaptor_param(name) and name not in self.frozen)

    def freeze(self, patterns: list[str], where: str = "stage2.freeze") -> list[str]:
        """Freeze the trainable parameters whose names match any of ``patterns`` (``re.search``).

        Fresh stage-2 sets are never frozen: adding them is how stage 2 trains something new.

        Args:
            patterns: regular expressions or plain substrings, e.g. ``lora_A``, ``bneck_``, ``wgate_``, ``head``.
            where: the config key the patterns came from (for error messages).

        Returns:
            The names frozen by this call.

        Raises:
            ConfigError: an invalid expression, or one matching no trainable parameter (a typo
                would otherwise silently freeze nothing).
        """
        candidates = [n for n, _ in self.named_parameters() if self.is_adaptor_param(n) and not self.is_fresh_param(n)]
        newly: list[str] = []
        for pattern in patterns:
            try:
                regex = re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{where}: {pattern!r} is not a valid regular expression ({e})") from e
            hits = [n for n in candidates if regex.search(n)]
            if not hits:
                groups = sorted({self.parameter_group(n) for n in candidates})
                raise ConfigError(
                    f"{where}: {pattern!r} matches no trainable parameter; the model trains {', '.join(groups)} "
                    f"(e.g. {', '.join(candidates[:3])})"
                )
            newly += [n for n in hits if n not in self.frozen]
            self.frozen.update(hits)
        self.refresh_trainable()
        return newly

    # ---- accounting -----------------------------------------------------------------------

    def parameter_table(self) -> list[ParameterRow]:
        """Trainable / total parameters per group, then an ``all`` row (the whole model)."""
        order = ["backbone"]
        for adaptor in ADAPTORS.values():
            order += [adaptor.group(), adaptor.group(FRESH_SET)]
        order.append("head")
        counts: dict[str, list[int]] = {}
        for name, p in self.named_parameters():
            row = counts.setdefault(self.parameter_group(name), [0, 0])
            row[0] += _numel(p) if p.requires_grad else 0
            row[1] += _numel(p)
        rows = [ParameterRow(g, *counts[g]) for g in order if g in counts]
        rows.append(ParameterRow("all", sum(r.trainable for r in rows), sum(r.total for r in rows)))
        return rows

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        """``parameter_table`` as plain data (for metrics.json): group → {trainable, total}, plus ``all``."""
        return {r.group: {"trainable": r.trainable, "total": r.total} for r in self.parameter_table()}

    def log_summary(self, print_fn: Callable[[str], None] = log.info) -> None:
        """Report the adaptors, the modules each targeted, and the parameter table."""
        fresh = f" + fresh {', '.join(self.fresh_adaptors)}" if self.fresh_adaptors else ""
        print_fn(f"model: {self.backbone.family} backbone ({self.backbone.num_layers} layers, hidden "
                 f"{self.backbone.hidden_size}), adaptors {', '.join(self.adaptors)}{fresh}, task {self.task}")
        for key, names in self.targets.items():
            if key == "none":
                print_fn("none: the backbone is frozen; only the head trains")
                continue
            print_fn(f"{key}: {len(names)} targeted")
            for line in summarize_module_names(names):
                print_fn(f"  {line}")
        if self.frozen:
            print_fn(f"frozen by pattern: {len(self.frozen)} parameters")
        print_fn(format_parameter_table(self.parameter_table()))


def summarize_module_names(names: list[str]) -> list[str]:
    """Collapse per-layer module names: ``….layers.{0-11}.attention.q_proj`` instead of 12 lines."""
    templates: dict[str, list[int]] = {}
    for name in names:
        match = re.search(r"(?:^|\.)layers\.(\d+)(?=\.|$)", name)
        if match is None:
            templates.setdefault(name, [])
            continue
        start, end = match.span(1)
        templates.setdefault(name[:start] + "{}" + name[end:], []).append(int(match.group(1)))
    lines = []
    for template, layers in templates.items():
        if not layers:
            lines.append(template)
            continue
        layers = sorted(set(layers))
        contiguous = layers == list(range(layers[0], layers[-1] + 1))
        span = f"{layers[0]}-{layers[-1]}" if contiguous and len(layers) > 1 else ",".join(map(str, layers))
        lines.append(template.replace("{}", "{" + span + "}"))
    return lines


def format_parameter_table(rows: list[ParameterRow]) -> str:
    """A fixed-width text table of ``ParameterRow`` s; percentages are of the last row (``all``)."""
    model_total = max(rows[-1].total, 1) if rows else 1
    width = max([len(r.group) for r in rows] + [5]) + 2
    lines = [f"{'group':<{width}}{'trainable':>14}{'total':>14}{'% of model':>12}"]
    for r in rows:
        lines.append(f"{r.group:<{width}}{r.trainable:>14,}{r.total:>14,}{100 * r.trainable / model_total:>11.3f}%")
    return "\n".join(lines)


def build_model(cfg: ModelConfig, num_classes: int | None = None, task: str = "categorical") -> SERModel:
    """Load the backbone, apply the adaptors in order, add the head, and set what trains.

    Args:
        cfg: the model config.
        num_classes: emotion classes of the label set (categorical / both); None for dimensional.
        task: ``categorical``, ``dimensional`` or ``both``.

    Returns:
        The ``SERModel`` in train mode; new parts are initialised from the global torch RNG
        (seed it for the same weights on every rank), the backbone from its checkpoint or seed.

    Raises:
        ConfigError: a bad adaptor setting or freeze pattern; ``BackboneError`` for a bad backbone.
    """
    if task not in TASKS:
        raise ConfigError(f"task {task!r} is not one of {', '.join(TASKS)}")
    try:
        check_adaptor_names(cfg.adaptors)  # again: a ModelConfig may have been edited after construction
    except ValueError as e:
        raise ConfigError(f"model.adaptors: {e}") from e
    model = SERModel(load_backbone(cfg.backbone), cfg, task, num_classes)
    # "full" goes first: it reads which backbone parameters the backbone left trainable, and
    # applying any other adaptor resets those flags (refresh_trainable). sorted() is stable.
    for name in sorted(cfg.adaptors, key=lambda a: a != "full"):
        model.apply_adaptor(name)
    model.adaptors = list(cfg.adaptors)
    if cfg.freeze:
        model.freeze(cfg.freeze, where="model.freeze")
    model.refresh_trainable()
    return model


def parameter_counts(
    backbone_config: str,
    adaptors: list[str],
    num_classes: int = 4,
    task: str = "categorical",
    model_cfg: ModelConfig | None = None,
) -> list[ParameterRow]:
    """Trainable / total parameters of an architecture with the given adaptors (``dser params``).

    The model is built on the ``meta`` device: real shapes, no memory, no weights, no download,
    so even WavLM Large takes a fraction of a second.

    Args:
        backbone_config: a real architecture (``REAL_CONFIGS``: wavlm-base-plus, wavlm-large,
            hubert-large) or a tiny preset (``tiny-wavlm`` …).
        adaptors: adaptor names, e.g. ``["lora", "bottleneck"]``.
        num_classes: emotion classes of the head (categorical / both).
        task: ``categorical``, ``dimensional`` or ``both``.
        model_cfg: other adaptor / head settings (its backbone name and adaptors are replaced).

    Returns:
        ``ParameterRow`` s per group and a final ``all`` row; print with ``format_parameter_table``.

    Raises:
        ConfigError: an unknown architecture or adaptor.
    """
    if backbone_config in REAL_CONFIGS:
        name = f"random:{backbone_config}"
    elif backbone_config in TINY_PRESETS:
        name = backbone_config
    else:
        raise ConfigError(
            f"--backbone-config {backbone_config!r} is not a known architecture; choose from "
            f"{', '.join([*REAL_CONFIGS, *TINY_PRESETS])}"
        )
    base = model_cfg or ModelConfig()
    try:
        cfg = dataclasses.replace(base, backbone=dataclasses.replace(base.backbone, name=name),
                                  adaptors=list(adaptors), freeze=[])
    except ValueError as e:
        raise ConfigError(f"--adaptors: {e}") from e
    with torch.device("meta"):
        model = build_model(cfg, num_classes=num_classes if task != "dimensional" else None, task=task)
    return model.parameter_table()
