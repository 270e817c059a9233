"""LoRA on the backbone's attention projections, through ``peft`` (never hand-written).

``apply`` wraps ``backbone.model`` in a ``peft.PeftModel`` with a ``LoraConfig`` (adapter name
``default``; a fresh stage-2 set is added as ``stage2`` with both sets active), so the
export is peft's own adapter format and ``PeftModel.from_pretrained(bare_model, dir)`` loads it.
The backbone calls its projection modules (WavLM's attention is switched to a module-calling
forward in ``backbone.py``), so the LoRA update always takes effect.

Parameter names carry peft's ``lora_A`` / ``lora_B`` (prefix ``lora_``).
"""

from __future__ import annotations

from dataclasses import dataclass

from dser.config import knob

PREFIX = "lora_"


@dataclass
class LoraConfig:
    rank: int = knob(8, "LoRA rank r")
    alpha: float = knob(16.0, "LoRA scaling alpha (update scaled by alpha / r, or alpha / sqrt(r) with rsLoRA)")
    dropout: float = knob(0.0, "dropout on the LoRA input")
    target_modules: list[str] | None = knob(None, "module names to adapt (null: the family's q/k/v/out projections)")
    layers: list[int] | None = knob(None, "transformer layer indices to adapt (null: all)")
    use_dora: bool = knob(False, "DoRA: weight-decomposed LoRA")
    use_rslora: bool = knob(False, "rank-stabilised LoRA scaling alpha / sqrt(r)")

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")


def peft_config(cfg: LoraConfig, backbone):
    """The ``peft.LoraConfig`` for a backbone."""
    import peft

    return peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules or backbone.lora_targets),
        layers_to_transform=list(cfg.layers) if cfg.layers is not None else None,
        layers_pattern="layers" if cfg.layers is not None else None,
        use_dora=cfg.use_dora, use_rslora=cfg.use_rslora, bias="none")


def apply(model, cfg: LoraConfig, adapter_name: str = "default") -> list[str]:
    """Add a LoRA set to ``model.backbone``; returns the targeted module names.

    The first set wraps the backbone's model in a PeftModel; a later one (stage 2's fresh set)
    is added beside it and both stay active.
    """
    import peft

    backbone = model.backbone
    config = peft_config(cfg, backbone)
    if isinstance(backbone.model, peft.PeftModel):
        backbone.model.add_adapter(adapter_name, config)
        names = list(backbone.model.peft_config)
        backbone.model.base_model.set_adapter(names)
    else:
        backbone.model = peft.get_peft_model(backbone.model, config, adapter_name=adapter_name)
    targeted = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in backbone.model.named_parameters()
                       if f"lora_A.{adapter_name}." in n})
    if not targeted:
        raise ValueError(f"lora: no module of the backbone matches target_modules "
                         f"{config.target_modules} (layers {cfg.layers})")
    for n, p in backbone.model.named_parameters():
        if PREFIX in n:
            p.requires_grad_(True)
    return targeted
