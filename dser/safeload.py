"""Reading pickled checkpoint files without running code from them.

A run directory is shared between colleagues and clusters, so a file in it may have been
written by anyone. ``torch.load(weights_only=False)`` — what DeepSpeed's own checkpoint engine
does — runs whatever the pickle says (``os.system`` included). Every pickled file dser reads
goes through :func:`safe_load` instead: ``torch.load(weights_only=True)``, which rebuilds only
tensors and plain containers, plus exactly the DeepSpeed classes its checkpoint files hold
(``DEEPSPEED_GLOBALS``). Any other global is refused with one line naming the file and the
global, before anything of the file is used.

What a run directory holds and how dser reads it::

    checkpoints/<tag>/*model_states.pt   DeepSpeed: module, scheduler    safe_load, through dser's checkpoint
    checkpoints/<tag>/*optim_states.pt   DeepSpeed: optimizer (ZeRO)     engine (use_safe_loads)
    checkpoints/<tag>/dser_rank{R}.pt    dser: step, data position, RNG  safe_load
                                         (all three checked first, on every rank: check_checkpoint_dir)
    best/, export/                       safetensors, JSON, YAML         never unpickled
    export/backbone/ (merged exports)    transformers' save_pretrained   check_model_dir, then from_pretrained,
                                         which reads a .bin with torch.load(weights_only=True) (its default)

Usage::

    state = safe_load(ckpt / "dser_rank0.pt")
    check_checkpoint_dir(ckpt)      # every rank, before any process group: every file
    use_safe_loads(engine)          # engine.load_checkpoint reads through safe_load
"""

from __future__ import annotations

import functools
import importlib
import pickle
import re
import zipfile
from pathlib import Path

import torch

# The globals a DeepSpeed checkpoint of dser's holds beyond tensors and plain containers (which
# torch's weights-only unpickler reads by itself), and why. Found by writing a checkpoint with
# every ds_configs/ file (zero0 … zero3_offload) in fp32 and bf16 and listing what
# torch.serialization.get_unsafe_globals_in_checkpoint reports (ZeRO-0 files hold none); fp16
# needs a GPU, so its entry comes from DeepSpeed 0.19's source (fp16/loss_scaler.py).
DEEPSPEED_GLOBALS = (
    # ZeRO 1-3 optimizer states, key "loss_scaler": the optimizer pickles its scaler object;
    # CreateLossScaler makes this static one for fp32 and bf16 (scale 1) and for a fixed fp16 scale.
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    # … and this one for fp16 with dynamic loss scaling (ds_configs/ say "loss_scale": 0).
    # Its attributes are numbers, booleans and torch.float16, which weights_only reads.
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    # ZeRO 1-3 optimizer states, key "zero_stage": the stage as an enum member.
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    # ZeRO 1-2 optimizer states, key "param_slice_mappings": where each parameter lies in the
    # flat partition (a dataclass of start and numel), kept for universal checkpoints.
    "deepspeed.utils.tensor_fragment.fragment_address",
)

# Pickled weight files a model directory may hold, as transformers looks for them.
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


class UnsafeCheckpointError(ValueError):
    """A pickled file that needs a global dser does not allow, or cannot be read; names the file.

    A ``ValueError``, like ``CheckpointError``: the commands print it as one line."""


@functools.cache
def _allowed() -> list:
    """The classes of ``DEEPSPEED_GLOBALS`` (imported on first use: only the recipes import DeepSpeed)."""
    allowed = []
    for name in DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            # DeepSpeed absent or the class renamed: a file that needs it is refused, naming it.
            continue
    return allowed


def _refused_global(message: str) -> str | None:
    match = re.search(r"GLOBAL (\S+)", message)
    return match.group(1) if match else None


def refusal(path: Path | str, error: pickle.UnpicklingError) -> str:
    """The one line that says why ``path`` was not loaded, from torch's weights-only error."""
    message = str(error)
    name = _refused_global(message)
    if name:
        why = f"it needs the global '{name}', which is not a tensor or a DeepSpeed class dser allows"
    else:
        # Another weights-only refusal (an object built in a way only full unpickling allows).
        detail = message.split("WeightsUnpickler error:")[-1].strip().splitlines()
        why = f"it holds something other than tensors ({detail[-1] if detail else 'unsupported pickle'})"
    return f"{path}: refusing to load: {why}; the checkpoint was not written by dser or was tampered with"


def safe_load(path: Path | str, map_location=None, mmap: bool = False, deepspeed: bool = True):
    """``torch.load(path, weights_only=True)`` allowing ``DEEPSPEED_GLOBALS`` and nothing else.

    Args:
        path: a file written by ``torch.save``.
        map_location: as for ``torch.load``.
        mmap: map the tensors' bytes instead of reading them (zip-format files only).
        deepspeed: allow ``DEEPSPEED_GLOBALS`` (False: tensors and plain containers only, for
            files DeepSpeed did not write, such as a backbone's weights).

    Returns:
        The loaded object.

    Raises:
        UnsafeCheckpointError: the file needs another global (named), or is not a readable
            ``torch.save`` file.
    """
    try:
        with torch.serialization.safe_globals(_allowed() if deepspeed else []):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(refusal(path, e)) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(f"{path}: not a readable torch checkpoint ({reason}); it may be truncated "
                                    f"or damaged") from None


def check_file(path: Path | str, deepspeed: bool = True) -> None:
    """Unpickle ``path`` as :func:`safe_load` would, its tensors mapped rather than read.

    Raises:
        UnsafeCheckpointError: as :func:`safe_load`.
    """
    zipped = zipfile.is_zipfile(path)  # mmap needs torch's zip format; an old-format file is read whole
    safe_load(path, map_location="cpu", mmap=zipped, deepspeed=deepspeed)


def check_checkpoint_dir(directory: Path | str) -> None:
    """Refuse a checkpoint directory if any of its ``*.pt`` files needs a global dser does not allow.

    The recipe calls it on every rank before any process group starts, each rank over every
    file (their pickles only: tensors are mapped, not read): a tampered file that only one rank
    would load stops them all alike with one line, instead of one rank failing while the others
    wait for it at their next collective.

    Raises:
        UnsafeCheckpointError: the first refusal, naming its file and the global.
    """
    for path in sorted(Path(directory).glob("*.pt")):
        check_file(path)


def check_model_dir(directory: Path | str) -> None:
    """Refuse a local model directory whose pickled weight files (``pytorch_model.bin`` …) hold
    anything but tensors, naming the file; transformers would refuse them too (it loads them with
    ``weights_only=True``), but without saying which file.

    Raises:
        UnsafeCheckpointError: naming the file and the global.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    for pattern in PICKLED_WEIGHTS:
        for path in sorted(directory.glob(pattern)):
            check_file(path, deepspeed=False)


def use_safe_loads(engine) -> None:
    """Make ``engine.load_checkpoint`` read every file through :func:`safe_load`.

    DeepSpeed's ``TorchCheckpointEngine.load`` hard-codes ``weights_only=False``; the engine
    DeepSpeed made is replaced by the same one with a safe ``load`` (saving is unchanged).

    Raises:
        UnsafeCheckpointError: the DeepSpeed config loads universal checkpoints, which DeepSpeed
            reads with ``torch.load(weights_only=False)`` outside its checkpoint engine.
    """
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if engine.load_universal_checkpoint():
        raise UnsafeCheckpointError("deepspeed.config: checkpoint.load_universal is set; dser does not load "
                                    "universal checkpoints (DeepSpeed unpickles them without weights_only)")

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch engine, loading with ``weights_only=True`` and ``DEEPSPEED_GLOBALS``."""

        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location)

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise UnsafeCheckpointError(f"deepspeed.config selects the {type(engine.checkpoint_engine).__name__} "
                                    f"checkpoint engine; dser loads checkpoints only through DeepSpeed's torch engine "
                                    f"(drop the checkpoint writer / datastates sections)")
    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(engine.checkpoint_engine.__dict__)  # the same settings (zip serialization …)
    engine.checkpoint_engine = safe
