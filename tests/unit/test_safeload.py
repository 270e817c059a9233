"""dser.safeload: pickled files load as tensors and DeepSpeed's own classes, anything else is
refused in one line naming the file and the global, and the payload never runs.

Each payload is first shown to be live (plain ``torch.load(weights_only=False)`` runs it), so a
test that passes because the payload was inert cannot pass here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dser.safeload import (DEEPSPEED_GLOBALS, UnsafeCheckpointError, check_checkpoint_dir, check_model_dir,
                           safe_load)


class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path, legacy: bool = False) -> None:
    """Add a payload to the dict saved in ``path`` (the rest of its content kept), and check it is live."""
    state = torch.load(path, weights_only=False) if path.exists() else {}
    state["payload"] = Payload(marker)
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    torch.load(path, weights_only=False)  # what DeepSpeed's own engine would do
    assert marker.exists(), "the payload is not live"
    marker.unlink()


def refusal_line(path: Path) -> str:
    return (f"{path}: refusing to load: it needs the global 'posix.system', which is not a tensor or a DeepSpeed "
            f"class dser allows; the checkpoint was not written by dser or was tampered with")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_a_payload_is_refused_in_one_line_naming_file_and_global_and_never_runs(tmp_path, legacy):
    f, marker = tmp_path / "dser_rank0.pt", tmp_path / "MARKER"
    torch.save({"step": 12, "weights": torch.arange(4.0)}, f)
    plant(f, marker, legacy=legacy)
    with pytest.raises(UnsafeCheckpointError) as e:
        safe_load(f)
    assert str(e.value) == refusal_line(f)
    with pytest.raises(UnsafeCheckpointError):
        check_checkpoint_dir(tmp_path)  # the pre-check (mapped tensors on zip files, whole reads else)
    assert not marker.exists()


def test_tensors_and_plain_state_load(tmp_path):
    f = tmp_path / "state.pt"
    state = {"step": 3, "rng": {"torch": torch.get_rng_state(), "python": (3, (1, 2), None)}, "history": [{"ua": 0.5}]}
    torch.save(state, f)
    got = safe_load(f)
    assert got["step"] == 3 and torch.equal(got["rng"]["torch"], state["rng"]["torch"])
    assert got["history"] == [{"ua": 0.5}] and got["rng"]["python"] == (3, (1, 2), None)
    check_checkpoint_dir(tmp_path)


def test_every_allowed_deepspeed_global_exists_and_loads(tmp_path):
    """Each entry names a class of this DeepSpeed; the fp16 loss scaler (written only on a GPU)
    round-trips through safe_load, and torch's default weights_only refuses it."""
    import importlib

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    for name in DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), name
    # as ZeRO's optimizer state_dict holds them (fp16: dynamic loss scaling, ds_configs' loss_scale 0)
    scaler = DynamicLossScaler(init_scale=2 ** 16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False, dtype=torch.float16)
    scaler.cur_iter, scaler.last_overflow_iter = 37, 12
    state = {"loss_scaler": scaler, "static": LossScaler(scale=1.0), "zero_stage": ZeroStageEnum.gradients,
             "param_slice_mappings": [{"w": fragment_address(numel=6, start=2)}]}
    f = tmp_path / "optim.pt"
    torch.save(state, f)
    with pytest.raises(Exception, match="DynamicLossScaler|LossScaler|ZeroStageEnum|fragment_address"):
        torch.load(f, weights_only=True)  # not torch's by default: the allow-list is what lets them in
    got = safe_load(f)
    assert type(got["loss_scaler"]) is DynamicLossScaler and vars(got["loss_scaler"]) == vars(scaler)
    assert got["static"].cur_scale == 1.0 and got["zero_stage"] is ZeroStageEnum.gradients
    assert got["param_slice_mappings"][0]["w"] == fragment_address(numel=6, start=2)


def test_a_truncated_file_is_one_line(tmp_path):
    f = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(100)}}, f)
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(UnsafeCheckpointError, match=f"^{f}: not a readable torch checkpoint"):
        safe_load(f)


def test_a_pickled_backbone_file_is_refused_by_dser_naming_it_and_by_transformers(tmp_path):
    """transformers' from_pretrained loads a pytorch_model.bin with weights_only=True (its default
    here); dser checks such files first, to say which one."""
    from safetensors.torch import load_file

    from dser.model.backbones import load_backbone, tiny_backbone_dir

    d = tiny_backbone_dir("tiny-wavlm", tmp_path / "backbone")
    marker = tmp_path / "MARKER"
    weights = d / "pytorch_model.bin"
    torch.save(load_file(d / "model.safetensors"), weights)
    (d / "model.safetensors").unlink()
    plant(weights, marker)
    with pytest.raises(UnsafeCheckpointError) as e:
        check_model_dir(d)
    assert str(e.value) == refusal_line(weights)
    with pytest.raises(Exception, match="posix.system"):  # transformers alone: refused, but no file named
        load_backbone(str(d))
    assert not marker.exists()
