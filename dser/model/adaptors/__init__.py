"""The adaptor registry: names in ``model.adaptors`` → the code that adds them and their parameters.

One adaptor per file. Each file has a config dataclass (fields with help text), an
``apply(model, cfg, set_name) -> targeted module names`` function, and a ``PATTERN``: the
regular expression that selects its parameters by name, so freezing, saving, export and the
parameter table all select by name::

    lora           .lora_A.<set>. / .lora_B.<set>. (peft's own names)   lora.py
    bottleneck     bneck_adapters.<set>.…                                bottleneck.py
    weighted_sum   wsum_layers.weights                                   weighted_sum.py
    weight_gating  wgate_gates.<layer>.g                                 weight_gating.py
    full, none     (no new parameters: which backbone parameters train)  full.py

``<set>`` is ``default`` for the adaptors a run is built with and ``stage2`` for the fresh set
stage 2 may add on top of loaded ones (only ``lora`` and ``bottleneck`` can be added fresh).
The model (``dser.model.build.SERModel``) applies them in the listed order and then sets
``requires_grad`` itself: an adaptor never decides what else trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dser.model.adaptors import bottleneck, full, lora, weight_gating, weighted_sum

DEFAULT_SET = "default"  # the adaptors a model is built with
FRESH_SET = "stage2"  # a second set added on top of loaded ones in stage 2


@dataclass(frozen=True)
class Adaptor:
    """A registered adaptor.

    Attributes:
        name: the name used in ``model.adaptors``.
        apply: ``apply(model, cfg, set_name) -> list[str]`` adds it and returns the targeted modules.
        config_key: the ``ModelConfig`` field holding its config (None: it has no settings).
        pattern: regular expression (``re.search``) matching its parameter names; a named group
            ``set`` captures the set name where there can be several. None: no parameters of its own.
        fresh: whether stage 2 can add a second, fresh set of it.
    """

    name: str
    apply: Callable[..., list[str]]
    config_key: str | None
    pattern: str | None
    fresh: bool


ADAPTORS: dict[str, Adaptor] = {
    "lora": Adaptor("lora", lora.apply, "lora", lora.PATTERN, fresh=True),
    "bottleneck": Adaptor("bottleneck", bottleneck.apply, "bottleneck", bottleneck.PATTERN, fresh=True),
    "weighted_sum": Adaptor("weighted_sum", weighted_sum.apply, "weighted_sum", weighted_sum.PATTERN, fresh=False),
    "weight_gating": Adaptor("weight_gating", weight_gating.apply, "weight_gating", weight_gating.PATTERN, fresh=False),
    "full": Adaptor("full", full.apply_full, None, None, fresh=False),
    "none": Adaptor("none", full.apply_none, None, None, fresh=False),
}
FRESH = tuple(name for name, a in ADAPTORS.items() if a.fresh)


def check_adaptor_names(names: list[str]) -> None:
    """Validate a ``model.adaptors`` list.

    Raises:
        ValueError: an unknown name (listing the known ones), a repeated name, ``none`` combined
            with anything, or ``full`` combined with ``lora`` (LoRA on weights that already
            train fully adds nothing and would make ``merge`` ambiguous).
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
    if "full" in names and "lora" in names:
        raise ValueError(f"adaptors {names}: full finetuning already trains the weights LoRA would adapt")
