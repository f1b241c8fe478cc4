"""Inference: score image files with a detector (streamed, batched, sharded under torchrun) and
evaluate a run on a data root.

Evaluation streams: images are decoded batch by batch and only the scores are kept, so its
memory does not grow with the number of images. Under degradations every file is decoded once
and scored under every level in the same pass (see ``ImageDataset(variants=...)``); a frozen
backbone reads (or fills) the feature cache of each level instead.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from fakescope.data.dataset import ImageDataset, cpu_threads, make_loader, plan_loader
from fakescope.data.layout import Index
from fakescope.data.transforms import Pipeline
from fakescope.engine import runtime
from fakescope.engine.features import extract_features
from fakescope.engine.runtime import Precision, Runtime
from fakescope.metrics import DetectionMetrics, attribution_metrics
from fakescope.progress import progress

VARIANT_BATCH_BYTES = 256 << 20
"""Largest uint8 batch (all variants of a batch together) one streaming pass decodes at once."""


def default_batch_size(input_size: int) -> int:
    """Inference batch size for a model input of ``input_size`` pixels: 64 at 224, larger for small
    inputs (512 for 32x32, where per-operator overhead dominates), at least 32."""
    return int(min(512, max(32, 64 * (224 / max(1, input_size)) ** 2)))


def forward_logits(model, x: torch.Tensor, precision: Precision, device: torch.device) -> torch.Tensor:
    """float32 logits for a float batch in [0, 1], computed the way every command that reports
    metrics computes them: ``precision``'s autocast and memory format; a frozen backbone's features
    rounded to float16 and the head in fp32, exactly as when they come from the feature cache.
    Gradients flow (callers wrap it in ``no_grad`` when they need none)."""
    if model.frozen:
        with precision.autocast(device):
            f = model.features(precision.prepare(x))
        return model.head(f.float().half().float()).float()
    with precision.autocast(device):
        return model(precision.prepare(x)).float()


def forward_p_ai(model, x: torch.Tensor, precision: Precision, device: torch.device) -> torch.Tensor:
    """P(ai) for a float batch in [0, 1] (see :func:`forward_logits`)."""
    with torch.no_grad():
        return model.p_ai(forward_logits(model, x, precision, device))


def score_width(model) -> int:
    """Columns of :func:`scores_from_logits`: ``p_ai``, then the class probabilities of an attribution model."""
    return 1 + (model.num_outputs if model.num_outputs > 2 else 0)


def scores_from_logits(model, logits: torch.Tensor, crops: int = 1) -> torch.Tensor:
    """``[B, W]``: P(ai) and, for an attribution model (more than two outputs), the softmax over its
    classes. With ``crops`` > 1 the rows are ``B x crops`` crops of B images and each image gets the
    mean over its crops (the ``crops`` test geometry)."""
    logits = logits.float()
    s = model.p_ai(logits)[:, None]
    if logits.shape[1] > 2:
        s = torch.cat([s, torch.softmax(logits.to(s.dtype), 1)], 1)
    return s.view(-1, crops, s.shape[1]).mean(1) if crops > 1 else s


def forward_scores(model, x: torch.Tensor, precision: Precision, device: torch.device) -> torch.Tensor:
    """:func:`scores_from_logits` for a batch ``[B, 3, S, S]`` or a batch of crops ``[B, K, 3, S, S]``."""
    k = x.shape[1] if x.dim() == 5 else 1
    with torch.no_grad():
        return scores_from_logits(model, forward_logits(model, x.flatten(0, 1) if x.dim() == 5 else x, precision,
                                                        device), k)


def nonfinite_errors(p: np.ndarray, errors: dict[int, str], names: list[str] | None = None) -> np.ndarray:
    """Turn scores that are not finite numbers (a model that returns NaN or inf for some input)
    into errors: each such file gets a reason in ``errors`` (naming the variants where it
    happened) and NaN in every variant, so every variant scores the same images. ``p``: ``[V, N]``,
    changed in place and returned."""
    bad = ~np.isfinite(p) & ~np.isin(np.arange(p.shape[1]), list(errors))[None, :]
    for i in np.flatnonzero(bad.any(axis=0)).tolist():
        where = [names[j] if names else str(j) for j in np.flatnonzero(bad[:, i]).tolist()]
        values = sorted({str(float(v)) for v in p[bad[:, i], i]})
        errors[i] = (f"the model returned a non-finite score ({', '.join(values)})"
                     + (f" under {', '.join(where)}" if names and len(names) > 1 else ""))
        p[:, i] = np.nan
    return p


def stage_scores(model, pipeline: Pipeline, stage: torch.Tensor, precision: Precision,
                 device: torch.device) -> np.ndarray:
    """:func:`scores_from_logits` (float64 ``[B, W]``: P(ai), then an attribution model's class
    probabilities) of a ``uint8`` batch of stage images (``pipeline.to_stage`` output, on ``device``):
    ``[B, 3, S, S]``, or ``[B, K, 3, S, S]`` under the ``crops`` geometry (each image scored as the
    mean over its crops). The model's resize, [0, 1] floats, then :func:`forward_scores`."""
    x = pipeline.finish(stage).float().div_(255)
    return forward_scores(model, x, precision, device).cpu().double().numpy()


def stage_p_ai(model, pipeline: Pipeline, stage: torch.Tensor, precision: Precision,
               device: torch.device) -> np.ndarray:
    """P(ai) (float64) of a batch of stage images (see :func:`stage_scores`). ``predict``, a streaming
    ``evaluate`` and the server all score through it, so they give the same numbers."""
    return stage_scores(model, pipeline, stage, precision, device)[:, 0]


def _head_scores(model, feats, ok: np.ndarray, device: torch.device, crops: int = 1, chunk: int = 4096) -> np.ndarray:
    p = np.full((len(feats), score_width(model)), np.nan)
    with torch.no_grad():
        for s in range(0, len(ok), chunk):
            idx = ok[s:s + chunk]
            f = feats[idx].to(device).float()
            if crops > 1:  # one row holds the K crops' features side by side
                f = f.reshape(len(idx) * crops, -1)
            p[idx] = scores_from_logits(model, model.head(f), crops).cpu().double().numpy()
            if hasattr(feats, "release"):
                feats.release()
    return p


def score_variants(model, files: list[str], pipelines: list[Pipeline], rt: Runtime, *, desc: str = "scoring",
                   descs: list[str] | None = None, with_probs: bool = False):
    """``(p_ai [V, N], errors)``: P(ai) of every file under each of ``pipelines`` (NaN where
    unreadable, or where the model's score was not a finite number) and ``{position: reason}``.
    Every rank returns the full result. With ``with_probs``: ``(p_ai, errors, probs)``, ``probs``
    the ``[N, C]`` class probabilities under the first pipeline for an attribution model (None for
    a binary one). Under the ``crops`` geometry every score is the mean over the image's crops.

    ``rt``: the device, precision, batch size (None: :func:`default_batch_size`), workers, feature
    cache (a frozen backbone reads and fills it unless ``use_cache`` is off or a ``max_file_size`` is
    set), image limits and thread cap."""
    s, errors = _score_variants(model, files, pipelines, rt, desc, descs)
    p = nonfinite_errors(np.ascontiguousarray(s[..., 0]), errors, ["clean", *descs[1:]] if descs else None)
    if not with_probs:
        return p, errors
    probs = s[0, :, 1:] if s.shape[-1] > 1 else None
    if probs is not None:
        probs[np.isnan(p[0])] = np.nan
    return p, errors, probs


def _score_variants(model, files, pipelines, rt: Runtime, desc, descs) -> tuple[np.ndarray, dict[int, str]]:
    model.eval()
    n, v = len(files), len(pipelines)
    bs = rt.batch_size or default_batch_size(model.preprocess.input_size)
    w = score_width(model)
    if model.frozen and rt.use_cache and rt.max_file_size is None:
        out = np.full((v, n, w), np.nan)
        errors: dict[int, str] = {}
        for j, pl in enumerate(pipelines):
            feats, errs = extract_features(model, files, pl, rt.replace(batch_size=bs),
                                           desc=(descs or [desc] * v)[j])
            ok = np.array(sorted(set(range(n)) - set(errs)), dtype=np.int64)
            out[j] = _head_scores(model, feats, ok, rt.device, pl.crops)
            errors.update(errs)
            del feats
        return out, errors
    # stream: decode each file once, score it under every variant; whole batches per rank
    stage = pipelines[0].stage_size()
    per_variant = bs * 3 * stage * stage * pipelines[0].crops
    group = max(1, min(v, VARIANT_BATCH_BYTES // max(1, per_variant)))
    out = np.full((v, n, w), np.nan)
    errors = {}
    for g0 in range(0, v, group):
        part, err = _stream(model, files, pipelines[g0:g0 + group], rt, bs,
                            desc if v == 1 else f"{desc} ({g0 + 1}-{min(v, g0 + group)} of {v} variants)")
        out[g0:g0 + group] = part
        errors.update(err)
    return out, errors


def _stream(model, files, pipelines, rt: Runtime, batch_size: int, desc: str) -> tuple[np.ndarray, dict[int, str]]:
    n, v = len(files), len(pipelines)
    device = rt.device
    kw = {"max_file_size": rt.max_file_size} if rt.max_file_size else {}
    ds = ImageDataset(files, pipelines[0], stage_only=True, max_pixels=rt.max_pixels,
                      variants=pipelines if v > 1 else None, **kw)
    order = [i for b in runtime.shard_batches(n, batch_size) for i in b]
    plan = plan_loader([files[i] for i in order], pipelines[0], device, rt.num_workers)
    loader = make_loader(ds, batch_size, order, num_workers=plan.workers, pin_memory=device.type == "cuda")
    idx_out: list[np.ndarray] = []
    p_out: list[np.ndarray] = []
    errors: dict[int, str] = {}
    with cpu_threads(runtime.fewest_threads(plan.threads, runtime.model_threads(model, device), rt.threads)):
        for batch in progress(loader, desc=desc, total=len(loader)):
            errors.update(batch.errors)
            if not len(batch.index):
                continue
            img = batch.image.to(device, non_blocking=True)
            ps = [stage_scores(model, pl, img[:, j] if v > 1 else img, rt.precision, device)
                  for j, pl in enumerate(pipelines)]
            p_out.append(np.stack(ps))
            idx_out.append(batch.index.numpy())
    p = np.full((v, n, score_width(model)), np.nan)
    mine = (np.concatenate(idx_out) if idx_out else np.zeros(0, np.int64),
            np.concatenate(p_out, axis=1) if p_out else np.zeros((v, 0, score_width(model))), errors)
    for part_idx, part_p, part_err in runtime.all_gather_objects(mine):
        p[:, part_idx] = part_p
        errors.update(part_err)
    return p, errors


def score_files(model, files: list[str], pipeline: Pipeline, rt: Runtime, *,
                desc: str = "scoring") -> tuple[np.ndarray, dict[int, str]]:
    """``(p_ai, errors)``: P(ai) per file (NaN where unreadable) and ``{position: reason}``.

    Every rank returns the full result. Memory stays flat: images are decoded batch by batch."""
    p, errors = score_variants(model, files, [pipeline], rt, desc=desc)
    return p[0], errors


def attribution_labels(labels, generators, classes: list[str]) -> np.ndarray:
    """Class index per image: 0 (``classes[0]``, nature) for real images, else the index of its
    generator in ``classes`` (-1 when the generator is not one of them)."""
    where = {c: i for i, c in enumerate(classes)}
    return np.array([0 if int(y) == 0 else where.get(str(g), -1) for y, g in zip(labels, generators, strict=True)],
                    dtype=np.int64)


def _attribution(labels, gens, probs, ok, classes) -> dict:

    y = attribution_labels(labels, gens, classes)
    known = ok & (y >= 0)
    out = attribution_metrics(y[known], probs[known], classes)
    out["unknown_generator"] = int((ok & (y < 0)).sum())
    return out


def _metrics(labels, p, gens, threshold) -> tuple[dict, np.ndarray]:
    ok = np.isfinite(p)
    m = DetectionMetrics(threshold)
    m.update(labels[ok], p[ok], gens[ok].tolist())
    return m.compute(), ok


def evaluate_index(model, index: Index, pipeline: Pipeline, rt: Runtime, *, threshold: float = 0.5,
                   degradations=(), calibrate=None, classes: list[str] | None = None) -> dict:
    """Metrics of ``model`` on ``index``: overall, per generator, and under each degradation level;
    for an attribution model (``classes``: its class list, ``nature`` first) also the ``attribution``
    metrics (:func:`fakescope.metrics.attribution_metrics`) over the images whose generator is one of
    its classes (``unknown_generator`` counts the others).

    ``calibrate`` (raw p_ai -> calibrated p_ai, e.g. ``Decision.p_ai``) is applied to every score
    before the metrics; ``scores`` then holds both (``p_ai`` calibrated, ``p_ai_raw``).

    ``rt``: where and how it runs (:class:`~fakescope.engine.runtime.Runtime`). Every file is decoded
    once for all levels. ``seconds`` is the time of the whole scoring,
    ``images_per_second`` the readable images scored per second over all levels.

    Returns the evaluate JSON (without the ``model``/``data`` descriptions, which the caller adds)
    plus ``scores``: ``files``, ``labels``, ``p_ai`` and ``generators`` of the scored images (arrays;
    ``bad_files`` lists the others: unreadable, or scored NaN/inf by the model)."""
    files = [index.abspath(i) for i in range(len(index))]
    labels = np.asarray(index.labels)
    gens = np.asarray(index.generators, dtype=object)
    levels = [(kind, float(level)) for kind, lv in degradations for level in lv]
    pipelines = [pipeline] + [replace(pipeline, degrade=lv) for lv in levels]
    descs = ["evaluating"] + [f"{kind} {level:g}" for kind, level in levels]
    t0 = time.perf_counter()
    p, errors, probs = score_variants(model, files, pipelines, rt, desc="evaluating", descs=descs, with_probs=True)
    seconds = time.perf_counter() - t0
    p_raw = p[0].copy()
    if calibrate is not None:
        p = np.asarray(calibrate(p))
    result, ok = _metrics(labels, p[0], gens, threshold)
    if probs is not None and classes:
        result["attribution"] = _attribution(labels, gens, probs, ok, classes)
    result["seconds"] = seconds
    result["images_per_second"] = float(ok.sum() * len(pipelines) / seconds) if seconds > 0 else None
    result["bad_files"] = {files[i]: r for i, r in sorted(errors.items())}
    result["scores"] = {"files": np.asarray(files, dtype=object)[ok], "labels": labels[ok], "p_ai": p[0][ok],
                        "p_ai_raw": p_raw[ok], "generators": gens[ok]}
    if degradations:
        result["degradations"] = {}
        for j, (kind, level) in enumerate(levels, start=1):
            metrics, _ = _metrics(labels, p[j], gens, threshold)
            result["degradations"].setdefault(kind, []).append({"level": level, **metrics})
    return result
