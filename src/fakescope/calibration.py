"""Calibrated scores and operating thresholds.

Pure functions of labels (nature=0, ai=1) and scores: :func:`ece` (15 equal-mass bins), :func:`brier`,
:func:`tpr_at_fpr`, :func:`eer`, :func:`fit_temperature` (temperature scaling of the ai-logit) and
:func:`threshold_for_fpr` (the operating point that wrongly accuses at most a given share of real
images). :func:`fit_calibration` puts them together into a :class:`Calibration`, stored in a run as
``calibration.json`` beside ``config.json``.

:func:`calibrate_p_ai` is the one function callers (predict, evaluate, the server) use to turn a
model's raw ``p_ai`` into the calibrated one; :func:`resolve_decision` says which threshold applies
and where it came from. Temperature scaling divides the ai-logit by ``T > 0``: it changes how
confident the scores are, never their order (ROC-AUC is unchanged).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve

from fakescope.errors import FakescopeError
from fakescope.runfiles import CALIBRATION
from fakescope.utils import write_json

CALIBRATION_FILE = CALIBRATION  # fakescope.runfiles names every run file
CALIBRATION_FORMAT = 1
ECE_BINS = 15
_P_EPS = 1e-16  # p_ai is float64: logits are recoverable to about +-36.8


def _arrays(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"expected labels and scores of the same length, got {y.size} and {s.size}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"expected labels in {{0, 1}} (nature=0, ai=1), got {sorted(set(y.tolist()))}")
    return y, s


def _both_classes(y: np.ndarray) -> bool:
    return 0 < int(y.sum()) < y.size


def logit(p_ai) -> np.ndarray:
    """log(p / (1 - p)) in float64, p clipped to [1e-16, 1 - 1e-16] (so +-36.8 at most)."""
    p = np.clip(np.asarray(p_ai, dtype=np.float64), _P_EPS, 1.0 - _P_EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


# --- metrics ---------------------------------------------------------------------------------------

def reliability_bins(labels, p_ai, n_bins: int = ECE_BINS) -> list[dict]:
    """Equal-mass bins of ``p_ai`` (sorted, split into ``n_bins`` groups of equal size):
    ``[{"p_mean", "ai_fraction", "n"}, ...]`` — the points of a reliability diagram."""
    y, p = _arrays(labels, p_ai)
    if y.size == 0:
        return []
    order = np.argsort(p, kind="stable")
    return [{"p_mean": float(p[b].mean()), "ai_fraction": float(y[b].mean()), "n": int(b.size)}
            for b in np.array_split(order, min(n_bins, y.size))]


def ece(labels, p_ai, n_bins: int = ECE_BINS) -> float | None:
    """Expected calibration error of ``p_ai`` as P(ai), ``n_bins`` equal-mass bins:
    ``sum_b n_b / n * |mean(y)_b - mean(p)_b|``. None on an empty set."""
    bins = reliability_bins(labels, p_ai, n_bins)
    n = sum(b["n"] for b in bins)
    return sum(b["n"] / n * abs(b["ai_fraction"] - b["p_mean"]) for b in bins) if n else None


def brier(labels, p_ai) -> float | None:
    """Mean squared error of ``p_ai`` against the label. None on an empty set."""
    y, p = _arrays(labels, p_ai)
    return float(np.mean((p - y) ** 2)) if y.size else None


def tpr_at_fpr(labels, scores, target_fpr: float) -> float | None:
    """The largest share of AI images caught by a threshold that calls at most ``target_fpr`` of the
    real images AI (on this set). None unless both classes are present."""
    y, s = _arrays(labels, scores)
    if not _both_classes(y):
        return None
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return float(tpr[fpr <= target_fpr + 1e-12].max())


def eer(labels, scores) -> float | None:
    """Equal error rate: where the false-positive rate equals the false-negative rate (linear
    interpolation between the two ROC points that straddle it). None unless both classes are present."""
    y, s = _arrays(labels, scores)
    if not _both_classes(y):
        return None
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    d = (1.0 - tpr) - fpr  # decreasing from 1 to -1 along the curve
    i = int(np.argmax(d <= 0))
    if i == 0:
        return float(fpr[0])
    t = d[i - 1] / (d[i - 1] - d[i])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def calibration_metrics(labels, p_ai) -> dict:
    """The evaluate JSON's calibration keys: ece, brier, tpr_at_fpr_1pct, tpr_at_fpr_5pct, eer."""
    return {"ece": ece(labels, p_ai), "brier": brier(labels, p_ai), "tpr_at_fpr_1pct": tpr_at_fpr(labels, p_ai, 0.01),
            "tpr_at_fpr_5pct": tpr_at_fpr(labels, p_ai, 0.05), "eer": eer(labels, p_ai)}


CALIBRATION_KEYS = ("ece", "brier", "tpr_at_fpr_1pct", "tpr_at_fpr_5pct", "eer")


# --- fitting ---------------------------------------------------------------------------------------

def nll(labels, logits, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy of sigmoid(logits / temperature)."""
    y, z = _arrays(labels, logits)
    z = z / temperature
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(labels, logits) -> float:
    """Temperature ``T > 0`` minimising the cross-entropy of sigmoid(logit / T) on this set.

    The loss is convex in ``1/T``; it is minimised by bounded Brent search over 1/T in [1e-3, 1e3]."""
    from scipy.optimize import minimize_scalar

    y, z = _arrays(labels, logits)
    if not _both_classes(y):
        raise FakescopeError(f"expected real and AI images to fit a temperature, got {int((y == 0).sum())} real and "
                             f"{int(y.sum())} AI: calibrate on a split that holds both classes")
    if not np.isfinite(z).all():
        raise ValueError("expected finite logits")
    res = minimize_scalar(lambda a: nll(y, z * a), bounds=(1e-3, 1e3), method="bounded",
                          options={"xatol": 1e-7})
    return float(1.0 / res.x)


def threshold_for_fpr(real_scores, target_fpr: float) -> float:
    """A threshold ``t`` (same scale as the scores; decision ``score >= t``) that calls at most
    ``floor(target_fpr * n)`` of these real images AI, as low as possible so that as much AI as
    possible is caught.

    With ``k`` false positives allowed, ``t`` lies between the (k+1)-th highest real score and the next
    higher distinct one (their midpoint, so that tiny numeric differences between runs do not flip
    the decision); above the highest real score it is that score + 1 (use logits, not probabilities)."""
    s = np.sort(np.asarray(real_scores, dtype=np.float64).ravel())[::-1]
    if s.size == 0:
        raise FakescopeError("expected real (nature) images to choose a threshold for a false-positive rate, got none")
    if not 0.0 <= target_fpr < 1.0:
        raise FakescopeError(f"expected a target false-positive rate in [0, 1), got {target_fpr}")
    k = int(math.floor(target_fpr * s.size + 1e-9))
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
                      method=d["method"], fit=dict(d.get("fit") or {}), data=dict(d.get("data") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FakescopeError(f"{source} is not a fakescope calibration ({type(e).__name__}: {e}); "
                                 f"run `fakescope calibrate` again or delete it") from None
        if not (cal.temperature > 0 and math.isfinite(cal.temperature) and 0 <= cal.threshold <= 1):
            raise FakescopeError(f"{source}: expected temperature > 0 and threshold in [0, 1], got "
                                 f"{cal.temperature} and {cal.threshold}; run `fakescope calibrate` again")
        return cal


def fit_calibration(labels, p_raw, target_fpr: float = 0.01, *, method: str = "temperature",
                    data: dict | None = None) -> Calibration:
    """Fit temperature scaling on (labels, raw p_ai) and choose the threshold for ``target_fpr`` on
    the real images of the same set. ``fit`` records the set's figures before and after."""
    if method != "temperature":
        raise FakescopeError(f"expected calibration method 'temperature', got {method!r}")
    y, p = _arrays(labels, p_raw)
    z = logit(p)
    t = fit_temperature(y, z)
    zc = z / t
    thr_logit = threshold_for_fpr(zc[y == 0], target_fpr)
    pc = sigmoid(zc)
    pred = zc >= thr_logit
    fit = {
        "n_real": int((y == 0).sum()), "n_ai": int(y.sum()),
        "ece_before": ece(y, p), "ece_after": ece(y, pc), "brier_before": brier(y, p), "brier_after": brier(y, pc),
        "nll_before": nll(y, z), "nll_after": nll(y, zc),
        "fpr_at_threshold": float(pred[y == 0].mean()), "tpr_at_threshold": float(pred[y == 1].mean()),
    }
    return Calibration(temperature=t, threshold=float(sigmoid(thr_logit)), threshold_logit=thr_logit,
                       target_fpr=float(target_fpr), method=method, fit=fit, data=dict(data or {}))


# --- in a run --------------------------------------------------------------------------------------

def calibration_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CALIBRATION_FILE


def write_calibration(run_dir: str | os.PathLike, cal: Calibration) -> Path:
    """Write ``RUN/calibration.json`` atomically."""
    path = calibration_path(run_dir)
    write_json(path, cal.to_dict())
    return path


def read_calibration(run_dir: str | os.PathLike) -> Calibration | None:
    """The run's calibration, or None when it has not been calibrated."""
    path = calibration_path(run_dir)
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FakescopeError(f"{path} is not valid JSON ({e}); run `fakescope calibrate` again or delete it") from None
    if not isinstance(d, dict):
        raise FakescopeError(f"{path} is not a fakescope calibration; run `fakescope calibrate` again or delete it")
    return Calibration.from_dict(d, str(path))


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
            d["calibration"] = {"target_fpr": c.target_fpr, "data": c.data,
                                "threshold": c.threshold}
        return d


def resolve_decision(run_dir: str | os.PathLike | None, threshold: float | None = None,
                     uncalibrated: bool = False, default: float = 0.5) -> Decision:
    """The run's calibration (unless ``uncalibrated``) and the threshold: ``threshold`` when given
    (on the calibrated scale when calibrated), else the calibrated one, else ``default``."""
    cal = None if uncalibrated or run_dir is None else read_calibration(run_dir)
    if threshold is not None:
        if not 0.0 <= float(threshold) <= 1.0:
            raise FakescopeError(f"expected a threshold in [0, 1], got {threshold}")
        return Decision(float(threshold), "--threshold", cal)
    if cal is not None:
        return Decision(cal.threshold, CALIBRATION_FILE, cal)
    return Decision(float(default), "default", None)
