"""GenImage's cross-generator protocol: train on each generator alone and test on every generator
(an N x N accuracy matrix), or train on all generators but one and test on the one left out."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fakescope.engine import runtime
from fakescope.errors import FakescopeError
from fakescope.report.html import write_cross
from fakescope.study.benchmark_report import RESULTS, write_benchmark_report
from fakescope.study.config import BenchmarkConfig, ModelSpec, run_config
from fakescope.study.runs import canonical, ensure_run, evaluate_cached, log, train_options
from fakescope.study.stats import aggregate, mean_of
from fakescope.utils import write_json


def run_cross(config: dict | BenchmarkConfig, model: str | None = None, *, leave_one_out: bool = False,
              report: bool = True, **overrides) -> dict:
    """GenImage's cross-generator protocol for one model of ``config``.

    Default: one run per generator, trained on that generator's train split alone, tested on the
    val split of every generator: ``matrix[i][j]`` is the accuracy of the model trained on
    ``train[i]`` on ``test[j]`` (mean over seeds), ``row_average[i]`` its mean over the test
    generators. ``leave_one_out``: run ``i`` trains on every generator but ``train[i]``;
    ``held_out[g]`` is its accuracy on the generator left out. Writes ``out/cross/<model>[-loo]``
    ``.json``, ``.md`` and ``.png`` (heatmap); the runs live in ``out/cross/<model>-.../``."""
    cfg = run_config(config, **overrides)
    spec = _model_spec(cfg, model)
    gens = cfg.generators
    if leave_one_out and len(gens) < 2:
        raise FakescopeError(f"expected at least 2 generators for --leave-one-out (train on the others, test on the "
                             f"one left out), got {len(gens)}: {', '.join(gens)}")
    if len(gens) < 2:
        log(f"only one generator ({gens[0]}): the cross-generator matrix is 1 x 1")
    folder = Path(cfg.out) / "cross"
    kind = "leave-one-out" if leave_one_out else "one-vs-all"
    log(f"cross-generator ({kind}) for {spec.label}: {len(gens)} runs x {len(cfg.seeds)} seed(s)")
    per_gen, runs = _train_and_test(cfg, spec, folder, leave_one_out)
    result = _matrix_result(cfg, spec, per_gen, runs, leave_one_out)
    if runtime.is_main():

        stem = folder / (spec.slug + ("-loo" if leave_one_out else ""))
        result["outputs"] = write_cross(result, stem)
        write_json(stem.with_suffix(".json"), result)
        log(f"cross-generator matrix: {stem.with_suffix('.md')}")
        if report and (Path(cfg.out) / RESULTS).is_file():
            write_benchmark_report(cfg.out)
    return canonical(result)


def _model_spec(cfg: BenchmarkConfig, model: str | None) -> ModelSpec:
    """The model named ``model``, or the configuration's one model when it names none."""
    if model is not None:
        return cfg.model(model)
    if len(cfg.models) != 1:
        raise FakescopeError(f"expected one model for the cross-generator protocol, got "
                             f"{', '.join(m.label for m in cfg.models)}: name one")
    return cfg.models[0]


def _train_and_test(cfg: BenchmarkConfig, spec: ModelSpec, folder: Path,
                    leave_one_out: bool) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """``(per_gen, runs)``: for each generator ``g``, the runs trained on it alone (or on all others)
    for every seed, and their metrics on every generator aggregated over seeds (``per_gen[g][test]``)."""
    gens = cfg.generators
    per_gen, runs = {}, {}
    total, k = len(gens) * len(cfg.seeds), 0
    for g in gens:
        train_gens = [x for x in gens if x != g] if leave_one_out else [g]
        name = f"without-{g}" if leave_one_out else f"train-{g}"
        evals, dirs = [], []
        for seed in cfg.seeds:
            k += 1
            what = f"cross [{k}/{total}] {spec.label} {name} seed {seed}"
            rd = folder / f"{spec.slug}-{name}-seed{seed}"
            ensure_run(train_options(cfg, spec, seed, train_gens), rd, force=cfg.force, what=what)
            evals.append(evaluate_cached(cfg, rd, generators=gens, force=cfg.force, what=what))
            dirs.append(str(rd))
        per_gen[g] = {t: aggregate([e["per_generator"][t] for e in evals]) for t in gens}
        runs[g] = dirs
    return per_gen, runs


def _matrix_result(cfg: BenchmarkConfig, spec: ModelSpec, per_gen: dict[str, dict], runs: dict[str, list[str]],
                   leave_one_out: bool) -> dict:
    """The accuracy matrix with its averages, and the protocol's own summary figures."""
    gens = cfg.generators
    rows = [[mean_of(per_gen[g][t]["accuracy"]) for t in gens] for g in gens]
    matrix = np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=np.float64)
    result = {
        "model": spec.label, "protocol": "leave-one-out" if leave_one_out else "one-vs-all", "metric": "accuracy",
        "split": cfg.split, "train": [f"all but {g}" if leave_one_out else g for g in gens], "test": list(gens),
        "matrix": matrix.tolist(), "row_average": np.nanmean(matrix, axis=1).tolist(),
        "column_average": np.nanmean(matrix, axis=0).tolist(), "seeds": list(cfg.seeds),
        "per_generator": per_gen, "runs": runs,
    }
    if leave_one_out:
        result["held_out"] = {g: matrix[i, i] for i, g in enumerate(gens)}
        result["mean_held_out"] = float(np.nanmean(np.diag(matrix)))
        auc = [mean_of(per_gen[g][g]["roc_auc"]) for g in gens]  # ROC-AUC on the generator left out
        result["held_out_roc_auc"] = dict(zip(gens, auc, strict=True))
        known = [v for v in auc if v is not None]
        result["mean_held_out_roc_auc"] = float(np.mean(known)) if known else None
    else:
        off = matrix[~np.eye(len(gens), dtype=bool)]
        result["mean_in_distribution"] = float(np.nanmean(np.diag(matrix)))
        result["mean_cross"] = float(np.nanmean(off)) if off.size else None
    return result
