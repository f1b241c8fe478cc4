"""Detection metrics against figures computed by hand (AI = 1 is the positive class)."""

import math

import numpy as np
import pytest

from fakescope.metrics import METRIC_KEYS, DetectionMetrics, binary_metrics

# six images; at threshold 0.5 the calls are AI, AI, AI, nature, nature, AI (0.5 == threshold counts as AI)
Y = [1, 1, 0, 1, 0, 0]
P = [0.9, 0.6, 0.6, 0.3, 0.2, 0.5]


def test_hand_computed_confusion_and_threshold_metrics():
    m = binary_metrics(Y, P, threshold=0.5)
    # tp: #0 #1; fp: #2 #5 (0.5 >= 0.5); fn: #3; tn: #4
    assert m["confusion"] == [[1, 2], [1, 2]]
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 3) == pytest.approx(m["fake_accuracy"])
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))  # 4/7
    assert m["real_accuracy"] == pytest.approx(1 / 3)
    assert set(m) == set(METRIC_KEYS)


def test_hand_computed_ranking_metrics():
    m = binary_metrics(Y, P)
    # ROC-AUC: pairs (ai, nature) ranked right, ties count half: 0.9 beats 3; 0.6 ties 0.6, beats 0.2 and 0.5;
    # 0.3 beats 0.2 only: (3 + 2.5 + 1) / 9
    assert m["roc_auc"] == pytest.approx(6.5 / 9)
    # AP = sum over score levels of (recall gain) x precision: 0.9 -> R 1/3, P 1; 0.6 -> R 2/3, P 2/3;
    # 0.5 -> no gain; 0.3 -> R 1, P 3/5
    assert m["average_precision"] == pytest.approx(1 / 3 * 1 + 1 / 3 * 2 / 3 + 1 / 3 * 3 / 5)


def test_score_equal_to_threshold_counts_as_ai():
    assert binary_metrics([0], [0.5], threshold=0.5)["confusion"] == [[0, 1], [0, 0]]
    assert binary_metrics([1], [0.5], threshold=0.5)["confusion"] == [[0, 0], [0, 1]]
    assert binary_metrics([1], [np.nextafter(0.5, 0)], threshold=0.5)["confusion"] == [[0, 0], [1, 0]]
    assert binary_metrics([0, 1], [0.0, 0.0], threshold=0.0)["confusion"] == [[0, 1], [0, 1]]  # 0: all AI
    assert binary_metrics([0, 1], [0.99, 1.0], threshold=1.0)["confusion"] == [[1, 0], [0, 1]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), -0.1, 1.5])
def test_non_finite_or_out_of_range_scores_are_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"expected finite scores p_ai in \[0, 1\], got 1 other value.*position 2"):
        binary_metrics([0, 1, 1], [0.2, 0.8, bad])
    dm = DetectionMetrics()
    dm.update([0, 1], [0.2, bad], ["g", "g"])
    with pytest.raises(ValueError, match="position 1"):
        dm.compute()


def test_one_class_root_reports_only_what_the_detector_decides():
    nature = binary_metrics([0, 0, 0, 0], [0.1, 0.7, 0.2, 0.3])
    assert nature["confusion"] == [[3, 1], [0, 0]]
    assert nature["accuracy"] == 0.75 and nature["real_accuracy"] == 0.75
    for k in ("precision", "recall", "f1", "roc_auc", "average_precision", "fake_accuracy"):
        assert nature[k] is None, k  # precision would be 0 whatever the detector did
    ai = binary_metrics([1, 1, 1, 1], [0.9, 0.7, 0.2, 0.6])
    assert ai["confusion"] == [[0, 0], [1, 3]]
    assert ai["accuracy"] == 0.75 and ai["recall"] == 0.75 and ai["fake_accuracy"] == 0.75
    for k in ("precision", "f1", "roc_auc", "average_precision", "real_accuracy"):
        assert ai[k] is None, k  # precision would be 1 whatever the detector did


def test_nothing_called_ai_and_empty_input():
    m = binary_metrics([0, 1, 1], [0.1, 0.2, 0.3])
    assert m["confusion"] == [[1, 0], [2, 0]]
    assert m["precision"] is None and m["recall"] == 0.0 and m["f1"] == 0.0
    empty = binary_metrics([], [])
    assert empty["n"] == 0 and empty["confusion"] == [[0, 0], [0, 0]]
    assert all(empty[k] is None for k in METRIC_KEYS if k not in ("n", "confusion"))


def test_threshold_and_argument_errors():
    with pytest.raises(ValueError, match=r"expected a threshold in \[0, 1\], got 1.5"):
        binary_metrics([0, 1], [0.2, 0.8], threshold=1.5)
    with pytest.raises(ValueError, match="same length"):
        binary_metrics([0, 1, 1], [0.2, 0.8])
    with pytest.raises(ValueError, match="expected labels in"):
        binary_metrics([0, 2], [0.2, 0.8])
    with pytest.raises(ValueError, match="expected labels in"):
        binary_metrics([0, 0.5], [0.2, 0.8])  # not silently truncated to 0


def test_per_generator_figures_are_each_generators_own():
    dm = DetectionMetrics(0.5)
    dm.update(Y[:3], P[:3], ["a", "a", "b"])  # batches split across generators
    dm.update(Y[3:], P[3:], ["a", "b", "b"])
    out = dm.compute()
    assert out["overall"] == binary_metrics(Y, P, 0.5)
    a, b = out["per_generator"]["a"], out["per_generator"]["b"]
    assert a["confusion"] == [[0, 0], [1, 2]] and a["n"] == 3  # images #0 #1 #3: all AI, one missed
    assert b["confusion"] == [[1, 2], [0, 0]] and b["n"] == 3  # images #2 #4 #5: all nature, two false alarms
    assert a["precision"] is None and math.isclose(a["recall"], 2 / 3)
    assert math.isclose(b["real_accuracy"], 1 / 3)
