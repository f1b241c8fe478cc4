"""The study's benchmark: every model x seed trained, evaluated, summarised, reported."""

from __future__ import annotations

import time
from pathlib import Path

from fakescope.choices import ONE_CLASS_DIRECTIONS
from fakescope.engine import checkpoint as ckpt
from fakescope.engine import runtime
from fakescope.study.benchmark_report import RESULTS, write_benchmark_report
from fakescope.study.config import BenchmarkConfig, ModelSpec, run_config
from fakescope.study.cross import run_cross
from fakescope.study.runs import (
    calibrate_cached,
    ensure_run,
    evaluate_cached,
    gallery_cached,
    log,
    precision_agreement,
    real_photos_cached,
    robustness_cached,
    run_dir_for,
    train_options,
)
from fakescope.study.stats import aggregate_eval, summarize
from fakescope.utils import write_json

CONFIG_FILE = "benchmark-config.json"


def run_benchmark(config: dict | BenchmarkConfig, **overrides) -> dict:
    """Train and evaluate every model of ``config`` (a mapping or :class:`BenchmarkConfig`) for every
    seed; write ``out/results.json``, the resolved configuration and the report; return the results::

        {"models": {label: {"overall", "per_generator", "seeds", "params", "train_seconds",
                            "images_per_second", "runs", ...}}, "config": {...}}

    The data is read (indexed, the generators resolved: :func:`~fakescope.study.config.resolve_data`)
    here, before anything is written."""
    cfg = run_config(config, **overrides)
    out = Path(cfg.out)
    if runtime.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG_FILE, cfg.resolved())
    dev = runtime.resolve_device(cfg.device)
    log(f"{len(cfg.models)} model(s) x {len(cfg.seeds)} seed(s) on {cfg.data} "
        f"(generators: {', '.join(cfg.generators)}; device {dev.type}); writing to {out}")
    results: dict = {"models": {}, "config": cfg.resolved(), "data": {"root": cfg.data, "generators": cfg.generators,
                                                                      "split": cfg.split}}
    t_start = time.perf_counter()
    for i, spec in enumerate(cfg.models):
        results["models"][spec.label] = _model_entry(cfg, spec, done=i * len(cfg.seeds))
        if runtime.is_main():
            write_json(out / RESULTS, results)  # partial results survive an interruption
    _cross_protocols(cfg, results)
    results["seconds"] = time.perf_counter() - t_start
    if runtime.is_main():
        write_json(out / RESULTS, results)
        if cfg.report:
            paths = write_benchmark_report(out, results)
            results["outputs"] = paths
            write_json(out / RESULTS, results)
            log(f"report: {paths['html']}")
    return results


def _model_entry(cfg: BenchmarkConfig, spec: ModelSpec, done: int) -> dict:
    """One model's row of the results: its seeds' runs trained and evaluated (``done``: the runs of the
    models before it, for the progress count), then the extra studies on its first seed's run."""
    evals, summaries, runs = _train_and_evaluate(cfg, spec, done)
    run_cfg = ckpt.read_config(run_dir_for(cfg, spec, cfg.seeds[0]))
    entry = {**aggregate_eval(evals), "seeds": list(cfg.seeds), "model": spec.model,
             "options": {k: v for k, v in spec.options.items() if k != "pretrained_file"},
             "params": run_cfg.get("params"), "trainable_params": run_cfg.get("trainable_params"),
             "input_size": run_cfg.get("preprocess", {}).get("input_size"),
             "native_size": run_cfg.get("native_size"), "test_geometry": run_cfg.get("test_geometry") or "resize",
             "eval_precision": evals[0].get("precision"),
             **_timing(summaries, evals), "runs": runs}
    first, what = runs[0]["dir"], f"{spec.label} seed {cfg.seeds[0]}"
    if cfg.gallery:
        entry["gallery"] = gallery_cached(cfg, first, what=what)
    if cfg.jpeg_align is not None:
        entry["shortcut"] = _shortcut(cfg, spec, runs)
    if cfg.attack:
        entry["robustness"] = _robustness_entry(robustness_cached(cfg, first, what=what))
    if cfg.real_photos is not None:
        entry["real_photos"] = real_photos_cached(cfg, first, what=what)
    if cfg.precision_check:
        entry["precision_check"] = precision_agreement(first, cfg, cfg.generators, what=what)
    return entry


def _train_and_evaluate(cfg: BenchmarkConfig, spec: ModelSpec, done: int) -> tuple[list[dict], list[dict], list[dict]]:
    """``(evaluations, training summaries, runs)`` of ``spec``, one per seed: each run trained (or
    reused), calibrated when the configuration asks, and evaluated."""
    evals, summaries, runs = [], [], []
    total = len(cfg.models) * len(cfg.seeds)
    for k, seed in enumerate(cfg.seeds, start=done + 1):
        what = f"[{k}/{total}] {spec.label} seed {seed}"
        rd = run_dir_for(cfg, spec, seed)
        summary, _ = ensure_run(train_options(cfg, spec, seed, cfg.generators), rd, force=cfg.force, what=what)
        if cfg.calibrate is not None:
            calibrate_cached(cfg, rd, what)
        ev = evaluate_cached(cfg, rd, generators=cfg.generators, degrade=cfg.degrade, force=cfg.force, what=what)
        log(f"{what}: {cfg.split} accuracy {ev['overall']['accuracy']:.4f}, F1 {_f(ev['overall']['f1'])}, "
            f"ROC-AUC {_f(ev['overall']['roc_auc'])}")
        evals.append(ev)
        summaries.append(summary)
        runs.append({"seed": seed, "dir": str(rd), "eval": ev["outputs"]["json"], "figures": ev["outputs"]["folder"]})
    return evals, summaries, runs


def _robustness_entry(atk: dict) -> dict:
    """The results table's summary of an attack result: robust accuracy per eps, overall and per direction."""
    return {"attack": atk["attack"], "eps": [r["eps"] for r in atk["results"]], "n": atk["n"],
            "clean_accuracy": atk["clean_accuracy"], "precision": atk.get("precision"),
            "robust_accuracy": [r["robust_accuracy"] for r in atk["results"]],
            "per_direction": {d: [r.get("per_direction", {}).get(d, {}).get("robust_accuracy")
                                  for r in atk["results"]] for d in ONE_CLASS_DIRECTIONS},
            "json": atk["outputs"]["json"]}


def _cross_protocols(cfg: BenchmarkConfig, results: dict) -> None:
    """``results["cross"]`` and ``results["leave_one_out"]`` when the configuration asks for them.

    --cross: the one-vs-all matrix; --leave-one-out: the leave-one-generator-out runs ("Unseen
    generators"); both together: both, for the models --cross names (every model by default)."""
    everyone = [m.label for m in cfg.models]
    crossed = cfg.cross if isinstance(cfg.cross, list) else (everyone if cfg.cross else [])
    if not (crossed or cfg.leave_one_out):
        return
    results["cross"], results["leave_one_out"] = {}, {}
    for label in crossed if cfg.cross else []:
        results["cross"][label] = run_cross(cfg, label, report=False)
    for label in (crossed or everyone) if cfg.leave_one_out else []:
        results["leave_one_out"][label] = run_cross(cfg, label, leave_one_out=True, report=False)


def _f(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def _timing(summaries: list[dict], evals: list[dict]) -> dict:
    """Training seconds and throughput (training images/s; ``eval_images_per_second``: inference).

    ``data_seconds`` is the time spent preparing the inputs before the first epoch (decoding, or the
    frozen backbone's feature extraction); ``train_seconds`` and ``images_per_second`` cover the
    epochs only (for a frozen backbone: the head on cached features, see ``input_path``)."""
    def agg(vals):
        return vals[0] if len(vals) == 1 else summarize(vals)

    return {"train_seconds": agg([s.get("train_seconds") for s in summaries]),
            "data_seconds": agg([s.get("data_seconds") for s in summaries]),
            "images_per_second": agg([s.get("train_images_per_second") for s in summaries]),
            "eval_images_per_second": agg([e.get("images_per_second") for e in evals]),
            "epochs_run": agg([s.get("epochs_run") for s in summaries]),
            "input_path": summaries[0].get("input_path")}


def _shortcut(cfg: BenchmarkConfig, spec: ModelSpec, runs: list[dict]) -> dict:
    q = cfg.jpeg_align
    evals = []
    for r in runs:
        what = f"{spec.label} seed {r['seed']}"
        evals.append(evaluate_cached(cfg, Path(r["dir"]), generators=cfg.generators, jpeg_align=q, force=cfg.force,
                                     what=what))
    out = {"jpeg_align": q, "eval_aligned": aggregate_eval(evals),
           "eval_aligned_runs": [e["outputs"]["json"] for e in evals]}
    if cfg.jpeg_align_train:
        evals, dirs = [], []
        for seed in cfg.seeds:
            what = f"{spec.label} (JPEG-aligned {q}) seed {seed}"
            rd = run_dir_for(cfg, spec, seed, q)
            ensure_run(train_options(cfg, spec, seed, cfg.generators, jpeg_align=q), rd, force=cfg.force, what=what)
            evals.append(evaluate_cached(cfg, rd, generators=cfg.generators, force=cfg.force, what=what))
            dirs.append(str(rd))
        out["train_aligned"] = aggregate_eval(evals)
        out["train_aligned_runs"] = dirs
    return out
