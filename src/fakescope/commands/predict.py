"""``fakescope predict``: P(ai) and a verdict for image files and folders."""

from __future__ import annotations

import csv
import io
import json

from fakescope.commands import args as a

COLUMNS = ("path", "p_ai", "verdict", "generator_hint", "error")


def add_parser(sub):
    p = sub.add_parser("predict", help="P(ai) for image files and folders")
    p.add_argument("run")
    p.add_argument("paths", nargs="+")
    p.add_argument("--format", default="table", choices=["table", "csv", "json"])
    p.add_argument("--threshold", type=a.threshold, default=None,
                   help="decision threshold on p_ai (default: the run's calibrated one, else 0.5)")
    p.add_argument("--uncalibrated", action="store_true", help="raw p_ai and threshold 0.5, ignoring calibration.json")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"],
                   help="onnxruntime: score with the exported model (see `fakescope export`)")
    p.add_argument("--onnx", default=None, metavar="PATH", help="the exported model (default RUN/model.onnx)")
    p.add_argument("--no-provenance", action="store_true", help="do not read the files' provenance metadata")
    p.add_argument("--max-file-size", type=a.positive_int, default=50 * 2**20, help="bytes (default 50 MiB)")
    p.add_argument("--native-size", default=None, help="override the run's native size: N or off")
    a.add_geometry(p)
    a.add_runtime(p)
    return p


def run(args) -> int:
    from fakescope.engine import runtime
    from fakescope.engine.evaluation import predict_paths

    rows = predict_paths(args.run, args.paths, threshold=args.threshold, uncalibrated=args.uncalibrated,
                         backend=args.backend, onnx_path=args.onnx, provenance=not args.no_provenance,
                         device=args.device,
                         precision=args.precision, batch_size=args.batch_size, num_workers=args.workers,
                         max_file_size=args.max_file_size, max_pixels=args.max_pixels,
                         native_size=args.native_size, compile=args.compile, geometry=args.test_geometry)
    attribution = any("generator" in r for r in rows)
    columns = (*COLUMNS[:3], "generator", "generator_p", *COLUMNS[3:]) if attribution else COLUMNS
    if not runtime.is_main():
        return 0
    if args.format == "json":
        print(json.dumps(rows, indent=2, allow_nan=False))
    elif args.format == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, (r.get("provenance") or {}).get(k) or "") for k in columns})
        print(buf.getvalue(), end="")
    else:
        width = min(80, max((len(r["path"]) for r in rows), default=4))
        print(f"{'path':{width}s}  {'p_ai':>7s}  verdict  " + ("generator (p)  " if attribution else "") + "metadata")
        for r in rows:
            if "error" in r:
                print(f"{r['path']:{width}s}  {'-':>7s}  error: {r['error']}")
            else:
                hint = (r.get("provenance") or {}).get("generator_hint") or "-"
                gen = f"{r['generator']} ({r['generator_p']:.3f})  " if attribution else ""
                print(f"{r['path']:{width}s}  {r['p_ai']:7.4f}  {r['verdict']:7s}  {gen}{hint}")
        scored = [r for r in rows if "threshold" in r]
        if scored:
            r = scored[0]
            print(f"\nthreshold {r['threshold']:.6g} ({r['threshold_source']}), "
                  f"{'calibrated' if r['calibrated'] else 'raw'} p_ai; metadata is separate evidence and "
                  f"never changes p_ai (its absence proves nothing)")
            if r.get("guarantee"):
                print(f"{'promise' if r['guarantee']['promise'] else 'no promise'}: {r['guarantee']['statement']}")
    return 0 if any("error" not in r for r in rows) else 1
