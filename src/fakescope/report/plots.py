"""Figures as PNG files.

Each figure is a :class:`matplotlib.figure.Figure` drawn by the Agg canvas directly, without
``pyplot``: importing this module or writing a figure never changes matplotlib's backend or
touches the user's open figures (a notebook keeps its inline plots). Files are written atomically.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from fakescope.metrics import ece, reliability_bins
from fakescope.utils import atomic_write_bytes


def _subplots(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, **kw):
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kw)


def _save(fig: Figure, path: str | os.PathLike) -> str:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return str(path)


def roc_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike,
             title: str = "ROC") -> str | None:
    """One ROC curve per name: ``{name: (labels, p_ai)}``; names with a single class are skipped."""
    fig, ax = _subplots((5, 5))
    drawn = 0
    for name, (y, p) in curves.items():
        y = np.asarray(y)
        if len(set(y.tolist())) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, p):.3f})")
        drawn += 1
    if not drawn:
        return None
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate (real called AI)", ylabel="true positive rate (AI caught)", title=title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def reliability_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike,
                     title: str = "reliability", n_bins: int = 15) -> str | None:
    """Reliability diagram: mean ``p_ai`` against the share of AI images in ``n_bins`` equal-mass bins,
    one line per ``{name: (labels, p_ai)}``, with each line's ECE in the legend; the diagonal is perfect
    calibration."""
    fig, ax = _subplots((4.6, 4.6))
    drawn = 0
    for name, (y, p) in curves.items():
        bins = reliability_bins(y, p, n_bins)
        if not bins:
            continue
        ax.plot([b["p_mean"] for b in bins], [b["ai_fraction"] for b in bins], marker="o", ms=4,
                label=f"{name} (ECE {ece(y, p, n_bins):.3f})")
        drawn += 1
    if not drawn:
        return None
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="mean p_ai in bin", ylabel="share of AI images in bin",
           title=title)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def confusion_plot(confusion: Sequence[Sequence[int]], path: str | os.PathLike, title: str = "confusion",
                   classes: Sequence[str] = ("nature", "ai")) -> str:
    """A confusion matrix (rows: true class, columns: predicted), 2x2 or (N+1)x(N+1) for attribution."""
    cm = np.asarray(confusion)
    k = cm.shape[0]
    side = 3.6 if k <= 2 else 1.6 + 0.55 * k
    fig, ax = _subplots((side, side * 0.9))
    ax.imshow(cm, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=10 if k <= 4 else 8,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(k), list(classes), rotation=45 if k > 2 else 0, ha="right" if k > 2 else "center")
    ax.set_yticks(range(k), list(classes))
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def curve_plot(xs: Sequence[float], series: dict[str, Sequence[float | None]], path: str | os.PathLike, *,
               xlabel: str, ylabel: str, title: str, invert_x: bool = False) -> str:
    fig, ax = _subplots((5, 3.6))
    for name, ys in series.items():
        ax.plot(list(xs), [np.nan if v is None else v for v in ys], marker="o", label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if invert_x:
        ax.invert_xaxis()
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def heatmap(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], path: str | os.PathLike, *,
            title: str, xlabel: str, ylabel: str) -> str:
    m = np.asarray(matrix, dtype=float)
    fig, ax = _subplots((max(4.5, 1.6 + 0.8 * len(cols)), max(3.4, 1.4 + 0.7 * len(rows))))
    ax.imshow(m, cmap="viridis", vmin=0, vmax=1)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, "-" if np.isnan(m[i, j]) else f"{m[i, j]:.2f}", ha="center", va="center",
                    color="white" if m[i, j] < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return _save(fig, path)


def gallery_plot(rows: list[tuple[str, list[tuple[np.ndarray, str]]]], path: str | os.PathLike,
                 title: str = "") -> str:
    """A captioned grid: one row per ``(label, [(HxWx3 uint8 image, caption), ...])``."""
    ncols = max((len(items) for _, items in rows), default=1)
    fig, axes = _subplots((2.3 * ncols, 2.5 * len(rows)), len(rows), ncols, squeeze=False)
    for r, (label, items) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(items):
                ax.imshow(items[c][0])
                ax.set_title(f"{label}\n{items[c][1]}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def image_grid(rows: list[tuple[str, list[np.ndarray]]], path: str | os.PathLike, title: str = "") -> str:
    """A labelled grid: one row per ``(label, [HxWx3 uint8 images])``."""
    ncols = max((len(imgs) for _, imgs in rows), default=1)
    fig, axes = _subplots((1.4 * ncols + 1.2, 1.45 * len(rows)), len(rows), ncols, squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(imgs):
                ax.imshow(imgs[c])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
