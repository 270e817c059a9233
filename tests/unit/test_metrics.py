"""Metrics agree with scikit-learn and a reference CCC on the same predictions."""

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

from dser.metrics import (PredictionAccumulator, compute_metrics, concordance_cc, gather_predictions,
                          macro_f1, unweighted_accuracy, weighted_accuracy)


def _reference_ccc(x, y):
    # Lin (1989) written from the formula with numpy's own covariance (ddof=0).
    cov = np.cov(x, y, bias=True)
    return 2 * cov[0, 1] / (cov[0, 0] + cov[1, 1] + (x.mean() - y.mean()) ** 2)


@pytest.mark.parametrize("seed", range(5))
def test_categorical_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 4, 200)
    # a biased classifier that never predicts class 3 and confuses 1 with 2
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 3, 200))
    assert unweighted_accuracy(y_true, y_pred) == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert weighted_accuracy(y_true, y_pred) == pytest.approx(accuracy_score(y_true, y_pred))
    assert macro_f1(y_true, y_pred) == pytest.approx(f1_score(y_true, y_pred, average="macro"))


def test_macro_f1_with_predicted_class_absent_from_reference():
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 2, 1, 1])
    assert macro_f1(y_true, y_pred) == pytest.approx(f1_score(y_true, y_pred, average="macro"))


@pytest.mark.parametrize("seed", range(3))
def test_ccc_equals_reference(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(100)
    x = 0.5 * y + 0.2 + 0.1 * rng.standard_normal(100)
    assert concordance_cc(x, y) == pytest.approx(_reference_ccc(x, y))
    assert concordance_cc(y, y) == pytest.approx(1.0)
    assert concordance_cc(-y, y) < 0


def test_compute_metrics_from_accumulated_batches():
    rng = np.random.default_rng(0)
    acc = PredictionAccumulator()
    all_true, all_pred, all_attr, all_attr_t = [], [], [], []
    for b in range(4):
        logits = torch.tensor(rng.standard_normal((5, 4)), dtype=torch.float32)
        emo = torch.tensor(rng.integers(0, 4, 5))
        emo[0] = -100  # an unlabelled clip must not count
        attr = torch.tensor(rng.random((5, 3)), dtype=torch.float32)
        attr_t = torch.tensor(rng.random((5, 3)), dtype=torch.float32)
        attr_t[1, 2] = float("nan")
        acc.add([f"u{b}_{i}" for i in range(5)], logits, emo, attr, attr_t)
        keep = emo.numpy() >= 0
        all_true.append(emo.numpy()[keep])
        all_pred.append(logits.argmax(-1).numpy()[keep])
        all_attr.append(attr.numpy())
        all_attr_t.append(attr_t.numpy())
    m = compute_metrics(gather_predictions(acc.as_dict()), ["n", "h", "a", "s"])
    y_true, y_pred = np.concatenate(all_true), np.concatenate(all_pred)
    assert m["samples"] == 20 and m["labelled"] == 16
    assert m["ua"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["wa"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["confusion"] == confusion_matrix(y_true, y_pred, labels=range(4)).tolist()
    a, t = np.concatenate(all_attr), np.concatenate(all_attr_t)
    keep = np.isfinite(t[:, 2])
    assert m["ccc_dominance"] == pytest.approx(_reference_ccc(a[keep, 2], t[keep, 2]), rel=1e-5)
    assert m["ccc_mean"] == pytest.approx(np.mean([m["ccc_valence"], m["ccc_arousal"], m["ccc_dominance"]]))


def test_gather_refuses_duplicates():
    acc = PredictionAccumulator()
    acc.add(["a", "a"], torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), None, None)
    with pytest.raises(ValueError, match="more than once"):
        gather_predictions(acc.as_dict())
