"""Fitting a calibration (temperature and operating threshold) and applying it: the :class:`Calibration`
record and the :class:`Decision` a command makes with it.

Pure functions of labels (nature=0, ai=1) and scores: :func:`fit_temperature` (temperature scaling of
the ai-logit) and :func:`threshold_for_fpr` (the operating point that wrongly accuses at most a given
share of real images). :func:`fit_calibration` puts them together into a :class:`Calibration`, stored
in a run as ``calibration.json`` beside ``config.json`` (the file's name and reading live in
:mod:`fakescope.runfiles`). The calibration metrics (ECE, Brier, TPR at an FPR, EER) are in
:mod:`fakescope.metrics`, the binomial bounds in :mod:`fakescope.intervals`; running a calibration
over a run's images is :func:`fakescope.engine.calibrate.calibrate_run`.

**The false-positive guarantee.** By default the threshold is not the empirical quantile of the
calibration set's real scores but the order-statistic rule with a Clopper–Pearson (binomial) tail bound:
with ``n`` real calibration scores and ``k`` of them allowed above the threshold, the false-positive rate
of that threshold on *new* real images exchangeable with the calibration set is at most the
``(k+1)``-th smallest of ``n`` uniforms, a ``Beta(k + 1, n - k)`` variable. So
``P(FPR > A) <= P(Beta(k + 1, n - k) > A) = P(Binomial(n, A) <= k)``, and the rule takes the largest ``k``
with ``P(Binomial(n, A) <= k) <= 1 - C`` (equivalently: the one-sided Clopper–Pearson upper bound of
``k / n`` at confidence ``C`` is at most ``A``). Then the FPR on new data is at most ``A`` with probability
at least ``C`` over the draw of the calibration set. When even ``k = 0`` fails (``(1 - A)^n > 1 - C``)
the set is too small; :func:`min_calibration_size` gives the smallest ``n`` that works. This is
distribution-free risk control (split conformal / PAC calibration) as in A. N. Angelopoulos and
S. Bates, "A gentle introduction to conformal prediction and distribution-free uncertainty
quantification" (2021, arXiv:2107.07511, the "PAC guarantee" / training-conditional coverage), and
A. N. Angelopoulos, S. Bates, E. J. Candès, M. I. Jordan and L. Lei, "Learn then Test: calibrating
predictive algorithms to achieve risk control" (2021, arXiv:2110.01052, binomial-tail p-values).
``confidence=0`` keeps the empirical rule (``floor(A n)`` false positives allowed), which carries no
promise: its FPR on new data exceeds ``A`` about half the time.

:func:`calibrate_p_ai` is the one function callers (predict, evaluate, the server) use to turn a
model's raw ``p_ai`` into the calibrated one; :func:`resolve_decision` says which threshold applies
and where it came from. Temperature scaling divides the ai-logit by ``T > 0``: it changes how
confident the scores are, never their order (ROC-AUC is unchanged).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fakescope.errors import FakescopeError
from fakescope.intervals import (
    INTERVAL_CONFIDENCE,
    binom_cdf,
    cp_upper,
    error_rates,
    log_binom_pmf,
    rate_with_interval,
)
from fakescope.metrics import both_classes, brier, ece, score_arrays
from fakescope.parsing import DEFAULT_CONFIDENCE, check_threshold
from fakescope.runfiles import CALIBRATION, calibration_path, read_calibration_json, write_calibration_json

CALIBRATION_FILE = CALIBRATION  # fakescope.runfiles names every run file
CALIBRATION_FORMAT = 1
_P_EPS = 1e-16  # p_ai is float64: logits are recoverable to about +-36.8


def logit(p_ai) -> np.ndarray:
    """log(p / (1 - p)) in float64, p clipped to [1e-16, 1 - 1e-16] (so +-36.8 at most)."""
    p = np.clip(np.asarray(p_ai, dtype=np.float64), _P_EPS, 1.0 - _P_EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


# --- fitting ---------------------------------------------------------------------------------------

def nll(labels, logits, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy of sigmoid(logits / temperature)."""
    y, z = score_arrays(labels, logits)
    z = z / temperature
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(labels, logits) -> float:
    """Temperature ``T > 0`` minimising the cross-entropy of sigmoid(logit / T) on this set.

    The loss is convex in ``1/T``; it is minimised by bounded Brent search over 1/T in [1e-3, 1e3]."""
    from scipy.optimize import minimize_scalar

    y, z = score_arrays(labels, logits)
    if not both_classes(y):
        raise FakescopeError(f"expected real and AI images to fit a temperature, got {int((y == 0).sum())} real and "
                             f"{int(y.sum())} AI: calibrate on a split that holds both classes")
    if not np.isfinite(z).all():
        raise ValueError("expected finite logits")
    res = minimize_scalar(lambda a: nll(y, z * a), bounds=(1e-3, 1e3), method="bounded",
                          options={"xatol": 1e-7})
    return float(1.0 / res.x)


# --- binomial bounds (Clopper–Pearson) and the guarantee rule ---------------------------------------

def check_promise(calibration: Calibration, confusion, confidence: float = INTERVAL_CONFIDENCE) -> dict | None:
    """Whether real images evaluated at the calibration's own threshold break its false-positive target:
    ``{"target_fpr", "confidence", "promise", "fpr", "n_real", "broken"}`` where ``broken`` means the
    data's whole two-sided Clopper–Pearson interval (``confidence``) of the FPR lies above the target:
    these real images are not like the calibration set. None without real images or a target."""
    fpr = error_rates(confusion, confidence)["fpr"]
    if not fpr["n"]:
        return None
    return {"target_fpr": calibration.target_fpr, "confidence": calibration.confidence,
            "promise": calibration.promise, "fpr": fpr, "n_real": fpr["n"],
            "broken": bool(fpr["interval"][0] > calibration.target_fpr)}


def _check_rule(target_fpr: float, confidence: float) -> None:
    if not 0.0 <= target_fpr < 1.0:
        raise FakescopeError(f"expected a target false-positive rate in [0, 1), got {target_fpr}")
    if not 0.0 <= confidence < 1.0:
        raise FakescopeError(f"expected a confidence in [0, 1) like 0.95, got {confidence}")


def min_calibration_size(target_fpr: float, confidence: float = DEFAULT_CONFIDENCE) -> int | None:
    """The smallest number of real calibration images for which the guarantee rule can promise an FPR
    of at most ``target_fpr`` at ``confidence``: the smallest ``n`` with ``(1 - A)^n <= 1 - C`` (no
    false positive allowed yet). 1 for ``confidence = 0`` (the empirical rule); None for ``A = 0``
    (no finite set promises a zero rate)."""
    _check_rule(target_fpr, confidence)
    if confidence == 0.0:
        return 1
    if target_fpr == 0.0:
        return None
    n = max(1, math.ceil(math.log1p(-confidence) / math.log1p(-target_fpr)))
    while n > 1 and (1.0 - target_fpr) ** (n - 1) <= 1.0 - confidence:  # guard against rounding
        n -= 1
    while (1.0 - target_fpr) ** n > 1.0 - confidence:
        n += 1
    return n


def allowed_false_positives(n: int, target_fpr: float, confidence: float = DEFAULT_CONFIDENCE) -> int:
    """How many of ``n`` real calibration scores the threshold may leave at or above it.

    ``confidence = 0``: ``floor(A n)`` (the empirical quantile). Otherwise the largest ``k`` with
    ``P(Binomial(n, A) <= k) <= 1 - C`` (see the module docstring); a :class:`FakescopeError` naming the
    smallest ``n`` that works when there is none."""
    _check_rule(target_fpr, confidence)
    if n <= 0:
        raise FakescopeError("expected real (nature) images to choose a threshold for a false-positive rate, got none")
    if confidence == 0.0:
        return int(math.floor(target_fpr * n + 1e-9))
    need = min_calibration_size(target_fpr, confidence)
    if need is None or n < need:
        fix = (f"use at least {need} real images (or a larger --target-fpr, a lower --confidence, or --confidence 0 "
               f"for the empirical quantile without a guarantee)" if need is not None else
               "use a target above 0, or --confidence 0 for the empirical quantile without a guarantee")
        raise FakescopeError(f"expected at least {need} real calibration images for a false-positive rate of at most "
                             f"{target_fpr:g} with {confidence:g} confidence, got {n}: {fix}")
    lp = log_binom_pmf(n, target_fpr)
    cdf = np.exp(np.logaddexp.accumulate(lp))  # P(Bin(n, A) <= k) for k = 0..n
    ok = np.flatnonzero(cdf <= 1.0 - confidence)
    return int(ok.max())


def threshold_for_fpr(real_scores, target_fpr: float, *, confidence: float = 0.0) -> float:
    """A threshold ``t`` (same scale as the scores; decision ``score >= t``) that calls at most
    ``k`` of these real images AI, as low as possible so that as much AI as possible is caught;
    ``k = allowed_false_positives(n, target_fpr, confidence)``: ``floor(target_fpr * n)`` for
    ``confidence = 0`` (the empirical quantile, the default here), else the guarantee rule of the module
    docstring (the FPR on new exchangeable real images is at most ``target_fpr`` with probability at
    least ``confidence``).

    With ``k`` false positives allowed, ``t`` lies between the (k+1)-th highest real score and the next
    higher distinct one (their midpoint, so that tiny numeric differences between runs do not flip
    the decision); above the highest real score it is that score + 1 (use logits, not probabilities)."""
    s = np.sort(np.asarray(real_scores, dtype=np.float64).ravel())[::-1]
    if s.size == 0:
        raise FakescopeError("expected real (nature) images to choose a threshold for a false-positive rate, got none")
    if not 0.0 <= target_fpr < 1.0:
        raise FakescopeError(f"expected a target false-positive rate in [0, 1), got {target_fpr}")
    k = allowed_false_positives(s.size, target_fpr, confidence)
    if k >= s.size:
        return float(s[-1])
    above = s[:k][s[:k] > s[k]]
    return float((s[k] + above.min()) / 2.0) if above.size else float(s[k] + 1.0)


@dataclass(frozen=True)
class Calibration:
    """Temperature scaling plus an operating threshold, as stored in ``calibration.json``.

    ``threshold`` applies to the calibrated ``p_ai``; ``threshold_logit`` is the same decision on the
    calibrated ai-logit (``logit(p_ai) / temperature``)."""

    temperature: float
    threshold: float
    threshold_logit: float
    target_fpr: float
    method: str = "temperature"
    fit: dict = field(default_factory=dict)   # figures on the calibration set, before and after
    data: dict = field(default_factory=dict)  # where the calibration set came from
    confidence: float = 0.0                   # of the FPR promise; 0: the empirical quantile (no promise)
    guarantee: dict = field(default_factory=dict)  # the promise and its figures (see :func:`guarantee_summary`)

    @property
    def promise(self) -> str | None:
        """The sentence of the promise, or None (``confidence = 0`` or an older calibration)."""
        return self.guarantee.get("promise")

    def p_ai(self, p_raw) -> np.ndarray:
        return sigmoid(logit(p_raw) / self.temperature)

    def p_ai_from_logits(self, logits) -> np.ndarray:
        return sigmoid(np.asarray(logits, dtype=np.float64) / self.temperature)

    def raw_threshold(self) -> float:
        """The same decision as ``calibrated p_ai >= threshold``, expressed on the raw ``p_ai``."""
        return float(sigmoid(self.threshold_logit * self.temperature))

    def to_dict(self) -> dict:
        return {"format": CALIBRATION_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict, source: str = CALIBRATION_FILE) -> Calibration:
        try:
            if d.get("format") != CALIBRATION_FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {CALIBRATION_FORMAT}")
            if d.get("method") != "temperature":
                raise ValueError(f"method {d.get('method')!r}, expected 'temperature'")
            cal = cls(temperature=float(d["temperature"]), threshold=float(d["threshold"]),
                      threshold_logit=float(d["threshold_logit"]), target_fpr=float(d["target_fpr"]),
                      method=d["method"], fit=dict(d.get("fit") or {}), data=dict(d.get("data") or {}),
                      confidence=float(d.get("confidence", 0.0)), guarantee=dict(d.get("guarantee") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FakescopeError(f"{source} is not a fakescope calibration ({type(e).__name__}: {e}); "
                                 f"run `fakescope calibrate` again or delete it") from None
        if not 0 <= cal.confidence < 1:
            raise FakescopeError(f"{source}: expected a confidence in [0, 1), got {cal.confidence}; "
                                 f"run `fakescope calibrate` again")
        if not (cal.temperature > 0 and math.isfinite(cal.temperature) and 0 <= cal.threshold <= 1):
            raise FakescopeError(f"{source}: expected temperature > 0 and threshold in [0, 1], got "
                                 f"{cal.temperature} and {cal.threshold}; run `fakescope calibrate` again")
        return cal


PROMISE_KEYS = ("target_fpr", "confidence", "n_real", "fpr_empirical", "fpr_upper_bound", "bound_confidence", "tpr",
                "tpr_interval", "calibration_set", "promise", "statement")


def _pct(x: float) -> str:
    return f"{100 * x:.4g} %"


def calibration_set_name(data: dict | None) -> str:
    """How the promise names the calibration set: the data root's folder name (``a + b`` for a holdout
    drawn from several roots) and which of its images (no server paths)."""
    data = data or {}
    roots = data.get("roots") or [data.get("root")]  # a run trained on several roots: name each of them
    if not all(roots):
        return "the calibration set"
    name = " + ".join(Path(os.fspath(r)).name or str(r) for r in roots)
    if data.get("split") == "holdout":
        return f"{name} (the training images the run did not train on)"
    return f"{name} (split {data.get('split')})" if data.get("split") else name


def guarantee_summary(n_real: int, false_positives: int, n_ai: int, true_positives: int, target_fpr: float,
                      confidence: float, data: dict | None = None) -> dict:
    """The promise of a threshold chosen on ``n_real`` real calibration scores, and its figures:
    ``rule``, ``target_fpr``, ``confidence``, ``n_real``, ``min_n_real`` (the smallest set the rule
    accepts), ``allowed_false_positives`` (``k``), ``false_positives`` and ``fpr_empirical`` on the set,
    ``fpr_upper_bound`` (the one-sided Clopper–Pearson bound of ``k / n`` at ``bound_confidence``: the
    promise's confidence, or 95 % for the empirical rule, where it may well exceed the target),
    ``exceed_probability`` (the largest chance, over calibration sets, that the FPR on new data exceeds
    the target: ``P(Binomial(n, A) <= k)``, at most ``1 - C`` under the rule), ``tpr``
    and ``tpr_interval`` (two-sided 95 % Clopper–Pearson, ``n_ai`` AI images), ``calibration_set``,
    ``promise`` (the sentence, None for ``confidence = 0``) and ``statement`` (the promise, or what the
    empirical rule does and does not say)."""
    k = allowed_false_positives(n_real, target_fpr, confidence)
    bound_c = confidence if confidence > 0 else INTERVAL_CONFIDENCE
    bound = cp_upper(min(k, n_real), n_real, bound_c)
    risk = binom_cdf(k, n_real, target_fpr)  # P(FPR on new data > A): exact for continuous scores
    name = calibration_set_name(data)
    tpr = rate_with_interval(true_positives, n_ai)
    promise = (f"at most {_pct(target_fpr)} of real images like those in {name} are called AI, with "
               f"{_pct(confidence)} confidence") if confidence > 0 else None
    statement = promise or (f"no guarantee (--confidence 0): the threshold calls {false_positives} of {n_real} real "
                            f"images of {name} AI (the empirical {_pct(target_fpr)} quantile); on new images like "
                            f"those the false-positive rate is at most {_pct(bound)} with {_pct(bound_c)} "
                            f"confidence, and above {_pct(target_fpr)} with probability up to {_pct(risk)}")
    return {"rule": "clopper-pearson" if confidence > 0 else "empirical-quantile", "target_fpr": float(target_fpr),
            "confidence": float(confidence), "n_real": int(n_real), "min_n_real": min_calibration_size(target_fpr,
                                                                                                         confidence),
            "allowed_false_positives": int(k), "false_positives": int(false_positives),
            "fpr_empirical": false_positives / n_real, "fpr_upper_bound": bound, "bound_confidence": bound_c,
            "exceed_probability": risk,
            "n_ai": int(n_ai), "tpr": tpr["value"], "tpr_interval": tpr["interval"],
            "interval_confidence": INTERVAL_CONFIDENCE, "calibration_set": name, "promise": promise,
            "statement": statement}


def fit_calibration(labels, p_raw, target_fpr: float = 0.01, *, method: str = "temperature",
                    data: dict | None = None, confidence: float = DEFAULT_CONFIDENCE) -> Calibration:
    """Fit temperature scaling on (labels, raw p_ai) and choose the threshold for ``target_fpr`` on
    the real images of the same set: by the guarantee rule at ``confidence`` (default 0.95; see the
    module docstring), or the empirical quantile for ``confidence = 0``. ``fit`` records the set's
    figures before and after, ``guarantee`` the promise (:func:`guarantee_summary`). Too few real
    images for the promise is a :class:`FakescopeError` naming the smallest number that works."""
    if method != "temperature":
        raise FakescopeError(f"expected calibration method 'temperature', got {method!r}")
    y, p = score_arrays(labels, p_raw)
    _check_rule(float(target_fpr), float(confidence))
    n_real = int((y == 0).sum())
    z = logit(p)
    t = fit_temperature(y, z)  # both classes, else an error
    allowed_false_positives(n_real, float(target_fpr), float(confidence))  # too few for the promise: an error
    zc = z / t
    thr_logit = threshold_for_fpr(zc[y == 0], target_fpr, confidence=float(confidence))
    pc = sigmoid(zc)
    pred = zc >= thr_logit
    fit = {
        "n_real": int((y == 0).sum()), "n_ai": int(y.sum()),
        "ece_before": ece(y, p), "ece_after": ece(y, pc), "brier_before": brier(y, p), "brier_after": brier(y, pc),
        "nll_before": nll(y, z), "nll_after": nll(y, zc),
        "fpr_at_threshold": float(pred[y == 0].mean()), "tpr_at_threshold": float(pred[y == 1].mean()),
    }
    guarantee = guarantee_summary(n_real, int(pred[y == 0].sum()), int(y.sum()), int(pred[y == 1].sum()),
                                  float(target_fpr), float(confidence), data)
    return Calibration(temperature=t, threshold=float(sigmoid(thr_logit)), threshold_logit=thr_logit,
                       target_fpr=float(target_fpr), method=method, fit=fit, data=dict(data or {}),
                       confidence=float(confidence), guarantee=guarantee)


# --- in a run --------------------------------------------------------------------------------------

def write_calibration(run_dir: str | os.PathLike, cal: Calibration) -> Path:
    """Write ``RUN/calibration.json`` (atomically, :func:`fakescope.runfiles.write_calibration_json`)."""
    return write_calibration_json(run_dir, cal.to_dict())


def read_calibration(run_dir: str | os.PathLike) -> Calibration | None:
    """The run's calibration, or None when it has not been calibrated."""
    d = read_calibration_json(run_dir)
    return None if d is None else Calibration.from_dict(d, str(calibration_path(run_dir)))


def calibrate_p_ai(p_ai, calibration: Calibration | None) -> np.ndarray:
    """Raw ``p_ai`` of the model -> calibrated ``p_ai`` (unchanged when ``calibration`` is None).

    This is the function servers and other callers use; for logits use ``Calibration.p_ai_from_logits``."""
    p = np.asarray(p_ai, dtype=np.float64)
    return p.copy() if calibration is None else calibration.p_ai(p)


@dataclass(frozen=True)
class Decision:
    """Which scores and which threshold a command uses, and why.

    ``calibration`` is None for raw scores. ``source`` is one of ``"--threshold"``,
    ``"calibration.json"`` or ``"default"``."""

    threshold: float
    source: str
    calibration: Calibration | None = None

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    @property
    def promise_applies(self) -> bool:
        """Whether the calibration's false-positive statement is about this threshold (its own one,
        not a ``--threshold`` override) and it has one."""
        return self.calibration is not None and self.source == CALIBRATION_FILE and bool(self.calibration.guarantee)

    def guarantee(self) -> dict | None:
        """The calibration's promise and its figures (the :data:`PROMISE_KEYS` of
        :func:`guarantee_summary`, as ``predict`` and the server report them) when they apply to this
        threshold, else None."""
        if not self.promise_applies:
            return None
        g = self.calibration.guarantee
        return {k: g.get(k) for k in PROMISE_KEYS}

    def p_ai(self, p_raw) -> np.ndarray:
        return calibrate_p_ai(p_raw, self.calibration)

    def raw_threshold(self) -> float:
        """The threshold on the model's raw p_ai that gives the same decisions (for attacks)."""
        if self.calibration is None:
            return self.threshold
        if self.source == CALIBRATION_FILE:
            return self.calibration.raw_threshold()
        t = self.calibration.temperature
        return float(sigmoid(logit(self.threshold) * t))

    def to_dict(self) -> dict:
        d: dict = {"value": self.threshold, "source": self.source, "calibrated": self.calibrated}
        if self.calibration is not None:
            c = self.calibration
            d["temperature"] = c.temperature
            d["calibration"] = {"target_fpr": c.target_fpr, "confidence": c.confidence, "data": c.data,
                                "threshold": c.threshold}
            if self.promise_applies:
                d["guarantee"] = c.guarantee
        return d


def resolve_decision(run_dir: str | os.PathLike | None, threshold: float | None = None,
                     uncalibrated: bool = False, default: float = 0.5) -> Decision:
    """The run's calibration (unless ``uncalibrated``) and the threshold: ``threshold`` when given
    (on the calibrated scale when calibrated), else the calibrated one, else ``default``."""
    cal = None if uncalibrated or run_dir is None else read_calibration(run_dir)
    if threshold is not None:
        return Decision(check_threshold(threshold), "--threshold", cal)
    if cal is not None:
        return Decision(cal.threshold, CALIBRATION_FILE, cal)
    return Decision(float(default), "default", None)


def same_set(a: dict, b: dict) -> bool:
    """Whether two ``{"root", "split"}`` descriptions name the same images' folder and split."""
    try:
        return (os.path.realpath(a["root"]) == os.path.realpath(b["root"]) and a.get("split") == b.get("split"))
    except (KeyError, TypeError):
        return False
