"""Runs of a study and the reuse of what was already computed.

:func:`reuse_or_compute` is the one cache check: a result is stored beside its *key* (a JSON mapping
of everything that produces its numbers) and reused only while the key is identical. The keys of
evaluations, attacks and precision checks include the weights (SHA-256 of ``model.safetensors``),
the data root and a digest of the selected files, ``max_pixels``, the resolved precision and device,
the batch size, the fakescope version and every option of the request, so changing any of them
recomputes. Training runs are reused by :func:`ensure_run` when their training configuration is
unchanged (runtime-only options excluded).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from fakescope import __version__
from fakescope import runfiles as rf
from fakescope.attacks import parse_eps
from fakescope.calibration import Calibration, read_calibration, resolve_decision
from fakescope.data.io import list_images
from fakescope.data.layout import index_root
from fakescope.engine import checkpoint as ckpt
from fakescope.engine import runtime
from fakescope.engine.attack import attack_run
from fakescope.engine.calibrate import calibrate_run
from fakescope.engine.evaluation import evaluate_run, predict_paths, prepare
from fakescope.engine.infer import score_files
from fakescope.engine.train import TrainOptions, train
from fakescope.errors import FakescopeError
from fakescope.explain import gallery
from fakescope.report.artifacts import (
    attack_folder,
    eval_folder,
    without_arrays,
    write_attack,
    write_calibration_files,
    write_evaluation,
    write_gallery,
)
from fakescope.report.model_card import refresh_model_card, write_training_card
from fakescope.study.config import TRAIN_KEYS, BenchmarkConfig, ModelSpec, train_augment
from fakescope.utils import dumps, write_json

# TrainOptions fields that do not change what a run learns (ignored when deciding to reuse a run)
RUNTIME_KEYS = ("device", "num_workers", "use_cache", "cache_dir", "strict")


def log(msg: str) -> None:
    """Progress of the study, one line per step, on stderr (rank 0 only)."""
    if runtime.is_main():
        print(f"fakescope benchmark: {msg}", file=sys.stderr, flush=True)


def canonical(obj) -> object:
    """``obj`` as it reads back from JSON (tuples become lists, NaN becomes null...)."""
    return json.loads(dumps(obj))


def reuse_or_compute(record: str | os.PathLike, key: dict, compute: Callable[[], dict], *, force: bool = False,
                     what: str = "", name: str = "result") -> dict:
    """The result stored in ``record`` when it was computed for exactly ``key`` (and not ``force``),
    else ``compute()``, stored with its key (rank 0 writes) and returned. The result must be JSON."""
    record = Path(record)
    key = canonical(key)
    if not force and record.is_file():
        try:
            blob = json.loads(record.read_text())
        except (OSError, ValueError):
            blob = None
        if isinstance(blob, dict) and blob.get("key") == key and "result" in blob:
            log(f"{what}: reusing the {name} {record}")
            return blob["result"]
    result = canonical(compute())
    if runtime.is_main():
        write_json(record, {"key": key, "result": result})
    return result


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str | None:
    """SHA-256 of a file (remembered per path, size, inode and modification time); None if absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    memo = (os.path.abspath(path), st.st_size, st.st_ino, st.st_mtime_ns)
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def selection_digest(data: str, generators, split: str) -> dict:
    """The data an evaluation reads: root, split, generators and a digest of the selected files' list."""
    index = index_root(data).select(generators, split)
    h = hashlib.sha256()
    for p, y, g in zip(index.paths, index.labels, index.generators, strict=True):
        h.update(f"{p}\0{y}\0{g}\n".encode())
    return {"root": index.root, "split": split, "generators": index.generator_names, "n_files": len(index),
            "files_sha256": h.hexdigest()}


def result_key(cfg: BenchmarkConfig, run_dir, *, precision: str | None, data: dict | None, **extra) -> dict:
    """The one key builder of a run's cached results (evaluation, attack, gallery, precision check,
    calibration, real photos): the fakescope version, the run (weights, config and calibration digests),
    ``data`` (e.g. :func:`selection_digest`), ``max_pixels``, the device and the *resolved* precision
    (``auto`` is what it resolves to on this machine), plus the result's own ``extra`` fields."""
    rt = runtime.resolve(replace(cfg.runtime, precision=precision or cfg.precision))
    return {"fakescope": __version__, "weights_sha256": file_digest(Path(run_dir) / ckpt.WEIGHTS),
            "run_config_sha256": file_digest(Path(run_dir) / ckpt.CONFIG),
            "calibration_sha256": file_digest(Path(run_dir) / rf.CALIBRATION), "data": data,
            "max_pixels": rt.max_pixels, "device": rt.device.type, "precision": rt.precision.name, **extra}


def _base_key(cfg: BenchmarkConfig, run_dir, generators, precision: str | None) -> dict:
    return result_key(cfg, run_dir, precision=precision, data=selection_digest(cfg.data, generators, cfg.split),
                      threshold=cfg.threshold)


TRAIN_REUSE = "train-reuse.json"
"""Beside a benchmark's run: the :func:`training_key` it was trained for."""


def _stored_training_key(run_dir: Path) -> dict | None:
    try:
        blob = json.loads((run_dir / TRAIN_REUSE).read_text())
    except (OSError, ValueError):
        return None
    return blob.get("key") if isinstance(blob, dict) else None


def training_key(opts) -> dict:
    """What a finished training run is reused for: its options (less where it runs), the training data
    (a digest of the selected files) and the fakescope version."""
    return canonical({"fakescope": __version__, "train": _comparable(opts.to_dict()),
                      "data": selection_digest(opts.data, opts.generators, "train")})


# --- training runs ----------------------------------------------------------------------------------

def run_dir_for(cfg: BenchmarkConfig, spec: ModelSpec, seed: int, jpeg_align: int | None = None) -> Path:
    tag = f"-jpeg{jpeg_align}" if jpeg_align is not None else ""
    return Path(cfg.out) / "runs" / f"{spec.slug}{tag}-seed{seed}"


def _comparable(train_dict: dict) -> dict:
    d = canonical(train_dict)
    for k in RUNTIME_KEYS:
        d.pop(k, None)
    if d.get("paired") is None:  # runs made before --paired existed: the same as unset
        d.pop("paired", None)
    return d


def train_options(cfg: BenchmarkConfig, spec: ModelSpec, seed: int, generators: list[str],
                  jpeg_align: int | None = None):

    t = {k: getattr(cfg, k) for k in TRAIN_KEYS if hasattr(cfg, k)}  # adversarial training is per model
    t.update(spec.train)
    return TrainOptions(
        model=spec.model, data=cfg.data, generators=list(generators), seed=seed, jpeg_align=jpeg_align,
        augment=train_augment(t.pop("augment")), model_options=dict(spec.options), device=cfg.device,
        use_cache=cfg.use_cache, cache_dir=cfg.cache_dir, num_workers=cfg.workers, max_pixels=cfg.max_pixels,
        native_size=str(t.pop("native_size")), **t)


def ensure_run(opts, run_dir: Path, *, force: bool = False, what: str = "") -> tuple[dict, bool]:
    """Train ``opts`` into ``run_dir`` unless a finished run with the same configuration is there.

    Returns ``(training summary, trained)``. An interrupted run with the same configuration is
    resumed; a run with another configuration (or any run, with ``force``) is replaced."""
    run_dir = Path(run_dir)
    resume = False
    key = training_key(opts)
    if (run_dir / ckpt.CONFIG).is_file():
        try:
            stored = ckpt.read_config(run_dir)
            asked = stored.get("train_requested", stored.get("train", {}))  # before the model's recipe
            same = _comparable(asked) == _comparable(opts.to_dict()) and _stored_training_key(run_dir) == key
        except FakescopeError:
            same = False
        summary = rf.read_train_metrics(run_dir)  # train_metrics.json (metrics.json in older runs)
        finished = summary is not None and (run_dir / ckpt.WEIGHTS).is_file()
        if same and finished and not force:
            log(f"{what}: reusing the finished run {run_dir}")
            return summary, False
        if same and not force and (run_dir / ckpt.LAST_STATE).is_file():
            resume = True
            log(f"{what}: resuming the interrupted run {run_dir}")
        else:
            why = "--force" if force else "its configuration changed"
            log(f"{what}: replacing {run_dir} ({why})")
            if runtime.is_main():
                shutil.rmtree(run_dir)
            runtime.barrier()
    elif run_dir.exists() and any(p.name != TRAIN_REUSE for p in run_dir.iterdir()):
        raise FakescopeError(f"{run_dir} exists and is not a fakescope run: move it away or choose another --out")
    if not resume:
        log(f"{what}: training into {run_dir}")
        if runtime.is_main():
            write_json(run_dir / TRAIN_REUSE, {"key": key})  # before training: a resume checks it too
    t0 = time.perf_counter()
    summary = train(opts, run_dir, resume=resume)
    if runtime.is_main():
        write_training_card(run_dir)  # the engine writes weights and JSON; the card is the caller's step
    v = summary["validation"]
    log(f"{what}: trained in {time.perf_counter() - t0:.1f} s (best epoch {summary['best_epoch']} of "
        f"{summary['epochs_run']}, validation accuracy {v['accuracy']:.4f})")
    return summary, True


# --- evaluations, attacks, precision checks ---------------------------------------------------------

def evaluation_key(cfg: BenchmarkConfig, run_dir, *, generators: list[str], jpeg_align: int | None = None,
                   degrade: list[str] | None = None, precision: str | None = None) -> dict:
    return {**_base_key(cfg, run_dir, generators, precision), "jpeg_align": jpeg_align, "degrade": degrade or [],
            "batch_size": cfg.eval_batch_size}


def evaluate_cached(cfg: BenchmarkConfig, run_dir: Path, *, generators: list[str], jpeg_align: int | None = None,
                    degrade: list[str] | None = None, precision: str | None = None, force: bool = False,
                    what: str = "") -> dict:
    """``evaluate_run`` with its files in ``RUN/eval-<root>-<split>[-jpegQ]`` (see
    :func:`fakescope.report.artifacts.eval_folder`), reused while :func:`evaluation_key` is unchanged."""
    folder = eval_folder(run_dir, cfg.data, cfg.split, jpeg_align)

    def compute() -> dict:

        log(f"{what}: evaluating on {cfg.split}" + (f" (JPEG-aligned at {jpeg_align})" if jpeg_align else "")
            + (f" with degradations {', '.join(degrade)}" if degrade else ""))
        result = evaluate_run(run_dir, cfg.data, split=cfg.split, generators=generators, threshold=cfg.threshold,
                              jpeg_align=jpeg_align, degrade=degrade or None,
                              runtime_options=replace(cfg.runtime, precision=precision or cfg.precision))
        outputs = write_evaluation(result, folder)
        if runtime.is_main():
            refresh_model_card(run_dir)  # the folder is in the run: its card lists the evaluation
        return {**without_arrays(result), "outputs": outputs}

    key = evaluation_key(cfg, run_dir, generators=generators, jpeg_align=jpeg_align, degrade=degrade,
                         precision=precision)
    return reuse_or_compute(folder / "reuse.json", key, compute, force=force, what=what, name="evaluation")


def calibrate_cached(cfg: BenchmarkConfig, run_dir: str | os.PathLike, what: str) -> dict:
    """Calibrate a run on its own held-out training images (``--split holdout``) for ``cfg.calibrate`` at
    ``cfg.calibrate_confidence`` (the rule of ``fakescope calibrate``; reused while the weights, the run's
    configuration, the target and the confidence are unchanged)."""
    key = result_key(cfg, run_dir, precision=cfg.precision, data={"split": "holdout"}, target_fpr=cfg.calibrate,
                     confidence=cfg.calibrate_confidence, calibration_sha256=None)  # the calibration: its output

    def compute() -> dict:

        log(f"{what}: calibrating on the run's held-out training images (target FPR {cfg.calibrate:g}, confidence "
            f"{cfg.calibrate_confidence:g})")
        res = calibrate_run(run_dir, split="holdout", target_fpr=float(cfg.calibrate),
                            confidence=float(cfg.calibrate_confidence), runtime_options=cfg.runtime)
        write_calibration_files(run_dir, res["calibration"])
        if runtime.is_main():
            refresh_model_card(run_dir)
        return res["calibration"].to_dict()

    out = reuse_or_compute(Path(run_dir) / "calibration-reuse.json", key, compute, force=cfg.force, what=what,
                           name="calibration")
    on_disk = read_calibration(run_dir)
    if on_disk is None or on_disk.to_dict() != Calibration.from_dict(out).to_dict():  # the file was removed/edited

        write_calibration_files(run_dir, Calibration.from_dict(out))
        if runtime.is_main():

            refresh_model_card(run_dir)
    return out


def gallery_cached(cfg: BenchmarkConfig, run_dir: str | os.PathLike, what: str) -> str | None:
    """``RUN/gallery-<split>/gallery.png`` ("what the model looks at"), reused while the weights, the
    calibration and the data are unchanged; None for a model without a convolutional map (a ViT)."""
    folder = Path(run_dir) / f"gallery-{cfg.split}"

    def compute() -> dict:

        log(f"{what}: Grad-CAM gallery")
        try:
            return {"png": write_gallery(gallery(run_dir, cfg.data, split=cfg.split, generators=cfg.generators,
                                                 threshold=cfg.threshold), folder)["png"]}
        except FakescopeError as e:  # e.g. a ViT backbone: no convolutional map to explain
            log(f"{what}: no gallery ({e})")
            return {"png": None, "reason": str(e)}

    key = _base_key(cfg, run_dir, cfg.generators, "fp32")
    res = reuse_or_compute(folder / "reuse.json", key, compute, force=cfg.force, what=what, name="gallery")
    if res.get("png") and not Path(res["png"]).is_file():
        res = reuse_or_compute(folder / "reuse.json", key, compute, force=True, what=what, name="gallery")
    return res.get("png")


def attack_key(cfg: BenchmarkConfig, run_dir) -> dict:
    a = cfg.attack
    return {**_base_key(cfg, run_dir, cfg.generators, a.get("precision")), "attack": a,
            "batch_size": cfg.eval_batch_size}


def robustness_cached(cfg: BenchmarkConfig, run_dir: str | os.PathLike, what: str) -> dict:
    """Robust accuracy of one run under ``cfg.attack`` (reused while :func:`attack_key` is unchanged)."""
    a = cfg.attack
    folder = attack_folder(run_dir, a["name"])

    def compute() -> dict:

        log(f"{what}: {a['name']} attack at eps {a['eps']}")
        res = attack_run(run_dir, cfg.data, attack=a["name"],
                         eps_list=parse_eps(a["eps"], norm="l2" if a["name"] == "pgd-l2" else "linf"),
                         steps=int(a["steps"]), direction=a["direction"], split=cfg.split, generators=cfg.generators,
                         limit=a["limit"], threshold=cfg.threshold,
                         runtime_options=replace(cfg.runtime, precision=a.get("precision") or cfg.precision))
        write_attack(res, folder)
        return without_arrays(res)

    return reuse_or_compute(folder / "reuse.json", attack_key(cfg, run_dir), compute, force=cfg.force, what=what,
                            name="attack")


def precision_agreement(run_dir, cfg: BenchmarkConfig, generators: list[str], what: str = "") -> dict:
    """fp32 vs bf16 predictions of a run on the evaluation split: ``{"agreement", "max_abs_diff",
    "mean_abs_diff", "n"}`` (``{"skipped": reason}`` where the device has no bf16). Stored in
    ``run_dir/precision-check.json`` and reused while its key is unchanged."""
    dev = runtime.resolve_device(cfg.device)
    if not runtime.bf16_supported(dev):
        return {"skipped": f"bf16 is not supported on this {dev.type} device"}
    key = {**_base_key(cfg, run_dir, generators, "fp32"), "precision": ["fp32", "bf16"],
           "batch_size": cfg.eval_batch_size}
    return reuse_or_compute(Path(run_dir) / "precision-check.json", key,
                            lambda: _log_and(what, lambda: _agreement(run_dir, cfg, generators)), force=cfg.force,
                            what=what, name="fp32-vs-bf16 comparison")


def _log_and(what: str, fn: Callable[[], dict]) -> dict:
    log(f"{what}: comparing fp32 and bf16 predictions")
    return fn()


def _agreement(run_dir, cfg: BenchmarkConfig, generators: list[str]) -> dict:
    import numpy as np


    index = index_root(cfg.data).select(generators, cfg.split)
    files = [index.abspath(i) for i in range(len(index))]
    scores = {}
    for name in ("fp32", "bf16"):
        model, _, pipeline, rt = prepare(run_dir, replace(cfg.runtime, precision=name))
        scores[name], _ = score_files(model, files, pipeline, rt, desc=f"scoring in {name}")
    a, b = scores["fp32"], scores["bf16"]
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.any():
        return {"agreement": None, "max_abs_diff": None, "mean_abs_diff": None, "n": 0}

    t = resolve_decision(run_dir, cfg.threshold).raw_threshold()  # scores are raw here: the same decisions
    return {"agreement": float(np.mean((a[ok] >= t) == (b[ok] >= t))),
            "max_abs_diff": float(np.max(np.abs(a[ok] - b[ok]))),
            "mean_abs_diff": float(np.mean(np.abs(a[ok] - b[ok]))), "n": int(ok.sum())}


# --- false alarms on a folder of real photos ---------------------------------------------------------

def real_photos_cached(cfg: BenchmarkConfig, run_dir: str | os.PathLike, what: str) -> dict:
    """How often the run calls the real photos of ``cfg.real_photos`` AI: every image scored as
    ``predict`` scores it (the run's test geometry, calibration and threshold, or ``cfg.threshold``).
    The honest check against shortcuts such as image size: a detector that learned "large and sharp
    means AI" fails it however well it scores on its own validation split::

        {"folder", "n", "called_ai", "fpr", "threshold", "threshold_source", "test_geometry",
         "errors": {path: reason}, "p_ai": {path: P(ai)}}   (paths relative to the folder)
    """
    folder = Path(cfg.real_photos)
    files = sorted(list_images([str(folder)]))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{os.path.relpath(f, folder)}\0{file_digest(f)}\n".encode())
    key = result_key(cfg, run_dir, precision=cfg.precision,
                     data={"folder": str(folder), "files_sha256": h.hexdigest(), "n_files": len(files)},
                     threshold=cfg.threshold)

    def compute() -> dict:

        log(f"{what}: scoring the {len(files)} real photos of {folder}")
        rows = predict_paths(run_dir, files, threshold=cfg.threshold, provenance=False,  # the default batch size
                             runtime_options=replace(cfg.runtime, batch_size=None))
        cfg_run = ckpt.read_config(run_dir)
        scored = [r for r in rows if "p_ai" in r]
        called = sum(r["verdict"] == "ai" for r in scored)
        first = scored[0] if scored else {}
        return {"folder": str(folder), "n": len(scored), "called_ai": called,
                "fpr": called / len(scored) if scored else None,
                "threshold": first.get("threshold"), "threshold_source": first.get("threshold_source"),
                "test_geometry": cfg_run.get("test_geometry") or "resize",
                "errors": {os.path.relpath(r["path"], folder): r["error"] for r in rows if "error" in r},
                "p_ai": {os.path.relpath(r["path"], folder): r["p_ai"] for r in scored}}

    return reuse_or_compute(Path(run_dir) / "real-photos-reuse.json", key, compute, force=cfg.force, what=what,
                            name="real-photo scores")
