"""(g) ``fakescope serve`` under load: requests/s, images/s, latency percentiles, errors and RSS,
against ``predict`` on the same images in the same run.

Two runs are trained on a few CIFAKE images (a ``cnn32`` and a frozen ``tf_efficientnet_lite0``
with the real ImageNet weights from ../shared). For each run and each image set (CIFAKE's 32x32
JPEGs, and the real photographs re-encoded as ~512 px JPEGs), a ``fakescope serve`` process is
started on a free loopback port, and this process (a second one) sends a bounded number of
requests (one raw JPEG each, or K files per multipart request with ``--images-per-request``) with
an async httpx client at concurrency 1, 8 and 32. Every cell
reports requests/s, images/s, p50/p95/p99 latency and errors; every server its RSS at the start and
the end; every image set ``predict_paths`` images/s (everything ``fakescope predict`` does after
start-up) on the same files, measured while the server is idle, and the largest difference between
the served P(ai) and predict's.

    python benchmarks/bench_serve.py                          # 2,000 requests per cell, 60 s cap
    python benchmarks/bench_serve.py --requests 500 --seconds 20
    python benchmarks/bench_serve.py --models cnn32 --images-per-request 1,8
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from _common import LITE0, Workdir, emit, env, extract_cifake, extract_photos, fakescope, like_the_cli, need, parser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


BOUNDARY = "fakescope-bench-boundary"


def request_bodies(files: list[Path], per_request: int) -> tuple[list[bytes], str]:
    """The request bodies, made once: one raw JPEG each (``per_request`` 1), or ``multipart/form-data``
    with ``per_request`` files each (a client that sends its images in groups)."""
    if per_request == 1:
        return [f.read_bytes() for f in files], "image/jpeg"
    bodies = []
    for s in range(0, len(files), per_request):
        group = (files[s:] + files)[:per_request]
        parts = [b"--" + BOUNDARY.encode() + b"\r\nContent-Disposition: form-data; name=\"file\"; filename=\""
                 + f.name.encode() + b"\"\r\nContent-Type: image/jpeg\r\n\r\n" + f.read_bytes() + b"\r\n"
                 for f in group]
        bodies.append(b"".join(parts) + b"--" + BOUNDARY.encode() + b"--\r\n")
    return bodies, f"multipart/form-data; boundary={BOUNDARY}"


async def load(url: str, bodies: list[bytes], concurrency: int, requests: int, seconds: float,
               content_type: str = "image/jpeg") -> dict:
    """``requests`` POSTs (bodies in turn) from ``concurrency`` connections, stopping after ``seconds``."""
    import httpx

    latencies: list[float] = []
    statuses: dict[int | str, int] = {}
    next_i = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        async def worker():
            nonlocal next_i
            while next_i < requests and time.perf_counter() < deadline:
                body = bodies[next_i % len(bodies)]
                next_i += 1
                t = time.perf_counter()
                try:
                    r = await client.post(url, content=body, headers={"content-type": content_type})
                    key: int | str = r.status_code
                except httpx.HTTPError as e:
                    key = type(e).__name__
                latencies.append(time.perf_counter() - t)
                statuses[key] = statuses.get(key, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    return {"requests": len(latencies), "seconds": wall, "ok": ok, "statuses": statuses,
            "latencies": latencies}


def start_server(run: Path, log: Path, max_batch: int, max_wait_ms: float) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fakescope", "serve", str(run), "--port", str(port),
                             "--no-access-log", "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env(), cwd=log.parent)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            sys.exit(f"fakescope serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    sys.exit(f"fakescope serve never became ready:\n{log.read_text()[-3000:]}")


def served_p_ai(url: str, files: list[Path]) -> dict[str, float]:
    import httpx

    out = {}
    for s in range(0, len(files), 32):
        part = files[s:s + 32]
        r = httpx.post(f"{url}/v1/predict", files=[("file", (str(f), f.read_bytes(), "image/jpeg")) for f in part],
                       timeout=120)
        r.raise_for_status()
        out.update({row["filename"]: row["p_ai"] for row in r.json()["results"]})
    return out


def main() -> None:
    like_the_cli()
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000, help="requests per cell (bounded)")
    p.add_argument("--seconds", type=float, default=60, help="time cap per cell")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--cifake-images", type=int, default=256, help="distinct 32x32 JPEGs")
    p.add_argument("--photo-copies", type=int, default=4, help="copies of the 47 photos at ~512 px")
    p.add_argument("--models", default="cnn32,lite0")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5)
    p.add_argument("--images-per-request", default="1",
                   help="comma-separated: images per request (1 = a raw JPEG body; K > 1 = multipart with K files)")
    args = p.parse_args()
    need(LITE0)
    from PIL import Image

    from fakescope.engine.evaluation import predict_paths

    levels = [int(c) for c in args.concurrency.split(",")]
    per_request = [int(k) for k in args.images_per_request.split(",")]
    with Workdir(args.workdir, args.keep) as wd:
        data = extract_cifake(wd, 100, args.cifake_images // 2)
        small = sorted((data / "val").rglob("*.jpg"))[: args.cifake_images]
        photos, big_dir = extract_photos(wd), wd / "photos512"
        big_dir.mkdir(exist_ok=True)
        big = []
        for f in sorted(photos.iterdir()):
            im = Image.open(f).convert("RGB")
            im.thumbnail((512, 512), Image.BILINEAR)  # longer side 512
            for k in range(args.photo_copies):  # distinct bytes per copy (quality), same size
                out = big_dir / f"{f.stem}-{k}.jpg"
                im.save(out, quality=90 - k)
                big.append(out)
        sets = {"32x32 JPEG": small, "~512px JPEG": big}
        runs = {}
        if "cnn32" in args.models:
            runs["cnn32"] = wd / "cnn32"
            fakescope("train", "--model", "cnn32", "--data", data, "--out", runs["cnn32"], "--epochs", 2)
        if "lite0" in args.models:
            runs["lite0 (frozen)"] = wd / "lite0"
            fakescope("train", "--model", "timm:tf_efficientnet_lite0", "--pretrained-file", LITE0, "--freeze",
                      "--data", data, "--out", runs["lite0 (frozen)"], "--epochs", 1, cache=wd / "cache")
        rows, servers = [], []
        for model, run in runs.items():
            for set_name, files in sets.items():
                predict_paths(run, [str(f) for f in files[:32]])  # warm-up
                t = time.perf_counter()
                ref = predict_paths(run, [str(f) for f in files])
                predict_rate = len(files) / (time.perf_counter() - t)
                proc, url = start_server(run, wd / f"serve-{run.name}-{len(files)}.log", args.max_batch,
                                         args.max_wait_ms)
                try:
                    served = served_p_ai(url, files)
                    diff = max(abs(served[r["path"]] - r["p_ai"]) for r in ref)
                    rss0 = rss_mib(proc.pid)
                    for c, k in [(c, k) for k in per_request for c in levels]:
                        bodies, ctype = request_bodies(files, k)
                        res = asyncio.run(load(f"{url}/v1/predict", bodies, c, args.requests, args.seconds, ctype))
                        lat = [x * 1000 for x in res["latencies"]]
                        fails = sum(n for k, n in res["statuses"].items() if not (isinstance(k, int) and k < 500))
                        rows.append({"model": model, "images": set_name, "per_request": k, "concurrency": c,
                                     "requests": res["requests"], "req_per_s": round(res["requests"] / res["seconds"],
                                                                                      1),
                                     "images_per_s": round(res["ok"] * k / res["seconds"], 1),
                                     "p50_ms": round(percentile(lat, 50), 1), "p95_ms": round(percentile(lat, 95), 1),
                                     "p99_ms": round(percentile(lat, 99), 1),
                                     "errors": res["requests"] - res["ok"], "non_4xx_failures": fails,
                                     "predict_images_per_s": round(predict_rate, 1),
                                     "ratio": round(res["ok"] * k / res["seconds"] / predict_rate, 3)})
                        print(rows[-1], flush=True)
                    rss1 = rss_mib(proc.pid)
                finally:
                    proc.terminate()
                    proc.wait(30)
                servers.append({"model": model, "images": set_name, "rss_start_mib": round(rss0, 1),
                                "rss_end_mib": round(rss1, 1), "rss_growth": round(rss1 / rss0 - 1, 3),
                                "max_abs_p_ai_diff_vs_predict": diff})
        print()
        for s in servers:
            print(s)
        c8 = [r for r in rows if r["concurrency"] == 8]
        emit("serve", rows, ["model", "images", "per_request", "concurrency", "requests", "req_per_s", "images_per_s",
                             "p50_ms", "p95_ms", "p99_ms", "errors", "non_4xx_failures", "predict_images_per_s",
                             "ratio"],
             {"servers": servers,
              "targets": "0 errors, RSS growth < 10 %, concurrency 8 images/s >= 0.7x predict",
              "met": {"errors": all(r["errors"] == 0 for r in rows),
                      "rss": all(s["rss_growth"] < 0.10 for s in servers),
                      "ratio_c8": {f"{r['model']} / {r['images']} / {r['per_request']} per request": r["ratio"] >= 0.7
                                   for r in c8}},
              "requests_cap": args.requests, "seconds_cap": args.seconds, "cores": os.cpu_count()})


if __name__ == "__main__":
    main()
