"""Evaluation and prediction with a run directory: the library functions behind ``evaluate`` and ``predict``
(the server's one-request-at-a-time scorer is :class:`fakescope.engine.predictor.Predictor`).

They return data; nothing here writes a file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fakescope import parsing
from fakescope.calibration import check_promise, resolve_decision, same_set
from fakescope.data.io import list_images
from fakescope.data.layout import index_root
from fakescope.data.transforms import Pipeline, parse_degradations
from fakescope.engine import runtime
from fakescope.engine.checkpoint import load_run, read_config
from fakescope.engine.infer import evaluate_index, score_variants
from fakescope.engine.onnx_backend import OnnxDetector, score_files_onnx
from fakescope.errors import FakescopeError
from fakescope.intervals import INTERVAL_CONFIDENCE, error_rates
from fakescope.metrics import calibration_metrics
from fakescope.models.recipe import check_geometry
from fakescope.options import PREDICT_MAX_FILE_SIZE, RuntimeOptions
from fakescope.parsing import checked
from fakescope.provenance import inspect_provenance


def _recorded_or_override(config: dict, key: str, flag: str, override: str | int | None) -> int | None:
    """``config[key]`` when ``override`` is None or ``auto``; None for ``off``; else a positive integer."""
    if override is None or override == "auto":
        return config.get(key)
    if override == "off":
        return None
    n = override if isinstance(override, int) and not isinstance(override, bool) else None
    if n is None and isinstance(override, str) and override.strip().isdigit():
        n = int(override)
    if n is None or n <= 0:
        raise FakescopeError(f"expected {flag} auto, off or a positive integer, got {override!r}")
    return n


def native_size_for(config: dict, override: str | int | None) -> int | None:
    """The run's recorded native size, or an override: ``auto`` (the run's), ``off`` or N."""
    return _recorded_or_override(config, "native_size", "--native-size", override)


def max_side_for(config: dict, override: str | int | None) -> int | None:
    """The run's recorded ``max_side`` (None: off), or an override: ``auto`` (the run's), ``off`` or N."""
    return _recorded_or_override(config, "max_side", "--max-side", override)


def geometry_for(config: dict, model, override: str | None) -> str:
    """The test-time geometry: ``override`` (``--test-geometry``), else the run's recorded one, else the model's."""
    return check_geometry(override or config.get("test_geometry") or model.test_geometry)


def prepare(run_dir, runtime_options: RuntimeOptions | None = None, *, native_size=None, jpeg_align=None,
            geometry: str | None = None, max_side=None):
    """``(model, config, pipeline, rt)`` for inference with a run: the model on ``rt.device`` in
    ``rt.precision``'s memory format (compiled with ``runtime_options.compile``), ``rt`` the resolved
    :class:`~fakescope.engine.runtime.Runtime`; the pipeline applies the run's test-time geometry
    unless ``geometry`` overrides it, and the run's ``max_side`` unless ``max_side`` does."""
    options = runtime_options if runtime_options is not None else RuntimeOptions()
    runtime.init_distributed(options.device)
    model, config = load_run(run_dir)
    rt = runtime.resolve(options, inference=True)
    model.to(rt.device)
    runtime.prepare_model(model, rt.precision, compile=options.compile)
    if jpeg_align is None:
        jpeg_align = config.get("train", {}).get("jpeg_align")
    pipeline = Pipeline(model.preprocess.input_size, native_size_for(config, native_size), jpeg_align,
                        geometry=geometry_for(config, model, geometry), max_side=max_side_for(config, max_side))
    return model, config, pipeline, rt


def evaluate_run(run_dir: str | os.PathLike, data: str | os.PathLike, *, split: str = "val", generators=None,
                 threshold: float | None = None, uncalibrated: bool = False, native_size=None,
                 jpeg_align: int | None = None, degrade=None, geometry: str | None = None,
                 runtime_options: RuntimeOptions | None = None, max_side=None) -> dict:
    """Evaluate a run on ``data``'s ``split``: the evaluate JSON as a dict, plus ``scores`` (the
    per-image ``files``, ``labels``, ``p_ai`` and ``generators`` as arrays). Writes nothing: the
    JSON, figures and ``scores.npz`` are :func:`fakescope.report.artifacts.write_evaluation`'s job.

    Images that cannot be read, and images the model scores NaN or inf, are listed in ``bad_files``
    (path -> reason) and left out of the metrics. An attribution run adds the ``attribution`` key
    (confusion matrix over its classes, per-class precision/recall/F1, macro F1, accuracy); its
    binary metrics use ``p_ai = 1 - P(nature)``. ``geometry`` overrides the run's test-time geometry.
    ``runtime_options``: where and how it runs (device, precision, batch size, workers, feature cache,
    pixel limit, compile; default :class:`~fakescope.options.RuntimeOptions`'s).

    Scores are the run's calibrated ``p_ai`` and the threshold its calibrated one when it has a
    ``calibration.json`` (unless ``uncalibrated``); an explicit ``threshold`` wins (on the calibrated
    scale). The result records the threshold, where it came from (``threshold_source``), the calibration
    used (with the uncalibrated ECE and Brier score), and ``warnings`` (e.g. evaluating on the
    calibration set itself); ``scores`` holds ``p_ai_raw`` beside ``p_ai``.

    ``rates`` holds the false- and true-positive rates with two-sided 95 % Clopper–Pearson intervals,
    overall and per generator. At the run's own calibrated threshold, ``guarantee_check`` compares the
    real images with the calibration's false-positive target (:func:`promise_check`; None otherwise)."""
    if threshold is not None:
        threshold = checked("threshold", threshold, parsing.threshold, source="evaluate_run")
    decision = resolve_decision(run_dir, threshold, uncalibrated)
    degradations = _degradations(degrade)
    model, config, pipeline, rt = prepare(run_dir, runtime_options, native_size=native_size, jpeg_align=jpeg_align,
                                          geometry=geometry, max_side=max_side)
    index = _evaluation_index(data, generators, split)
    result = evaluate_index(model, index, pipeline, rt, threshold=decision.threshold, degradations=degradations,
                            calibrate=decision.p_ai if decision.calibrated else None, classes=config.get("classes"))
    scores = result.pop("scores")
    _describe_evaluation(result, run_dir, config, index, split, pipeline, decision)
    warnings: list[str] = []
    if decision.calibrated:
        result["calibration"] = _calibration_summary(decision.calibration, scores, index, split, warnings)
    result["rates"] = _rates(result)
    result["guarantee_check"] = None
    if decision.promise_applies:
        result["guarantee_check"] = promise_check(decision.calibration, result, warnings)
    result["warnings"] = warnings
    result["precision"] = rt.precision.name
    result["scores"] = scores
    return result


def _degradations(degrade):
    """The parsed ``degrade`` specification (a :class:`FakescopeError` when it does not parse)."""
    try:
        return parse_degradations(degrade)
    except ValueError as e:
        raise FakescopeError(str(e)) from None


def _evaluation_index(data, generators, split: str):
    """``data``'s index restricted to ``generators`` and ``split``; an error when that leaves no image."""
    index = index_root(data).select(generators, split)
    if len(index) == 0:
        raise FakescopeError(f"no images in {data} for split {split!r}")
    return index


def _describe_evaluation(result: dict, run_dir, config: dict, index, split: str, pipeline, decision) -> None:
    """Add to ``result`` what was evaluated and how: the model, the data, the task and the decision threshold
    (``calibration`` left None: :func:`_calibration_summary` fills it for a calibrated run)."""
    result["model"] = {"name": config["model"]["name"], "run": str(Path(run_dir).resolve()),
                       "options": config["model"].get("options", {})}
    result["data"] = {"root": index.root, "split": split, "generators": index.generator_names,
                      "n_files": len(index), "native_size": pipeline.native_size, "jpeg_align": pipeline.jpeg_align,
                      "test_geometry": pipeline.geometry, "max_side": pipeline.max_side}
    result["task"] = config.get("task", "binary")
    result["threshold"] = decision.threshold
    result["threshold_source"] = decision.source
    result["calibrated"] = decision.calibrated
    result["calibration"] = None


def _calibration_summary(cal, scores: dict, index, split: str, warnings: list[str]) -> dict:
    """The calibration used (with the uncalibrated ECE and Brier score); a warning in ``warnings`` when
    the evaluated set is the calibration set itself."""
    both = 0 < int(np.sum(scores["labels"])) < len(scores["labels"])  # as in the metrics: null otherwise
    raw = calibration_metrics(scores["labels"], scores["p_ai_raw"]) if both else {"ece": None, "brier": None}
    summary = {"temperature": cal.temperature, "target_fpr": cal.target_fpr,
               "calibrated_threshold": cal.threshold, "fitted_on": cal.data,
               "uncalibrated": {"ece": raw["ece"], "brier": raw["brier"]}}
    if same_set(cal.data, {"root": index.root, "split": split}):
        warnings.append(f"evaluated on the calibration set itself ({index.root}, split {split!r}): the "
                        f"threshold's false-positive rate and the ECE here are optimistic")
    return summary


def _rates(result: dict) -> dict:
    """False- and true-positive rates with Clopper–Pearson intervals, overall and per generator."""
    return {"method": "clopper-pearson", "confidence": INTERVAL_CONFIDENCE,
            "overall": error_rates(result["overall"]["confusion"]),
            "per_generator": {g: error_rates(m["confusion"]) for g, m in result["per_generator"].items()}}


def promise_check(cal, result: dict, warnings: list[str]) -> dict:
    """The calibration's false-positive target against this evaluation's real images, overall and per
    generator (:func:`fakescope.calibration.check_promise`); a warning for each set (overall, and each
    generator when there are several) whose whole 95 % FPR interval lies above the target. Where the
    target does hold, each set is flagged with probability at most 2.5 % (the interval's lower end)."""
    root = (result.get("data") or {}).get("root")
    out = {"target_fpr": cal.target_fpr, "confidence": cal.confidence, "promise": cal.promise,
           "calibration_set": cal.guarantee.get("calibration_set"),
           "overall": check_promise(cal, result["overall"]["confusion"]),
           "per_generator": {g: check_promise(cal, m["confusion"]) for g, m in result["per_generator"].items()}}
    sets = [("overall", out["overall"])] + (list(out["per_generator"].items()) if len(out["per_generator"]) > 1
                                            else [])
    for name, c in sets:
        if c is None or not c["broken"]:
            continue
        lo, hi = c["fpr"]["interval"]
        what = f"{root}" if name == "overall" else f"{root}, generator {name}"
        said = (f"the calibration's promise ({cal.promise})" if cal.promise else
                f"the calibration's target of {cal.target_fpr:g} (empirical quantile, no promise)")
        warnings.append(f"false-positive rate {c['fpr']['value']:.4f} on the {c['n_real']} real images of {what}, 95 % "
                        f"interval [{lo:.4f}, {hi:.4f}], lies entirely above {said}: these real images are not like "
                        f"the calibration set, and the calibrated false-positive rate does not hold for them")
    out["broken"] = any(c is not None and c["broken"] for _, c in sets)
    return out


def predict_paths(run_dir, paths: list[str], *, threshold: float | None = None, uncalibrated: bool = False,
                  native_size=None, backend: str = "torch", onnx_path=None, provenance: bool = True,
                  geometry: str | None = None, runtime_options: RuntimeOptions | None = None,
                  max_side=None) -> list[dict]:
    """One row per image: ``{"path", "p_ai", "verdict", "threshold", "threshold_source", "calibrated",
    "provenance"}`` or ``{"path", "error"[, "provenance"]}``; bad files never stop the rest.
    An attribution run adds ``generator`` (the most probable class, ``nature`` included),
    ``generator_p`` (its probability) and ``top3`` (``[[class, probability], ...]``).

    An image the model scores NaN or inf is an error row (``p_ai`` is always a finite number).
    ``p_ai`` is calibrated and the threshold the calibrated one when the run has a ``calibration.json``
    (unless ``uncalibrated``; an explicit ``threshold`` wins); at the calibrated threshold each scored row
    carries ``guarantee``, the calibration's false-positive promise and its figures
    (:meth:`fakescope.calibration.Decision.guarantee`). ``backend="onnxruntime"`` scores with the
    exported model (``onnx_path``, default ``RUN/model.onnx``) instead of PyTorch. ``provenance`` is the
    file's own metadata evidence (:func:`fakescope.provenance.inspect_provenance`); it never changes ``p_ai``.
    ``runtime_options`` (default: ``predict``'s, :class:`~fakescope.options.RuntimeOptions` with
    ``max_file_size`` :data:`~fakescope.options.PREDICT_MAX_FILE_SIZE`): device, precision, batch size,
    workers, image limits, thread cap, compile; the feature cache is never used."""
    options = runtime_options if runtime_options is not None else RuntimeOptions(max_file_size=PREDICT_MAX_FILE_SIZE)
    if threshold is not None:
        threshold = checked("threshold", threshold, parsing.threshold, source="predict_paths")
    if backend not in ("torch", "onnxruntime"):
        raise FakescopeError(f"expected --backend torch or onnxruntime, got {backend!r}")
    decision = resolve_decision(run_dir, threshold, uncalibrated)
    missing = [p for p in paths if not os.path.lexists(p)]
    files = list_images([p for p in paths if os.path.lexists(p)])
    probs = None
    if backend == "onnxruntime":
        det, config, pipeline = prepare_onnx(run_dir, onnx_path, native_size=native_size, geometry=geometry,
                                             threads=options.threads, max_side=max_side)
        p, errors = score_files_onnx(det, files, pipeline, options, raw=True)
    else:
        model, config, pipeline, rt = prepare(run_dir, options, native_size=native_size, geometry=geometry,
                                              max_side=max_side)
        p, errors, probs = score_variants(model, files, [pipeline], rt.replace(use_cache=False), desc="predicting",
                                          with_probs=True)
        p = p[0]
    classes = config.get("classes") if probs is not None else None
    p = decision.p_ai(p)
    guarantee = decision.guarantee()
    rows: list[dict] = [{"path": m, "error": "file not found"} for m in missing]
    for i, f in enumerate(files):
        if i in errors:
            row = {"path": f, "error": errors[i]}
        elif not np.isfinite(p[i]):
            row = {"path": f, "error": f"the model scored this image {p[i]} (not a finite number)"}
        else:
            row = {"path": f, **verdict(p[i], decision.threshold), "threshold": decision.threshold,
                   "threshold_source": decision.source, "calibrated": decision.calibrated}
            if guarantee is not None:
                row["guarantee"] = guarantee
            if classes:
                row.update(attribution_fields(probs[i], classes))
        if provenance:
            row["provenance"] = inspect_provenance(f)
        rows.append(row)
    return rows


def attribution_fields(probs: np.ndarray, classes: list[str]) -> dict:
    """``{"generator", "generator_p", "top3"}`` of one image from an attribution run's class
    probabilities: the most probable class (``nature`` included), its probability and the three most
    probable ``[class, probability]`` pairs (``predict`` and the server report the same fields)."""
    top = np.argsort(-np.asarray(probs), kind="stable")[:3]
    return {"generator": classes[top[0]], "generator_p": round(float(probs[top[0]]), 6),
            "top3": [[classes[k], round(float(probs[k]), 6)] for k in top]}


def prepare_onnx(run_dir, onnx_path=None, *, native_size=None, geometry: str | None = None,
                 threads: int | None = None, max_side=None):
    """``(OnnxDetector, config, pipeline)`` for scoring a run with its ONNX export (``onnx_path``,
    default ``RUN/model.onnx``, on ``threads`` intra-op threads, None: onnxruntime's choice): the export
    must be of this run's model; images are prepared exactly as for the PyTorch backend (native size,
    max side, JPEG alignment)."""
    config = read_config(run_dir)
    det = OnnxDetector(onnx_path or Path(run_dir) / "model.onnx", threads=threads)
    if det.metadata.get("model") != config["model"]["name"]:
        raise FakescopeError(f"expected an ONNX export of this run's model {config['model']['name']}, got "
                             f"{det.metadata.get('model')} in {det.path}")
    pipeline = Pipeline(det.input_size, native_size_for(config, native_size), config.get("train", {}).get("jpeg_align"),
                        geometry=check_geometry(geometry or config.get("test_geometry") or "resize"),
                        max_side=max_side_for(config, max_side))
    return det, config, pipeline


def verdict(p_ai: float, threshold: float) -> dict:
    """``{"p_ai", "verdict"}`` as ``predict`` reports them: P(ai) rounded to 6 decimals, ``ai`` at or
    above ``threshold``."""
    return {"p_ai": round(float(p_ai), 6), "verdict": "ai" if p_ai >= threshold else "nature"}
