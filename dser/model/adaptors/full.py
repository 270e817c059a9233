"""The two baselines that add no modules: ``full`` finetuning and ``none`` (head only).

Both only decide which backbone parameters train, so they share this file instead of each
having one of three lines:

- ``full``: every backbone parameter that is trainable when the backbone is loaded, i.e. all
  but what the backbone freezes by default (the CNN front end unless
  ``model.backbone.freeze_feature_encoder: false``; Whisper's fixed sinusoidal positions).
  SpecAugment's learned mask embedding (``masked_spec_embed``, present when a config enables
  masking) trains only when ``mask_time_prob > 0``: otherwise dser never uses it and it would be
  a trainable parameter without a gradient.
- ``none``: the backbone stays frozen; only the head trains (a probe of the last layer).

The model records the ``full`` set by name (``SERModel.full_names``, names without peft's
``.base_layer``, so a fresh stage-2 LoRA wrapping a layer does not change the set); the
trainable flags are set by the model after all adaptors are applied.
"""

from __future__ import annotations


def full_finetuning_names(model) -> frozenset[str]:
    """Names (as in ``model.named_parameters()``) of the backbone parameters ``full`` trains.

    Args:
        model: a ``SERModel`` whose backbone flags are still as loaded (``full`` excludes
            ``lora``, and no other adaptor touches backbone flags).
    """
    masking = model.backbone.cfg.mask_time_prob > 0.0
    return frozenset(
        f"backbone.{name}"
        for name, p in model.backbone.named_parameters()
        if p.requires_grad and (masking or not name.endswith("masked_spec_embed"))
    )


def apply_full(model, cfg=None, set_name: str = "default") -> list[str]:
    """Mark the backbone for full finetuning; returns the top-level backbone modules that train."""
    model.full_names = full_finetuning_names(model)
    # e.g. backbone.model.feature_projection, backbone.model.encoder
    return sorted({".".join(name.split(".")[:3]) for name in model.full_names})


def apply_none(model, cfg=None, set_name: str = "default") -> list[str]:
    """Head only: nothing in the backbone trains."""
    return []
