import numpy as np
import pytest
from sklearn import metrics as skm

from fakescope.metrics import METRIC_KEYS, DetectionMetrics, binary_metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    p = np.clip(y * 0.3 + rng.uniform(0, 0.7, 500), 0, 1)
    m = binary_metrics(y, p, threshold=0.5)
    pred = (p >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["average_precision"] == pytest.approx(skm.average_precision_score(y, p))
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert m["confusion"] == [[tn, fp], [fn, tp]]
    assert m["real_accuracy"] == pytest.approx(tn / (tn + fp))
    assert m["fake_accuracy"] == pytest.approx(tp / (tp + fn))
    assert m["n"] == 500
    assert set(m) == set(METRIC_KEYS)


def test_one_class_root_gives_null_for_two_class_metrics():
    m = binary_metrics([0, 0, 0, 0], [0.1, 0.7, 0.2, 0.3])
    assert m["accuracy"] == 0.75 and m["real_accuracy"] == 0.75
    assert m["roc_auc"] is None and m["average_precision"] is None and m["f1"] is None
    assert m["recall"] is None and m["fake_accuracy"] is None
    assert m["confusion"] == [[3, 1], [0, 0]]


def test_threshold_and_argument_errors():
    with pytest.raises(ValueError, match=r"expected a threshold in \[0, 1\], got 1.5"):
        binary_metrics([0, 1], [0.2, 0.8], threshold=1.5)
    with pytest.raises(ValueError, match="same length"):
        binary_metrics([0, 1, 1], [0.2, 0.8])
    with pytest.raises(ValueError, match="expected labels in"):
        binary_metrics([0, 2], [0.2, 0.8])


def test_stateful_wrapper_per_generator():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    p = rng.uniform(0, 1, 200)
    g = np.where(np.arange(200) < 120, "a", "b")
    dm = DetectionMetrics(0.4)
    for s in range(0, 200, 50):
        dm.update(y[s:s + 50], p[s:s + 50], g[s:s + 50].tolist())
    out = dm.compute()
    assert out["overall"] == binary_metrics(y, p, 0.4)
    assert out["per_generator"]["a"] == binary_metrics(y[:120], p[:120], 0.4)
    assert out["per_generator"]["b"]["n"] == 80
