"""``fakescope benchmark``: the study's results table and report (the library is :mod:`fakescope.study`).

``add_study_options`` and ``study_options`` are shared with ``fakescope cross``."""

from __future__ import annotations

import argparse

from fakescope.attacks import ATTACKS
from fakescope.commands import args as a

BENCHMARK_HELP = """\
Train every model for every seed on the train split of all selected generators, evaluate each run on
the val split (overall and per generator) and write DIR/results.json, DIR/report.md and a
self-contained DIR/report.html. Every option can also be set in a YAML/TOML/JSON --config file
(command-line flags win); model-specific options go there, e.g.

  models:
    cnn32: {}
    timm:tf_efficientnet_lite0: {pretrained_file: weights.safetensors, freeze: true}

Finished runs with an unchanged configuration are reused unless --force.

Shortcut control: --jpeg-align Q evaluates every run a second time with every image of both classes
re-encoded as JPEG at quality Q, and the report shows accuracy with and without alignment;
--jpeg-align-train also trains JPEG-aligned runs and reports them evaluated aligned."""

def _seeds(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer seeds like 42,43,44, got {s!r}") from None


def add_study_options(p, *, models: bool) -> None:
    p.add_argument("--config", default=None, metavar="FILE", help="YAML, TOML or JSON file holding any option")
    p.add_argument("--data", default=None, action="append", help=a.DATA_HELP + a.SEVERAL_HELP)
    p.add_argument("--generators", type=a.csv, default=None, help="comma-separated generators (default: all)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: runs/benchmark)")
    p.add_argument("--seeds", type=_seeds, default=None, help="comma-separated seeds (default: 42)")
    p.add_argument("--epochs", type=a.positive_int, default=None)
    p.add_argument("--lr", type=a.number, default=None)
    p.add_argument("--limit", type=a.positive_int, default=None, help="at most N images per generator and class")
    p.add_argument("--force", action="store_true", default=None, help="retrain and re-evaluate every run")
    if models:
        p.add_argument("--jpeg-align", type=a.quality, default=None, metavar="Q",
                       help="shortcut control: also evaluate every run with both classes re-encoded as JPEG at Q")
        g = p.add_argument_group("models")
        g.add_argument("--models", type=a.csv, default=None,
                       help="comma-separated models (default: cnn32,resnet50,convnext_small)")
        a.add_backbone_options(g)
    else:
        a.add_model_options(p)
    a.add_geometry(p, "every run's test-time geometry (default: each model's own)")
    a.add_runtime(p)


def add_parser(sub):
    b = sub.add_parser("benchmark", help="the study's results table and report over several models",
                       description=BENCHMARK_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_options(b, models=True)
    b.add_argument("--jpeg-align-train", action="store_true", default=None,
                   help="with --jpeg-align: also train JPEG-aligned runs")
    b.add_argument("--degrade", action="append", default=None, metavar="KIND:LEVELS",
                   help="also evaluate under jpeg:95,75,50,30 | blur:1,2,3 | resize:0.5,0.25 (repeatable)")
    b.add_argument("--cross", action="store_true", default=None, help="also the cross-generator matrix of every model")
    b.add_argument("--leave-one-out", action="store_true", default=None,
                   help="also train on all generators but one and test on the one left out, for every model (or "
                        "those --cross names): the report's 'Unseen generators' table")
    b.add_argument("--threshold", type=a.threshold, default=None,
                   help="decision threshold (default: each run's calibrated one, else 0.5)")
    b.add_argument("--calibrate", type=a.fraction, default=None, metavar="FPR",
                   help="calibrate every run on its own held-out training images for this target false-positive "
                        "rate before evaluating it")
    b.add_argument("--calibrate-confidence", type=a.confidence, default=None, metavar="C",
                   help="with --calibrate: the probability that the FPR promise holds (default 0.95; 0: the "
                        "empirical quantile, no promise); configuration key calibrate_confidence")
    b.add_argument("--real-photos", default=None, metavar="DIR",
                   help="a folder of real photos only (any sizes): report how many each model calls AI at its own "
                        "threshold (the check against size and content shortcuts)")
    b.add_argument("--attack", default=None, choices=list(ATTACKS),
                   help="also the robust accuracy of every model's first-seed run under this attack")
    b.add_argument("--attack-eps", default=None, help="budgets, e.g. 0,1/255,2/255,4/255,8/255")
    b.add_argument("--attack-limit", type=a.positive_int, default=None,
                   help="attack at most N images per generator and class")
    b.add_argument("--no-precision-check", dest="precision_check", action="store_false", default=None,
                   help="skip the fp32-vs-bf16 prediction agreement")
    return b


def study_options(args) -> tuple[dict, dict]:
    """``(file options, command-line overrides)``."""
    from fakescope.study import load_config_file

    base = load_config_file(args.config) if args.config else {}
    args.data = a.data_option(args.data)
    over = {k: getattr(args, k, None) for k in ("data", "generators", "out", "seeds", "epochs", "lr", "limit",
                                                 "force", "jpeg_align", "jpeg_align_train", "degrade", "cross",
                                                 "leave_one_out", "threshold", "calibrate", "calibrate_confidence",
                                                 "precision_check", "device", "max_pixels", "cache_dir",
                                                 "test_geometry", "real_photos")}
    if getattr(args, "attack", None):  # benchmark only (cross has no attack options)
        over["attack"] = {"name": args.attack, **({"eps": args.attack_eps} if args.attack_eps else {}),
                          **({"limit": args.attack_limit} if args.attack_limit else {})}
    over["eval_batch_size"] = None
    if args.batch_size:
        over["batch_size"] = over["eval_batch_size"] = args.batch_size
    if args.precision != "auto":
        over["precision"] = args.precision
    if args.workers is not None:
        over["workers"] = args.workers
    if args.no_cache:
        over["use_cache"] = False
    return base, over


def run(args) -> int:
    from fakescope.engine import runtime
    from fakescope.report.html import STUDY_COLUMNS
    from fakescope.report.tables import markdown_table
    from fakescope.study import run_benchmark

    base, over = study_options(args)
    gopts = a.model_options_from_args(args)
    if gopts:
        over["model_options"] = {**(base.get("model_options") or {}), **gopts}
    if args.models:
        file_models = base.get("models")
        if isinstance(file_models, dict):  # keep the file's options for the models named here
            over["models"] = {m: file_models.get(m) or {} for m in args.models}
        else:
            over["models"] = args.models
    results = run_benchmark(base, **over)
    if runtime.is_main():
        print(markdown_table({k: m["overall"] for k, m in results["models"].items()}, STUDY_COLUMNS, first="model"))
        for label, m in results["models"].items():
            s = m.get("shortcut")
            if s:
                print(f"{label}: accuracy {_fmt(m['overall']['accuracy'])}, JPEG-aligned ({s['jpeg_align']}) "
                      f"{_fmt(s['eval_aligned']['overall']['accuracy'])}")
        out = results.get("outputs", {})
        print(f"\nresults: {results['config']['out']}/results.json" + (f"  report: {out['html']}" if out else ""))
    return 0


def _fmt(v) -> str:
    from fakescope.report.tables import fmt

    return fmt(v)
