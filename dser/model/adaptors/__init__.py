"""The adaptor registry: a name in ``model.adaptors`` → the ``Adaptor`` that owns its settings, code and parameters.

One adaptor per file. Each file has an ``apply(model, cfg, set_name) -> targeted module names``
function that adds the adaptor's modules and hooks to a ``SERModel``; its settings dataclass is
in ``configs.py`` and its parameters carry a unique prefix, matched by ``pattern``, so freezing,
saving, export and the parameter table all select by name::

    name           settings (model.<name>)  parameters                                      file
    lora           LoraConfig               .lora_A.<set>. / .lora_B.<set>. (peft's own)    lora.py
    bottleneck     BottleneckConfig         bneck_adapters.<set>.<ffn|attn><layer>.…        bottleneck.py
    weighted_sum   WeightedSumConfig        wsum_layers.weights                             weighted_sum.py
    weight_gating  WeightGatingConfig       wgate_gates.<layer>.g                           weight_gating.py
    ia3            IA3Config                ia3_vectors.<set>.<layer>.<module>.scale        ia3.py
    full, none     (none)                   no parameters: which backbone parameters train  full.py

``<set>`` is ``default`` for the adaptors a run is built with and ``stage2`` for the fresh set
stage 2 may add on top of loaded ones (``fresh``: lora, bottleneck, ia3). The model
(``dser.model.build.SERModel``) applies them in the listed order and then sets ``requires_grad``
itself: an adaptor never decides what else trains. Shared hook and layer-range helpers are in
``hooks.py``.

This module and ``configs.py`` import nothing heavy: ``ModelConfig`` (``dser.model.config``) takes
one section per registered adaptor from here, and checking a run config must not import torch.
An adaptor's code is imported when it is first applied.

Adding an adaptor (the README's architecture section has the long form; ``ia3`` followed it):

1. its settings dataclass in ``configs.py`` (help text on every field, values checked);
2. ``<name>.py`` with ``apply(model, cfg, set_name)``: modules under a unique prefix (or into
   ``model.<sets>[set_name]``), attached with the ``hooks`` helpers;
3. one ``Adaptor`` entry below: ``model.<name>`` in run configs, its parameter group, freezing,
   saving and export then follow;
4. a row in the adaptor table (``tests/unit/model/test_adaptors.py``) and a by-hand count in
   ``tests/unit/model/test_params.py``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from dser.model.adaptors.configs import BottleneckConfig, IA3Config, LoraConfig, WeightedSumConfig, WeightGatingConfig

DEFAULT_SET = "default"  # the adaptors a model is built with
FRESH_SET = "stage2"  # a second set added on top of loaded ones in stage 2


@dataclass(frozen=True)
class Adaptor:
    """A registered adaptor.

    Attributes:
        name: the name used in ``model.adaptors``; also its parameter group (``parameter_table``)
            and, when it has settings, its config section ``model.<name>``.
        code: ``"module:function"`` of ``function(model, cfg, set_name) -> list[str]``, which adds
            it to a ``SERModel`` and returns the targeted modules (imported on first use).
        config: its settings dataclass (None: it has no settings).
        help: the help text of its config section.
        pattern: regular expression (``re.search``) matching its parameter names; a named group
            ``set`` captures the set name where there can be several. None: no parameters of its own.
        sets: the ``SERModel`` attribute holding its modules as a ``ModuleDict`` by set name,
            created with the model (None: it keeps its modules elsewhere, or has none).
        fresh: whether stage 2 can add a second, fresh set of it.
        merges: it rescales or updates backbone weights, so a merged export folds it into them,
            and it adds nothing to full finetuning (which trains those weights already).
    """

    name: str
    code: str
    config: type | None = None
    help: str = ""
    pattern: str | None = None
    sets: str | None = None
    fresh: bool = False
    merges: bool = False

    def apply(self, model, cfg, set_name: str = DEFAULT_SET) -> list[str]:
        """Add this adaptor (set ``set_name``) to ``model``; returns the targeted module names."""
        module, _, function = self.code.partition(":")
        return getattr(importlib.import_module(module), function)(model, cfg, set_name)

    def group(self, set_name: str = DEFAULT_SET) -> str:
        """Its parameter group for a set: ``lora``, ``lora (stage2)`` …"""
        return self.name if set_name == DEFAULT_SET else f"{self.name} ({set_name})"


_PKG = "dser.model.adaptors"
ADAPTORS: dict[str, Adaptor] = {a.name: a for a in [
    Adaptor("lora", f"{_PKG}.lora:apply", LoraConfig, "LoRA settings (used when adaptors lists lora)",
            pattern=r"\.lora_\w+\.(?P<set>[^.]+)(?:\.|$)", fresh=True, merges=True),
    Adaptor("bottleneck", f"{_PKG}.bottleneck:apply", BottleneckConfig, "bottleneck adapter settings",
            pattern=r"^bneck_adapters\.(?P<set>[^.]+)\.", sets="bneck_adapters", fresh=True),
    Adaptor("weighted_sum", f"{_PKG}.weighted_sum:apply", WeightedSumConfig, "weighted layer sum settings",
            pattern=r"^wsum_"),
    Adaptor("weight_gating", f"{_PKG}.weight_gating:apply", WeightGatingConfig, "weight-gating settings",
            pattern=r"^wgate_"),
    Adaptor("ia3", f"{_PKG}.ia3:apply", IA3Config, "IA³ settings: rescaled keys, values and feed-forward activations",
            pattern=r"^ia3_vectors\.(?P<set>[^.]+)\.", sets="ia3_vectors", fresh=True, merges=True),
    Adaptor("full", f"{_PKG}.full:apply_full"),
    Adaptor("none", f"{_PKG}.full:apply_none"),
]}
FRESH = tuple(name for name, a in ADAPTORS.items() if a.fresh)


def check_adaptor_names(names: list[str]) -> None:
    """Validate a ``model.adaptors`` list.

    Raises:
        ValueError: an unknown name (listing the known ones), a repeated name, ``none`` combined
            with anything, or ``full`` combined with an adaptor of backbone weights (``lora``,
            ``ia3``: on weights that already train fully it adds nothing and would make
            ``merge`` ambiguous).
    """
    unknown = [n for n in names if n not in ADAPTORS]
    if unknown:
        raise ValueError(f"unknown adaptor {unknown[0]!r} in adaptors; choose from {', '.join(ADAPTORS)}")
    if not names:
        raise ValueError("adaptors is empty; list at least one (none trains the head alone)")
    if len(set(names)) != len(names):
        raise ValueError(f"adaptors lists an adaptor twice: {names}")
    if "none" in names and len(names) > 1:
        raise ValueError(f"adaptors {names}: none (head only) does not combine with other adaptors")
    clash = [n for n in names if ADAPTORS[n].merges]
    if "full" in names and clash:
        raise ValueError(f"adaptors {names}: full finetuning already trains the weights {clash[0]} would adapt")
