"""``predict --out DIR --engine ray``: the same job as :mod:`fakescope.engine.bulk` as a Ray Data pipeline.

The driver reads the input list as a stream (:func:`fakescope.engine.bulk.iter_inputs`), skips the
shards already complete, and feeds the pending ones, up to :data:`WINDOW_ROWS` inputs at a time, to a
Ray Data pipeline: CPU tasks decode each file with fakescope's reader and bring it to the run's stage
image (:func:`fakescope.engine.bulk.decode_input`), a pool of actors each holding the model once scores
the stage images (:class:`Scorer`, GPU actors with ``gpus_per_actor``), and the driver writes the rows
(Ray returns them in input order) into the same Parquet shards as the torch engine. Ray is imported
only here, and only when this engine runs: fakescope works without it (``pip install 'fakescope[ray]'``).

:class:`Scorer` is also the entry point for users' own Ray pipelines: a callable class for
``Dataset.map_batches`` that scores a batch of decoded images (``image``: RGB ``uint8`` arrays
``[H, W, 3]``, e.g. from ``ray.data.read_images(mode="RGB")``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from fakescope.calibration import resolve_decision
from fakescope.data.dataset import available_cores
from fakescope.data.io import from_array
from fakescope.engine.bulk_rows import KillHook, Scoring, decode_input, empty_row
from fakescope.engine.infer import default_batch_size
from fakescope.engine.predictor import Predictor
from fakescope.errors import FakescopeError
from fakescope.options import RuntimeOptions
from fakescope.progress import _enabled

WINDOW_ROWS = 1_000_000
"""Inputs handed to one Ray Data execution (its actors load the model once per window)."""
_NULL_INT = -1
_TEXT = ("format", "error", "generator_hint", "verdict", "threshold_source", "generator")


def import_ray():
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise FakescopeError(f"expected Ray for --engine ray, got {e}: install it with pip install 'fakescope[ray]'") \
            from None
    return ray


def decode_batch(batch: dict, *, pipeline, stage_shape: tuple[int, ...], max_pixels: int,
                 max_file_size: int | None, provenance: bool) -> dict:
    """Ray Data CPU task: ``{"shard", "pos", "path"}`` -> the same plus ``stage`` (``uint8``, zeros for a
    bad file) and the file's fields (:func:`~fakescope.engine.bulk.decode_input`; -1 and "" stand for none)."""
    torch.set_num_threads(1)
    n = len(batch["path"])
    stage = np.zeros((n, *stage_shape), dtype=np.uint8)
    out = {k: batch[k] for k in ("shard", "pos", "path")}
    cols: dict[str, list] = {k: [] for k in ("width", "height", "bytes", "format", "error", "metadata_says_ai",
                                             "generator_hint")}
    for i, p in enumerate(batch["path"]):
        s, meta = decode_input(str(p), pipeline, max_pixels=max_pixels, max_file_size=max_file_size,
                               provenance=provenance)
        if s is not None:
            stage[i] = s.numpy()
        for k in cols:
            cols[k].append(meta[k])
    out["stage"] = stage
    for k in ("width", "height", "bytes"):
        out[k] = np.array([_NULL_INT if v is None else v for v in cols[k]], dtype=np.int64)
    out["metadata_says_ai"] = np.array([_NULL_INT if v is None else int(v) for v in cols["metadata_says_ai"]],
                                       dtype=np.int8)
    for k in ("format", "error", "generator_hint"):
        out[k] = np.array(["" if v is None else str(v) for v in cols[k]], dtype=object)
    return out


class Scorer:
    """Score a batch of images with a run, in ``Dataset.map_batches`` (one model per actor)::

        ds = ray.data.read_images("s3://bucket/imgs/", mode="RGB", include_paths=True)
        scored = ds.map_batches(Scorer, fn_constructor_kwargs={"run_dir": "runs/cnn32"},
                                concurrency=4, batch_size=256)      # num_gpus=1 for GPU actors

    Input: a numpy batch with ``image`` (RGB ``uint8`` arrays ``[H, W, 3]``, any sizes: box-reduced,
    brought to the run's test geometry and scored exactly as ``predict`` treats a decoded file) or
    ``stage`` (stage images that :func:`decode_batch` prepared; rows with a non-empty ``error`` are
    skipped). Output: the other columns unchanged (``image``/``stage`` dropped unless ``keep_images``)
    plus ``p_ai`` (NaN where not scored), ``verdict``, ``threshold``, ``threshold_source``,
    ``calibrated``, ``error`` ("" when scored) and, for an attribution run, ``generator`` and
    ``generator_p``. ``threshold``, ``uncalibrated``, the geometry options and ``runtime_options``
    (:class:`~fakescope.options.RuntimeOptions`: device, precision, pixel limit, thread cap) mean what
    they mean for ``predict``."""

    def __init__(self, run_dir, *, threshold: float | None = None, uncalibrated: bool = False, native_size=None,
                 geometry: str | None = None, backend: str = "torch", onnx_path=None,
                 runtime_options: RuntimeOptions | None = None, keep_images: bool = False, max_side=None) -> None:

        self.predictor = Predictor(run_dir, runtime_options, native_size=native_size, backend=backend,
                                   onnx_path=onnx_path, geometry=geometry, max_side=max_side)
        self.scoring = Scoring(resolve_decision(run_dir, threshold, uncalibrated), self.predictor.classes)
        self.keep_images = keep_images

    def _stages(self, batch: dict) -> tuple[list[torch.Tensor | None], list[str]]:

        n = len(next(iter(batch.values())))
        errors = [str(e) for e in batch["error"]] if "error" in batch else [""] * n
        if "stage" in batch:
            return [None if errors[i] else torch.from_numpy(np.ascontiguousarray(batch["stage"][i]))
                    for i in range(n)], errors
        if "image" not in batch:
            raise ValueError(f"expected a batch with an 'image' or 'stage' column, got {sorted(batch)}")
        pl = self.predictor.pipeline
        stages: list[torch.Tensor | None] = []
        for i in range(n):
            if errors[i]:
                stages.append(None)
                continue
            try:
                stages.append(pl.to_stage(from_array(batch["image"][i], pl.reduce_size())))
            except (RuntimeError, ValueError) as e:
                stages.append(None)
                errors[i] = f"cannot transform image ({e})"
        return stages, errors

    def __call__(self, batch: dict) -> dict:
        stages, errors = self._stages(batch)
        good = [i for i, s in enumerate(stages) if s is not None]
        fields = self.scoring.fields(self.predictor.scores([stages[i] for i in good])) if good else []
        n = len(stages)
        out = {k: v for k, v in batch.items() if self.keep_images or k not in ("image", "stage")}
        cols = {"p_ai": [np.nan] * n, "verdict": [""] * n, "threshold": [np.nan] * n, "threshold_source": [""] * n,
                "calibrated": [False] * n, "error": list(errors)}
        if self.scoring.classes:
            cols |= {"generator": [""] * n, "generator_p": [np.nan] * n}
        for i, f in zip(good, fields, strict=True):
            for k, v in f.items():
                cols[k][i] = v
        for k, v in cols.items():
            out[k] = np.array(v, dtype=object if k in _TEXT else None)
        return out


def _windows(pending, limit: int) -> Iterator[list[tuple[int, list[str], dict]]]:
    window, rows = [], 0
    for item in pending:
        window.append(item)
        rows += len(item[1])
        if rows >= limit:
            yield window
            window, rows = [], 0
    if window:
        yield window


def _rows(b: dict, attribution: bool) -> list[dict]:
    """Rows (``Parquet`` columns, None for none) of one output batch."""
    rows = []
    for i in range(len(b["path"])):
        err = str(b["error"][i])
        r = empty_row(str(b["path"][i]))
        for k in ("width", "height", "bytes"):
            v = int(b[k][i])
            r[k] = None if v == _NULL_INT else v
        v = int(b["metadata_says_ai"][i])
        r["metadata_says_ai"] = None if v == _NULL_INT else bool(v)
        r["format"] = str(b["format"][i]) or None
        r["generator_hint"] = str(b["generator_hint"][i]) or None
        if err:
            r["error"] = err
        else:
            r.update(p_ai=float(b["p_ai"][i]), verdict=str(b["verdict"][i]), threshold=float(b["threshold"][i]),
                     threshold_source=str(b["threshold_source"][i]), calibrated=bool(b["calibrated"][i]))
            if attribution:
                r.update(generator=str(b["generator"][i]), generator_p=float(b["generator_p"][i]))
        rows.append(r)
    return rows


def run_ray(job, *, pipeline, scorer: dict, runtime_options: RuntimeOptions, address: str | None = None,
            actors: int | None = None, gpus_per_actor: float = 0.0, provenance: bool,
            window_rows: int = WINDOW_ROWS) -> dict:
    """Run ``job``'s pending shards through Ray Data; ``{"files", "shards_written"}``.

    ``scorer``: the :class:`Scorer` keyword arguments other than its runtime options (``run_dir``,
    ``threshold``, ``uncalibrated``, ``native_size``, ``max_side``, ``geometry``, ``backend``, ``onnx_path``).
    ``runtime_options``: the batch size (None: :func:`~fakescope.engine.infer.default_batch_size`),
    the reader's limits (``max_pixels`` as resolved, ``max_file_size``) and the actors' device,
    precision and thread cap.

    ``address``: None starts a local Ray instance on this machine's CPUs; ``auto`` or ``HOST:PORT``
    joins an existing cluster. ``actors`` scoring actors (default: one per GPU with ``gpus_per_actor``,
    else half the cluster's CPUs, at least 1), each with ``gpus_per_actor`` GPUs."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=available_cores(), include_dashboard=False, log_to_driver=False)
        except Exception as e:  # noqa: BLE001 - Ray raises many kinds (ConnectionError, RuntimeError, ...)
            raise FakescopeError(f"expected a Ray instance at {address or 'this machine'}, got: "
                                 f"{' '.join(str(e).split())[:300]}") from None
    try:
        return _run(ray, job, pipeline=pipeline, scorer=scorer, runtime_options=runtime_options, actors=actors,
                    gpus_per_actor=gpus_per_actor, provenance=provenance, window_rows=window_rows)
    finally:
        if started:  # the local instance this call started (a cluster, or the caller's instance, stays)
            ray.shutdown()


def _run(ray, job, *, pipeline, scorer: dict, runtime_options: RuntimeOptions, actors, gpus_per_actor, provenance,
         window_rows) -> dict:
    """Score ``job``'s pending shards window by window (a window: up to ``window_rows`` inputs of whole
    shards) on a started Ray instance; ``{"files", "shards_written"}``."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = _enabled()
    res = ray.cluster_resources()
    if actors is None:
        actors = _default_actors(res, gpus_per_actor)
    o = runtime_options
    bs = o.batch_size or default_batch_size(pipeline.input_size)
    decode_kw = _decode_kwargs(pipeline, o, provenance)
    # the actors decode nothing and are not compiled: their device, precision, pixel limit and threads
    actor = RuntimeOptions(device=o.device, precision=o.precision, max_pixels=o.max_pixels, threads=o.threads)
    scorer_kw = {**scorer, "runtime_options": actor}
    kill = KillHook()
    done = {"files": 0, "shards_written": 0}
    for window in _windows(job.pending_shards(), window_rows):
        ds = _window_dataset(ray, window, bs)
        # decoding: CPU tasks spread over the cluster (a scheduling strategy of their own keeps Ray from
        # fusing them into the actors); scoring: the actor pool
        ds = ds.map_batches(decode_batch, fn_kwargs=decode_kw, batch_size=bs, batch_format="numpy", num_cpus=1,
                            scheduling_strategy="SPREAD")
        ds = ds.map_batches(Scorer, fn_constructor_kwargs=scorer_kw, batch_size=bs, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus_per_actor or None,
                            num_cpus=1, scheduling_strategy="DEFAULT")
        _write_window(ds, window, job, kill, done)
    return done


def _default_actors(res: dict, gpus_per_actor: float) -> int:
    """Scoring actors when none are asked for: one per ``gpus_per_actor`` GPUs of the cluster (``res``: its
    resources), else half its CPUs; at least 1."""
    gpus = float(res.get("GPU", 0))
    return max(1, int(gpus // gpus_per_actor)) if gpus_per_actor > 0 and gpus else \
        max(1, int(res.get("CPU", 2)) // 2)


def _decode_kwargs(pipeline, o: RuntimeOptions, provenance: bool) -> dict:
    """:func:`decode_batch`'s keyword arguments: the pipeline, the shape it stages images at, the reader's limits."""
    s = pipeline.stage_size()
    stage_shape = (pipeline.crops, 3, s, s) if pipeline.geometry == "crops" else (3, s, s)
    return {"pipeline": pipeline, "stage_shape": stage_shape, "max_pixels": o.max_pixels,
            "max_file_size": o.max_file_size, "provenance": provenance}


def _window_dataset(ray, window: list, bs: int):
    """A Ray dataset of one window's inputs (columns ``shard``, ``pos``, ``path``), in blocks of ``bs`` rows."""
    import pyarrow as pa

    shard_col = [i for i, paths, _ in window for _ in paths]
    pos_col = [k for _, paths, _ in window for k in range(len(paths))]
    path_col = [p for _, paths, _ in window for p in paths]
    table = pa.table({"shard": pa.array(shard_col, pa.int64()), "pos": pa.array(pos_col, pa.int64()),
                      "path": pa.array(path_col, pa.string())})
    del shard_col, pos_col, path_col
    blocks = [table.slice(o, bs) for o in range(0, table.num_rows, bs)]
    return ray.data.from_arrow(blocks)


def _write_window(ds, window: list, job, kill: KillHook, done: dict) -> None:
    """Write the scored rows of ``ds`` into their shards, committing each shard once complete (counted in
    ``done``); a shard left incomplete is aborted and an error."""
    manifests = {i: man for i, _, man in window}
    writers: dict = {}
    try:
        for b in ds.iter_batches(batch_format="numpy", batch_size=None, prefetch_batches=2):
            rows = _rows(b, job.attribution)
            shards = np.asarray(b["shard"])
            for sh in dict.fromkeys(shards.tolist()):
                w = writers.get(sh) or writers.setdefault(sh, job.writer(sh, manifests[sh]))
                w.write([r for r, x in zip(rows, shards.tolist(), strict=True) if x == sh])
                if w.stats["n"] == manifests[sh]["n"]:
                    w.commit()
                    del writers[sh]
                    done["files"] += manifests[sh]["n"]
                    done["shards_written"] += 1
                    kill.committed()
    finally:
        for w in writers.values():
            w.abort()
    if writers:
        raise RuntimeError(f"Ray returned incomplete shards {sorted(writers)}")
