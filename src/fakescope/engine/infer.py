"""Inference: score image files with a detector (streamed, batched, sharded under torchrun) and
evaluate a run on a data root."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from fakescope.data.dataset import ImageDataset, make_loader
from fakescope.data.layout import Index
from fakescope.data.transforms import Pipeline
from fakescope.engine import runtime
from fakescope.engine.features import extract_features
from fakescope.engine.runtime import Precision
from fakescope.metrics import DetectionMetrics
from fakescope.progress import progress


def forward_p_ai(model, x: torch.Tensor, precision: Precision, device: torch.device) -> torch.Tensor:
    """P(ai) for a float batch in [0, 1]. A frozen backbone's features are rounded to float16 and
    the head runs in fp32, exactly as when they come from the feature cache."""
    with torch.no_grad():
        with precision.autocast(device):
            if model.frozen:
                f = model.features(precision.prepare(x))
        if model.frozen:
            logits = model.head(f.half().float())
        else:
            with precision.autocast(device):
                logits = model(precision.prepare(x))
        return model.p_ai(logits)


def score_files(model, files: list[str], pipeline: Pipeline, *, device: torch.device, precision: Precision,
                batch_size: int = 64, num_workers: int | None = None, use_cache: bool = True,
                cache_root=None, max_pixels: int | None = None, max_file_size: int | None = None,
                desc: str = "scoring") -> tuple[np.ndarray, dict[int, str]]:
    """``(p_ai, errors)``: P(ai) per file (NaN where unreadable) and ``{position: reason}``.

    Every rank returns the full result. Memory stays flat: images are decoded batch by batch."""
    model.eval()
    if model.frozen and use_cache and max_file_size is None:
        feats, errors = extract_features(model, files, pipeline, device=device, precision=precision,
                                         batch_size=batch_size, num_workers=num_workers, cache_root=cache_root,
                                         desc=desc, max_pixels=max_pixels)
        p = np.full(len(files), np.nan)
        ok = np.array(sorted(set(range(len(files))) - set(errors)), dtype=np.int64)
        with torch.no_grad():
            for s in range(0, len(ok), 4096):
                idx = ok[s:s + 4096]
                f = feats[idx].to(device).float()
                p[idx] = model.p_ai(model.head(f)).cpu().double().numpy()
        return p, errors
    kw = {k: v for k, v in (("max_pixels", max_pixels), ("max_file_size", max_file_size)) if v}
    ds = ImageDataset(files, pipeline, stage_only=True, **kw)
    order = [i for b in runtime.shard_batches(len(files), batch_size) for i in b]
    loader = make_loader(ds, batch_size, order, num_workers=num_workers, pin_memory=device.type == "cuda")
    idx_out: list[np.ndarray] = []
    p_out: list[np.ndarray] = []
    errors: dict[int, str] = {}
    for batch in progress(loader, desc=desc, total=len(loader)):
        errors.update(batch.errors)
        if not len(batch.index):
            continue
        x = pipeline.finish(batch.image.to(device, non_blocking=True)).float().div_(255)
        p_out.append(forward_p_ai(model, x, precision, device).cpu().double().numpy())
        idx_out.append(batch.index.numpy())
    p = np.full(len(files), np.nan)
    for part_idx, part_p, part_err in runtime.all_gather_objects(
            (np.concatenate(idx_out) if idx_out else np.zeros(0, np.int64),
             np.concatenate(p_out) if p_out else np.zeros(0), errors)):
        p[part_idx] = part_p
        errors.update(part_err)
    return p, errors


def evaluate_index(model, index: Index, pipeline: Pipeline, *, device: torch.device, precision: Precision,
                   threshold: float = 0.5, batch_size: int = 64, num_workers: int | None = None,
                   use_cache: bool = True, cache_root=None, degradations=(), max_pixels: int | None = None) -> dict:
    """Metrics of ``model`` on ``index``: overall, per generator, and under each degradation level.

    Returns the evaluate JSON (without the ``model``/``data`` descriptions, which the caller adds)
    plus ``_scores`` (labels, p_ai, generators of the readable images) for plots."""
    files = [index.abspath(i) for i in range(len(index))]
    labels = np.asarray(index.labels)
    gens = np.asarray(index.generators, dtype=object)
    t0 = time.perf_counter()
    p, errors = score_files(model, files, pipeline, device=device, precision=precision, batch_size=batch_size,
                            num_workers=num_workers, use_cache=use_cache, cache_root=cache_root,
                            max_pixels=max_pixels, desc="evaluating")
    seconds = time.perf_counter() - t0
    ok = ~np.isnan(p)
    m = DetectionMetrics(threshold)
    m.update(labels[ok], p[ok], gens[ok].tolist())
    result = m.compute()
    result["seconds"] = seconds
    result["images_per_second"] = float(ok.sum() / seconds) if seconds > 0 else None
    result["bad_files"] = {files[i]: r for i, r in sorted(errors.items())}
    result["_scores"] = {"labels": labels[ok], "p_ai": p[ok], "generators": gens[ok]}
    if degradations:
        result["degradations"] = {}
        for kind, levels in degradations:
            rows = []
            for level in levels:
                pl = replace(pipeline, degrade=(kind, float(level)))
                pd, _ = score_files(model, files, pl, device=device, precision=precision, batch_size=batch_size,
                                    num_workers=num_workers, use_cache=use_cache, cache_root=cache_root,
                                    max_pixels=max_pixels, desc=f"{kind} {level:g}")
                okd = ~np.isnan(pd)
                md = DetectionMetrics(threshold)
                md.update(labels[okd], pd[okd], gens[okd].tolist())
                rows.append({"level": float(level), **md.compute()})
            result["degradations"][kind] = rows
    return result
