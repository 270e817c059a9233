"""Loading a backbone by name: hub id, local directory, tiny preset or ``random:<architecture>``.

Every road ends in the registered ``Backbone`` subclass of the config's ``model_type``
(``registry.FAMILIES``), built around its transformers model::

    load_backbone("microsoft/wavlm-base-plus")      # hub id (or its local cache)
    load_backbone("/models/wavlm-large")            # a directory from save_pretrained
    load_backbone("tiny-wavlm")                     # tiny preset, fixed-seed random weights
    load_backbone("random:wavlm-large")             # real architecture, random weights

The run's ``layerdrop`` and ``mask_time_prob`` replace the checkpoint's (the published
checkpoints ship non-zero values). A checkpoint lacking any of the family's weights is refused
(only the SpecAugment embedding may be missing); weights it has beyond the encoder (Whisper's
decoder) are left unloaded. ``check_backbone`` fails early, reading only the config, so a run
stops before it builds anything: presets, ``random:`` names and local directories by their files
(``dser.model.backbone_names``, which commands that must not import torch use alone), hub ids
through transformers' config loading. With ``HF_HUB_OFFLINE=1`` nothing here touches the network.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig

from dser.model.backbone_names import backbone_problem, is_local_path
from dser.model.backbones.base import Backbone, BackboneConfig, BackboneError
from dser.model.backbones.presets import REAL_CONFIGS, TINY_PRESETS
from dser.model.backbones.registry import FAMILIES


def _backbone_class(config: PretrainedConfig, name: str) -> type[Backbone]:
    if config.model_type not in FAMILIES:
        raise BackboneError(
            f"backbone {name!r} is a {config.model_type!r} model; dser supports "
            f"{', '.join(FAMILIES)} (transformers model types)"
        )
    return FAMILIES[config.model_type]


def backbone_from_config(config: PretrainedConfig, cfg: BackboneConfig | None = None) -> Backbone:
    """Build a backbone with random weights (fixed seed ``cfg.seed``) from a transformers config.

    Args:
        config: e.g. ``TINY_PRESETS["tiny-wavlm"]()`` or ``REAL_CONFIGS["wavlm-large"]()``.
        cfg: run options; defaults to ``BackboneConfig()``.

    Returns:
        The ``Backbone``; the global RNG state is left untouched.
    """
    cfg = cfg or BackboneConfig()
    backbone_class = _backbone_class(config, type(config).__name__)
    config._attn_implementation = backbone_class.configure(config, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = backbone_class.model_class(config)
    return backbone_class(model, cfg)


def _pretrained_config(name: str):
    """``(source, transformers config)`` of a hub id or local directory; reads only the config.

    Raises:
        BackboneError: a missing directory, one without config.json, or a hub id that is not
            in the local cache (offline) or does not exist.
    """
    source = name
    if is_local_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise BackboneError(
                f"backbone directory {name!r} does not exist; set model.backbone.name to a model directory"
            )
        if not (path / "config.json").is_file():
            raise BackboneError(
                f"backbone directory {name!r} has no config.json; point model.backbone.name at a directory "
                "written by save_pretrained (or use tiny_backbone_dir)"
            )
        source = str(path)
    try:
        return source, AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BackboneError(
            f"backbone {name!r} is neither a tiny preset ({', '.join(TINY_PRESETS)}), a local directory, "
            f"nor a model in the local Hugging Face cache; download it first on a machine with network "
            f"(huggingface-cli download {name}) or set model.backbone.name to a model directory ({reason})"
        ) from e


def check_backbone(cfg: BackboneConfig | str) -> None:
    """Fail early, without loading weights, when ``load_backbone(cfg)`` could not find the model.

    Raises:
        BackboneError: as :func:`load_backbone` would, naming the backbone and what to do.
    """
    name = cfg if isinstance(cfg, str) else cfg.name
    problem = backbone_problem(name, model_types=FAMILIES)
    if problem:
        raise BackboneError(problem)
    if name in TINY_PRESETS or name.startswith("random:") or is_local_path(name):
        return  # its name or its config.json said all
    _, config = _pretrained_config(name)
    _backbone_class(config, name)


def _load_pretrained(cfg: BackboneConfig) -> Backbone:
    name = cfg.name
    source, config = _pretrained_config(name)
    backbone_class = _backbone_class(config, name)
    attn = backbone_class.configure(config, cfg)
    kwargs = {"key_mapping": backbone_class.checkpoint_key_mapping} if backbone_class.checkpoint_key_mapping else {}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the unused-weights report (Whisper's decoder …)
    try:
        model, info = backbone_class.model_class.from_pretrained(
            source, config=config, attn_implementation=attn, output_loading_info=True, **kwargs
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = sorted(k for k in info["missing_keys"] if "masked_spec_embed" not in k)
    if missing:
        raise BackboneError(
            f"backbone {name!r}: the checkpoint lacks {len(missing)} weights of {backbone_class.model_class.__name__} "
            f"(e.g. {', '.join(missing[:3])}); is it a {backbone_class.family} encoder checkpoint?"
        )
    return backbone_class(model, cfg)

def load_backbone(cfg: BackboneConfig | str) -> Backbone:
    """Load a backbone by hub id, local directory, tiny preset or ``random:<architecture>``.

    Args:
        cfg: a ``BackboneConfig`` or just its ``name``.

    Returns:
        The ``Backbone`` in train mode (as ``nn.Module`` starts); dropout is whatever the
        checkpoint's config says.

    Raises:
        BackboneError: unknown name (never touches the network when ``HF_HUB_OFFLINE=1``),
            a directory without a model, or an unsupported model type.
    """
    if isinstance(cfg, str):
        cfg = BackboneConfig(name=cfg)
    name = cfg.name
    if name in TINY_PRESETS:
        return backbone_from_config(TINY_PRESETS[name](), cfg)
    if name.startswith("random:"):
        check_backbone(name)
        return backbone_from_config(REAL_CONFIGS[name.removeprefix("random:")](), cfg)
    return _load_pretrained(cfg)


def tiny_backbone_dir(name: str, path: str | Path) -> Path:
    """Save a tiny preset with ``save_pretrained`` so it loads through the local-directory path.

    Args:
        name: a ``TINY_PRESETS`` key.
        path: directory to write (created).

    Returns:
        ``path`` as a ``Path``.
    """
    if name not in TINY_PRESETS:
        raise BackboneError(f"unknown tiny preset {name!r}; known: {', '.join(TINY_PRESETS)}")
    path = Path(path)
    load_backbone(name).hf_model.save_pretrained(path)
    return path
