"""Adaptor-only weights (safetensors) and the export directory.

A run trains adaptors and a head on a frozen, public backbone, so what it saves is small:
``save_adaptors`` writes exactly the tensors that are trainable by design (every parameter of
an applied adaptor and of the head, frozen ones included; the whole backbone but its frozen
front end under ``full``) plus the backbone's fitted feature statistics (``feature_mean`` …,
filterbank families with ``feature_norm: global``). ``load_adaptors`` refuses a file with
missing or unexpected keys, naming them.

Export layout (``export_model``)::

    export/config.yaml            the run config, as given (written last: it marks a complete export)
    export/labels.json            the label set (classes and the emotions each absorbs), or null
    export/export.json            how to rebuild: model config, task, classes, fresh sets, files
    export/adaptors.safetensors   the head and every non-LoRA adaptor, IA³ included (+ feature
                                  statistics; + the backbone weights under full finetuning)
    export/lora/                  LoRA set "default" in peft's format (adapter_config.json +
                                  adapter_model.safetensors), so that
                                  PeftModel.from_pretrained(backbone.model, "export/lora") loads it
    export/lora/stage2/           a fresh stage-2 LoRA set, the same way (load it with
                                  peft_model.load_adapter(".../lora/stage2", "stage2") and make both
                                  active: peft_model.base_model.set_adapter(["default", "stage2"]))
    export/ia3/, ia3/stage2/      each IA³ set, also in peft's format (an IA3Config naming the
                                  rescaled modules), for peft users: PeftModel.from_pretrained(
                                  backbone.model, "export/ia3") computes what the set does. dser
                                  itself loads IA³ from adaptors.safetensors. peft cannot hold LoRA
                                  and IA³ in one model (IA³ is no "mixed" adapter type), so with
                                  both, peft takes one of them; dser's own loader takes both
    export/backbone/              merge=True only: the backbone with LoRA and IA³ folded into its
                                  weights (and the full-finetuned weights), written by save_pretrained;
                                  then there is no lora/ or ia3/, and adaptors.safetensors holds no
                                  backbone, LoRA or IA³ weights

``load_exported`` rebuilds the model from this directory; ``load_export_weights`` loads an
export into a model already built (stage 2 starting from a stage-1 run).

Under ZeRO-3, call these inside ``deepspeed.zero.GatheredParameters`` over the adaptor
parameters (``SERModel.is_adaptor_param``); ``merge=True`` needs every backbone weight, so merge
from a model loaded with ``load_exported``, not inside a ZeRO-3 run.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import dser
from dser.config import ConfigError, from_dict, to_dict
from dser.labels import LabelSet
from dser.model.adaptors import ADAPTORS, DEFAULT_SET, ia3, lora
from dser.safeload import UnsafeCheckpointError, check_model_dir, refusal

log = logging.getLogger(__name__)

ADAPTORS_FORMAT = "dser-adaptors/1"
EXPORT_FORMAT = "dser-export/1"
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before the base model's names


class CheckpointError(ValueError):
    """An adaptor file or export that does not fit the model; the message names the keys or files."""


# --------------------------------------------------------------------------------------------
# Adaptor + head weights
# --------------------------------------------------------------------------------------------


def _fitted_buffers(model) -> dict[str, torch.Tensor]:
    """Persistent buffers registered on the Backbone itself: the fitted feature statistics."""
    backbone = model.backbone
    return {
        f"backbone.{name}": b
        for name, b in backbone.named_buffers(recurse=False)
        if name not in backbone._non_persistent_buffers_set
    }


def adaptor_state(model) -> dict[str, torch.Tensor]:
    """The tensors ``save_adaptors`` writes, by parameter name (detached, on their device).

    Args:
        model: a ``SERModel``.
    """
    state = {n: p.detach() for n, p in model.named_parameters() if model.is_adaptor_param(n)}
    state.update({n: b.detach() for n, b in _fitted_buffers(model).items()})
    return state


def _is_lora(model, name: str) -> bool:
    return model.parameter_group(name).split(" ")[0] == "lora"


def _merges(model, name: str) -> bool:
    """Whether a parameter belongs to an adaptor a merged export folds into the backbone (LoRA, IA³)."""
    adaptor = ADAPTORS.get(model.parameter_group(name).split(" ")[0])
    return adaptor is not None and adaptor.merges


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write safetensors atomically (a crash leaves the previous file, never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def _read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no {what} there; check the path (a run writes it when it finishes)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}); it may be truncated: save it again"
        ) from e


def _listing(names: list[str], limit: int = 10) -> str:
    if not names:
        return "none"
    more = f" … and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _copy_strict(tensors: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], source: Path, hint: str) -> None:
    """Copy ``tensors`` into ``targets`` (same keys), after checking keys and shapes; nothing changes on error."""
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit this model: missing keys: {_listing(missing)}; unexpected keys: "
            f"{_listing(unexpected)}. {hint}"
        )
    for key, target in targets.items():
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(tensors[key].shape)} but the model's is "
                f"{tuple(target.shape)}. {hint}"
            )
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(tensors[key].to(target.device, target.dtype))


def _named_targets(model, names: list[str]) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers of the given names."""
    everything = dict(model.named_parameters())
    everything.update(model.named_buffers())
    return {name: everything[name] for name in names}


def save_adaptors(model, path: str | Path) -> Path:
    """Write the adaptor + head tensors of ``model`` (``adaptor_state``) to a safetensors file.

    Args:
        model: a ``SERModel``.
        path: the file to write (parent directories are created; written atomically).

    Returns:
        ``path``.
    """
    path = Path(path)
    _save_tensors(adaptor_state(model), path, {"format": ADAPTORS_FORMAT})
    return path


def load_adaptors(model, path: str | Path, skip_prefixes: tuple[str, ...] = ()) -> None:
    """Load a ``save_adaptors`` file into ``model``, strictly.

    Args:
        model: a ``SERModel`` built with the same adaptors (and fresh sets) as the saved one.
        path: the safetensors file.
        skip_prefixes: names to leave untouched on both sides, e.g. ``("head.",)`` for a new head.

    Raises:
        CheckpointError: a missing/unreadable file, missing or unexpected keys (listed by name),
            or a shape mismatch.
    """
    path = Path(path)
    tensors = _read_tensors(path, "adaptor file")
    skip = tuple(skip_prefixes)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(skip)}
    expected = [n for n in adaptor_state(model) if not n.startswith(skip)]
    _copy_strict(tensors, _named_targets(model, expected), path,
                 "Was it saved from a model with other adaptors, adaptor settings or backbone?")


# --------------------------------------------------------------------------------------------
# LoRA in peft's format
# --------------------------------------------------------------------------------------------


def _lora_params(hf_model, adapter: str) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters of one adapter, named as in the transformers model."""
    params = {}
    for name, p in hf_model.named_parameters():
        match = re.search(lora.PATTERN, name)
        if match and match.group("set") == adapter:
            params[name] = p
    return params


def _peft_keys(hf_model, adapter: str) -> dict[str, str]:
    """Each LoRA parameter of ``adapter`` → its key in peft's ``adapter_model.safetensors``, named by peft.

    peft drops the adapter name (``lora_A.default.weight`` → ``lora_A.weight``; DoRA's
    ``lora_magnitude_vector.default.weight`` → ``lora_magnitude_vector``) and ``PeftModel``
    prefixes ``base_model.model.``; asking peft per parameter keeps saving and strict loading
    on exactly its naming.
    """
    from peft import get_peft_model_state_dict

    keys = {}
    for name, p in _lora_params(hf_model, adapter).items():
        (key,) = get_peft_model_state_dict(
            hf_model, state_dict={name: p.detach()}, adapter_name=adapter, save_embedding_layers=False
        )
        keys[name] = PEFT_PREFIX + key
    return keys


def _write_peft_dir(config, state: dict[str, torch.Tensor], directory: Path) -> None:
    """Write an adapter as ``PeftModel.save_pretrained`` would: adapter_config.json + adapter_model.safetensors.

    Args:
        config: the peft config (its ``base_model_name_or_path`` and ``inference_mode`` set).
        state: tensors by their key in peft's file (``base_model.model.…``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    _save_tensors(state, directory / "adapter_model.safetensors", {"format": "pt"})


def _save_peft_adapter(model, adapter: str, directory: Path) -> None:
    """Write one LoRA set in peft's format."""
    hf_model = model.backbone.hf_model
    config = copy.deepcopy(hf_model.peft_config[adapter])
    config.base_model_name_or_path = model.cfg.backbone.name
    config.inference_mode = True  # what peft writes for an adapter saved for use
    params = _lora_params(hf_model, adapter)
    state = {key: params[name] for name, key in _peft_keys(hf_model, adapter).items()}
    _write_peft_dir(config, state, directory)


def _load_peft_adapter(model, adapter: str, directory: Path, skip: tuple[str, ...]) -> None:
    """Load a peft-format LoRA set into the model's adapter of the same name, strictly."""
    hf_model = model.backbone.hf_model
    config_path = directory / "adapter_config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing; the export's LoRA set {adapter!r} is incomplete")
    saved = _read_json(config_path, "LoRA config")
    ours = hf_model.peft_config[adapter]
    for key in ("r", "lora_alpha", "use_rslora", "use_dora"):
        if saved.get(key) != getattr(ours, key):
            raise CheckpointError(
                f"{config_path}: {key} is {saved.get(key)!r} but the model's LoRA set {adapter!r} has "
                f"{getattr(ours, key)!r}; build the model with the exported model config"
            )
    prefix = model.module_name(hf_model) + "."
    params = _lora_params(hf_model, adapter)
    keys = _peft_keys(hf_model, adapter)
    skipped = {keys[name] for name in params if (prefix + name).startswith(skip)}
    targets = {key: params[name] for name, key in keys.items() if key not in skipped}
    source = directory / "adapter_model.safetensors"
    tensors = _read_tensors(source, f"LoRA weights of set {adapter!r}")
    tensors = {k: v for k, v in tensors.items() if k not in skipped}
    _copy_strict(tensors, targets, source, "Was it saved with other LoRA targets or layers?")


def _merged_backbone(model) -> torch.nn.Module:
    """A copy of the transformers model with every IA³ and LoRA set folded into its weights and removed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(model.backbone.hf_model)
    ia3.fold_into(model, merged)  # first: it merges the LoRA of the layers it rescales itself
    for name, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            if not module.merged:
                module.merge(safe_merge=True, adapter_names=list(module.active_adapters))
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent) if parent else merged, child, module.get_base_layer())
    if hasattr(merged, "peft_config"):
        del merged.peft_config  # a plain transformers model again
    for module in merged.modules():  # adaptor hooks refer to the live model's adapters
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    return merged


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export_model(
    model, out_dir: str | Path, run_config: dict, label_set: dict | None, merge: bool = False
) -> Path:
    """Write a trained model to an export directory (layout in the module docstring).

    Args:
        model: a ``SERModel``.
        out_dir: the directory (created; a previous export's lora/ and backbone/ are replaced).
        run_config: the resolved run config (written as config.yaml).
        label_set: ``LabelSet.to_dict()`` or None (dimensional task).
        merge: fold LoRA (and, under ``full``, the finetuned weights) into a saved backbone
            instead of writing peft adapters.

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("lora", "ia3", "backbone"):
        shutil.rmtree(out / sub, ignore_errors=True)
    hf_model = model.backbone.hf_model
    hf_prefix = model.module_name(hf_model) + "."
    adapters = lora.adapter_names(hf_model)
    state = {n: t for n, t in adaptor_state(model).items() if not _is_lora(model, n)}
    peft_dirs: dict[str, dict[str, str]] = {"lora": {}, "ia3": {}}
    backbone_dir = None
    if merge and (adapters or ia3.set_names(model) or model.full_names):
        backbone_dir = "backbone"
        _merged_backbone(model).save_pretrained(str(out / backbone_dir))
        state = {n: t for n, t in state.items() if not n.startswith(hf_prefix) and not _merges(model, n)}
    else:
        if merge:
            log.info("export: nothing to merge (no LoRA, IA³ or full finetuning); writing the usual export")
        for adapter in adapters:
            peft_dirs["lora"][adapter] = rel = "lora" if adapter == DEFAULT_SET else f"lora/{adapter}"
            _save_peft_adapter(model, adapter, out / rel)
        for set_name in ia3.set_names(model):  # a copy for peft users; dser reads adaptors.safetensors
            peft_dirs["ia3"][set_name] = rel = "ia3" if set_name == DEFAULT_SET else f"ia3/{set_name}"
            config, tensors = ia3.peft_adapter(model, set_name)
            _write_peft_dir(config, {PEFT_PREFIX + k: v for k, v in tensors.items()}, out / rel)
    _save_tensors(state, out / "adaptors.safetensors", {"format": ADAPTORS_FORMAT})
    (out / "labels.json").write_text(json.dumps(label_set, indent=2) + "\n")
    meta = {
        "format": EXPORT_FORMAT,
        "dser_version": dser.__version__,
        "task": model.task,
        "num_classes": model.num_classes,
        "model": to_dict(model.cfg),
        "fresh_adaptors": list(model.fresh_adaptors),
        "merged": backbone_dir is not None,
        "backbone": backbone_dir,
        "lora": peft_dirs["lora"],
        "ia3": peft_dirs["ia3"],
    }
    (out / "export.json").write_text(json.dumps(meta, indent=2) + "\n")
    # Last: tools take a config.yaml as the sign of a finished export.
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(run_config), sort_keys=False))
    return out


def _read_json(path: Path, what: str, null: bool = False) -> dict | None:
    """``path`` parsed as a JSON object (or ``null``, where ``null`` allows it); anything else
    is a CheckpointError naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: the {what} cannot be read as JSON ({str(e).splitlines()[0]}); "
                              f"the export is damaged: export the run again") from None
    if data is None and null:
        return None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the {what} should be a JSON object, found a {type(data).__name__}; "
                              f"the export is damaged: export the run again")
    return data


EXPORT_KEYS = ("model", "backbone", "merged", "fresh_adaptors", "lora", "num_classes", "task")


def read_export(out_dir: str | Path) -> dict:
    """The ``export.json`` of an export directory.

    Raises:
        CheckpointError: not an export directory (or another format version).
    """
    path = Path(out_dir) / "export.json"
    if not path.is_file():
        raise CheckpointError(f"{Path(out_dir)} holds no dser export (no export.json); did the run finish?")
    meta = _read_json(path, "export description")
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, this dser reads {EXPORT_FORMAT!r}")
    missing = [k for k in EXPORT_KEYS if k not in meta]
    if missing or not isinstance(meta["lora"], dict) or not isinstance(meta["fresh_adaptors"], list):
        raise CheckpointError(f"{path}: " + (f"no {', '.join(missing)}" if missing else "lora/fresh_adaptors of the "
                              "wrong type") + "; the export is damaged: export the run again")
    return meta


def export_labels(out_dir: str | Path) -> dict | None:
    """The label set an export was trained with (``labels.json``), as ``LabelSet.to_dict()``; None if dimensional.

    Raises:
        CheckpointError: not an export directory.
    """
    meta = read_export(out_dir)
    path = Path(out_dir) / "labels.json"
    if not path.is_file():  # export_model always writes it (null without a label set)
        raise CheckpointError(f"{path}: missing; the export is damaged: export the run again")
    labels = _read_json(path, "label set", null=True)  # export_model writes null when it has no label set
    if labels is None:
        return None
    if not isinstance(labels.get("classes"), list):
        raise CheckpointError(f"{path}: no list of classes; the export is damaged: export the run again")
    return labels


def load_export_weights(model, out_dir: str | Path, skip_prefixes: tuple[str, ...] = ()) -> None:
    """Load an export's head, adaptors and LoRA sets into an already built model, strictly.

    Stage 2 uses this to start from a stage-1 export: build the model with the same model
    config, load, then ``add_fresh_adaptors`` and ``freeze``.

    Args:
        model: a ``SERModel`` built like the exported one (merged / full exports: with
            ``model.backbone.name`` set to the export's backbone/ directory).
        out_dir: the export directory.
        skip_prefixes: parameter names to leave untouched, e.g. ``("head.",)`` for a new head.

    Raises:
        CheckpointError: a missing file, LoRA sets that differ, missing/unexpected keys, shapes.
    """
    out = Path(out_dir)
    meta = read_export(out)
    skip = tuple(skip_prefixes)
    hf_model = model.backbone.hf_model
    hf_prefix = model.module_name(hf_model) + "."
    if meta["backbone"]:
        wanted = (out / meta["backbone"]).resolve()
        if Path(model.cfg.backbone.name).expanduser().resolve() != wanted:
            raise CheckpointError(
                f"{out} holds its own backbone weights in {wanted}; build the model with "
                f"model.backbone.name: {wanted} (the model uses {model.cfg.backbone.name!r})"
            )
    have, want = lora.adapter_names(hf_model), list(meta["lora"])
    if sorted(have) != sorted(want):
        raise CheckpointError(
            f"{out} has LoRA sets {want or 'none'} but the model has {have or 'none'}; build it with the "
            f"exported model config (adaptors and fresh adaptors)"
        )
    tensors = _read_tensors(out / "adaptors.safetensors", "adaptor file")
    tensors = {k: v for k, v in tensors.items() if not k.startswith(skip)}
    expected = [
        n for n in adaptor_state(model)
        if not _is_lora(model, n) and not n.startswith(skip) and not (meta["backbone"] and n.startswith(hf_prefix))
    ]
    _copy_strict(tensors, _named_targets(model, expected), out / "adaptors.safetensors",
                 "Build the model with the exported model config (export.json).")
    for adapter, rel in meta["lora"].items():
        _load_peft_adapter(model, adapter, out / rel, skip)


def load_exported(out_dir: str | Path):
    """Rebuild a trained model from an export directory.

    Args:
        out_dir: a directory written by ``export_model``.

    Returns:
        ``(model, run_config, label_set)``: the ``SERModel`` in eval mode, the run config dict
        (config.yaml) and the ``LabelSet`` (None for a dimensional model).

    Raises:
        CheckpointError: not an export or files that do not fit; ``BackboneError`` when the
            base backbone is not available (non-merged exports need it, e.g. in the HF cache);
            ``UnsafeCheckpointError`` when a pickled backbone file holds more than tensors.
    """
    from dser.model.build import ModelConfig, build_model

    out = Path(out_dir)
    meta = read_export(out)
    try:
        cfg = from_dict(ModelConfig, meta["model"], where=f"{out / 'export.json'}: model")
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    fresh = list(meta["fresh_adaptors"])
    if meta["backbone"]:
        cfg.backbone.name = str((out / meta["backbone"]).resolve())
    if meta["merged"]:
        # LoRA and IA³ live in the merged backbone's weights now.
        cfg.adaptors = [a for a in cfg.adaptors if not ADAPTORS[a].merges] or ["none"]
        fresh = [a for a in fresh if not ADAPTORS[a].merges]
    # A local backbone directory (the export's own backbone/ above all) may hold pickled weights
    # (pytorch_model.bin): transformers reads them with weights_only=True; checking first names the file.
    check_model_dir(cfg.backbone.name)
    try:
        model = build_model(cfg, num_classes=meta["num_classes"], task=meta["task"])
    except pickle.UnpicklingError as e:  # transformers' weights_only refusal, for a backbone elsewhere
        raise UnsafeCheckpointError(refusal(f"backbone {cfg.backbone.name} of {out}", e)) from None
    model.add_fresh_adaptors(fresh)
    load_export_weights(model, out)
    run_config = {}
    if (out / "config.yaml").is_file():
        try:
            run_config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise CheckpointError(f"{out / 'config.yaml'}: the run config cannot be read as YAML "
                                  f"({str(e).splitlines()[0]}); the export is damaged: export the run again") from None
        if not isinstance(run_config, dict):
            raise CheckpointError(f"{out / 'config.yaml'}: the run config should be a mapping, found a "
                                  f"{type(run_config).__name__}; the export is damaged: export the run again")
    labels = export_labels(out)
    try:
        label_set = LabelSet.from_dict(labels) if labels else None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{out / 'labels.json'}: not a label set ({e}); the export is damaged: "
                              f"export the run again") from None
    return model.eval(), run_config, label_set
