"""``data inspect``: what is in a data root, and what is wrong with it."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fakescope.data.dataset import default_workers
from fakescope.data.io import DEFAULT_MAX_PIXELS, probe_image, read_image
from fakescope.data.layout import Index, limit_per_class
from fakescope.data.transforms import fit
from fakescope.errors import ImageReadError
from fakescope.progress import progress


class _Probe(Dataset):
    def __init__(self, files: list[str], max_pixels: int) -> None:
        self.files, self.max_pixels = files, max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            fmt, w, h = probe_image(self.files[i], self.max_pixels)
            img = read_image(self.files[i], max_pixels=self.max_pixels)  # full decode: finds truncation
            return i, fmt, w, h, local_detail(img), None
        except ImageReadError as e:
            return i, None, 0, 0, None, e.reason


DETAIL_SIZE = 256
"""Side of the centre square (at the image's own pixel scale) whose local detail is measured."""


def local_detail(img: torch.Tensor) -> float:
    """Mean absolute Laplacian (grey levels) of the centre ``DETAIL_SIZE`` square of ``uint8 [3, H, W]``,
    taken at the image's own pixel scale: low for smooth, clean pictures (studio shots, renders, skies),
    high for cluttered, noisy or sharp ones."""
    h, w = img.shape[-2:]
    top, left = max(0, (h - DETAIL_SIZE) // 2), max(0, (w - DETAIL_SIZE) // 2)
    x = img[:, top:top + DETAIL_SIZE, left:left + DETAIL_SIZE].float().mean(0)
    if min(x.shape) < 3:
        return 0.0
    lap = 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]
    return float(lap.abs().mean())


DETAIL_AUC = 0.75
"""Local detail alone separating the classes with a ROC-AUC at least this far from 0.5 (either way) is a shortcut."""


def detail_shortcut(ai: list[float], nature: list[float]) -> tuple[dict, str | None]:
    """``(summary, warning or None)``: how well local detail alone tells 'ai' from 'nature' images
    (ROC-AUC of the statistic, 'ai' as positive), with each class's quartiles."""
    from sklearn.metrics import roc_auc_score

    summary = {c: {"q25": float(np.percentile(v, 25)), "median": float(np.median(v)),
                   "q75": float(np.percentile(v, 75)), "n": len(v)} for c, v in (("ai", ai), ("nature", nature)) if v}
    if not ai or not nature:
        return summary, None
    auc = float(roc_auc_score([1] * len(ai) + [0] * len(nature), list(ai) + list(nature)))
    summary["roc_auc"] = auc
    if max(auc, 1 - auc) < DETAIL_AUC:
        return summary, None
    smoother = "ai" if auc < 0.5 else "nature"
    return summary, (
        f"detail shortcut: local detail alone (mean absolute Laplacian of the centre {DETAIL_SIZE}-px square) "
        f"separates the classes with ROC-AUC {max(auc, 1 - auc):.2f} ('ai' median {summary['ai']['median']:.1f}, "
        f"'nature' median {summary['nature']['median']:.1f}: '{smoother}' images are smoother); a detector can learn "
        f"clean vs. cluttered pictures instead of the generator and call smooth real photos "
        f"{'AI' if smoother == 'ai' else 'real'} (check it on such photos, e.g. benchmark --real-photos DIR)")


@dataclass
class _Tally:
    """What decoding the checked files found: formats and sizes per class, sizes per (generator, class),
    shorter sides, local detail per class, and the unreadable files (path -> reason)."""

    formats: dict[str, Counter] = field(default_factory=lambda: {"nature": Counter(), "ai": Counter()})
    sizes: Counter = field(default_factory=Counter)
    class_sizes: dict[str, Counter] = field(default_factory=lambda: {"nature": Counter(), "ai": Counter()})
    per_generator: dict[tuple[str, str], list[tuple[int, int]]] = field(default_factory=dict)
    shorts: list[int] = field(default_factory=list)
    detail: dict[str, list[float]] = field(default_factory=lambda: {"nature": [], "ai": []})
    bad: dict[str, str] = field(default_factory=dict)


def inspect_index(index: Index, *, sample: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                  num_workers: int | None = None) -> dict:
    """Counts per generator/split/class, formats per class, sizes, unreadable files, warnings.

    Every file is decoded once (use ``sample`` to check at most that many per generator, split
    and class on a very large root); counts always cover the whole index."""
    probed = limit_per_class(index, sample) if sample else index
    files = [probed.abspath(i) for i in range(len(probed))]
    t = _tally(probed, files, max_pixels, num_workers)
    warnings = []
    fmt_warning = format_shortcut(t.formats)
    if fmt_warning:
        warnings.append(fmt_warning)
    warnings.extend(size_shortcuts(t.per_generator))
    detail_summary, detail_warning = detail_shortcut(t.detail["ai"], t.detail["nature"])
    if detail_warning:
        warnings.append(detail_warning)
    if t.bad:
        warnings.append(f"{len(t.bad)} unreadable files (listed under 'unreadable')")
    warnings.extend(_missing_classes(index))
    return {
        "root": index.root,
        "layout": index.layout,
        "total": len(index),
        "counts": index.counts(),
        "checked": len(files),
        "formats": {c: dict(f.most_common()) for c, f in t.formats.items()},
        "sizes": {
            "most_common": dict(t.sizes.most_common(10)),
            "by_class": {c: dict(f.most_common(5)) for c, f in t.class_sizes.items()},
            "shorter_side": ({"min": min(t.shorts), "median": statistics.median(t.shorts), "max": max(t.shorts)}
                             if t.shorts else None),
        },
        "local_detail": detail_summary,
        "unreadable": t.bad,
        "warnings": warnings,
    }


def _tally(probed: Index, files: list[str], max_pixels: int, num_workers: int | None) -> _Tally:
    """Decode every file of ``probed`` (``files``: their paths) in ``num_workers`` workers and tally it."""
    loader = DataLoader(_Probe(files, max_pixels), batch_size=64, collate_fn=list,
                        num_workers=default_workers() if num_workers is None else num_workers)
    t = _Tally()
    names = ("nature", "ai")
    for batch in progress(loader, desc="inspecting", total=len(loader)):
        for i, fmt, w, h, d, err in batch:
            if err is not None:
                t.bad[files[i]] = err
                continue
            cls = names[probed.labels[i]]
            t.detail[cls].append(d)
            t.formats[cls][fmt] += 1
            t.sizes[f"{w}x{h}"] += 1
            t.class_sizes[cls][f"{w}x{h}"] += 1
            t.per_generator.setdefault((probed.generators[i], cls), []).append((w, h))
            t.shorts.append(min(w, h))
    return t


def format_shortcut(formats: dict[str, Counter]) -> str | None:
    """A warning when most 'ai' images are in one file format and most 'nature' images in another."""
    major = {c: (f.most_common(1)[0] if f else None) for c, f in formats.items()}
    if not (major["ai"] and major["nature"]):
        return None
    (fa, na), (fn, nn) = major["ai"], major["nature"]
    share_a, share_n = na / sum(formats["ai"].values()), nn / sum(formats["nature"].values())
    if fa != fn and share_a > 0.5 and share_n > 0.5:
        return (f"format shortcut: 'ai' images are mostly {fa} ({share_a:.0%}) but 'nature' images are mostly "
                f"{fn} ({share_n:.0%}); a detector can learn the compression instead of the generator "
                f"(use --jpeg-align Q to re-encode both classes)")
    return None


def _missing_classes(index: Index) -> list[str]:
    """A warning for each generator/split of ``index`` lacking one class."""
    return [f"{g}/{s} has no '{cls}' images" for g, splits in index.counts().items() for s, c in splits.items()
            for cls in ("nature", "ai") if c[cls] == 0]


FIXED_SIZE_SHARE = 0.9
"""A class whose most common exact size covers at least this share of its images has a fixed size..."""
OTHER_SIZE_SHARE = 0.5
"""...which is a shortcut when at most this share of the other class has that size."""
SHORT_SIDE_RATIO = 1.5
"""Otherwise, medians of the shorter side this far apart are a shortcut too."""


def _size_gap(ai: list[tuple[int, int]], nature: list[tuple[int, int]]) -> str | None:
    """How the two classes' image sizes differ, when a detector could tell them apart by it; else None."""
    by_class = {"ai": ai, "nature": nature}
    for cls, other in (("ai", "nature"), ("nature", "ai")):
        (size, k), = Counter(by_class[cls]).most_common(1)
        share = k / len(by_class[cls])
        other_share = sum(s == size for s in by_class[other]) / len(by_class[other])
        if share >= FIXED_SIZE_SHARE and other_share <= OTHER_SIZE_SHARE:
            w, h = size
            return f"{share:.0%} of '{cls}' images are {w}x{h} against {other_share:.0%} of '{other}' images"
    med = {c: statistics.median(min(s) for s in v) for c, v in by_class.items()}
    if max(med.values()) >= SHORT_SIDE_RATIO * min(med.values()):
        return f"median shorter side 'ai' {med['ai']:g}, 'nature' {med['nature']:g}"
    return None


def size_shortcuts(per_generator: dict[tuple[str, str], list[tuple[int, int]]]) -> list[str]:
    """One warning naming every generator whose 'ai' and 'nature' images differ in size
    (``per_generator``: ``{(generator, class): [(width, height), ...]}``)."""
    by_gap: dict[str, list[str]] = {}  # generators with the same difference are named together
    for g in sorted({g for g, _ in per_generator}):
        ai, nature = per_generator.get((g, "ai")), per_generator.get((g, "nature"))
        gap = _size_gap(ai, nature) if ai and nature else None
        if gap:
            by_gap.setdefault(gap, []).append(g)
    if not by_gap:
        return []
    gaps = [f"{', '.join(gens)}: {gap}" for gap, gens in by_gap.items()]
    return [f"size shortcut: the classes differ in image size ({'; '.join(gaps)}); every image is resized to "
            f"the model's input, so a detector can learn the size or its resampling trace instead of the generator "
            f"(check a detector on 'ai' and 'nature' images of matching sizes before trusting its accuracy)"]


def sample_images(index: Index, per_class: int = 6, size: int = 96) -> list[tuple[str, list]]:
    """Rows for the sample grid: ``(generator / class, [HxWx3 uint8])``, readable files only."""
    rows = []
    picked = limit_per_class(index, per_class * 3)
    for g in picked.generator_names:
        for cls, name in ((1, "ai"), (0, "nature")):
            imgs = []
            for i in range(len(picked)):
                if picked.generators[i] == g and picked.labels[i] == cls and len(imgs) < per_class:
                    try:
                        img = read_image(picked.abspath(i))
                    except ImageReadError:
                        continue
                    imgs.append(fit(img, size).permute(1, 2, 0).numpy())
            if imgs:
                rows.append((f"{g}\n{name}", imgs))
    return rows


