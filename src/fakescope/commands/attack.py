"""``fakescope attack``: adversarial robustness of a trained run."""

from __future__ import annotations

from fakescope.attacks import ATTACKS
from fakescope.choices import ATTACK_DIRECTIONS
from fakescope.commands import args as a


def add_parser(sub):
    p = sub.add_parser("attack", help="robust accuracy of a run under an adversarial attack")
    p.add_argument("run")
    a.add_data(p)
    p.add_argument("--attack", default="pgd", choices=list(ATTACKS))
    p.add_argument("--eps", default="0,1/255,2/255,4/255,8/255",
                   help="comma-separated budgets in pixel units of [0, 1] images (fractions allowed)")
    p.add_argument("--steps", type=a.positive_int, default=10, help="PGD steps")
    p.add_argument("--step-size", type=a.number, default=None, help="PGD step size (default 2.5 * eps / steps)")
    p.add_argument("--queries", type=a.positive_int, default=None, help="Square attack query budget")
    p.add_argument("--direction", default="both", choices=list(ATTACK_DIRECTIONS))
    p.add_argument("--source", default=None, metavar="RUN_A", help="craft on this run, evaluate on RUN (transfer)")
    p.add_argument("--limit", type=a.positive_int, default=None, help="at most N images per generator and class")
    p.add_argument("--save-examples", default=None, metavar="DIR",
                   help="write up to 16 clean/adversarial example pairs per eps as PNGs into DIR")
    p.add_argument("--threshold", type=a.threshold, default=None,
                   help="decision threshold on p_ai (default: the run's calibrated one, else 0.5)")
    p.add_argument("--uncalibrated", action="store_true", help="raw p_ai and threshold 0.5, ignoring calibration.json")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT")
    p.add_argument("--out", default=None, help="folder for the plot (default RUN/attack-<name>)")
    a.add_geometry(p, "override the run's test-time geometry (crops is attacked on the centre crop)")
    a.add_runtime(p)
    return p


EXAMPLES = 16


def run(args) -> int:
    from fakescope.attacks import parse_eps
    from fakescope.engine import runtime
    from fakescope.engine.attack import attack_run
    from fakescope.report.artifacts import attack_folder, write_attack
    from fakescope.report.tables import markdown_table

    eps = parse_eps(args.eps, norm="l2" if args.attack == "pgd-l2" else "linf")
    options = {"n_queries": args.queries} if args.queries and args.attack == "square" else None
    res = attack_run(args.run, args.data, attack=args.attack, eps_list=eps, steps=args.steps,
                     step_size=args.step_size, direction=args.direction, split=args.split,
                     generators=args.generators, limit=args.limit, source=args.source,
                     examples=EXAMPLES if args.save_examples else 0, threshold=args.threshold,
                     uncalibrated=args.uncalibrated, seed=args.seed, attack_options=options,
                     geometry=args.test_geometry, runtime_options=a.runtime_from_args(args))
    write_attack(res, args.out or attack_folder(args.run, args.attack), args.json_out, examples_dir=args.save_examples)
    if not runtime.is_main():  # under torchrun only rank 0 prints and writes
        return 0
    rows = {f"{r['eps'] * 255:g}/255": {**r, **{f"{d} acc": v.get("robust_accuracy")
                                              for d, v in r.get("per_direction", {}).items()}}
            for r in res["results"]}
    print(markdown_table(rows, ("robust_accuracy", "success_rate", "ai-to-real acc", "real-to-ai acc",
                                "mean_linf", "mean_l2", "psnr"), first=f"{args.attack} eps"))
    print(f"\nthreshold {res['threshold']:.6g} ({res['threshold_source']}; on the raw p_ai {res['raw_threshold']:.6g})")
    print(f"clean accuracy {res['clean_accuracy']:.4f} on {res['n']} images (judged in {res['precision']}, "
          f"crafted in {res['attack_precision']}); "
          f"results: {res['outputs']['json']}  plot: {res['outputs']['plot']}")
    return 0

