"""``attack`` for a run directory: load the run and its data, run an attack at several eps and
return the results (nothing is written: see :func:`fakescope.report.artifacts.write_attack`).

Precision policy, shared with ``evaluate``: the clean and adversarial images are *judged* exactly
as ``evaluate`` scores images (``precision="auto"``: bf16 where the processor supports it, else
fp32; see :func:`fakescope.engine.infer.forward_logits`), so the attack's clean accuracy is
``evaluate``'s accuracy on the same images. The examples are *crafted* with fp32 gradients unless
a precision is asked for explicitly, which then applies to both."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fakescope import parsing
from fakescope.attacks import robustness
from fakescope.calibration import resolve_decision
from fakescope.data.dataset import ImageDataset, make_loader
from fakescope.data.layout import index_root, limit_per_class
from fakescope.engine.evaluation import prepare
from fakescope.engine.infer import forward_logits
from fakescope.engine.runtime import Precision, Runtime, resolve_precision
from fakescope.errors import FakescopeError
from fakescope.options import RuntimeOptions
from fakescope.parsing import checked

BATCH_SIZE = 64
"""Images per attack batch when the runtime options set none (``attack``'s default)."""


class _Judged(nn.Module):
    """A detector computing its logits as the evaluation does (``precision``'s autocast and memory
    format, a frozen backbone's features rounded to float16) and returning float32 logits;
    gradients with respect to the input still flow. Delegates the Detector helpers (``ai_logit``...)."""

    def __init__(self, model: nn.Module, precision: Precision, device: torch.device) -> None:
        super().__init__()
        self.model, self.precision, self.device = model, precision, device
        self.preprocess = model.preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward_logits(self.model, x, self.precision, self.device)

    def ai_logit(self, logits):
        return self.model.ai_logit(logits)

    def p_ai(self, logits):
        return self.model.p_ai(logits)

    def loss(self, logits, labels):
        if logits.shape[1] > 2:  # an attribution model is attacked on its real-vs-AI decision
            return F.binary_cross_entropy_with_logits(self.model.ai_logit(logits), labels.float())
        return self.model.loss(logits, labels)


def _batches(index, pipeline, rt: Runtime, source_pipeline=None):
    """``(x, y, generators[, x_source])`` batches on ``rt.device`` (``rt.batch_size`` images, default
    :data:`BATCH_SIZE`); ``x_source``: the same images through the source run's pipeline (its own
    native size and JPEG alignment) when it differs from the target's."""
    files = [index.abspath(i) for i in range(len(index))]
    device = rt.device

    def loader(pl):
        return make_loader(ImageDataset(files, pl, stage_only=True), rt.batch_size or BATCH_SIZE,
                           num_workers=rt.num_workers)

    pairs = zip(loader(pipeline), loader(source_pipeline), strict=True) if source_pipeline else \
        ((b, None) for b in loader(pipeline))
    for batch, src in pairs:
        keep = batch.index.tolist()
        if src is not None and src.index.tolist() != keep:  # a file one pipeline could read and the other not
            common = sorted(set(keep) & set(src.index.tolist()))
            pos = {i: k for k, i in enumerate(keep)}
            spos = {i: k for k, i in enumerate(src.index.tolist())}
            img, simg = batch.image[[pos[i] for i in common]], src.image[[spos[i] for i in common]]
            keep = common
        else:
            img, simg = batch.image, None if src is None else src.image
        if not keep:
            continue
        x = pipeline.finish(img.to(device)).float().div_(255)
        y = torch.tensor([index.labels[i] for i in keep], device=device)
        gens = [index.generators[i] for i in keep]
        if simg is None:
            yield x, y, gens
        else:
            yield x, y, gens, source_pipeline.finish(simg.to(device)).float().div_(255)


def attack_run(run_dir: str | os.PathLike, data: str | os.PathLike, *, attack: str = "pgd",
               eps_list: list[float], steps: int = 10, step_size: float | None = None, direction: str = "both",
               split: str = "val", generators=None, limit: int | None = None, source: str | None = None,
               examples: int = 0, threshold: float | None = None, uncalibrated: bool = False, seed: int = 42,
               attack_options: dict | None = None, geometry: str | None = None,
               runtime_options: RuntimeOptions | None = None) -> dict:
    """Robust accuracy of a run under ``attack`` at each eps: the attack JSON as a dict (``precision``:
    how images were judged, ``attack_precision``: how examples were crafted) plus, with ``examples``,
    up to that many example images per eps as arrays (``examples``). Writes nothing.

    ``source``: a transfer attack, crafted on that run (through its own preprocessing: native size
    and JPEG alignment) and judged by ``run_dir``.

    Decisions use the run's calibrated threshold when it has one (unless ``uncalibrated``; an explicit
    ``threshold`` wins, on the calibrated scale). Temperature scaling keeps the order of the scores, so
    the attack runs on the raw model with the equivalent raw threshold; the result records both.

    The images reach the model through the run's test-time geometry (``geometry`` overrides it),
    except that ``crops`` is attacked on the centre crop: a perturbation lives in the model's input,
    one square (the result's ``data.test_geometry`` says which was used).

    ``runtime_options``: device, precision (see the module docstring), batch size (None:
    :data:`BATCH_SIZE`) and workers; the feature cache, ``max_pixels`` and ``compile`` are not used
    (the attack decodes with the reader's defaults and differentiates the eager model)."""
    if threshold is not None:
        threshold = checked("threshold", threshold, parsing.threshold, source="attack_run")
    decision = resolve_decision(run_dir, threshold, uncalibrated)
    raw_threshold = decision.raw_threshold()
    options = replace(runtime_options if runtime_options is not None else RuntimeOptions(), compile=False)
    model, config, pipeline, rt = prepare(run_dir, options, geometry=geometry)
    dev, prec = rt.device, rt.precision
    pipeline = _attacked_geometry(pipeline)
    craft_prec = resolve_precision("fp32" if options.precision == "auto" else options.precision, dev, inference=True)
    target = _Judged(model, prec, dev)
    crafter = _Judged(model, craft_prec, dev) if craft_prec != prec else None
    src_model, src_pipeline = (None, None) if source is None else \
        _transfer_source(source, options, craft_prec, geometry, model, pipeline, dev)
    index = _attack_index(data, generators, split, limit)
    torch.manual_seed(seed)
    result = robustness(target, _batches(index, pipeline, rt, src_pipeline), attack=attack,
                        eps_list=eps_list, steps=steps, step_size=step_size, direction=direction, seed=seed,
                        source_model=src_model, crafter=crafter, max_examples=examples, threshold=raw_threshold,
                        attack_options=attack_options)
    result["model"] = {"name": config["model"]["name"], "run": str(Path(run_dir).resolve()),
                       "source": str(Path(source).resolve()) if source else None}
    result["data"] = _data_section(index, split, limit, pipeline, src_pipeline, transfer=bool(source))
    result.update(threshold=decision.threshold, threshold_source=decision.source, calibrated=decision.calibrated,
                  raw_threshold=raw_threshold, precision=prec.name, attack_precision=craft_prec.name, seed=seed)
    return result


def _attacked_geometry(pipeline):
    """``pipeline``, its ``crops`` geometry replaced by ``center_crop``: a perturbation lives in one square input."""
    return replace(pipeline, geometry="center_crop") if pipeline.geometry == "crops" else pipeline


def _transfer_source(source, options: RuntimeOptions, craft_prec: Precision, geometry: str | None, model, pipeline,
                     dev):
    """``(source model, its pipeline)`` for a transfer attack crafted on the run ``source``: the model in
    ``craft_prec``, the pipeline None where it is the target's own. The input sizes must agree."""
    src, _, src_pipeline, _ = prepare(source, replace(options, precision=craft_prec.name), geometry=geometry)
    src_pipeline = _attacked_geometry(src_pipeline)
    if src.preprocess.input_size != model.preprocess.input_size:
        raise FakescopeError(f"expected --source to take the same input size as the target run, got "
                             f"{src.preprocess.input_size} and {model.preprocess.input_size}")
    src_model = _Judged(src, craft_prec, dev)
    return src_model, (None if src_pipeline == pipeline else src_pipeline)


def _data_section(index, split: str, limit: int | None, pipeline, src_pipeline, *, transfer: bool) -> dict:
    """The result's ``data``: the images attacked and the preprocessing they went through."""
    return {"root": index.root, "split": split, "generators": index.generator_names, "n_files": len(index),
            "limit_per_class": limit, "native_size": pipeline.native_size,
            "source_native_size": (src_pipeline or pipeline).native_size if transfer else None,
            "test_geometry": pipeline.geometry, "max_side": pipeline.max_side}


def _attack_index(data, generators, split: str, limit: int | None):
    """``data``'s images of ``split`` and ``generators``, at most ``limit`` per class; an error when none."""
    index = index_root(data).select(generators, split)
    if limit:
        index = limit_per_class(index, limit)
    if len(index) == 0:
        raise FakescopeError(f"no images in {data} for split {split!r}")
    return index
