"""The HTTP API and web page of ``fakescope serve``: a FastAPI application over one or more runs.

* ``POST /v1/predict``: images as ``multipart/form-data`` (field ``file``, repeatable) or one raw
  ``image/*`` body; P(ai) per image, exactly as ``fakescope predict`` computes it (the same reader,
  native-size preprocessing, precision and memory format, see :class:`~fakescope.engine.predictor.Predictor`).
* ``GET /v1/models``, ``GET /health``, ``GET /ready``, ``GET /openapi.json``, ``GET /docs`` (offline
  Swagger UI: its assets are served from this process), ``GET /`` (the web page).

Uploads are read as they stream in, with the size limits checked on the way, kept in memory and
never written to disk. Images are decoded in a small thread pool, and concurrent requests share
forward passes through a :class:`~fakescope.serve.batcher.Batcher` per model, which runs them in
one inference thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Security
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from fakescope import __version__
from fakescope.calibration import calibrate_p_ai, resolve_decision
from fakescope.data.io import describe_bytes, sniff_format
from fakescope.engine.evaluation import attribution_fields, verdict
from fakescope.engine.predictor import Predictor
from fakescope.errors import FakescopeError, ImageReadError
from fakescope.options import RuntimeOptions
from fakescope.provenance import inspect_bytes
from fakescope.runfiles import read_train_metrics
from fakescope.serve.batcher import Batcher, QueueFull
from fakescope.serve.errors import ApiError, error_response, install_handlers
from fakescope.serve.uploads import read_uploads

log = logging.getLogger("fakescope.serve")

CONFIG_ENV = "FAKESCOPE_SERVE_CONFIG"
"""Environment variable through which ``--workers N`` hands the configuration to each worker process."""
INLINE_DECODE_BYTES = 16 * 1024
"""Uploads up to this size (a thumbnail, a 32x32 image: well under a millisecond to decode) are decoded
on the event loop; larger ones in the decoding threads."""
RETRY_AFTER_BUSY = "1"
RETRY_AFTER_LOADING = "5"
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self' 'unsafe-inline'; connect-src 'self'; base-uri 'none'; frame-ancestors 'none'")
"""The page and the docs load nothing from elsewhere; the browser is told to refuse it too."""


@dataclass
class ServeOptions:
    """Limits and settings of a server (the ``fakescope serve`` options)."""

    threshold: float | None = None   # None: each run's calibrated threshold (calibration.json), else 0.5
    uncalibrated: bool = False       # raw p_ai even for a calibrated run
    provenance: bool = True          # report each upload's provenance metadata (never changes p_ai)
    max_batch: int = 32
    max_wait_ms: float = 10.0
    max_queue: int = 256            # most requests in progress (read, decoded, waiting or scored); then 429
    max_file_size: int = 20 * 10**6
    max_files: int = 64
    max_pixels: int | None = None
    api_key: str | None = None
    device: str = "auto"
    precision: str = "auto"
    decode_threads: int | None = None
    warmup: bool = True
    backend: str = "torch"           # or "onnxruntime": each run's ONNX export, RUN/model.onnx
    test_geometry: str | None = None
    """Overrides every run's test-time geometry (None: each run's own)."""

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise FakescopeError(f"expected a threshold in [0, 1], got {self.threshold}")
        for name in ("max_batch", "max_queue", "max_file_size", "max_files"):
            if getattr(self, name) < 1:
                raise FakescopeError(f"expected {name} >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise FakescopeError(f"expected max_wait_ms >= 0, got {self.max_wait_ms}")
        self.runtime  # noqa: B018 - device, precision and the image limits are checked when the options are made

    @property
    def runtime(self) -> RuntimeOptions:
        """The scoring runtime of every served run: device, precision and the reader's limits (the
        upload limit ``max_file_size`` is also the decoder's)."""
        return RuntimeOptions(device=self.device, precision=self.precision, max_pixels=self.max_pixels,
                              max_file_size=self.max_file_size)


# --- response schemas (for /openapi.json and /docs) -----------------------------------------------

class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class PredictResult(BaseModel):
    filename: str
    p_ai: float | None
    verdict: str | None
    width: int | None
    height: int | None
    format: str | None
    error: ErrorBody | None
    provenance: dict[str, Any] | None = None
    generator: str | None = Field(None, description="attribution runs: the most probable class (nature included)")
    generator_p: float | None = Field(None, description="attribution runs: its probability")
    top3: list[tuple[str, float]] | None = Field(None, description="attribution runs: the three most probable "
                                                 "[class, probability]")


class PredictResponse(BaseModel):
    model: str
    threshold: float
    threshold_source: str
    calibrated: bool
    results: list[PredictResult]


class ModelInfo(BaseModel):
    name: str
    default: bool
    model: str
    options: dict[str, Any]
    input_size: int
    native_size: int | None
    threshold: float
    threshold_source: str
    calibrated: bool
    backend: str
    precision: str
    device: str
    data: dict[str, Any]
    validation: dict[str, Any] | None
    best_epoch: int | None
    test_geometry: str
    classes: list[str] | None = Field(None, description="attribution runs: the classes, nature first")
    guarantee: dict[str, Any] | None = Field(
        None, description="at the run's calibrated threshold: its false-positive promise and figures (target_fpr, "
                          "confidence, n_real, fpr_empirical, fpr_upper_bound, tpr, tpr_interval, promise, statement)")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


def _errors(*statuses: int) -> dict:
    text = {400: "malformed request", 401: "missing or wrong API key", 404: "unknown model",
            413: "file or request too large", 415: "not an image", 422: "image rejected by the reader",
            429: "queue full (Retry-After)", 503: "models not loaded yet (Retry-After)"}
    return {s: {"model": ErrorResponse, "description": text[s]} for s in statuses}


PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                 "description": "one or more images (repeat the field)"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}, "description": "one raw image"}}}}


# --- the served runs ------------------------------------------------------------------------------

class ServedModel:
    """One run: its predictor, its batcher and what ``/v1/models`` says about it."""

    def __init__(self, run_dir: str | os.PathLike, options: ServeOptions, runtime_options: RuntimeOptions,
                 executor: ThreadPoolExecutor) -> None:
        self.name = Path(run_dir).resolve().name
        self.predictor = Predictor(run_dir, runtime_options, geometry=options.test_geometry, backend=options.backend)
        # calibrated p_ai and the run's threshold unless told otherwise (fakescope.calibration)
        self.decision = resolve_decision(run_dir, options.threshold, options.uncalibrated)
        self.buckets = sorted({min(2**k, options.max_batch) for k in range(options.max_batch.bit_length() + 1)})
        self.batcher = Batcher(self.score, executor, max_batch=options.max_batch,
                               max_wait_ms=options.max_wait_ms,
                               max_queue=options.max_queue * options.max_files)  # what max_queue requests can hold
        self.info = self._describe(Path(run_dir), options)

    def _describe(self, run_dir: Path, options: ServeOptions) -> dict:
        cfg = self.predictor.config
        metrics = read_train_metrics(run_dir) or {}
        data = {k: v for k, v in (cfg.get("data") or {}).items() if k != "root"}  # no server paths
        data["jpeg_align"] = self.predictor.pipeline.jpeg_align
        return {"name": self.name, "default": False, "model": cfg["model"]["name"],
                "options": cfg["model"].get("options") or {}, "input_size": self.predictor.pipeline.input_size,
                "native_size": self.predictor.pipeline.native_size, "max_side": self.predictor.pipeline.max_side,
                "threshold": self.decision.threshold,
                "threshold_source": self.decision.source, "calibrated": self.decision.calibrated,
                "guarantee": self.decision.guarantee(),
                "test_geometry": self.predictor.pipeline.geometry, "classes": self.predictor.classes,
                "backend": options.backend, "precision": self.predictor.precision.name,
                "device": str(self.predictor.device), "data": data,
                "validation": metrics.get("validation"), "best_epoch": metrics.get("best_epoch")}

    def score(self, stages: list[torch.Tensor]) -> list[tuple[float, dict]]:
        """``(P(ai), attribution fields)`` per image of a batch (the fields are empty unless the run is an
        attribution run: see :func:`~fakescope.engine.evaluation.attribution_fields`). The batch is
        padded with blank images to the next of a few sizes (powers of two up to ``max_batch``): the
        backends keep kernels and buffers per input shape, so a handful of shapes, all made at
        warm-up, keep the memory flat however the requests arrive."""
        n = len(stages)
        size = next(b for b in self.buckets if b >= n)
        if size > n:
            stages = stages + [torch.zeros_like(stages[0])] * (size - n)
        scores = self.predictor.scores(stages)[:n]
        p = calibrate_p_ai(scores[:, 0], self.decision.calibration).tolist()
        classes = self.predictor.classes
        if not classes:
            return [(v, {}) for v in p]
        return [(v, attribution_fields(row[1:], classes) if np.isfinite(row).all() else {})
                for v, row in zip(p, scores)]

    def warm_up(self, max_batch: int) -> None:
        stage = torch.zeros(self.predictor.stage_shape, dtype=torch.uint8)
        for n in self.buckets:
            self.score([stage] * n)


class ServerState:
    def __init__(self, runs: list[str | os.PathLike], options: ServeOptions) -> None:
        if not runs:
            raise FakescopeError("expected at least one run directory to serve, got none")
        self.options = options
        self.inference = ThreadPoolExecutor(1, thread_name_prefix="fakescope-infer")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.decoders = ThreadPoolExecutor(options.decode_threads or max(1, min(4, cores)),
                                           thread_name_prefix="fakescope-decode")
        self.models: dict[str, ServedModel] = {}
        self.runtime = options.runtime  # built once, for every run
        for run in runs:
            m = ServedModel(run, options, self.runtime, self.inference)
            if m.name in self.models:
                raise FakescopeError(f"expected run directories with distinct names (the model name is the "
                                     f"folder name), got {m.name!r} twice: rename or copy one")
            self.models[m.name] = m
        self.default = next(iter(self.models))
        self.models[self.default].info["default"] = True
        self.ready = False
        self.in_flight = 0

    def pick(self, name: str | None) -> ServedModel:
        if name is None or name == "":
            return self.models[self.default]
        if name not in self.models:
            raise ApiError(404, "not_found", f"unknown model {name!r}; served: {', '.join(self.models)}")
        return self.models[name]

    async def start(self) -> None:
        for m in self.models.values():
            m.batcher.start()
        if self.options.warmup:
            loop = asyncio.get_running_loop()
            for m in self.models.values():
                await loop.run_in_executor(self.inference, m.warm_up, self.options.max_batch)
        self.ready = True
        log.info("fakescope serve ready: %s", ", ".join(self.models))

    async def stop(self) -> None:
        self.ready = False
        for m in self.models.values():
            await m.batcher.stop()
        self.inference.shutdown(wait=False, cancel_futures=True)
        self.decoders.shutdown(wait=False, cancel_futures=True)


def _decode(model: ServedModel, data: bytes, name: str, provenance: bool = False):
    """``(row fields, stage image or None)`` for one upload: the format is sniffed from the bytes; with
    ``provenance`` the row carries the file's own metadata evidence (it never changes ``p_ai``)."""
    row: dict[str, Any] = {"filename": name, "p_ai": None, "verdict": None, "width": None, "height": None,
                           "format": None, "error": None}
    if provenance and data:

        row["provenance"] = inspect_bytes(data, name)
    if data:
        row["format"] = sniff_format(data[:16])
        if row["format"] is None:

            row["error"] = {"code": "unsupported_media_type", "message": describe_bytes(data[:2048])}
            return row, None
    try:
        decoded, stage = model.predictor.decode(data, name)
    except ImageReadError as e:
        row["error"] = {"code": "unreadable_image", "message": e.reason}
        return row, None
    row.update(format=decoded.format, width=decoded.width, height=decoded.height)
    return row, stage


# --- the application ------------------------------------------------------------------------------
#
# The routes are module-level functions on three routers; the one piece of state they share, the
# :class:`ServerState` that create_app builds (runs, batchers, limits), is ``app.state.fakescope``
# and reaches them through the :func:`server_state` dependency.

bearer = HTTPBearer(auto_error=False, description="the server's API key as a bearer token")
header_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="the server's API key")


def server_state(request: Request) -> ServerState:
    """The :class:`ServerState` of the application serving ``request`` (a FastAPI dependency)."""
    return request.app.state.fakescope


async def require_key(state: ServerState = Depends(server_state),
                      credentials: HTTPAuthorizationCredentials | None = Security(bearer),
                      key: str | None = Security(header_key)) -> None:
    """Refuses a request without the server's API key (when it has one): ``Authorization: Bearer KEY``
    or ``X-API-Key: KEY``, compared in constant time."""
    api_key = state.options.api_key
    if api_key is None:
        return
    given = key if key is not None else (credentials.credentials if credentials is not None else None)
    if given is None:
        raise ApiError(401, "unauthorized", "this server needs an API key: send 'Authorization: Bearer KEY' "
                       "or 'X-API-Key: KEY'", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.encode("utf-8", "replace"), api_key.encode("utf-8")):
        raise ApiError(401, "unauthorized", "wrong API key", headers={"WWW-Authenticate": "Bearer"})


status_routes = APIRouter(tags=["status"])
v1_routes = APIRouter(prefix="/v1", tags=["v1"], dependencies=[Depends(require_key)])
page_routes = APIRouter(include_in_schema=False)


@status_routes.get("/health", summary="The process is up")
async def health() -> dict:
    return {"status": "ok", "version": __version__}


@status_routes.get("/ready", summary="Models loaded and warmed up",
                   responses={503: {"model": ErrorResponse, "description": "still loading (Retry-After)"}})
async def ready(state: ServerState = Depends(server_state)):
    if not state.ready:
        return error_response(503, "not_ready", "the models are loading or warming up",
                              {"Retry-After": RETRY_AFTER_LOADING})
    return {"status": "ready", "models": list(state.models)}


@v1_routes.get("/models", response_model=ModelsResponse, summary="The served runs", responses=_errors(401))
async def models(state: ServerState = Depends(server_state)) -> dict:
    return {"models": [m.info for m in state.models.values()]}


@v1_routes.post("/predict", response_model=PredictResponse, summary="P(ai) for one or more images",
                openapi_extra=PREDICT_BODY, responses=_errors(400, 401, 404, 413, 415, 422, 429, 503))
async def predict(request: Request,
                  model: str | None = Query(None, description="a served model name (default: the first run)"),
                  threshold: float | None = Query(None, ge=0, le=1,
                                                  description="verdict threshold (default: the server's)"),
                  state: ServerState = Depends(server_state)):
    served = state.pick(model)
    if not state.ready:
        raise ApiError(503, "not_ready", "the models are loading or warming up: retry shortly",
                       headers={"Retry-After": RETRY_AFTER_LOADING})
    if state.in_flight >= state.options.max_queue:
        raise ApiError(429, "queue_full", f"too many requests in progress ({state.in_flight}): retry shortly",
                       headers={"Retry-After": RETRY_AFTER_BUSY})
    state.in_flight += 1
    try:
        return await _predict(request, state, served, threshold)
    finally:
        state.in_flight -= 1


async def _predict(request: Request, state: ServerState, served: ServedModel, threshold: float | None):
    """One admitted request: read and decode its uploads, score the readable ones, answer."""
    # a ?threshold applies to the served scores (calibrated when the run is); else the model's own
    source = served.decision.source if threshold is None else "?threshold"
    threshold = served.decision.threshold if threshold is None else threshold
    options = state.options
    with served.batcher.expect() as expectation:  # a forward pass may wait for this request's images
        uploads = await read_uploads(request.headers, request.stream(), max_file_size=options.max_file_size,
                                     max_files=options.max_files)
        decoded = await _decode_uploads(state, served, uploads)
        rows = [row for row, _ in decoded]
        await _score_rows(served, decoded, expectation, threshold)
    body = {"model": served.name, "threshold": threshold, "threshold_source": source,
            "calibrated": served.decision.calibrated, "results": rows}
    return _predict_response(body)


async def _decode_uploads(state: ServerState, served: ServedModel, uploads: list) -> list[tuple[dict, Any]]:
    """:func:`_decode` of every upload: on the event loop when they are tiny (a thread hop costs more),
    else in the decoding threads."""
    provenance = state.options.provenance
    if sum(len(u.data) for u in uploads) <= INLINE_DECODE_BYTES:
        return [_decode(served, u.data, u.filename, provenance) for u in uploads]
    loop = asyncio.get_running_loop()
    return list(await asyncio.gather(*(loop.run_in_executor(state.decoders, _decode, served, u.data, u.filename,
                                                            provenance) for u in uploads)))


async def _score_rows(served: ServedModel, decoded: list[tuple[dict, Any]], expectation, threshold: float) -> None:
    """Scores the decoded images through the model's batcher and fills in their rows (in place)."""
    good = [i for i, (_, stage) in enumerate(decoded) if stage is not None]
    if not good:
        return
    try:
        scores = await served.batcher.submit([decoded[i][1] for i in good], expectation)
    except QueueFull as e:
        raise ApiError(429, "queue_full", str(e), headers={"Retry-After": RETRY_AFTER_BUSY}) from None
    for i, (p, attribution) in zip(good, scores):
        row = decoded[i][0]
        if math.isfinite(p):
            row.update(verdict(p, threshold), **attribution)
        else:  # a model that returns NaN/inf for this input: an error row, never NaN in JSON
            row["error"] = {"code": "nonfinite_score", "message": f"the model returned a non-finite score ({p})"}


def _predict_response(body: dict):
    """200 when at least one file was scored; else 415 (none was an image) or 422, the rows attached."""
    rows = body["results"]
    if any(r["p_ai"] is not None for r in rows):
        return JSONResponse(body)
    codes = {r["error"]["code"] for r in rows}
    status = 415 if codes == {"unsupported_media_type"} else 422
    first = rows[0]["error"]["message"]
    message = (f"{rows[0]['filename']}: {first}" if len(rows) == 1
               else f"none of the {len(rows)} files could be scored (first: {rows[0]['filename']}: {first})")
    code = "unsupported_media_type" if status == 415 else "unreadable_image"
    return error_response(status, code, message, extra=body)


HTML_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


@functools.cache
def page_html() -> str:
    """The web page (``page.html``), read once."""
    return resources.files("fakescope.serve").joinpath("page.html").read_text(encoding="utf-8")


@page_routes.get("/")
async def index() -> HTMLResponse:
    return HTMLResponse(page_html(), headers=HTML_HEADERS)


@page_routes.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    html = get_swagger_ui_html(openapi_url=f"{root}{request.app.openapi_url}", title="fakescope API",
                               swagger_js_url=f"{root}/docs-assets/swagger-ui-bundle.js",
                               swagger_css_url=f"{root}/docs-assets/swagger-ui.css",
                               swagger_favicon_url=f"{root}/docs-assets/favicon.png",
                               swagger_ui_parameters={"validatorUrl": None, "tryItOutEnabled": True})
    return HTMLResponse(html.body, headers=HTML_HEADERS)


def _mount_docs_assets(app: FastAPI) -> None:
    """Swagger UI's JavaScript and CSS, shipped by ``fastapi_offline``: /docs works without a CDN."""
    import fastapi_offline
    from fastapi.staticfiles import StaticFiles

    assets = Path(fastapi_offline.__file__).parent / "static"
    app.mount("/docs-assets", StaticFiles(directory=str(assets)), name="docs-assets")


@asynccontextmanager
async def _lifespan(app: FastAPI):
    state: ServerState = app.state.fakescope
    task = asyncio.create_task(state.start())  # /health answers while the models warm up
    try:
        yield
    finally:
        task.cancel()
        await state.stop()


def create_app(runs: list[str | os.PathLike], options: ServeOptions | None = None) -> FastAPI:
    """The FastAPI application serving ``runs`` (the first is the default model). Loads the runs now
    (a bad run directory raises :class:`FakescopeError`); the warm-up forward runs at start-up."""
    state = ServerState(runs, options or ServeOptions())
    page_html()  # a broken installation fails here, not on the first visit
    app = FastAPI(title="fakescope", version=__version__, lifespan=_lifespan, docs_url=None, redoc_url=None,
                  description="Detect AI-generated images with trained fakescope runs.")
    app.state.fakescope = state
    install_handlers(app)
    for router in (status_routes, v1_routes, page_routes):
        app.include_router(router)
    _mount_docs_assets(app)
    return app


def app_from_env() -> FastAPI:
    """Application factory for ``uvicorn --factory`` (``--workers N``): the configuration comes from
    :data:`CONFIG_ENV` (JSON ``{"runs": [...], "options": {...}}``)."""
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise FakescopeError(f"expected the {CONFIG_ENV} environment variable (set by `fakescope serve`)")
    cfg = json.loads(raw)
    return create_app(cfg["runs"], ServeOptions(**cfg["options"]))


def config_env(runs: list[str], options: ServeOptions) -> str:
    return json.dumps({"runs": [str(Path(r).resolve()) for r in runs], "options": asdict(options)})
