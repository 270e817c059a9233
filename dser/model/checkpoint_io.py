"""Adaptor-only weights (safetensors) and the export directory.

``save_adaptors``/``load_adaptors`` store what a run trains — adaptor and head parameters
(the whole model for full finetuning) and fitted feature statistics — never the frozen
backbone, and loading refuses missing or unexpected keys by name.

Export layout (``export_model``)::

    export/config.yaml            run config + model config + label set + fresh adaptor sets
    export/labels.json            the label set (classes and the emotions each absorbs)
    export/adaptors.safetensors   everything save_adaptors stores (LoRA included)
    export/lora/                  LoRA in peft's own format: PeftModel.from_pretrained(bare_backbone, export/lora)
                                  (a stage-2 fresh set sits in export/lora/stage2/)
    export/backbone/              with merge=True: the backbone with LoRA folded in (save_pretrained)
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file

from dser.config import from_dict, to_dict
from dser.labels import LabelSet


class AdaptorLoadError(ValueError):
    """An adaptor file that does not fit the model; names the keys."""


def save_adaptors(model, path: Path) -> Path:
    """Write the model's adaptor + head tensors to ``path`` (safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.saved_state().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    return path


def load_adaptors(model, path: Path, skip_prefixes: tuple[str, ...] = ()) -> None:
    """Load adaptor + head tensors into ``model``, strictly.

    Args:
        model: a built SERModel with the same adaptors.
        path: a file written by ``save_adaptors``.
        skip_prefixes: keys to leave as they are (e.g. ``("head.",)`` for a new stage-2 head).

    Raises:
        AdaptorLoadError: missing or unexpected keys, or shape mismatches, by name.
    """
    path = Path(path)
    if not path.is_file():
        raise AdaptorLoadError(f"{path}: no adaptor file there")
    loaded = load_file(str(path))
    expected = model.saved_state()
    fresh = lambda k: ".stage2." in k  # noqa: E731  fresh stage-2 sets are not in a stage-1 file
    skip = lambda k: k.startswith(skip_prefixes) if skip_prefixes else False  # noqa: E731
    missing = [k for k in expected if k not in loaded and not skip(k) and not (fresh(k) and not any(fresh(x) for x in loaded))]
    unexpected = [k for k in loaded if k not in expected and not skip(k)]
    if missing or unexpected:
        raise AdaptorLoadError(f"{path} does not fit this model: missing keys {missing[:8]}"
                               f"{' …' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                               f"{' …' if len(unexpected) > 8 else ''}; was it trained with other adaptors?")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for k, v in loaded.items():
        if skip(k):
            continue
        target = params.get(k, buffers.get(k))
        if target.shape != v.shape and getattr(target, "ds_shape", None) != v.shape:
            raise AdaptorLoadError(f"{path}: {k} has shape {tuple(v.shape)}, the model {tuple(target.shape)}")
        target.data.copy_(v.to(target.dtype))


def export_model(model, out_dir: Path, run_config: dict, label_set: dict | None, merge: bool = False) -> Path:
    """Write the export directory (layout in the module docstring)."""
    import peft

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"run_config": run_config, "model": to_dict(model.cfg), "task": model.task,
            "num_classes": model.num_classes, "fresh_adaptors": list(model.fresh), "label_set": label_set}
    (out / "config.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    (out / "labels.json").write_text(json.dumps(label_set, indent=2) + "\n")
    save_adaptors(model, out / "adaptors.safetensors")
    if isinstance(model.backbone.model, peft.PeftModel):
        model.backbone.model.save_pretrained(str(out / "lora"))
        if merge:
            merged = copy.deepcopy(model.backbone.model).merge_and_unload()
            merged.save_pretrained(str(out / "backbone"))
    elif merge and "full" in model.cfg.adaptors:
        model.backbone.model.save_pretrained(str(out / "backbone"))
    return out


def load_exported(out_dir: Path):
    """Rebuild a model from an export directory.

    Returns:
        ``(model, run_config, label_set)`` with the model in eval mode.
    """
    from dser.model.build import ModelConfig, build_model

    out = Path(out_dir)
    meta = yaml.safe_load((out / "config.yaml").read_text())
    cfg = from_dict(ModelConfig, meta["model"], where="export.model")
    model = build_model(cfg, meta["num_classes"], meta["task"])
    model.add_fresh_adaptors(meta.get("fresh_adaptors", []))
    load_adaptors(model, out / "adaptors.safetensors")
    label_set = LabelSet.from_dict(meta["label_set"]) if meta.get("label_set") else None
    return model.eval(), meta["run_config"], label_set
