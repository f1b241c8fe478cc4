"""Helpers shared by the benchmark scripts: data from ../shared, timing, tables, JSON lines.

Benchmarks are scripts, not tests: each measures its figures side by side in one run and prints
a short table and one JSON line (``BENCH {...}``). Data comes from ``../shared`` (relative to the
repository root, or ``$FAKESCOPE_SHARED``) and is extracted into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FAKESCOPE_PROGRESS", "0")
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FAKESCOPE_SHARED", REPO.parent / "shared"))
CIFAKE_TAR = SHARED / "data" / "cifake_sdv14.tar"
PHOTOS_TAR = SHARED / "data" / "real_photos_misc.tar"
LITE0 = SHARED / "weights" / "tf_efficientnet_lite0_imagenet.safetensors"


def like_the_cli() -> None:
    """Re-execute this script with the OpenMP wait policy the ``fakescope`` command sets for itself
    (``OMP_WAIT_POLICY=PASSIVE`` unless the user chose one); it must be set before torch is loaded,
    so in-process measurements see the threads the CLI would."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})


def need(path: Path) -> Path:
    if not path.exists():
        sys.exit(f"{path} is absent: the benchmarks read their data from ../shared (or $FAKESCOPE_SHARED)")
    return path


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workdir", default=None, help="where to extract data and write runs (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p


class Workdir:
    def __init__(self, path: str | None, keep: bool) -> None:
        self.keep = keep or path is not None
        self.path = Path(path) if path else Path(tempfile.mkdtemp(prefix="fakescope-bench-"))
        self.path.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)


def extract_cifake(dest: Path, train_per_class: int, val_per_class: int) -> Path:
    """The first N members of each CIFAKE class folder, as ``dest/cifake_sdv14/{train,val}/{ai,nature}``."""
    want = {("train", "ai"): train_per_class, ("train", "nature"): train_per_class,
            ("val", "ai"): val_per_class, ("val", "nature"): val_per_class}
    got = dict.fromkeys(want, 0)
    with tarfile.open(need(CIFAKE_TAR)) as tar:
        for m in tar:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) < 4:
                continue
            key = (parts[-3], parts[-2])
            if key in want and got[key] < want[key]:
                tar.extract(m, dest, filter="data")
                got[key] += 1
            if got == want:
                break
    return dest / "cifake_sdv14"


def extract_photos(dest: Path) -> Path:
    with tarfile.open(need(PHOTOS_TAR)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "real_photos"


def env(**extra) -> dict:
    e = {**os.environ, "FAKESCOPE_PROGRESS": "0"}
    e.update({k: str(v) for k, v in extra.items()})
    return e


def fakescope(*args, cache: Path | None = None, check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    """Run the CLI in a fresh process; ``(wall seconds, completed process)``."""
    cmd = [sys.executable, "-m", "fakescope", *map(str, args)]
    extra = {"FAKESCOPE_CACHE_DIR": cache} if cache else {}
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env(**extra), capture_output=True, text=True)
    wall = time.perf_counter() - t
    if check and r.returncode != 0:
        sys.exit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return wall, r


def machine() -> dict:
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity") else os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def emit(name: str, rows: list[dict], columns: list[str], summary: dict) -> None:
    print(table(rows, columns))
    print()
    for k, v in summary.items():
        print(f"{k}: {v}")
    print("BENCH " + json.dumps({"benchmark": name, "machine": machine(), "rows": rows, **summary}, default=str))


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def seconds(fn, device) -> float:
    """Wall seconds of ``fn()`` on ``device``, waiting for queued CUDA work before and after."""
    import torch

    sync = torch.cuda.synchronize if getattr(device, "type", str(device)) == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t
