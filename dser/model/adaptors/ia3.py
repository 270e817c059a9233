"""IA³ (Liu et al., 2022): learned vectors that rescale the keys, the values and the feed-forward activations.

As in peft's ``IA3``: a key or value projection's *output* is multiplied channel-wise by its
vector, ``k = l_k ⊙ W_k x``; a feed-forward target, the feed-forward block's output layer, has
its *input* multiplied instead, ``y = W_2 (l_ff ⊙ act(W_1 x))``: the activations are rescaled.
Every vector starts at ones, so the model starts exactly as the bare backbone. Targets per
family (``Backbone.default_ia3_targets`` / ``default_ia3_feedforward``; names inside a layer)::

    wavlm, hubert, wav2vec2, data2vec-audio   attention.k_proj, attention.v_proj | feed_forward.output_dense
    whisper                                   self_attn.k_proj, self_attn.v_proj | fc2
    w2v-bert                                  self_attn.linear_k, self_attn.linear_v | ffn1.output_dense,
                                              ffn2.output_dense (both macaron halves)

The vectors are ``IA3Vector`` modules called from hooks (``hooks.rewrite_output`` for keys and
values, ``hooks.rewrite_input`` for feed-forward layers); the transformers modules are not
replaced, so LoRA on the same projections composes in either order of ``model.adaptors``:
``[ia3, lora]`` puts LoRA beside the rescaled layer (``k = l ⊙ W x + B A x``), ``[lora, ia3]``
rescales the LoRA-adapted projection (``k = l ⊙ (W + B A) x``). Parameters::

    ia3_vectors.default.3.attention_k_proj.scale            (H)
    ia3_vectors.default.3.feed_forward_output_dense.scale   (the feed-forward width)

(``ia3_vectors.<set>.<layer>.<module path, "." → "_">``). Stage 2 may add a fresh set
(``stage2``): its vectors multiply the loaded set's. The vectors save and load with the other
adaptors (``adaptors.safetensors``); ``peft_adapter`` gives a set in peft's format for the export's
``ia3/`` directory, and ``fold_into`` folds every set into a merged backbone's weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import peft
import torch
from torch import nn

from dser.config import ConfigError
from dser.model.adaptors import ADAPTORS
from dser.model.adaptors.configs import IA3Config
from dser.model.adaptors.hooks import InputHook, OutputHook, rewrite_input, rewrite_output, selected_layers

PATTERN = ADAPTORS["ia3"].pattern


class IA3Vector(nn.Module):
    """``x ⊙ scale`` over the last dimension; ``scale`` starts at ones."""

    def __init__(self, size: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, F, size)
        return x * self.scale.to(x.dtype)


def _matches(path: str, names) -> bool:
    """peft's rule: a module is named by its path or a suffix of it after a dot."""
    return any(path == n or path.endswith(f".{n}") for n in names)


def _linear(module: nn.Module, name: str) -> nn.Linear:
    """The linear layer behind a target (peft's LoRA wrapper keeps it as its base layer)."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if not isinstance(base, nn.Linear):
        raise ConfigError(f"model.ia3.target_modules: {name} is a {type(base).__name__}; IA³ rescales linear layers")
    return base


def apply(model, cfg: IA3Config, set_name: str = "default") -> list[str]:
    """Add a set of IA³ vectors (``model.ia3_vectors[set_name]``) with their hooks.

    Args:
        model: the ``SERModel``.
        cfg: the IA³ settings.
        set_name: ``default``, or ``stage2`` for a fresh stage-2 set.

    Returns:
        Names (in ``model``) of the rescaled modules.

    Raises:
        ConfigError: a layer index out of range, targets that match no linear module, or
            feed-forward modules that match none of the targets.
    """
    backbone = model.backbone
    layers = selected_layers(cfg.layers, backbone, "model.ia3.layers")
    if set_name in model.ia3_vectors:
        raise ConfigError(f"an IA³ set named {set_name!r} is already in the model")
    targets = cfg.target_modules or backbone.default_ia3_targets
    feedforward = cfg.feedforward_modules if cfg.feedforward_modules is not None else backbone.default_ia3_feedforward
    found = []  # (layer, name in the model, path inside the layer, module, its linear layer, feed-forward?)
    for i in layers:
        layer = backbone.layers[i]
        prefix = model.module_name(layer)
        for path, module in layer.named_modules():
            if path and _matches(path, targets):
                found.append((i, f"{prefix}.{path}", path, module, _linear(module, f"{prefix}.{path}"),
                              _matches(path, feedforward)))
    if not found:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in backbone.layers[0].named_modules()
                               if isinstance(m, nn.Linear)})
        raise ConfigError(f"model.ia3.target_modules {list(targets)} match no module in layers {layers} of the "
                          f"{backbone.family} backbone; its linear modules are named {', '.join(linear_names)}")
    if cfg.feedforward_modules is not None and not any(f[-1] for f in found):
        raise ConfigError(f"model.ia3.feedforward_modules {cfg.feedforward_modules} match none of the targeted "
                          f"modules ({found[0][1]} …)")
    vectors = model.ia3_vectors[set_name] = nn.ModuleDict()
    for i, _, path, module, linear, is_ff in found:
        if str(i) not in vectors:
            vectors[str(i)] = nn.ModuleDict()
        vector = IA3Vector(linear.in_features if is_ff else linear.out_features)
        vectors[str(i)][path.replace(".", "_")] = vector
        if is_ff:
            rewrite_input(model, module, vector)  # the activations entering the feed-forward output layer
        else:
            rewrite_output(model, module, vector)  # the keys / values
    return [f[1] for f in found]


# --------------------------------------------------------------------------------------------
# Reading the hooks back: peft's format and merging
# --------------------------------------------------------------------------------------------


@dataclass
class HookedTarget:
    """One rescaled module of a set, found through its hook.

    Attributes:
        set_name: the IA³ set (``default``, ``stage2``).
        name: the hooked module's name in the transformers model (``….k_proj``, or
            ``….k_proj.base_layer`` when LoRA wrapped it later).
        vector: its ``IA3Vector``.
        feedforward: the input is rescaled (else the output).
    """

    set_name: str
    name: str
    vector: IA3Vector
    feedforward: bool


def hooked_targets(model) -> list[HookedTarget]:
    """Every IA³ target of ``model``, in the order its hook was registered (the order they run in)."""
    if not hasattr(model, "ia3_vectors"):
        return []
    owners = {id(m): name.split(".")[0] for name, m in model.ia3_vectors.named_modules() if isinstance(m, IA3Vector)}
    found = []
    for name, module in model.backbone.hf_model.named_modules():
        for hook_id, hook in [*module._forward_hooks.items(), *module._forward_pre_hooks.items()]:
            if isinstance(hook, (OutputHook, InputHook)) and id(hook.fn) in owners:
                found.append((hook_id, HookedTarget(owners[id(hook.fn)], name, hook.fn, isinstance(hook, InputHook))))
    return [target for _, target in sorted(found, key=lambda pair: pair[0])]


def _plain_name(name: str) -> str:
    """A module's name in the backbone without LoRA (peft's wrapper adds ``.base_layer``)."""
    return re.sub(r"\.base_layer(?=\.|$)", "", name)


def set_names(model) -> list[str]:
    """The IA³ sets of ``model``, in the order they were added."""
    return list(getattr(model, "ia3_vectors", {}))


def peft_adapter(model, set_name: str) -> tuple[peft.IA3Config, dict[str, torch.Tensor]]:
    """One IA³ set as peft saves it: its ``IA3Config`` and ``adapter_model.safetensors`` tensors.

    ``PeftModel.from_pretrained(backbone.model, directory)`` then computes what dser's set does
    (peft's vectors are ``(out, 1)`` for keys and values, ``(1, in)`` for feed-forward layers,
    named ``<module>.ia3_l``; keys here lack ``PeftModel``'s ``base_model.model.`` prefix).
    """
    targets = [t for t in hooked_targets(model) if t.set_name == set_name]
    names = [_plain_name(t.name) for t in targets]
    config = peft.IA3Config(
        target_modules=names,
        feedforward_modules=[n for n, t in zip(names, targets, strict=True) if t.feedforward],
        base_model_name_or_path=model.cfg.backbone.name,
        inference_mode=True,  # what peft writes for an adapter saved for use
    )
    tensors = {}
    for name, t in zip(names, targets, strict=True):
        scale = t.vector.scale.detach()
        tensors[f"{name}.ia3_l"] = scale[None, :] if t.feedforward else scale[:, None]
    return config, tensors


@torch.no_grad()
def fold_into(model, merged: nn.Module) -> None:
    """Fold every IA³ set of ``model`` into ``merged``, a copy of ``model.backbone.hf_model``.

    Keys and values: ``W ← diag(l) W``, ``b ← l ⊙ b``; feed-forward: ``W ← W diag(l)``. A vector
    on a LoRA-wrapped layer (``[lora, ia3]``) rescales ``W + B A``, so that layer's LoRA is merged
    first; one on the base layer under a wrapper (``[ia3, lora]``) rescales ``W`` alone, and the
    LoRA merge that follows adds ``B A``.

    Raises:
        ConfigError: IA³ on the base layer of a DoRA-wrapped layer (DoRA normalises the base
            weight, so the rescaling cannot be folded exactly).
    """
    from peft.tuners.lora import LoraLayer

    for target in hooked_targets(model):
        module = merged.get_submodule(target.name)
        parent = merged.get_submodule(target.name.rsplit(".", 1)[0]) if "." in target.name else merged
        if isinstance(module, LoraLayer):
            if not module.merged:
                module.merge(safe_merge=True, adapter_names=list(module.active_adapters))
            module = module.get_base_layer()
        elif isinstance(parent, LoraLayer) and any(parent.use_dora.values()):
            raise ConfigError(f"merge: IA³ rescales {_plain_name(target.name)} under a DoRA layer, which cannot be "
                              f"folded exactly; export without merge, or list lora before ia3")
        scale = target.vector.scale.detach().to(module.weight.device, module.weight.dtype)
        if target.feedforward:
            module.weight.mul_(scale[None, :])
        else:
            module.weight.mul_(scale[:, None])
            if module.bias is not None:
                module.bias.mul_(scale)
