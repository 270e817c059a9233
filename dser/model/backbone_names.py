"""What a ``model.backbone.name`` refers to, checked from names and files alone (no torch, no
transformers): ``dser submit``, ``dser grid`` and ``dser demo`` check a config's backbone with it
before anything runs, and ``backbones.check_backbone`` starts with it.

The names dser knows are copied here from the tables that build models, which import
transformers; ``tests/unit/model/test_backbone.py`` fails when the copies drift::

    MODEL_TYPES          registry.FAMILIES' keys (transformers model types)
    TINY_PRESET_NAMES    presets.TINY_PRESETS' keys
    REAL_ARCHITECTURES   presets.REAL_CONFIGS' keys (random:<architecture>)

Usage::

    backbone_problem("tiny-wavlm")               # None: a preset
    backbone_problem("/models/wavlm-large")      # None, or what is wrong with its config.json
    backbone_problem("microsoft/wavlm-base-plus")  # checked in the local Hugging Face cache, if there
    uncached_hub_id("microsoft/wavlm-base-plus")   # True: nothing here can say whether it exists
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

MODEL_TYPES = ("wavlm", "hubert", "wav2vec2", "data2vec-audio", "whisper", "wav2vec2-bert")
TINY_PRESET_NAMES = ("tiny-wavlm", "tiny-hubert", "tiny-wav2vec2", "tiny-data2vec", "tiny-whisper", "tiny-w2v-bert")
REAL_ARCHITECTURES = ("wavlm-base-plus", "wavlm-large", "hubert-large")


def is_local_path(name: str) -> bool:
    """Whether a backbone name means a directory (rather than a hub id)."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def _config_problem(config_file: Path, name: str, where: str, model_types: Collection[str]) -> str | None:
    """What is wrong with a model's ``config.json`` for dser, or None."""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"backbone {name!r}: {config_file} cannot be read as JSON ({str(e).splitlines()[0]}); {where}"
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        return f"backbone {name!r}: {config_file} names no model_type; {where}"
    if model_type not in model_types:
        return f"backbone {name!r} is a {model_type!r} model; dser supports {', '.join(model_types)} " \
               f"(transformers model types)"
    return None


def _cached_config(name: str) -> Path | None:
    """The ``config.json`` of hub id ``name`` in the local Hugging Face cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache  # no torch: a transformers dependency
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a repo id (HFValidationError)
        return None
    return Path(found) if isinstance(found, str) else None


def backbone_problem(name: str, model_types: Collection[str] = MODEL_TYPES) -> str | None:
    """What is wrong with backbone ``name``, judged from its name and files; None when nothing is.

    A tiny preset or ``random:<architecture>`` is checked by name; a local directory needs a
    ``config.json`` whose ``model_type`` dser supports; a hub id is checked the same way when the
    local Hugging Face cache holds it, and passes otherwise (see ``uncached_hub_id``).

    Args:
        name: ``model.backbone.name``.
        model_types: the supported transformers model types (``registry.FAMILIES`` where it is
            imported anyway).

    Returns:
        One line naming the backbone and what to do, or None.
    """
    if name in TINY_PRESET_NAMES:
        return None
    if name.startswith("random:"):
        arch = name.removeprefix("random:")
        if arch not in REAL_ARCHITECTURES:
            return f"unknown architecture {arch!r} in {name!r}; known: {', '.join(REAL_ARCHITECTURES)}"
        return None
    if is_local_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            return f"backbone directory {name!r} does not exist; set model.backbone.name to a model directory"
        if not (path / "config.json").is_file():
            return (f"backbone directory {name!r} has no config.json; point model.backbone.name at a directory "
                    f"written by save_pretrained (or use tiny_backbone_dir)")
        return _config_problem(path / "config.json", name, "point model.backbone.name at a directory written by "
                                                           "save_pretrained", model_types)
    cached = _cached_config(name)
    if cached is not None:
        return _config_problem(cached, name, "download it again (huggingface-cli download "
                                             f"{name} --force-download)", model_types)
    return None


def uncached_hub_id(name: str) -> bool:
    """Whether ``name`` is a hub id that the local Hugging Face cache does not hold: whether it
    exists cannot be known from files here (the jobs that load it need it in their cache, or
    the network)."""
    return not (name in TINY_PRESET_NAMES or name.startswith("random:") or is_local_path(name)
                or _cached_config(name) is not None)
