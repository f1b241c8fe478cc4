"""``calibrate``: fit temperature scaling and an operating threshold for a run on held-out images.

The calibration set is a data root's split, or ``holdout``: the images of the run's own training split
that it did not train on (its early-stopping carve, plus the files a ``--limit`` left out). It must not
be the set the run is later judged on; :func:`calibrate_run` warns when it looks like it is, and
``evaluate`` warns when it evaluates on the calibration set.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from fakescope.calibration import DEFAULT_CONFIDENCE, allowed_false_positives, fit_calibration
from fakescope.data.layout import Index, carve_validation, index_root, limit_per_class
from fakescope.engine.evaluation import prepare
from fakescope.engine.infer import score_files
from fakescope.errors import FakescopeError
from fakescope.options import RuntimeOptions
from fakescope.runfiles import read_config

HOLDOUT = "holdout"


def holdout_index(config: dict) -> Index:
    """The training split's images that the run never trained on: the early-stopping carve plus,
    when it was trained with ``--limit``, the files the limit left out."""
    data, train = config.get("data") or {}, config.get("train") or {}
    roots = data.get("roots") or [data.get("root")]  # a run on several roots records them all
    for root in roots:
        if not root or not Path(root).is_dir():
            raise FakescopeError(f"expected the run's training root to exist for --split holdout, got {root!r}; "
                                 f"pass --data ROOT --split val (or train) instead")
    full = index_root(roots).select(data.get("generators"), "train")
    used = limit_per_class(full, train["limit"]) if train.get("limit") else full
    _, carve = carve_validation(used, float(train.get("val_fraction", 0.1)))
    trained = set(used.paths) - set(carve.paths)
    return full.subset([i for i, p in enumerate(full.paths) if p not in trained])


def calibrate_run(run_dir: str | os.PathLike, data: str | os.PathLike | None = None, *, split: str = "val",
                  generators=None, target_fpr: float = 0.01, method: str = "temperature", limit: int | None = None,
                  confidence: float = DEFAULT_CONFIDENCE, runtime_options: RuntimeOptions | None = None) -> dict:
    """Score the calibration set with the run and fit: ``{"calibration": Calibration, "warnings": [...]}``.
    Writes nothing: :func:`fakescope.report.artifacts.write_calibration_files` stores it in the run.

    The threshold promises an FPR of at most ``target_fpr`` on new images like the set's real ones with
    probability ``confidence`` (:mod:`fakescope.calibration`; ``confidence=0``: the empirical quantile,
    no promise). A set with too few real images for that is an error naming the smallest number, raised
    before anything is scored. ``runtime_options``: where and how the set is scored (device, precision,
    batch size, workers, feature cache, pixel limit; the model is not compiled)."""
    if not 0.0 <= float(target_fpr) < 1.0:
        raise FakescopeError(f"expected --target-fpr in [0, 1), got {target_fpr}")
    if not 0.0 <= float(confidence) < 1.0:
        raise FakescopeError(f"expected --confidence in [0, 1) like 0.95, got {confidence}")
    config = read_config(run_dir)
    warnings: list[str] = []
    train_root = (config.get("data") or {}).get("root")
    if split == HOLDOUT:
        index = holdout_index(config)
        if generators:
            index = index.select(generators)
        root = index.root
    else:
        if data is None:
            raise FakescopeError("expected --data ROOT with --split train/val (or --split holdout for the "
                                 "run's own held-out training images)")
        index = index_root(data).select(generators, split)
        root = index.root
        if split == "train" and train_root and os.path.realpath(root) == os.path.realpath(train_root):
            warnings.append(f"calibrating on {root} split 'train', which this run was trained on: its scores "
                            f"there are over-confident; use --split holdout or other data")
        if split == "val":
            warnings.append(f"calibrating on {root} split 'val': `evaluate` judges on 'val' by default, and figures "
                            f"measured on the calibration set are optimistic; evaluate on other data")
    if limit:
        index = limit_per_class(index, limit)
    if len(index) == 0:
        raise FakescopeError(f"no images to calibrate on in {root} (split {split!r})")
    n_real = int((np.asarray(index.labels) == 0).sum())
    if n_real:
        allowed_false_positives(n_real, float(target_fpr), float(confidence))  # too few: say so before scoring
    options = runtime_options if runtime_options is not None else RuntimeOptions()
    model, config, pipeline, rt = prepare(run_dir, replace(options, compile=False))
    files = [index.abspath(i) for i in range(len(index))]
    p, errors = score_files(model, files, pipeline, rt, desc="calibrating")
    ok = ~np.isnan(p)
    labels = np.asarray(index.labels)[ok]
    desc = {"root": root, "split": split, "generators": index.generator_names, "n_files": len(index),
            "unreadable": int((~ok).sum()), "limit": limit, "precision": rt.precision.name}
    if len(index.roots) > 1:  # the index's root is then only the roots' common parent
        desc["roots"] = index.roots
    cal = fit_calibration(labels, p[ok], target_fpr, method=method, data=desc, confidence=float(confidence))
    return {"calibration": cal, "warnings": warnings}
