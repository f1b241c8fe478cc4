"""Readable tables (Markdown, which also reads well on a terminal)."""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_COLUMNS = ("accuracy", "precision", "recall", "f1", "roc_auc", "average_precision",
                   "real_accuracy", "fake_accuracy", "n")


def fmt(v) -> str:
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
        return f"{v['mean']:.4f} ± {v['std']:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    return str(v)


def markdown_table(rows: dict[str, dict], columns: Sequence[str] = DEFAULT_COLUMNS, first: str = "") -> str:
    header = [first] + list(columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for name, row in rows.items():
        lines.append("| " + " | ".join([name] + [fmt(row.get(c)) for c in columns]) + " |")
    return "\n".join(lines)
