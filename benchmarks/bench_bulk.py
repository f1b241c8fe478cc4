"""(i) Bulk scoring: ``predict --out DIR`` (Parquet shards) vs the current ``predict`` vs decode-only, one
process vs Ray vs two torchrun ranks, on CIFAKE and on the large real photos; peak RSS at 1,000 and 20,000 files.

Every scoring figure is one fresh ``fakescope`` process (or a torchrun launch, or a local Ray instance on
this machine's CPUs) over the same ``--files-from`` list, timed from outside (``wall images/s``, start-up
included); ``predict --out`` also reports its own rate after start-up (``job images/s``, from its
``summary.json``: model loading, Ray start and actor start-up included, Python start-up not).
``decode-only`` runs fakescope's reader and the run's preprocessing (:func:`fakescope.engine.bulk.decode_input`)
over the same files in this process, without a model: the ceiling when decoding dominates (large photos).
Peak RSS (``wait4``, the process itself) of ``predict --out`` and of ``predict --format json`` on the first
1,000 and 20,000 CIFAKE train images shows which one stays flat.

    python benchmarks/bench_bulk.py                          # trains a cnn32 on 2,000 CIFAKE images first
    python benchmarks/bench_bulk.py --run runs/cnn32 --cifake 2000 --rss 1000,5000
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import PHOTOS_TAR, Workdir, emit, env, extract_cifake, extract_photos, fakescope, parser

LOCAL_CIFAKE = Path("/tmp/data/cifake_sdv14")
LOCAL_PHOTOS = Path("/tmp/data/real_photos")


def timed(cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """``(wall seconds, peak RSS MiB of the process itself, result)``."""
    t = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out_err = {}

    import threading

    def drain(name, stream):
        out_err[name] = stream.read().decode(errors="replace")

    threads = [threading.Thread(target=drain, args=(n, s)) for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for th in threads:
        th.start()
    _, status, usage = os.wait4(proc.pid, 0)
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    rc = os.waitstatus_to_exitcode(status)
    if rc not in (0, 1):
        sys.exit(f"failed ({rc}): {' '.join(map(str, cmd))}\n{out_err.get('err', '')[-3000:]}")
    return wall, usage.ru_maxrss / 1024, subprocess.CompletedProcess(cmd, rc, out_err.get("out"), out_err.get("err"))


def write_list(path: Path, files: list[str]) -> Path:
    path.write_text("".join(f + "\n" for f in files))
    return path


def decode_only(run: Path, files: list[str]) -> float:
    """Images per second of fakescope's reader + the run's stage preprocessing, one process, no model."""
    import torch

    from fakescope.engine.bulk import decode_input
    from fakescope.engine.predictor import Predictor
    from fakescope.options import RuntimeOptions

    torch.set_num_threads(1)
    pipeline = Predictor(run, RuntimeOptions(device="cpu", precision="fp32")).pipeline
    t = time.perf_counter()
    for f in files:
        decode_input(f, pipeline)
    return len(files) / (time.perf_counter() - t)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="a cnn32 run (default: train one on 2,000 CIFAKE train images)")
    p.add_argument("--cifake", type=int, default=4000, help="CIFAKE val images scored (at most 4,000)")
    p.add_argument("--photo-repeats", type=int, default=2, help="times the 47-photo list is repeated")
    p.add_argument("--rss", default="1000,20000", help="file counts for the peak-RSS rows (at most 20,000)")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--no-torchrun", action="store_true")
    args = p.parse_args()
    rss_counts = [int(x) for x in args.rss.split(",") if x]
    with Workdir(args.workdir, args.keep) as wd:
        if LOCAL_CIFAKE.is_dir():
            cifake = LOCAL_CIFAKE
        else:
            cifake = extract_cifake(wd, max(rss_counts + [2000]) // 2, args.cifake // 2)
        photos = LOCAL_PHOTOS if LOCAL_PHOTOS.is_dir() else (extract_photos(wd) if PHOTOS_TAR.exists() else None)
        run = Path(args.run) if args.run else wd / "run-cnn32"
        if not args.run:
            fakescope("train", "--model", "cnn32", "--data", cifake, "--out", run, "--epochs", 2, "--limit", 1000,
                      cache=wd / "cache")
        val = sorted(str(f) for c in ("ai", "nature") for f in (cifake / "val" / c).iterdir())
        val = val[: args.cifake]
        sets = {"cifake": val}
        if photos is not None:
            sets["real_photos"] = sorted(str(f) for f in photos.iterdir() if f.is_file()) * args.photo_repeats
        rows = []
        for name, files in sets.items():
            lst = write_list(wd / f"{name}.txt", files)
            n = len(files)
            rows.append({"data": name, "method": "decode-only (1 process, no model)", "files": n,
                         "wall images/s": round(decode_only(run, files), 1)})
            wall, rss, _ = timed([sys.executable, "-m", "fakescope", "predict", run, "--files-from", lst,
                                  "--format", "json"])
            rows.append({"data": name, "method": "predict --format json (current)", "files": n,
                         "wall images/s": round(n / wall, 1), "peak RSS MiB": round(rss)})
            variants = [("predict --out (1 process)", [sys.executable, "-m", "fakescope"], [])]
            if not args.no_torchrun:
                variants.append(("predict --out (torchrun, 2 ranks)",
                                 [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                  "2", "-m", "fakescope"], ["--device", "cpu"]))
            if not args.no_ray:
                variants.append((f"predict --out --engine ray (local, {len(os.sched_getaffinity(0))} CPUs)",
                                 [sys.executable, "-m", "fakescope"], ["--engine", "ray"]))
            for label, launcher, extra in variants:
                out = wd / f"out-{name}-{len(rows)}"
                wall, rss, r = timed([*launcher, "predict", run, "--files-from", lst, "--out", out,
                                      "--shard-size", args.shard_size, *extra])
                s = json.loads((out / "summary.json").read_text())
                assert s["files"] == n, (label, s)
                rows.append({"data": name, "method": label, "files": n, "wall images/s": round(n / wall, 1),
                             "job images/s": s["images_per_second"],
                             "peak RSS MiB": round(rss) if "1 process" in label else ""})
        train = sorted(str(f) for c in ("ai", "nature") for f in (cifake / "train" / c).iterdir())
        for k in rss_counts:
            files = train[:k]
            lst = write_list(wd / f"rss-{k}.txt", files)
            wall, rss, _ = timed([sys.executable, "-m", "fakescope", "predict", run, "--files-from", lst,
                                  "--out", wd / f"rss-out-{k}", "--shard-size", args.shard_size])
            rows.append({"data": f"cifake train[:{k}]", "method": "predict --out (1 process)", "files": len(files),
                         "wall images/s": round(len(files) / wall, 1), "peak RSS MiB": round(rss)})
            wall, rss, _ = timed([sys.executable, "-m", "fakescope", "predict", run, "--files-from", lst,
                                  "--format", "json"])
            rows.append({"data": f"cifake train[:{k}]", "method": "predict --format json (current)",
                         "files": len(files), "wall images/s": round(len(files) / wall, 1),
                         "peak RSS MiB": round(rss)})
        out_rss = [r["peak RSS MiB"] for r in rows if r["data"].startswith("cifake train") and "--out" in r["method"]]
        emit("bulk", rows, ["data", "method", "files", "wall images/s", "job images/s", "peak RSS MiB"],
             {"run": str(run), "shard_size": args.shard_size,
              "predict_out_rss_growth": round(out_rss[-1] / out_rss[0], 3) if len(out_rss) > 1 else None})


if __name__ == "__main__":
    main()
