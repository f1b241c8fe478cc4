"""Readable tables (Markdown, which also reads well on a terminal): the package's one table writer."""

from __future__ import annotations

import math
from collections.abc import Sequence

DEFAULT_COLUMNS = ("accuracy", "precision", "recall", "f1", "roc_auc", "average_precision",
                   "real_accuracy", "fake_accuracy", "n")


def fmt(v) -> str:
    """A cell: 4 decimals for floats, ``—`` for a missing value, ``mean ± std [interval]`` for a
    multi-seed figure (the interval only where one is defined, see :mod:`fakescope.study.stats`)."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, dict) and "mean" in v:  # a multi-seed figure
        if v["mean"] is None:
            return "—"
        ci = v.get("ci95")
        std = "" if v.get("std") is None else f" ± {v['std']:.4f}"
        return f"{v['mean']:.4f}{std}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    return str(v)


def significant(x: float, digits: int = 3) -> str:
    """``x`` rounded to ``digits`` significant figures, written without an exponent (3905.2469 -> ``3910``,
    0.012345 -> ``0.0123``)."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    decimals = digits - 1 - math.floor(math.log10(abs(x)))
    r = round(x, decimals)
    return f"{r:.{decimals}f}" if decimals > 0 else str(int(r))


def measured(v) -> str:
    """A cell for a timing or throughput (seconds, images/s): 3 significant figures, which is what their
    run-to-run noise allows (a few per cent on a shared machine); a multi-seed figure as ``mean ± std``."""
    if isinstance(v, (bool, int)) or v is None:
        return fmt(v)
    if isinstance(v, float):
        return significant(float(v))
    if isinstance(v, dict) and "mean" in v:
        if v["mean"] is None:
            return "—"
        return significant(v["mean"]) + ("" if v.get("std") is None else f" ± {significant(v['std'])}")
    return fmt(v)


def _cell(v) -> str:
    text = v if isinstance(v, str) else fmt(v)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table: ``header`` and ``rows`` of cells (strings kept, other values through :func:`fmt`;
    ``|`` escaped)."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown_table(rows: dict[str, dict], columns: Sequence[str] = DEFAULT_COLUMNS, first: str = "") -> str:
    """One row per ``name -> {column: value}``."""
    return markdown([first, *columns], [[name, *(row.get(c) for c in columns)] for name, row in rows.items()])
