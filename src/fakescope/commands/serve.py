"""``fakescope serve``: an HTTP API and a web page over trained runs (the library is :mod:`fakescope.serve`)."""

from __future__ import annotations

import argparse
import os
import re

from fakescope.commands import args as a

API_KEY_ENV = "FAKESCOPE_API_KEY"
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def size(s: str) -> int:
    """A byte count: ``20MB``, ``512KiB``, ``1048576``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", s)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 20MB, 512KiB or 1048576 (bytes), got {s!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def _nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s}")
    return v


def _port(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = -1
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port in [0, 65535], got {s!r}")
    return v


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve", help="serve runs over HTTP: JSON API, web page, OpenAPI docs",
        description="Serve one or more runs: POST /v1/predict, GET /v1/models, /health, /ready, /docs and a "
                    "web page at /. The first run is the default model; ?model=NAME (the run folder's name) "
                    "picks another. Binds to 127.0.0.1: put a reverse proxy in front to expose it.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--threshold", type=a.threshold, default=None,
                   help="verdict threshold on P(ai) (default: each run's calibrated one, else 0.5)")
    p.add_argument("--uncalibrated", action="store_true", help="raw p_ai and threshold 0.5, ignoring calibration.json")
    p.add_argument("--no-provenance", action="store_true", help="do not report the uploads' provenance metadata")
    p.add_argument("--max-batch", type=a.positive_int, default=32, help="most images in one forward pass")
    p.add_argument("--max-wait-ms", type=_nonneg_float, default=10.0,
                   help="longest wait for more images before a forward pass starts")
    p.add_argument("--max-queue", type=a.positive_int, default=256,
                   help="most requests in progress (being read, decoded, waiting or scored, whatever their "
                        "number of images); a request beyond it gets 429 with Retry-After")
    p.add_argument("--workers", type=a.positive_int, default=1, help="server processes (each loads the models)")
    p.add_argument("--api-key", default=None,
                   help=f"require this key (Authorization: Bearer KEY or X-API-Key); default: ${API_KEY_ENV}")
    p.add_argument("--max-file-size", type=size, default=20 * 10**6, help="largest image (default 20MB)")
    p.add_argument("--max-files", type=a.positive_int, default=64, help="most images in one request")
    p.add_argument("--max-pixels", type=a.positive_int, default=None,
                   help="refuse images with more pixels than this (decompression-bomb guard; default 120M)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 + channels_last where the processor supports it, as predict")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"],
                   help="onnxruntime: score with each run's ONNX export, RUN/model.onnx (see `fakescope export`)")
    p.add_argument("--root-path", default="", help="URL prefix when a reverse proxy serves this under a sub-path")
    p.add_argument("--forwarded-allow-ips", default="127.0.0.1",
                   help="proxies whose X-Forwarded-* headers are trusted (comma-separated, or *)")
    p.add_argument("--no-access-log", action="store_true", help="do not log every request")
    a.add_geometry(p, "override every run's test-time geometry")
    return p


def run(args) -> int:
    import uvicorn

    from fakescope.serve.app import CONFIG_ENV, ServeOptions, config_env, create_app

    api_key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    options = ServeOptions(threshold=args.threshold, uncalibrated=args.uncalibrated,
                           provenance=not args.no_provenance, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                           max_queue=args.max_queue, max_file_size=args.max_file_size, max_files=args.max_files,
                           max_pixels=args.max_pixels, api_key=api_key, device=args.device,
                           precision=args.precision, backend=args.backend, test_geometry=args.test_geometry)
    common = dict(host=args.host, port=args.port, root_path=args.root_path, proxy_headers=True,
                  forwarded_allow_ips=args.forwarded_allow_ips, access_log=not args.no_access_log,
                  timeout_graceful_shutdown=10, log_level="info")
    if args.workers > 1:  # each worker process builds its own app from the environment
        create_app(args.runs, ServeOptions(**{**options.__dict__, "warmup": False}))  # fail fast on a bad run
        os.environ[CONFIG_ENV] = config_env(args.runs, options)
        uvicorn.run("fakescope.serve.app:app_from_env", factory=True, workers=args.workers, **common)
        return 0
    app = create_app(args.runs, options)
    names = ", ".join(app.state.fakescope.models)
    auth = "API key required" if api_key else "no API key"
    print(f"fakescope serve: {names} at http://{args.host}:{args.port}{args.root_path}/ ({auth})", flush=True)
    uvicorn.run(app, **common)
    return 0
