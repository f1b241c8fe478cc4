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
    p.add_argument("paths", nargs="*", help="image files and folders (folders are walked recursively)")
    p.add_argument("--files-from", default=None, metavar="LIST",
                   help="score the paths in LIST too: a text file with one path per line, or a Parquet/CSV file "
                        "with a 'path' column (streamed, never walked)")
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
    a.add_max_side(p)
    a.add_runtime(p)
    from fakescope.engine.bulk import DEFAULT_SHARD_SIZE, ENGINES

    g = p.add_argument_group("bulk scoring (--out)")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="write Parquet shards (part-NNNNN.parquet), job.json and summary.json to DIR instead of "
                        "printing rows; resumable: a rerun skips the finished shards")
    g.add_argument("--shard-size", type=a.positive_int, default=DEFAULT_SHARD_SIZE,
                   help=f"inputs per shard (default {DEFAULT_SHARD_SIZE})")
    g.add_argument("--overwrite", action="store_true", help="replace a --out folder that holds a different job")
    g.add_argument("--engine", default="torch", choices=list(ENGINES),
                   help="torch: this process (or each torchrun rank); ray: a Ray Data pipeline (needs --out)")
    g.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                   help="join an existing Ray cluster (default: start a local Ray instance on this machine's CPUs)")
    g.add_argument("--actors", type=a.positive_int, default=None,
                   help="Ray scoring actors, each holding the model once (default: one per GPU with "
                        "--gpus-per-actor, else half the CPUs)")
    g.add_argument("--gpus-per-actor", type=a.number, default=0.0, metavar="G", help="GPUs per Ray actor (default 0)")
    return p


def run_bulk(args, runtime_options) -> int:
    import json as _json

    from fakescope.engine import runtime
    from fakescope.engine.bulk import predict_to_folder, summary_text

    summary = predict_to_folder(
        args.run, args.out, args.paths, files_from=args.files_from, shard_size=args.shard_size,
        overwrite=args.overwrite, engine=args.engine, threshold=args.threshold, uncalibrated=args.uncalibrated,
        native_size=args.native_size, backend=args.backend, onnx_path=args.onnx, provenance=not args.no_provenance,
        geometry=args.test_geometry, ray_address=args.ray_address, actors=args.actors,
        gpus_per_actor=args.gpus_per_actor, runtime_options=runtime_options, max_side=args.max_side)
    if not runtime.is_main():
        return 0
    print(_json.dumps(summary, indent=2) if args.format == "json" else summary_text(summary))
    return 0 if summary["scored"] or not summary["files"] else 1


def run(args) -> int:
    from fakescope.engine import runtime
    from fakescope.engine.evaluation import predict_paths
    from fakescope.errors import FakescopeError

    if not args.paths and not args.files_from:
        raise FakescopeError("expected image paths or --files-from LIST, got neither")
    runtime_options = a.runtime_from_args(args)
    if args.out is not None:
        return run_bulk(args, runtime_options)
    if args.engine != "torch":
        raise FakescopeError(f"expected --out DIR with --engine {args.engine} (it writes Parquet shards), got none")
    paths = list(args.paths)
    if args.files_from:
        from fakescope.engine.bulk import read_list

        paths += list(read_list(args.files_from))
    rows = predict_paths(args.run, paths, threshold=args.threshold, uncalibrated=args.uncalibrated,
                         backend=args.backend, onnx_path=args.onnx, provenance=not args.no_provenance,
                         native_size=args.native_size, geometry=args.test_geometry, runtime_options=runtime_options,
                         max_side=args.max_side)
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
