"""Figures over seeds: mean, sample standard deviation and a Student t confidence interval.

With ``n`` per-seed figures (n >= 2) the 95 % interval of the mean is
``mean ± t(0.975, n - 1) · std / sqrt(n)`` (``std``: sample standard deviation, ddof = 1), which
assumes roughly normal per-seed figures. With n < 5 the interval is wide and that assumption cannot
be checked: the summary says so (``note``). With one seed there is no spread and no interval
(``std`` and ``ci95`` are None). A percentile bootstrap over 2-3 seeds, used before, is close to
[min, max] and claims far more certainty than the data has.
"""

from __future__ import annotations

import math

import numpy as np

SMALL_N = 5


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t distribution with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def summarize(values: list) -> dict:
    """``{"mean", "std", "ci95", "n", "values"}`` of per-seed ``values`` (None entries are ignored),
    plus ``note`` when 2 <= n < 5."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    n = int(len(v))
    out: dict = {"mean": None, "std": None, "ci95": None, "n": n, "values": list(values)}
    if n == 0:
        return out
    out["mean"] = float(v.mean())
    if n == 1:
        return out
    std = float(v.std(ddof=1))
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
    out["std"] = std
    out["ci95"] = [out["mean"] - half, out["mean"] + half]
    if n < SMALL_N:
        out["note"] = f"n = {n} seeds is small: the t-interval is wide and assumes normal per-seed figures"
    return out


def aggregate(dicts: list[dict]) -> dict:
    """Per-seed metric dicts -> one dict: the dict itself for one seed, else a summary per figure."""
    if len(dicts) == 1:
        return dicts[0]
    out: dict = {}
    for k in dicts[0]:
        vals = [d.get(k) for d in dicts]
        if isinstance(vals[0], dict):
            out[k] = aggregate(vals)
        elif k == "confusion":
            arr = np.asarray(vals, dtype=np.float64)
            out[k] = {"mean": arr.mean(0).tolist(), "std": arr.std(0, ddof=1).tolist(), "sum": arr.sum(0).tolist(),
                      "values": vals}
        elif k == "n" and len(set(vals)) == 1:
            out[k] = vals[0]
        elif all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[k] = summarize(vals)
        else:
            out[k] = vals
    return out


def mean_of(v):
    """A figure's value: the number itself, or the mean of a multi-seed summary."""
    return v["mean"] if isinstance(v, dict) and "mean" in v else v


def aggregate_eval(evals: list[dict]) -> dict:
    """Evaluate JSONs of several seeds -> overall, per generator and per degradation level, aggregated."""
    out = {"overall": aggregate([e["overall"] for e in evals]),
           "per_generator": {g: aggregate([e["per_generator"][g] for e in evals]) for g in evals[0]["per_generator"]}}
    if evals[0].get("degradations"):
        out["degradations"] = {
            kind: [{"level": row["level"], "overall": aggregate([e["degradations"][kind][i]["overall"] for e in evals]),
                    "per_generator": {g: aggregate([e["degradations"][kind][i]["per_generator"][g] for e in evals])
                                      for g in row["per_generator"]}}
                   for i, row in enumerate(rows)]
            for kind, rows in evals[0]["degradations"].items()}
    return out
