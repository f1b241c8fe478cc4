"""Detection metrics with AI as the positive class, computed by scikit-learn.

:func:`binary_metrics` is a pure function of labels and scores; :class:`DetectionMetrics` is the
thin stateful wrapper that accumulates batches and reports overall and per-generator figures.
Metrics that are undefined for the data (ROC-AUC on a folder of real photos only, recall with no
AI images) are ``None`` rather than a made-up number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm

from fakescope import validate

METRIC_KEYS = ("accuracy", "precision", "recall", "f1", "roc_auc", "average_precision",
               "real_accuracy", "fake_accuracy", "n", "confusion")


def check_threshold(threshold: float) -> float:
    """The one threshold rule of :func:`fakescope.validate.threshold` (``p_ai >= threshold`` is AI)."""
    return validate.threshold(threshold)


def _num(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def binary_metrics(labels: Sequence[int] | np.ndarray, p_ai: Sequence[float] | np.ndarray,
                   threshold: float = 0.5) -> dict:
    """Accuracy, precision, recall, F1, ROC-AUC, AP, real/fake accuracy, n and the confusion matrix.

    ``labels``: 0 = nature, 1 = ai. ``p_ai``: P(ai) in [0, 1]. An image is called AI when
    ``p_ai >= threshold``. ``confusion`` is ``[[tn, fp], [fn, tp]]``.
    """
    y = np.asarray(labels, dtype=np.int64).ravel()
    p = np.asarray(p_ai, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"expected labels and scores of the same length, got {y.shape[0]} and {p.shape[0]}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"expected labels in {{0, 1}} (nature=0, ai=1), got {sorted(set(y.tolist()))}")
    threshold = check_threshold(threshold)
    pred = (p >= threshold).astype(np.int64)
    n = int(y.size)
    out: dict = {k: None for k in METRIC_KEYS}
    out["n"] = n
    if n == 0:
        out["confusion"] = [[0, 0], [0, 0]]
        return out
    cm = skm.confusion_matrix(y, pred, labels=[0, 1])
    (tn, fp), (fn, tp) = cm.tolist()
    both = 0 < y.sum() < n
    out.update(
        accuracy=_num(skm.accuracy_score(y, pred)),
        precision=_num(skm.precision_score(y, pred, zero_division=np.nan)),
        recall=_num(skm.recall_score(y, pred, zero_division=np.nan)),
        f1=_num(skm.f1_score(y, pred, zero_division=np.nan)) if both else None,
        roc_auc=_num(skm.roc_auc_score(y, p)) if both else None,
        average_precision=_num(skm.average_precision_score(y, p)) if both else None,
        real_accuracy=tn / (tn + fp) if tn + fp else None,
        fake_accuracy=tp / (tp + fn) if tp + fn else None,
        confusion=[[tn, fp], [fn, tp]],
    )
    return out


class DetectionMetrics:
    """Accumulates ``(labels, p_ai, generators)`` batches; ``compute()`` gives overall and per generator."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = check_threshold(threshold)
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
