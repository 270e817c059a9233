"""LoRA on the backbone, through ``peft`` (never hand-written).

``apply`` injects ``peft`` LoRA layers into ``backbone.model`` (the transformers model) with
``peft.inject_adapter_in_model``: the model is mutated in place and stays the transformers model,
so parameter names are the backbone's own plus peft's ``lora_A`` / ``lora_B`` (and DoRA's
``lora_magnitude_vector``)::

    backbone.model.encoder.layers.0.attention.q_proj.base_layer.weight   (frozen)
    backbone.model.encoder.layers.0.attention.q_proj.lora_A.default.weight
    backbone.model.encoder.layers.0.attention.q_proj.lora_B.default.weight

The first set is peft's adapter ``default``; stage 2's fresh set is a second adapter ``stage2``
in the same layers, and both stay *active* (peft sums the updates of every active adapter), so
the loaded set keeps working, may be frozen by name (``lora_A.default``), and exports as a
separate peft adapter. Merging the loaded set into the base weights instead was rejected: the
exported backbone would then differ from the public checkpoint and have to be saved whole.

Default targets are the family's attention projections (``backbone.lora_targets``: q/k/v/out,
w2v-BERT's linear_q/k/v/out). WavLM's stock attention would bypass them (it passes the weights
to ``F.multi_head_attention_forward``); ``backbones/waveform.py`` switches it to a module-calling forward,
so LoRA takes effect on every family (tested per family).
"""

from __future__ import annotations

import logging
import warnings

import peft
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import set_adapter

from dser.config import ConfigError
from dser.model.adaptors import ADAPTORS
from dser.model.adaptors.configs import LoraConfig
from dser.model.adaptors.hooks import selected_layers

log = logging.getLogger(__name__)

# peft's parameter names: lora_A, lora_B, lora_magnitude_vector (DoRA), then the adapter (set) name.
PATTERN = ADAPTORS["lora"].pattern


def peft_config(cfg: LoraConfig, backbone) -> peft.LoraConfig:
    """The ``peft.LoraConfig`` for ``cfg`` on ``backbone`` (what the export's adapter_config.json holds)."""
    return peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules or backbone.lora_targets),
        # Every family keeps its transformer layers in a ModuleList named "layers"
        # (encoder.layers.N / layers.N), which is what peft's layer filter matches.
        layers_to_transform=list(cfg.layers) if cfg.layers is not None else None,
        layers_pattern="layers" if cfg.layers is not None else None,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        bias="none",
    )


def adapter_names(hf_model) -> list[str]:
    """The LoRA adapters injected into a transformers model, in the order they were added."""
    return list(getattr(hf_model, "peft_config", {}))


def apply(model, cfg: LoraConfig, set_name: str = "default") -> list[str]:
    """Inject a LoRA set (peft adapter ``set_name``) into ``model.backbone``; all sets stay active.

    Args:
        model: the ``SERModel``.
        cfg: the LoRA settings.
        set_name: peft adapter name: ``default``, or ``stage2`` for a fresh stage-2 set.

    Returns:
        Names (in ``model``) of the modules that received this adapter.

    Raises:
        ConfigError: a layer index out of range, or target modules that match nothing.
    """
    backbone = model.backbone
    hf_model = backbone.hf_model
    selected_layers(cfg.layers, backbone, "model.lora.layers")  # peft takes the list itself
    if set_name in adapter_names(hf_model):
        raise ConfigError(f"a LoRA set named {set_name!r} is already in the model")
    config = peft_config(cfg, backbone)
    with warnings.catch_warnings():
        # A second adapter is intended (stage 2); peft warns about it.
        warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
        try:
            peft.inject_adapter_in_model(config, hf_model, adapter_name=set_name)
        except ValueError as e:
            if "not found in the base model" not in str(e) and "Target modules" not in str(e):
                raise
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in hf_model.named_modules() if type(m).__name__ == "Linear"})
            raise ConfigError(
                f"model.lora.target_modules {config.target_modules} (layers {cfg.layers}) match no module of the "
                f"{backbone.family} backbone; its linear modules are named {', '.join(linear)}"
            ) from e
    # peft activates only the newest adapter; every set contributes to the forward pass.
    set_adapter(hf_model, adapter_names(hf_model))
    prefix = model.module_name(hf_model)
    return [
        f"{prefix}.{name}"
        for name, module in hf_model.named_modules()
        if isinstance(module, LoraLayer) and set_name in module.lora_A
    ]
