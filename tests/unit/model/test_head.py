"""Head and losses: pooling never sees padding, outputs per task, cross-entropy and CCC against
independent references (torch's own cross-entropy, CCC written out in numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dser.config import ConfigError, from_dict
from dser.model.head import (
    AttentiveStatsPooling,
    Head,
    HeadConfig,
    ccc_loss,
    concordance_cc,
    cross_entropy,
    masked_mean,
)

H = 16


def frames(seed: int = 0, b: int = 3, f: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, f, H, generator=g)
    mask = torch.ones(b, f, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 1:] = False
    return x, mask


def ccc_numpy(p: np.ndarray, t: np.ndarray) -> float:
    mp, mt = p.mean(), t.mean()
    cov = ((p - mp) * (t - mt)).mean()
    return 2 * cov / (p.var() + t.var() + (mp - mt) ** 2)


def test_masked_mean_is_the_mean_of_valid_frames_only():
    x, mask = frames()
    garbage = x.clone()
    garbage[~mask] = 1e6  # padding content must not matter
    pooled = masked_mean(garbage, mask)
    for i in range(3):
        torch.testing.assert_close(pooled[i], x[i, mask[i]].mean(0))


def test_attentive_stats_pooling_ignores_padding():
    torch.manual_seed(0)
    pool = AttentiveStatsPooling(H, 8)
    x, mask = frames()
    garbage = x.clone()
    garbage[~mask] = 1e3
    out = pool(garbage, mask)
    assert out.shape == (3, 2 * H)
    for i in range(3):
        alone = pool(x[i : i + 1, mask[i]], mask[i : i + 1, mask[i]])  # the clip without padding
        torch.testing.assert_close(out[i], alone[0])
    # one valid frame: mean is that frame, std is the floor
    torch.testing.assert_close(out[2, :H], x[2, 0])
    torch.testing.assert_close(out[2, H:], torch.full((H,), 1e-3))


@pytest.mark.parametrize("pooling, width", [("mean", 32), ("attentive_stats", 64)])
@pytest.mark.parametrize("task", ["categorical", "dimensional", "both"])
def test_output_shapes_per_task(task, pooling, width):
    torch.manual_seed(0)
    head = Head(H, HeadConfig(projector_dim=32, pooling=pooling), task, num_classes=5).eval()
    x, mask = frames()
    out = head(x, mask)
    assert out["pooled"].shape == (3, width)
    assert (out["logits"] is None) == (task == "dimensional")
    assert (out["attributes"] is None) == (task == "categorical")
    if out["logits"] is not None:
        assert out["logits"].shape == (3, 5)
    if out["attributes"] is not None:
        assert out["attributes"].shape == (3, 3)
        assert ((out["attributes"] > 0) & (out["attributes"] < 1)).all()  # sigmoid by default


def test_linear_regressor_output_is_unsquashed():
    torch.manual_seed(0)
    cfg = HeadConfig(projector_dim=8, regressor_output="linear", dropout=0.0)
    head = Head(H, cfg, "dimensional", None)
    with torch.no_grad():
        head.regressor.bias.fill_(5.0)
    x, mask = frames()
    assert (head(x, mask)["attributes"] > 1).all()


def test_projector_activation_option():
    torch.manual_seed(0)
    x, mask = frames()
    relu = Head(H, HeadConfig(projector_dim=8, activation="relu"), "categorical", 4).eval()
    # with ReLU, each pooled channel is a mean of non-negative values
    assert (relu(x, mask)["pooled"] >= 0).all()
    plain = Head(H, HeadConfig(projector_dim=8), "categorical", 4).eval()
    assert (plain(x, mask)["pooled"] < 0).any()


def test_head_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="head.poolin"):
        from_dict(HeadConfig, {"poolin": "mean"}, where="model.head")
    with pytest.raises(ConfigError, match="model.head.pooling"):
        from_dict(HeadConfig, {"pooling": "max"}, where="model.head")
    with pytest.raises(ConfigError, match="dropout"):
        from_dict(HeadConfig, {"dropout": 1.5}, where="model.head")
    with pytest.raises(ValueError, match="at least 2 classes"):
        Head(H, HeadConfig(), "categorical", None)
    with pytest.raises(ValueError, match="task must be one of"):
        Head(H, HeadConfig(), "regression", 4)


def test_cross_entropy_matches_torch_with_weights_and_ignored_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g)
    target = torch.tensor([0, 3, -100, 2, 2, -100])
    weights = torch.tensor([0.5, 1.0, 2.0, 1.5])
    torch.testing.assert_close(cross_entropy(logits, target), F.cross_entropy(logits, target, ignore_index=-100))
    torch.testing.assert_close(
        cross_entropy(logits, target, weights), F.cross_entropy(logits, target, weight=weights, ignore_index=-100)
    )


def test_cross_entropy_without_labels_is_zero_and_backpropagates():
    logits = torch.randn(3, 4, requires_grad=True)
    loss = cross_entropy(logits, torch.full((3,), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_ccc_matches_numpy_reference_and_bounds():
    rng = np.random.default_rng(0)
    p, t = rng.random(20), rng.random(20)
    got = concordance_cc(torch.tensor(p), torch.tensor(t)).item()
    assert got == pytest.approx(ccc_numpy(p, t), abs=1e-5)
    assert concordance_cc(torch.tensor(t), torch.tensor(t)).item() == pytest.approx(1.0, abs=1e-5)
    assert concordance_cc(torch.tensor(t), torch.tensor(1 - t)).item() < -0.9
    # a constant shift lowers CCC (unlike Pearson correlation)
    assert concordance_cc(torch.tensor(t + 0.3), torch.tensor(t)).item() < 0.9


def test_ccc_loss_ignores_nan_targets_per_attribute():
    rng = np.random.default_rng(1)
    pred = rng.random((8, 3))
    target = rng.random((8, 3))
    target[[1, 4], 0] = np.nan  # valence missing on two clips
    target[:, 2] = np.nan  # dominance missing everywhere
    target[:7, 1] = np.nan  # arousal on one clip only: no CCC possible
    loss = ccc_loss(torch.tensor(pred, dtype=torch.float32), torch.tensor(target, dtype=torch.float32))
    keep = ~np.isnan(target[:, 0])
    expected = 1 - ccc_numpy(pred[keep, 0], target[keep, 0])  # only valence counts
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_ccc_loss_without_usable_attributes_is_zero_and_backpropagates():
    pred = torch.rand(4, 3, requires_grad=True)
    loss = ccc_loss(pred, torch.full((4, 3), float("nan")))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(pred.grad).all()


@pytest.mark.parametrize("weight", [1.0, 0.25])
def test_both_task_loss_is_weighted_sum(weight):
    torch.manual_seed(0)
    head = Head(H, HeadConfig(projector_dim=8, attribute_loss_weight=weight), "both", 4).eval()
    x, mask = frames()
    out = head(x, mask)
    batch = {"emotion": torch.tensor([1, -100, 2]), "attributes": torch.tensor([[0.1, 0.5, 0.9],
                                                                                [0.4, float("nan"), 0.3],
                                                                                [0.8, 0.2, 0.6]])}
    loss, parts = head.loss(out, batch)
    ce = F.cross_entropy(out["logits"], batch["emotion"], ignore_index=-100)
    ccc = ccc_loss(out["attributes"], batch["attributes"])
    torch.testing.assert_close(parts["ce"], ce.detach())
    torch.testing.assert_close(parts["ccc_loss"], ccc.detach())
    torch.testing.assert_close(loss, ce + weight * ccc)
