"""``fakescope calibrate``: temperature scaling and an operating threshold for a run, on held-out images."""

from __future__ import annotations

import sys

from fakescope.commands import args as a
from fakescope.parsing import DEFAULT_CONFIDENCE


def add_parser(sub):
    p = sub.add_parser("calibrate", help="fit calibrated scores and a threshold for a target false-positive rate")
    p.add_argument("run")
    p.add_argument("--data", default=None, help="data root of the calibration set (not needed with --split holdout)")
    p.add_argument("--split", default="val", choices=["train", "val", "holdout"],
                   help="holdout: the run's own training images it did not train on (its early-stopping carve "
                        "and what --limit left out)")
    p.add_argument("--generators", type=a.csv, default=None, help="comma-separated generators to use")
    p.add_argument("--method", default="temperature", choices=["temperature"])
    p.add_argument("--target-fpr", type=a.fraction, default=0.01,
                   help="the false-positive rate promised on new real images like the calibration set's "
                        "(default 0.01)")
    p.add_argument("--confidence", type=a.confidence, default=DEFAULT_CONFIDENCE,
                   help="probability that the promise holds (default 0.95; Clopper-Pearson order-statistic rule); "
                        "0: the empirical quantile of the calibration set, no promise")
    p.add_argument("--limit", type=a.positive_int, default=None, help="at most N images per generator and class")
    a.add_runtime(p)
    return p


def run(args) -> int:
    from fakescope.engine import runtime
    from fakescope.engine.calibrate import calibrate_run
    from fakescope.report.artifacts import write_calibration_files
    from fakescope.report.model_card import refresh_model_card

    res = calibrate_run(args.run, args.data, split=args.split, generators=args.generators,
                        target_fpr=args.target_fpr, method=args.method, limit=args.limit,
                        confidence=args.confidence, runtime_options=a.runtime_from_args(args))
    paths = write_calibration_files(args.run, res["calibration"])
    if not runtime.is_main():
        return 0
    card = refresh_model_card(args.run)  # the card shows the calibration (from the run's files only)
    if card is not None:
        paths["model_card"] = str(card)
    for w in res["warnings"]:
        print(f"WARNING: {w}", file=sys.stderr)
    c = res["calibration"].to_dict()
    f = c["fit"]
    print(f"calibration set: {c['data']['root']} ({c['data']['split']}), {f['n_real']} real + {f['n_ai']} AI images")
    print(f"temperature {c['temperature']:.4f}: ECE {f['ece_before']:.4f} -> {f['ece_after']:.4f}, "
          f"Brier {f['brier_before']:.4f} -> {f['brier_after']:.4f}")
    g = c["guarantee"]
    rule = (f"Clopper-Pearson rule, {g['confidence']:g} confidence: at most {g['allowed_false_positives']} of "
            f"{g['n_real']} real images above it" if g["confidence"] > 0 else "empirical quantile, no promise")
    print(f"threshold {c['threshold']:.6g} for a false-positive rate <= {c['target_fpr']:g} ({rule})")
    print(f"on the calibration set: FPR {g['fpr_empirical']:.4f} ({g['false_positives']} of {g['n_real']}), "
          f"upper bound {g['fpr_upper_bound']:.4f} ({g['bound_confidence']:g} confidence); TPR {g['tpr']:.4f} "
          f"[{g['tpr_interval'][0]:.4f}, {g['tpr_interval'][1]:.4f}] (95 % interval, {g['n_ai']} AI images)")
    print(f"promise: {g['statement']}")
    print(f"written: {', '.join(paths.values())}")
    return 0
