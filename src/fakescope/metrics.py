"""Detection metrics with AI as the positive class.

:func:`binary_metrics` is a pure function of labels and scores; :class:`DetectionMetrics` is the
thin stateful wrapper that accumulates batches and reports overall and per-generator figures.
The threshold metrics come from the confusion counts (an image is called AI when
``p_ai >= threshold``: a score equal to the threshold counts as AI); ROC-AUC and average precision
are scikit-learn's. Metrics that the data leave undefined, or that the class mix alone would fix,
are ``None`` rather than a made-up number: on a root with one class only, precision, F1, ROC-AUC
and average precision are ``None`` (precision would be 0 on real photos only and 1 on AI images
only, whatever the detector); recall (= fake accuracy) needs AI images, real accuracy needs real
ones. Scores must be finite and in [0, 1]: an unreadable image is left out, never scored NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm
from sklearn.metrics import roc_curve

from fakescope import parsing

METRIC_KEYS = ("accuracy", "precision", "recall", "f1", "roc_auc", "average_precision",
               "real_accuracy", "fake_accuracy", "n", "confusion",
               "ece", "brier", "tpr_at_fpr_1pct", "tpr_at_fpr_5pct", "eer")


ECE_BINS = 15


def score_arrays(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"expected labels and scores of the same length, got {y.size} and {s.size}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"expected labels in {{0, 1}} (nature=0, ai=1), got {sorted(set(y.tolist()))}")
    return y, s


def both_classes(y: np.ndarray) -> bool:
    return 0 < int(y.sum()) < y.size



def reliability_bins(labels, p_ai, n_bins: int = ECE_BINS) -> list[dict]:
    """Equal-mass bins of ``p_ai`` (sorted, split into ``n_bins`` groups of equal size):
    ``[{"p_mean", "ai_fraction", "n"}, ...]`` — the points of a reliability diagram."""
    y, p = score_arrays(labels, p_ai)
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
    y, p = score_arrays(labels, p_ai)
    return float(np.mean((p - y) ** 2)) if y.size else None


def tpr_at_fpr(labels, scores, target_fpr: float) -> float | None:
    """The largest share of AI images caught by a threshold that calls at most ``target_fpr`` of the
    real images AI (on this set). None unless both classes are present."""
    y, s = score_arrays(labels, scores)
    if not both_classes(y):
        return None
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return float(tpr[fpr <= target_fpr + 1e-12].max())


def eer(labels, scores) -> float | None:
    """Equal error rate: where the false-positive rate equals the false-negative rate (linear
    interpolation between the two ROC points that straddle it). None unless both classes are present."""
    y, s = score_arrays(labels, scores)
    if not both_classes(y):
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


def _num(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _check_inputs(labels, p_ai) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).ravel()
    p = np.asarray(p_ai, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"expected labels and scores of the same length, got {y.shape[0]} and {p.shape[0]}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"expected labels in {{0, 1}} (nature=0, ai=1), got {sorted(set(y.tolist()))[:10]}")
    bad = np.flatnonzero(~np.isfinite(p) | (p < 0) | (p > 1))
    if bad.size:
        raise ValueError(f"expected finite scores p_ai in [0, 1], got {bad.size} other value(s), e.g. {p[bad[0]]} at "
                         f"position {bad[0]}; leave unreadable images out instead of scoring them NaN")
    return y.astype(np.int64), p


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def binary_metrics(labels: Sequence[int] | np.ndarray, p_ai: Sequence[float] | np.ndarray,
                   threshold: float = 0.5) -> dict:
    """Accuracy, precision, recall, F1, ROC-AUC, AP, real/fake accuracy, n, the confusion matrix, and
    the calibration and operating-point figures of :func:`calibration_metrics`
    (ECE over 15 equal-mass bins, Brier score, TPR at FPR 1 % and 5 %, EER; ``None`` with one class
    only, like ROC-AUC).

    ``labels``: 0 = nature, 1 = ai. ``p_ai``: P(ai), finite, in [0, 1] (else ``ValueError``). An
    image is called AI when ``p_ai >= threshold`` (equal counts as AI). ``confusion`` is
    ``[[tn, fp], [fn, tp]]``. With one class only, precision, F1, ROC-AUC and AP are ``None``.
    """
    y, p = _check_inputs(labels, p_ai)
    threshold = parsing.check_threshold(threshold)
    pred = p >= threshold
    n = int(y.size)
    out: dict = {k: None for k in METRIC_KEYS}
    out["n"] = n
    truth = y == 1
    tp, fn = int((pred & truth).sum()), int((~pred & truth).sum())
    fp, tn = int((pred & ~truth).sum()), int((~pred & ~truth).sum())
    out["confusion"] = [[tn, fp], [fn, tp]]
    if n == 0:
        return out
    both = 0 < tp + fn < n
    out.update(
        accuracy=(tp + tn) / n,
        precision=_ratio(tp, tp + fp) if both else None,  # None too when nothing is called AI
        recall=_ratio(tp, tp + fn),
        f1=_ratio(2 * tp, 2 * tp + fp + fn) if both else None,  # 0 when nothing is called AI
        roc_auc=_num(skm.roc_auc_score(y, p)) if both else None,
        average_precision=_num(skm.average_precision_score(y, p)) if both else None,
        real_accuracy=_ratio(tn, tn + fp),
        fake_accuracy=_ratio(tp, tp + fn),
    )
    if both:
        out.update(calibration_metrics(y, p))
    return out


class DetectionMetrics:
    """Accumulates ``(labels, p_ai, generators)`` batches; ``compute()`` gives overall and per generator."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = parsing.check_threshold(threshold)
        self.reset()

    def reset(self) -> None:
        self._y: list[np.ndarray] = []
        self._p: list[np.ndarray] = []
        self._g: list[str] = []

    def update(self, labels, p_ai, generators: Sequence[str]) -> None:
        y = np.asarray(labels).ravel()
        p = np.asarray(p_ai, dtype=np.float64).ravel()
        if not (len(y) == len(p) == len(generators)):
            raise ValueError(f"expected equal lengths, got labels={len(y)}, p_ai={len(p)}, "
                             f"generators={len(generators)}")
        self._y.append(y)
        self._p.append(p)
        self._g.extend(generators)

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = np.concatenate(self._y) if self._y else np.zeros(0, np.int64)
        p = np.concatenate(self._p) if self._p else np.zeros(0)
        return y, p, np.asarray(self._g, dtype=object)

    def compute(self) -> dict:
        y, p, g = self.arrays
        return {
            "overall": binary_metrics(y, p, self.threshold),
            "per_generator": {name: binary_metrics(y[g == name], p[g == name], self.threshold)
                              for name in sorted(set(g.tolist()))},
        }


def attribution_metrics(labels: Sequence[int] | np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict:
    """Generator attribution: ``labels`` are class indices into ``classes`` (``classes[0]`` is
    ``nature``), ``probs`` the ``[n, len(classes)]`` softmax. The predicted class is the arg-max.

    Returns ``{"classes", "confusion" (rows: true, columns: predicted), "per_class": {name:
    {"precision", "recall", "f1", "support"}}, "macro_f1", "accuracy", "n"}``; a class never
    predicted has precision ``None``, one absent from ``labels`` recall and F1 ``None`` (and is
    left out of the macro F1)."""
    y = np.asarray(labels, dtype=np.int64).ravel()
    prob = np.asarray(probs, dtype=np.float64).reshape(len(y), -1) if len(y) else np.zeros((0, len(classes)))
    k = len(classes)
    if prob.shape[1] != k:
        raise ValueError(f"expected {k} class probabilities per image, got {prob.shape[1]}")
    if y.size and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"expected class indices in [0, {k - 1}], got {sorted(set(y.tolist()))}")
    pred = prob.argmax(1) if len(y) else np.zeros(0, np.int64)
    cm = skm.confusion_matrix(y, pred, labels=list(range(k))) if len(y) else np.zeros((k, k), np.int64)
    per_class, f1s = {}, []
    for i, name in enumerate(classes):
        tp, support, called = int(cm[i, i]), int(cm[i].sum()), int(cm[:, i].sum())
        precision = tp / called if called else None
        recall = tp / support if support else None
        f1 = None
        if recall is not None:
            f1 = 2 * tp / (support + called)
            f1s.append(f1)
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return {"classes": list(classes), "confusion": cm.tolist(), "per_class": per_class,
            "macro_f1": float(np.mean(f1s)) if f1s else None,
            "accuracy": float((pred == y).mean()) if len(y) else None, "n": int(len(y))}
