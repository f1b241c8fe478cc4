"""The false-positive promise of `calibrate`: the Clopper–Pearson order-statistic rule, its bounds and
its failure modes (numpy + scipy only; the CLI side is in test_trust_cli.py)."""

import numpy as np
import pytest
from scipy import stats

from fakescope.calibration import (
    Calibration,
    allowed_false_positives,
    check_promise,
    fit_calibration,
    min_calibration_size,
    sigmoid,
    threshold_for_fpr,
)
from fakescope.errors import FakescopeError
from fakescope.intervals import binom_cdf, clopper_pearson, cp_lower, cp_upper, error_rates

REPS, FRESH = 200, 20_000


def _normal(rng, n):
    return rng.normal(size=n)


def _rounded_p_ai(rng, n):  # p_ai-like scores with many ties (3 decimals)
    return np.round(sigmoid(rng.normal(-2.0, 1.5, n)), 3)


@pytest.mark.parametrize("n, target, draw", [(2000, 0.01, _normal), (400, 0.05, _rounded_p_ai)])
def test_simulation_the_rule_keeps_its_promise_and_the_empirical_quantile_does_not(n, target, draw):
    """Calibrate on n real scores, judge the threshold on 20,000 fresh ones, 200 times: the fresh FPR
    exceeds the target in at most 1 - C of the runs (plus binomial slack) under the rule, and in about
    half of them with the empirical quantile (confidence 0)."""
    confidence = 0.95
    rng = np.random.default_rng(1234)
    over_rule = over_empirical = 0
    fresh_rule = []
    for _ in range(REPS):
        cal, new = draw(rng, n), draw(rng, FRESH)
        t_rule = threshold_for_fpr(cal, target, confidence=confidence)
        t_emp = threshold_for_fpr(cal, target, confidence=0.0)
        f_rule, f_emp = float((new >= t_rule).mean()), float((new >= t_emp).mean())
        over_rule += f_rule > target
        over_empirical += f_emp > target
        fresh_rule.append(f_rule)
    slack = stats.binom.ppf(0.999, REPS, 1 - confidence)  # 21 of 200 at 5 %
    assert over_rule <= slack, f"{over_rule} of {REPS} runs above {target}"
    assert 0.3 * REPS <= over_empirical <= 0.75 * REPS, f"empirical quantile: {over_empirical} of {REPS}"
    assert np.mean(fresh_rule) > 0.4 * target  # a usable threshold, not "call nothing AI"


@pytest.mark.parametrize("n", [1, 7, 59, 300, 2000])
@pytest.mark.parametrize("conf", [0.5, 0.9, 0.95, 0.99])
def test_bounds_against_scipy_beta_quantiles(n, conf):
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        up = stats.beta.ppf(conf, k + 1, n - k) if k < n else 1.0
        lo = stats.beta.ppf(1 - conf, k, n - k + 1) if k > 0 else 0.0
        assert cp_upper(k, n, conf) == pytest.approx(up, rel=1e-9, abs=1e-12)
        assert cp_lower(k, n, conf) == pytest.approx(lo, rel=1e-9, abs=1e-12)
        a = (1 - conf) / 2
        iv = clopper_pearson(k, n, conf)
        assert iv[0] == pytest.approx(stats.beta.ppf(a, k, n - k + 1) if k else 0.0, rel=1e-9, abs=1e-12)
        assert iv[1] == pytest.approx(stats.beta.ppf(1 - a, k + 1, n - k) if k < n else 1.0, rel=1e-9, abs=1e-12)
        assert binom_cdf(k, n, 0.3) == pytest.approx(stats.binom.cdf(k, n, 0.3), rel=1e-9, abs=1e-15)
    assert clopper_pearson(0, 0) is None


@pytest.mark.parametrize("target", [0.001, 0.01, 0.05, 0.2])
@pytest.mark.parametrize("conf", [0.8, 0.95, 0.99])
def test_allowed_false_positives_is_the_largest_k_with_the_binomial_tail_below_1_minus_c(target, conf):
    need = min_calibration_size(target, conf)
    assert (1 - target) ** need <= 1 - conf < (1 - target) ** (need - 1)  # the exact smallest n
    with pytest.raises(FakescopeError, match=f"expected at least {need} real calibration images"):
        allowed_false_positives(need - 1, target, conf)
    for n in (need, need + 1, 3 * need, 20 * need):
        k = allowed_false_positives(n, target, conf)
        assert stats.binom.cdf(k, n, target) <= 1 - conf < stats.binom.cdf(k + 1, n, target)
        assert cp_upper(k, n, conf) <= target < cp_upper(k + 1, n, conf)  # the same rule, said with the bound
    assert allowed_false_positives(1000, target, 0.0) == int(np.floor(target * 1000 + 1e-9))


def test_smallest_n_for_one_percent_at_95_percent():
    assert min_calibration_size(0.01, 0.95) == 299  # "about 300 real images"
    assert allowed_false_positives(299, 0.01, 0.95) == 0
    with pytest.raises(FakescopeError) as e:
        threshold_for_fpr(np.zeros(298), 0.01, confidence=0.95)
    msg = str(e.value)
    assert "\n" not in msg and "at least 299" in msg and "got 298" in msg and "--confidence 0" in msg
    assert min_calibration_size(0.0, 0.95) is None and min_calibration_size(0.01, 0.0) == 1
    with pytest.raises(FakescopeError, match="expected at least None"):
        allowed_false_positives(10_000, 0.0, 0.95)


def _scores(n_real=1000, n_ai=1000, seed=0):
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n_real, int), np.ones(n_ai, int)]
    return y, sigmoid(np.r_[rng.normal(-1, 1, n_real), rng.normal(1.5, 1, n_ai)])


def test_fit_calibration_records_the_promise():
    y, p = _scores()
    data = {"root": "/somewhere/cifake", "split": "val"}
    cal = fit_calibration(y, p, 0.01, data=data)  # default confidence 0.95
    g = cal.guarantee
    assert cal.confidence == 0.95 and g["rule"] == "clopper-pearson" and g["n_real"] == 1000
    assert g["promise"] == ("at most 1 % of real images like those in cifake (split val) are called AI, with "
                            "95 % confidence") == cal.promise == g["statement"]
    pc = cal.p_ai(p)
    fp, tp = int((pc[y == 0] >= cal.threshold).sum()), int((pc[y == 1] >= cal.threshold).sum())
    assert g["false_positives"] == fp <= g["allowed_false_positives"] == allowed_false_positives(1000, 0.01, 0.95)
    assert g["fpr_empirical"] == fp / 1000 and g["fpr_upper_bound"] <= 0.01
    assert g["fpr_upper_bound"] == pytest.approx(stats.beta.ppf(0.95, g["allowed_false_positives"] + 1,
                                                                 1000 - g["allowed_false_positives"]))
    assert g["tpr"] == tp / 1000 and g["tpr_interval"] == pytest.approx(
        [stats.beta.ppf(0.025, tp, 1001 - tp), stats.beta.ppf(0.975, tp + 1, 1000 - tp)])
    assert g["exceed_probability"] <= 0.05
    # the empirical quantile: more caught, no promise, and a bound above the target
    emp = fit_calibration(y, p, 0.01, data=data, confidence=0)
    assert emp.threshold < cal.threshold and emp.promise is None and emp.guarantee["rule"] == "empirical-quantile"
    assert emp.guarantee["fpr_upper_bound"] > 0.01 and emp.guarantee["bound_confidence"] == 0.95
    assert "no guarantee" in emp.guarantee["statement"] and emp.guarantee["exceed_probability"] > 0.4
    assert Calibration.from_dict(cal.to_dict()) == cal
    # calibrations written before the promise existed still load: the empirical rule, no guarantee
    old = {k: v for k, v in cal.to_dict().items() if k not in ("confidence", "guarantee")}
    back = Calibration.from_dict(old)
    assert back.confidence == 0.0 and back.guarantee == {} and back.promise is None


def test_too_few_real_images_is_one_line_naming_the_smallest_n():
    y, p = _scores(n_real=120, n_ai=50)
    with pytest.raises(FakescopeError, match="expected at least 299 real calibration images .* got 120"):
        fit_calibration(y, p, 0.01)
    assert fit_calibration(y, p, 0.05).guarantee["n_real"] == 120  # 59 are enough for 5 %
    with pytest.raises(FakescopeError, match="confidence in"):
        fit_calibration(y, p, 0.05, confidence=1.0)


def test_check_promise_flags_an_interval_entirely_above_the_target():
    y, p = _scores()
    cal = fit_calibration(y, p, 0.01)
    assert check_promise(cal, [[990, 10], [0, 0]])["broken"] is False  # 1 %: inside
    assert check_promise(cal, [[975, 25], [0, 0]])["broken"] is True  # 2.5 % of 1000: [1.6 %, 3.7 %]
    assert check_promise(cal, [[45, 2], [0, 0]])["broken"] is False  # 2 of 47: too few to say
    assert check_promise(cal, [[0, 0], [3, 7]]) is None  # no real images
    r = error_rates([[975, 25], [30, 70]])
    assert r["fpr"]["value"] == 0.025 and r["fpr"]["n"] == 1000 and r["tpr"]["value"] == 0.7
    assert r["tpr"]["interval"] == pytest.approx([stats.beta.ppf(0.025, 70, 31), stats.beta.ppf(0.975, 71, 30)])


def test_a_holdout_of_several_roots_is_named_by_each_root_not_their_common_parent():
    y, p = _scores()
    data = {"root": "/tmp", "roots": ["/tmp/aligned", "/tmp/data/multigen"], "split": "holdout"}
    cal = fit_calibration(y, p, 0.05, data=data)
    assert cal.promise.startswith("at most 5 % of real images like those in aligned + multigen (the training "
                                  "images the run did not train on) are called AI")
