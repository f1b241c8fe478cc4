import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fakescope.calibration import (
    Calibration,
    calibrate_p_ai,
    fit_calibration,
    fit_temperature,
    logit,
    read_calibration,
    resolve_decision,
    sigmoid,
    threshold_for_fpr,
    write_calibration,
)
from fakescope.errors import FakescopeError
from fakescope.metrics import brier, calibration_metrics, ece, eer, reliability_bins, tpr_at_fpr


def overconfident(n=4000, scale=4.0, seed=0):
    """Labels drawn from true log-odds z; the 'model' reports scale * z (over-confident)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    y = (rng.uniform(size=n) < sigmoid(z)).astype(int)
    return y, sigmoid(scale * z)


def test_temperature_scaling_lowers_ece_on_overconfident_scores():
    y, p = overconfident()
    t = fit_temperature(y, logit(p))
    assert 3.0 < t < 5.0  # recovers the over-confidence factor
    cal = fit_calibration(y, p, 0.05)
    pc = cal.p_ai(p)
    assert ece(y, pc) < 0.5 * ece(y, p)
    assert cal.fit["ece_after"] == pytest.approx(ece(y, pc)) and cal.fit["ece_before"] == pytest.approx(ece(y, p))
    assert brier(y, pc) < brier(y, p) and cal.fit["nll_after"] < cal.fit["nll_before"]
    # same ranking: ROC-AUC unchanged, order of scores unchanged
    assert roc_auc_score(y, pc) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert (np.argsort(pc, kind="stable") == np.argsort(p, kind="stable")).all()


def test_underconfident_scores_get_temperature_below_one():
    y, p = overconfident(scale=0.5, seed=1)
    assert fit_temperature(y, logit(p)) < 0.7


@pytest.mark.parametrize("target", [0.0, 0.01, 0.05, 0.2])
@pytest.mark.parametrize("seed", [0, 1])
def test_threshold_gives_at_most_target_fpr_and_is_tightest(target, seed):
    rng = np.random.default_rng(seed)
    real = np.round(rng.normal(0, 1, 997), 2)  # rounded: many ties
    t = threshold_for_fpr(real, target)
    fp = int((real >= t).sum())
    assert fp / real.size <= target
    # the next real score below t would exceed the budget: nothing looser was possible
    below = real[real < t]
    if below.size:
        assert (real >= below.max()).mean() > target


def test_calibrated_threshold_on_the_calibration_set():
    y, p = overconfident(seed=2)
    cal = fit_calibration(y, p, 0.01, confidence=0)  # the empirical quantile: tpr_at_fpr's operating point
    pc = cal.p_ai(p)
    fpr = float((pc[y == 0] >= cal.threshold).mean())
    assert fpr <= 0.01 and cal.fit["fpr_at_threshold"] == pytest.approx(fpr)
    # the same decisions on the raw scale
    assert ((p >= cal.raw_threshold()) == (pc >= cal.threshold)).all()
    assert cal.fit["tpr_at_threshold"] == pytest.approx(float((pc[y == 1] >= cal.threshold).mean()))
    assert cal.fit["tpr_at_threshold"] == pytest.approx(tpr_at_fpr(y, p, 0.01), abs=2e-3)


def test_ece_and_brier_by_hand():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.3, 0.6, 0.8])
    assert brier(y, p) == pytest.approx((0.01 + 0.09 + 0.16 + 0.04) / 4)
    # 4 images, 15 bins -> 4 bins of one image each
    assert ece(y, p) == pytest.approx((0.1 + 0.3 + 0.4 + 0.2) / 4)
    assert len(reliability_bins(np.zeros(30, int), np.linspace(0, 1, 30))) == 15
    assert ece([1, 1], [1.0, 1.0]) == 0.0 and ece([], []) is None


def test_tpr_at_fpr_and_eer():
    y = np.array([0] * 100 + [1] * 100)
    s = np.concatenate([np.arange(100), np.arange(100) + 90.5])  # reals 0..99, AI 90.5..189.5
    assert tpr_at_fpr(y, s, 0.0) == pytest.approx(0.91)  # above the real maximum 99: AI 99.5 ... 189.5
    assert tpr_at_fpr(y, s, 0.05) == pytest.approx(0.96)  # 5 reals (95..99) allowed: AI 94.5 ... 189.5
    assert eer(y, s) == pytest.approx(0.0475, abs=0.006)  # 100 - t = t - 90.5 at t = 95.25
    perfect = np.concatenate([np.zeros(5), np.ones(5)])
    assert eer(np.array([0] * 5 + [1] * 5), perfect) == 0.0
    m = calibration_metrics([0, 0, 0], [0.1, 0.2, 0.9])
    assert m["tpr_at_fpr_1pct"] is None and m["eer"] is None and m["ece"] is not None


def test_run_file_roundtrip_and_decisions(tmp_path):
    y, p = overconfident(800, seed=3)
    assert read_calibration(tmp_path) is None
    d = resolve_decision(tmp_path)
    assert (d.threshold, d.source, d.calibrated) == (0.5, "default", False)
    cal = fit_calibration(y, p, 0.05, data={"root": "/x", "split": "train"})
    path = write_calibration(tmp_path, cal)
    assert json.loads(path.read_text())["format"] == 1
    back = read_calibration(tmp_path)
    assert back == cal
    d = resolve_decision(tmp_path)
    assert d.source == "calibration.json" and d.threshold == cal.threshold and d.calibrated
    np.testing.assert_allclose(d.p_ai(p), calibrate_p_ai(p, cal))
    assert d.to_dict()["temperature"] == cal.temperature
    d = resolve_decision(tmp_path, threshold=0.7)
    assert d.source == "--threshold" and d.calibrated and d.threshold == 0.7
    assert ((p >= d.raw_threshold()) == (cal.p_ai(p) >= 0.7)).all()
    d = resolve_decision(tmp_path, uncalibrated=True)
    assert not d.calibrated and d.threshold == 0.5
    np.testing.assert_array_equal(d.p_ai(p), p)


def test_bad_calibration_files(tmp_path):
    (tmp_path / "calibration.json").write_text("{not json")
    with pytest.raises(FakescopeError, match="not valid JSON"):
        read_calibration(tmp_path)
    (tmp_path / "calibration.json").write_text(json.dumps({"format": 1, "method": "temperature", "temperature": -1,
                                                          "threshold": 0.5, "threshold_logit": 0, "target_fpr": 0.01}))
    with pytest.raises(FakescopeError, match="temperature > 0"):
        read_calibration(tmp_path)
    with pytest.raises(FakescopeError, match="real and AI"):
        fit_calibration([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(FakescopeError, match="false-positive rate in"):
        threshold_for_fpr([0.1], 1.0)
    assert Calibration.from_dict(fit_calibration([0, 1, 0, 1], [0.2, 0.7, 0.4, 0.9], confidence=0).to_dict())
