"""``fakescope explain``: Grad-CAM heat maps of what pushed a run's score toward AI."""

from __future__ import annotations

from fakescope.commands import args as a


def add_parser(sub):
    p = sub.add_parser("explain", help="heat-map overlays of the regions that pushed the score toward AI")
    p.add_argument("run")
    p.add_argument("paths", nargs="+", metavar="IMAGE")
    p.add_argument("--out", required=True, help="folder for the PNG overlays and explain.json")
    p.add_argument("--method", default="gradcam", choices=["gradcam"])
    p.add_argument("--layer", default=None, help="module name to explain (default: the last convolutional stage)")
    p.add_argument("--threshold", type=a.threshold, default=None,
                   help="verdict threshold (default: the run's calibrated one, else 0.5)")
    p.add_argument("--uncalibrated", action="store_true", help="raw p_ai, ignoring the run's calibration")
    p.add_argument("--native-size", default=None, help="override the run's native size: N or off")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--max-pixels", type=a.positive_int, default=None)
    return p


def run(args) -> int:
    from fakescope.explain import explain_files
    from fakescope.report.artifacts import write_explanation

    res = write_explanation(explain_files(args.run, args.paths, method=args.method, layer=args.layer,
                                          threshold=args.threshold, uncalibrated=args.uncalibrated,
                                          native_size=args.native_size, runtime_options=a.runtime_from_args(args)),
                               args.out)
    print(f"{res['method']} on {res['model']} layer {res['layer']}; threshold {res['threshold']['value']:.4g} "
          f"({res['threshold']['source']})")
    for r in res["images"]:
        if "error" in r:
            print(f"{r['path']}: error: {r['error']}")
        else:
            print(f"{r['path']}: p_ai {r['p_ai']:.4f} {r['verdict']} -> {r['overlay']}")
    print(f"scores: {args.out}/explain.json")
    return 0 if any("error" not in r for r in res["images"]) else 1
