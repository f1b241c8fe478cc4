"""Exact binomial tails and Clopper–Pearson intervals for rates (false- and true-positive rates).

Pure functions of counts: :func:`binom_cdf` (``P(Binomial(n, p) <= k)`` summed in log space),
:func:`cp_upper` / :func:`cp_lower` (one-sided bounds), :func:`clopper_pearson` (the two-sided exact
interval), :func:`rate_with_interval` and :func:`error_rates` (a confusion matrix's FPR and TPR with
their intervals). :mod:`fakescope.calibration` builds its false-positive guarantee on them; the
evaluation reports its rates with them."""

from __future__ import annotations

import math

import numpy as np

INTERVAL_CONFIDENCE = 0.95  # of the reported FPR / TPR intervals


def log_binom_pmf(n: int, p: float) -> np.ndarray:
    """log P(Binomial(n, p) = i) for i = 0..n (p in (0, 1))."""
    from scipy.special import gammaln

    i = np.arange(n + 1, dtype=np.float64)
    return gammaln(n + 1.0) - gammaln(i + 1.0) - gammaln(n - i + 1.0) + i * math.log(p) + (n - i) * math.log1p(-p)


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed exactly in log space."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp = log_binom_pmf(n, p)[: k + 1]
    m = lp.max()
    return float(min(1.0, math.exp(m) * np.exp(lp - m).sum()))


def _solve_decreasing(f, target: float) -> float:
    """The p in [0, 1] where the decreasing function f(p) crosses ``target`` (bisection to 1e-15)."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return (lo + hi) / 2.0


def cp_upper(k: int, n: int, confidence: float) -> float:
    """One-sided Clopper–Pearson upper bound at ``confidence`` for a rate with ``k`` events in ``n``
    trials: the ``p`` with ``P(Binomial(n, p) <= k) = 1 - confidence`` (= ``Beta(k + 1, n - k)``'s
    ``confidence`` quantile; 1 when ``k = n``)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"expected 0 <= k <= n and n > 0, got k={k}, n={n}")
    if k == n:
        return 1.0
    if confidence <= 0.0:
        return k / n
    return _solve_decreasing(lambda p: binom_cdf(k, n, p), 1.0 - confidence)


def cp_lower(k: int, n: int, confidence: float) -> float:
    """One-sided Clopper–Pearson lower bound at ``confidence``: the ``p`` with
    ``P(Binomial(n, p) >= k) = 1 - confidence`` (= ``Beta(k, n - k + 1)``'s ``1 - confidence``
    quantile; 0 when ``k = 0``)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"expected 0 <= k <= n and n > 0, got k={k}, n={n}")
    if k == 0:
        return 0.0
    if confidence <= 0.0:
        return k / n
    return 1.0 - cp_upper(n - k, n, confidence)


def clopper_pearson(k: int, n: int, confidence: float = INTERVAL_CONFIDENCE) -> list[float] | None:
    """Two-sided (exact, central) Clopper–Pearson interval ``[lo, hi]`` for ``k`` events in ``n``
    trials at ``confidence``; None when ``n = 0``."""
    if n == 0:
        return None
    a = (1.0 + confidence) / 2.0
    return [cp_lower(k, n, a), cp_upper(k, n, a)]


def rate_with_interval(k: int, n: int, confidence: float = INTERVAL_CONFIDENCE) -> dict:
    """``{"value": k / n, "interval": [lo, hi], "k", "n"}`` (Clopper–Pearson); value and interval None
    when ``n = 0``."""
    return {"value": k / n if n else None, "interval": clopper_pearson(k, n, confidence), "k": int(k), "n": int(n)}


def error_rates(confusion, confidence: float = INTERVAL_CONFIDENCE) -> dict:
    """``{"fpr", "tpr"}`` from a ``[[tn, fp], [fn, tp]]`` confusion matrix, each
    :func:`rate_with_interval` (Clopper–Pearson at ``confidence``; value None without real, resp. AI, images)."""
    (tn, fp), (fn, tp) = confusion
    return {"fpr": rate_with_interval(int(fp), int(fp + tn), confidence),
            "tpr": rate_with_interval(int(tp), int(tp + fn), confidence)}
