"""Score millions of images into a folder of Parquet shards: streamed, resumable, one writer per rank.

``predict --out DIR`` (:func:`predict_to_folder`) reads its inputs as a stream (files and folders, or a
``--files-from`` list: a text file with one path per line, or a Parquet/CSV file with a ``path`` column),
cuts the stream into shards of ``shard_size`` inputs, and writes each shard as
``DIR/shards/part-NNNNN.parquet`` (:data:`COLUMNS`), row group by row group while it is scored, into a
temporary file renamed into place when the shard is complete. The shard's file metadata holds the
run's name, the weights' SHA-256 and a manifest of the inputs it covers (position, count, first and
last path, SHA-256 of the paths). Memory holds one shard's paths and one batch, never the whole list.

A rerun of the same job skips the shards that are complete (after checking that each covers the same
inputs), so a killed run loses at most the shards in flight and never writes a row twice; ``DIR/job.json``
records what decides the scores (run, weights, calibration, threshold, options) and a rerun that differs
is refused unless ``overwrite``. Under torchrun shard ``i`` belongs to rank ``i % world_size``: every rank
reads the input stream, scores and writes only its own shards, and only the per-shard counts are
gathered for ``DIR/summary.json``. ``engine="ray"`` runs the same job as a Ray Data pipeline
(:mod:`fakescope.engine.ray_bulk`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from fakescope import parsing
from fakescope.calibration import resolve_decision
from fakescope.data.dataset import cpu_threads, make_loader, plan_loader
from fakescope.data.io import DEFAULT_MAX_PIXELS, iter_images
from fakescope.engine import runtime
from fakescope.engine.bulk_rows import (  # noqa: F401  (what one input becomes; re-exported)
    COLUMNS,
    KILL_AFTER_ENV,
    FileDataset,
    KillHook,
    Scoring,
    _filesystem_read,
    _provenance,
    collate_files,
    decode_input,
    empty_row,
    is_uri,
    reason_kind,
    schema,
)
from fakescope.engine.checkpoint import WEIGHTS
from fakescope.engine.infer import default_batch_size
from fakescope.engine.predictor import Predictor
from fakescope.engine.ray_bulk import run_ray
from fakescope.errors import FakescopeError
from fakescope.options import PREDICT_MAX_FILE_SIZE, RuntimeOptions
from fakescope.parsing import checked
from fakescope.progress import progress
from fakescope.utils import atomic_write_text, fsync_dir

SHARD_DIR = "shards"
"""Where the shards go, under ``--out`` (so ``pyarrow.parquet.read_table(DIR/shards)`` reads them all)."""
SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".parquet"
JOB_FILE = "job.json"
SUMMARY_FILE = "summary.json"
META_KEY = b"fakescope"
DEFAULT_SHARD_SIZE = 10_000
ROW_GROUP = 4096
FORMAT_VERSION = 1


# --- the inputs ---------------------------------------------------------------------------------------


def read_list(files_from: str | os.PathLike) -> Iterator[str]:
    """The paths of a ``--files-from`` list, streamed: a Parquet or CSV file (by extension) with a
    ``path`` column, else a text file with one path per line (blank lines skipped)."""
    src = str(files_from)
    if not os.path.isfile(src):
        raise FakescopeError(f"expected --files-from to be a file, got {src!r} (no such file)")
    ext = os.path.splitext(src)[1].lower()
    if ext in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(src)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise FakescopeError(f"expected --files-from to be a Parquet file, got {src!r} ({e})") from None
        if "path" not in pf.schema_arrow.names:
            raise FakescopeError(f"expected a 'path' column in {src}, got columns {pf.schema_arrow.names}")
        for batch in pf.iter_batches(columns=["path"], batch_size=65536):
            yield from (str(p) for p in batch.column(0).to_pylist() if p)
        return
    if ext in (".csv", ".tsv"):
        with open(src, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
            if "path" not in (reader.fieldnames or []):
                raise FakescopeError(f"expected a 'path' column in {src}, got columns {reader.fieldnames}")
            yield from (r["path"] for r in reader if r.get("path"))
        return
    with open(src, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if line.strip():
                yield line


def iter_inputs(paths: Iterable[str] = (), files_from: str | os.PathLike | None = None) -> Iterator[str]:
    """Every input once, in order: ``paths`` (folders walked recursively and sorted, as ``predict``
    does; a path that does not exist is kept and becomes a ``file not found`` row), then the
    ``files_from`` list (entries used as given: never walked, never checked here)."""
    for p in paths:
        p = str(p)
        if is_uri(p) or not os.path.isdir(p):
            yield p
        else:
            yield from iter_images([p])
    if files_from is not None:
        yield from read_list(files_from)


def iter_shards(inputs: Iterable[str], shard_size: int) -> Iterator[tuple[int, list[str]]]:
    """``(shard index, its paths)``: consecutive runs of ``shard_size`` inputs."""
    chunk: list[str] = []
    i = 0
    for p in inputs:
        chunk.append(p)
        if len(chunk) == shard_size:
            yield i, chunk
            i, chunk = i + 1, []
    if chunk:
        yield i, chunk


def manifest(shard: int, shard_size: int, paths: list[str]) -> dict:
    """What a shard covers: its position in the input stream, the count, the first and last path and
    the SHA-256 of the paths (newline-joined)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode("utf-8", "surrogateescape") + b"\n")
    return {"shard": shard, "start": shard * shard_size, "n": len(paths), "first": paths[0], "last": paths[-1],
            "sha256": h.hexdigest()}


def shard_path(out_dir: str | os.PathLike, shard: int) -> Path:
    return Path(out_dir) / SHARD_DIR / f"{SHARD_PREFIX}{shard:05d}{SHARD_SUFFIX}"


def read_shard_meta(path: str | os.PathLike) -> dict | None:
    """The fakescope metadata of a finished shard (None when the file is not a readable shard)."""
    import pyarrow.parquet as pq

    try:
        md = pq.read_metadata(path).metadata or {}
        return json.loads(md[META_KEY])
    except Exception:  # noqa: BLE001 - a truncated or foreign file is simply not a finished shard
        return None


# --- decoding -------------------------------------------------------------------------------------


# --- scoring ------------------------------------------------------------------------------------------


def weights_sha256(run_dir: str | os.PathLike) -> str:

    h = hashlib.sha256()
    with open(Path(run_dir) / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- writing ------------------------------------------------------------------------------------------


class ShardWriter:
    """One shard being written: rows go to ``.part-NNNNN.parquet.tmp`` as they come (in row groups of
    :data:`ROW_GROUP`); :meth:`commit` adds the metadata (manifest, counts), closes, fsyncs and renames
    it into place. Nothing else ever writes ``part-NNNNN.parquet``."""

    def __init__(self, out_dir: Path, shard: int, man: dict, job_meta: dict, attribution: bool) -> None:
        import pyarrow.parquet as pq

        self.final = shard_path(out_dir, shard)
        self.tmp = self.final.with_name("." + self.final.name + ".tmp")
        self.schema = schema(attribution)
        self.meta = {**job_meta, "manifest": man, "rank": runtime.rank(), "world_size": runtime.world_size()}
        self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        self.pending: list[dict] = []
        self.stats = {"n": 0, "scored": 0, "called_ai": 0, "errors": Counter()}

    def write(self, rows: list[dict]) -> None:
        for r in rows:
            self.stats["n"] += 1
            if r.get("error"):
                self.stats["errors"][reason_kind(r["error"])] += 1
            else:
                self.stats["scored"] += 1
                self.stats["called_ai"] += r.get("verdict") == "ai"
        self.pending.extend(rows)
        if len(self.pending) >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.pending:
            cols = {c: [r.get(c) for r in self.pending] for c in self.schema.names}
            self.writer.write_table(pa.table(cols, schema=self.schema))
            self.pending = []

    def commit(self) -> dict:
        self._flush()
        stats = {**self.stats, "errors": dict(self.stats["errors"])}
        if stats["n"] != self.meta["manifest"]["n"]:
            raise RuntimeError(f"shard {self.final.name}: {stats['n']} rows for {self.meta['manifest']['n']} inputs")
        self.writer.add_key_value_metadata({META_KEY: json.dumps({**self.meta, "stats": stats})})
        self.writer.close()
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)
        return stats

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)


# --- the job ------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One ``predict --out`` job: where it writes, what decides its scores, and its inputs."""

    out_dir: Path
    fingerprint: dict
    shard_size: int
    attribution: bool
    job_meta: dict
    scoring: Scoring
    inputs: Callable[[], Iterator[str]]
    overwrite: bool = False
    stats: list[dict] = field(default_factory=list)

    def pending_shards(self, mine: Callable[[int], bool] = lambda i: True) -> Iterator[tuple[int, list[str], dict]]:
        """``(index, paths, manifest)`` of the shards (among ``mine``) not yet complete; a complete shard
        is checked against the inputs it should cover, and skipped."""
        for i, paths in iter_shards(self.inputs(), self.shard_size):
            if not mine(i):
                continue
            man = manifest(i, self.shard_size, paths)
            f = shard_path(self.out_dir, i)
            if f.exists():
                meta = read_shard_meta(f)
                if meta is not None:
                    if meta.get("manifest", {}).get("sha256") != man["sha256"]:
                        raise FakescopeError(
                            f"expected {f.name} to cover the same inputs as this run (inputs {man['start']}-"
                            f"{man['start'] + man['n'] - 1}, first {man['first']!r}), got "
                            f"{meta.get('manifest', {}).get('first')!r}...: the input list changed; use another "
                            f"--out or --overwrite")
                    continue
            yield i, paths, man

    def writer(self, shard: int, man: dict) -> ShardWriter:
        return ShardWriter(self.out_dir, shard, man, self.job_meta, self.attribution)


def _short(v, n: int = 48) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {_short(a)} -> {_short(b)}")
    return out


def own_files(out_dir: Path) -> list[Path]:
    """The files a job writes in its folder (what ``overwrite`` removes; nothing else is touched)."""
    shards = out_dir / SHARD_DIR
    return [p for p in out_dir.iterdir() if p.name in (JOB_FILE, SUMMARY_FILE)] + \
        ([p for p in shards.iterdir() if p.name.lstrip(".").startswith(SHARD_PREFIX)
          and (p.name.endswith(SHARD_SUFFIX) or p.name.endswith(SHARD_SUFFIX + ".tmp"))] if shards.is_dir() else [])


def check_folder(out_dir: Path, fingerprint: dict, overwrite: bool) -> str | None:
    """Make ``out_dir`` ready for this job (rank 0 only): None, or the one-line reason it refuses."""
    if out_dir.exists() and not out_dir.is_dir():
        return f"expected --out to be a folder, got the file {out_dir}"
    (out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    job = out_dir / JOB_FILE
    if overwrite:
        for p in own_files(out_dir):
            p.unlink(missing_ok=True)
    elif job.exists():
        try:
            old = json.loads(job.read_text())
        except (OSError, ValueError):
            old = {}
        diff = _differences(old, fingerprint)
        if diff:
            return (f"expected {out_dir} to hold the same job, got a different one ({'; '.join(diff)}): "
                    f"use another --out, or --overwrite to replace it")
        return None
    elif (out_dir / SHARD_DIR).is_dir() and any((out_dir / SHARD_DIR).iterdir()):
        return (f"expected {out_dir} to be empty or a predict --out folder, got shards without {JOB_FILE}: "
                f"use --overwrite")
    atomic_write_text(job, json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
    return None


def make_job(run_dir, out_dir, *, paths=(), files_from=None, shard_size: int = DEFAULT_SHARD_SIZE,
             decision, config: dict, pipeline, options: dict, overwrite: bool = False) -> Job:

    run_dir = Path(run_dir).resolve()
    sha = weights_sha256(run_dir)
    classes = config.get("classes") or None
    fingerprint = {
        "format_version": FORMAT_VERSION, "run": str(run_dir), "weights_sha256": sha,
        "model": config["model"]["name"], "decision": decision.to_dict(), "shard_size": shard_size,
        "test_geometry": pipeline.geometry, "native_size": pipeline.native_size, "jpeg_align": pipeline.jpeg_align,
        "options": options,
    }
    if pipeline.max_side is not None:  # only when set: a job folder written before max_side existed still matches
        fingerprint["max_side"] = pipeline.max_side
    job_meta = {"format_version": FORMAT_VERSION, "run_name": run_dir.name, "run": str(run_dir),
                "model": config["model"]["name"], "weights_sha256": sha, "classes": classes}
    return Job(Path(out_dir), fingerprint, shard_size, bool(classes), job_meta, Scoring(decision, classes),
               lambda: iter_inputs(paths, files_from), overwrite)


def open_folder(job: Job) -> None:
    """Rank 0 checks (and, with overwrite, clears) the folder; every rank raises the same refusal."""
    reason = check_folder(job.out_dir, job.fingerprint, job.overwrite) if runtime.is_main() else None
    reasons = runtime.all_gather_objects(reason)
    if reasons[0]:
        raise FakescopeError(reasons[0])


# --- the torch engine ---------------------------------------------------------------------------------

def rows_for(paths: list[str], batch: dict, fields: list[dict]) -> list[dict]:
    """The rows of one decoded batch, in input order (``fields``: the scores of ``batch["good"]``)."""
    scored = dict(zip(batch["good"], fields, strict=True))
    out = []
    for i, meta in zip(batch["index"], batch["meta"], strict=True):
        r = empty_row(paths[i]) | meta
        r.update(scored.get(i, {}))
        out.append(r)
    return out


def run_torch(job: Job, predictor, *, provenance: bool) -> dict:
    """Score this rank's pending shards with ``predictor`` (a :class:`~fakescope.engine.predictor.Predictor`,
    whose runtime options also give the batch size, workers and thread cap);
    ``{"files", "shards_written"}`` of this rank."""
    options = predictor.options
    batch_size = options.batch_size or default_batch_size(predictor.pipeline.input_size)
    rank, world = runtime.rank(), runtime.world_size()
    kill = KillHook()
    done = {"files": 0, "shards_written": 0}
    plan = None
    for shard, paths, man in job.pending_shards(lambda i: i % world == rank):
        ds = FileDataset(paths, predictor.pipeline, max_pixels=predictor.max_pixels,
                         max_file_size=predictor.max_file_size, provenance=provenance)
        if plan is None:
            plan = plan_loader(paths, predictor.pipeline, predictor.device, options.num_workers)
        loader = make_loader(ds, batch_size, num_workers=plan.workers, pin_memory=predictor.device.type == "cuda",
                             collate_fn=collate_files)
        w = job.writer(shard, man)
        try:
            with cpu_threads(runtime.fewest_threads(plan.threads, options.threads)):
                for batch in progress(loader, desc=f"shard {shard}", total=len(loader)):
                    fields = job.scoring.fields(predictor.scores(list(batch["stage"]))) \
                        if batch["stage"] is not None else []
                    w.write(rows_for(paths, batch, fields))
            w.commit()
        except BaseException:
            w.abort()
            raise
        done["files"] += len(paths)
        done["shards_written"] += 1
        kill.committed()
    return done


def _run_ray(job: Job, **kw) -> dict:
    return run_ray(job, **kw)  # ray itself is imported by run_ray (an optional dependency)


ENGINES = ("torch", "ray")
"""``predict --engine`` choices: ``torch`` (this process, or each torchrun rank) and ``ray`` (a Ray Data pipeline)."""


def summarize(out_dir: Path, this_run: dict, seconds: float) -> dict:
    """The folder's summary from every shard's metadata, plus this run's work and speed."""
    files = scored = called = 0
    errors: Counter = Counter()
    shards = 0
    for f in sorted((out_dir / SHARD_DIR).glob(f"{SHARD_PREFIX}*{SHARD_SUFFIX}")):
        meta = read_shard_meta(f)
        if meta is None:
            continue
        st = meta["stats"]
        shards += 1
        files += st["n"]
        scored += st["scored"]
        called += st["called_ai"]
        errors.update(st["errors"])
    n = this_run["files"]
    return {"out": str(out_dir), "files": files, "scored": scored, "errors": sum(errors.values()),
            "errors_by_reason": dict(errors.most_common()), "called_ai": called, "shards": shards,
            "this_run": {"files": n, "shards_written": this_run["shards_written"],
                         "shards_skipped": shards - this_run["shards_written"]},
            "seconds": round(seconds, 3), "images_per_second": round(n / seconds, 2) if seconds > 0 and n else None}


def summary_text(s: dict) -> str:
    lines = [f"{s['out']}: {s['files']} files in {s['shards']} shards, {s['scored']} scored, "
             f"{s['called_ai']} called AI, {s['errors']} errors",
             f"this run: {s['this_run']['files']} files in {s['this_run']['shards_written']} shards "
             f"({s['this_run']['shards_skipped']} already done) in {s['seconds']:.1f} s"
             + (f", {s['images_per_second']:.1f} images/s" if s["images_per_second"] else "")]
    for reason, n in s["errors_by_reason"].items():
        lines.append(f"  {n:8d}  {reason}")
    return "\n".join(lines)


def predict_to_folder(run_dir, out_dir, paths: Iterable[str] = (), *, files_from=None,
                      shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False, engine: str = "torch",
                      threshold: float | None = None, uncalibrated: bool = False, native_size=None,
                      backend: str = "torch", onnx_path=None, provenance: bool = True,
                      geometry: str | None = None, ray_address: str | None = None, actors: int | None = None,
                      gpus_per_actor: float = 0.0, runtime_options: RuntimeOptions | None = None,
                      max_side=None) -> dict:
    """Score ``paths`` and the ``files_from`` list into Parquet shards in ``out_dir`` (see the module
    docstring); returns the summary (also written to ``out_dir/summary.json`` by rank 0).

    The rows hold what :func:`~fakescope.engine.evaluation.predict_paths` reports for the same files
    (``p_ai`` unrounded), plus ``width``, ``height``, ``format`` and ``bytes``; its options mean the same
    (``runtime_options`` too, default ``predict``'s: see :func:`~fakescope.engine.evaluation.predict_paths`)."""
    threshold, paths = _checked_request(engine, threshold, shard_size, paths, files_from)
    decision = resolve_decision(run_dir, threshold, uncalibrated)
    options = runtime_options if runtime_options is not None else RuntimeOptions(max_file_size=PREDICT_MAX_FILE_SIZE)
    options = replace(options, max_pixels=options.max_pixels or DEFAULT_MAX_PIXELS)
    t0 = time.perf_counter()
    predictor = Predictor(run_dir, _driver_options(options, engine), native_size=native_size, backend=backend,
                          onnx_path=onnx_path, geometry=geometry, max_side=max_side)
    config, pipeline = predictor.config, predictor.pipeline
    if predictor.classes is None:
        config = {**config, "classes": None}
    job_options = {"max_file_size": options.max_file_size, "max_pixels": options.max_pixels,
                   "provenance": provenance, "backend": backend,
                   "precision": options.precision}  # not the device, batch size, workers or engine
    job = make_job(run_dir, out_dir, paths=paths, files_from=files_from, shard_size=shard_size, decision=decision,
                   config=config, pipeline=pipeline, options=job_options, overwrite=overwrite)
    open_folder(job)
    if engine == "ray":
        del predictor
        scorer = {"run_dir": str(os.path.abspath(run_dir)), "threshold": threshold, "uncalibrated": uncalibrated,
                  "native_size": native_size, "max_side": max_side, "geometry": geometry, "backend": backend,
                  "onnx_path": onnx_path}
        mine = _run_ray(job, pipeline=pipeline, scorer=scorer, runtime_options=options, address=ray_address,
                        actors=actors, gpus_per_actor=gpus_per_actor, provenance=provenance)
    else:
        mine = run_torch(job, predictor, provenance=provenance)
    return _gather_summary(job, mine, t0)


def _checked_request(engine: str, threshold: float | None, shard_size: int, paths: Iterable[str],
                     files_from) -> tuple[float | None, list[str]]:
    """``(threshold, paths as a list)``, checked, once the engine, the shard size and the inputs asked for are
    valid."""
    if engine not in ENGINES:
        raise FakescopeError(f"expected --engine to be one of {', '.join(ENGINES)}, got {engine!r}")
    if threshold is not None:
        threshold = checked("threshold", threshold, parsing.threshold, source="predict_to_folder")
    if shard_size < 1:
        raise FakescopeError(f"expected --shard-size to be a positive integer, got {shard_size}")
    paths = list(paths)
    if not paths and files_from is None:
        raise FakescopeError("expected image paths or --files-from LIST, got neither")
    return threshold, paths


def _driver_options(options: RuntimeOptions, engine: str) -> RuntimeOptions:
    """This process's runtime options: ``options``, but the ray engine's driver only needs the run's
    pipeline and classes (its actors load the model), so it holds them on the CPU in fp32."""
    return RuntimeOptions(device="cpu", precision="fp32", max_pixels=options.max_pixels,
                          max_file_size=options.max_file_size) if engine == "ray" else options


def _gather_summary(job: Job, mine: dict, t0: float) -> dict:
    """The folder's summary, this run's counts gathered from every rank; rank 0 writes it and removes the
    temporary files a killed run left for shards done since (other ranks return ``{}``)."""
    parts = runtime.all_gather_objects(mine)
    seconds = time.perf_counter() - t0
    total = {"files": sum(p["files"] for p in parts), "shards_written": sum(p["shards_written"] for p in parts)}
    summary = summarize(job.out_dir, total, seconds) if runtime.is_main() else {}
    if runtime.is_main():
        for p in (job.out_dir / SHARD_DIR).glob(f".{SHARD_PREFIX}*{SHARD_SUFFIX}.tmp"):
            if shard_path(job.out_dir, int(p.name[len(SHARD_PREFIX) + 1:].split(".")[0])).exists():
                p.unlink(missing_ok=True)
        atomic_write_text(job.out_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary
