"""(d) Peak memory (RSS) of ``fakescope evaluate`` on 1,000 versus 10,000 images.

A ``cnn32`` run (trained for one epoch on a few CIFAKE images) is evaluated on data roots of
``--small`` and ``--large`` CIFAKE images (hard links into one extracted folder), each in its own
process; the peak resident set of that process is read from ``wait4``. Evaluation streams
(decoded images are dropped batch by batch), so the peak should not grow with the number of
images beyond the per-image scores and file names. ``--degrade`` adds degradation levels
(scored in the same pass); ``--frozen`` also measures a frozen tf_efficientnet_lite0 run that
reads the memory-mapped feature cache (slow on a CPU: it runs the backbone on every image once).

    python benchmarks/bench_eval_memory.py                    # 1,000 vs 10,000
    python benchmarks/bench_eval_memory.py --small 500 --large 5000
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from _common import LITE0, Workdir, emit, env, extract_cifake, fakescope, need, parser


def peak_rss_mib(cmd: list[str], extra_env: dict) -> tuple[float, float]:
    """``(peak RSS in MiB, wall seconds)`` of ``cmd`` (the process itself, not its DataLoader workers)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env(**extra_env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, wall


def make_root(src, dest, n: int):
    """``dest/val/{ai,nature}`` with n/2 hard links each into ``src/train/{ai,nature}``."""
    for cls in ("ai", "nature"):
        files = sorted((src / "train" / cls).iterdir())[: n // 2]
        if len(files) < n // 2:
            sys.exit(f"only {len(files)} {cls} images extracted, need {n // 2}")
        (dest / "val" / cls).mkdir(parents=True, exist_ok=True)
        for f in files:
            os.link(f, dest / "val" / cls / f.name)
    return dest


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--small", type=int, default=1000)
    p.add_argument("--large", type=int, default=10_000, help="at most 20,000 (the CIFAKE train split)")
    p.add_argument("--degrade", default=None, help="e.g. jpeg:90,50 (scored in the same pass)")
    p.add_argument("--frozen", action="store_true", help="also a frozen tf_efficientnet_lite0 run (slow on CPU)")
    args = p.parse_args()
    with Workdir(args.workdir, args.keep) as wd:
        data = extract_cifake(wd, args.large // 2, 0)
        runs = {"cnn32": wd / "run-cnn32"}
        fakescope("train", "--model", "cnn32", "--data", data, "--out", runs["cnn32"], "--epochs", 1,
                  "--limit", 100, cache=wd / "cache")
        if args.frozen:
            need(LITE0)
            runs["tf_efficientnet_lite0 (frozen, cached)"] = wd / "run-lite0"
            fakescope("train", "--model", "timm:tf_efficientnet_lite0", "--pretrained-file", LITE0, "--data", data,
                      "--out", wd / "run-lite0", "--epochs", 1, "--limit", 50, cache=wd / "cache")
        roots = {n: make_root(data, wd / f"root-{n}", n) for n in (args.small, args.large)}
        rows = []
        for label, run in runs.items():
            peaks = {}
            for n, root in roots.items():
                cmd = [sys.executable, "-m", "fakescope", "evaluate", str(run), "--data", str(root),
                       "--out", str(wd / f"ev-{n}")]
                if args.degrade:
                    cmd += ["--degrade", args.degrade]
                peaks[n], wall = peak_rss_mib(cmd, {"FAKESCOPE_CACHE_DIR": wd / "cache"})
                rows.append({"model": label, "images": n, "peak_rss_mib": round(peaks[n], 1),
                             "wall_seconds": round(wall, 1)})
            rows[-1]["growth_mib"] = round(peaks[args.large] - peaks[args.small], 1)
            rows[-1]["growth_ratio"] = round(peaks[args.large] / peaks[args.small], 3)
        emit("eval_memory", rows, ["model", "images", "peak_rss_mib", "wall_seconds", "growth_mib", "growth_ratio"],
             {"degrade": args.degrade, "note": "peak RSS of the evaluate process (from wait4)"})


if __name__ == "__main__":
    main()
