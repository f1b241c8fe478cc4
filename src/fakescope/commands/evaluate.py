"""``fakescope evaluate``: metrics of a run on a data root (table, JSON and figures)."""

from __future__ import annotations

import sys

from fakescope.commands import args as a


def add_parser(sub):
    e = sub.add_parser("evaluate", help="metrics of a run on a data root")
    e.add_argument("run")
    a.add_data(e)
    e.add_argument("--threshold", type=a.threshold, default=None,
                   help="decision threshold on p_ai (default: the run's calibrated one, else 0.5)")
    e.add_argument("--uncalibrated", action="store_true", help="raw p_ai and threshold 0.5, ignoring calibration.json")
    e.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the JSON here")
    e.add_argument("--out", default=None, help="folder for the PNGs and scores.npz "
                   "(default: RUN/eval-<data root's folder name>-<split>)")
    e.add_argument("--native-size", default=None, help="override the run's native size: N or off")
    e.add_argument("--degrade", action="append", default=None, metavar="KIND:LEVELS",
                   help="jpeg:95,75,50,30 | blur:1,2,3 | resize:0.5,0.25 (repeatable)")
    a.add_geometry(e)
    a.add_max_side(e)
    a.add_runtime(e)
    return e


def run(args) -> int:
    from fakescope.engine import runtime
    from fakescope.engine.evaluation import evaluate_run
    from fakescope.report.artifacts import eval_folder, in_run, write_evaluation
    from fakescope.report.model_card import refresh_model_card

    result = evaluate_run(
        args.run, args.data, split=args.split, generators=args.generators, threshold=args.threshold,
        uncalibrated=args.uncalibrated,
        native_size=args.native_size, jpeg_align=args.jpeg_align, degrade=args.degrade, geometry=args.test_geometry,
        runtime_options=a.runtime_from_args(args), max_side=args.max_side,
    )
    outputs = write_evaluation(result, args.out or eval_folder(args.run, args.data, args.split, args.jpeg_align),
                               args.json_out)
    if runtime.is_main() and in_run(outputs["json"], args.run):
        refresh_model_card(args.run)  # the card lists the run's evaluations
    if runtime.is_main():
        _print_metrics(result, args.split)
        _print_decision(result)
        _print_breakdowns(result)
        _print_skipped(result)
        print(f"\nresults: {outputs['json']}  figures: {outputs['folder']}")
    if not result["overall"].get("n"):  # exit code 0 unless nothing could be read
        print(f"fakescope: error: none of the {len(result['bad_files'])} images could be read", file=sys.stderr)
        return 1
    return 0


def _print_metrics(result: dict, split: str) -> None:
    """The metric tables: classification, calibration / operating point, error rates with their intervals."""
    from fakescope.report.tables import markdown_table

    rows = {"overall": result["overall"], **result["per_generator"]}
    print(markdown_table(rows, first=f"{result['model']['name']} on {split}"))
    print()
    print(markdown_table(rows, ("ece", "brier", "tpr_at_fpr_1pct", "tpr_at_fpr_5pct", "eer"),
                         first="calibration / operating point"))
    rates = result["rates"]
    print()
    print(markdown_table({name: _rate_row(r) for name, r in {"overall": rates["overall"],
                                                              **rates["per_generator"]}.items()},
                         ("fpr", "fpr 95 % interval", "real", "tpr", "tpr 95 % interval", "ai"),
                         first="error rates (Clopper-Pearson)"))


def _print_decision(result: dict) -> None:
    """The threshold and scores used, the calibration's promise checked (if any), the warnings (on stderr)."""
    from fakescope.report.tables import fmt

    cal = result["calibration"]
    print(f"\nthreshold {result['threshold']:.6g} ({result['threshold_source']}); scores "
          + (f"calibrated (T = {cal['temperature']:.4f}; uncalibrated ECE {fmt(cal['uncalibrated']['ece'])})"
             if cal else "raw p_ai"))
    check = result.get("guarantee_check")
    if check:
        o = check["overall"]
        said = f"promise: {check['promise']}" if check["promise"] else \
            f"target FPR {check['target_fpr']:g} (empirical quantile, no promise)"
        verdict = ("no real images here to check it" if o is None else
                   "BROKEN on this data" if check["broken"] else "not contradicted by this data")
        print(f"{said} -> {verdict}")
    for w in result.get("warnings", []):
        print(f"WARNING: {w}", file=sys.stderr)


def _print_breakdowns(result: dict) -> None:
    """The attribution tables of an attribution run, and one table per degradation asked for."""
    from fakescope.report.tables import markdown_table

    if "attribution" in result:
        att = result["attribution"]
        print()
        print(markdown_table(att["per_class"], ("precision", "recall", "f1", "support"), first="attribution"))
        print(f"\nattribution: accuracy {att['accuracy']:.4f}, macro F1 {att['macro_f1']:.4f} over {att['n']} "
              f"images ({att['unknown_generator']} of generators the run was not trained on left out)")
    for kind, levels in result.get("degradations", {}).items():
        print()
        print(markdown_table({f"{kind} {lv['level']:g}": lv["overall"] for lv in levels},
                             ("accuracy", "f1", "roc_auc", "n"), first="degradation"))


def _print_skipped(result: dict) -> None:
    """How many images were left out of the metrics, and why (unreadable, or scored NaN or inf)."""
    if result["bad_files"]:
        n_bad = len(result["bad_files"])
        nonfinite = sum("non-finite score" in r for r in result["bad_files"].values())
        print(f"\n{n_bad - nonfinite} unreadable files skipped (listed in the JSON)" if not nonfinite else
              f"\n{n_bad} images skipped: {n_bad - nonfinite} unreadable, {nonfinite} scored NaN or inf by the "
              f"model (listed in the JSON)")


def _rate_row(r: dict) -> dict:
    def iv(x):
        return f"[{x['interval'][0]:.4f}, {x['interval'][1]:.4f}]" if x["interval"] else None

    return {"fpr": r["fpr"]["value"], "fpr 95 % interval": iv(r["fpr"]), "real": r["fpr"]["n"],
            "tpr": r["tpr"]["value"], "tpr 95 % interval": iv(r["tpr"]), "ai": r["tpr"]["n"]}
