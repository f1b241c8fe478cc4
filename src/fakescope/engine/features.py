"""Frozen-backbone features, computed once per (backbone, weights, preprocessing, image file).

:func:`extract_features` looks every file up in the on-disk cache (:mod:`fakescope.engine.feature_cache`),
computes the missing ones batch by batch (:func:`iter_features`) and writes them a shard every
:data:`SHARD_ROWS` rows, so an interrupted extraction keeps what it computed and never holds more
than one shard in memory. It returns a :class:`~fakescope.engine.feature_cache.FeatureTable`.

Under torchrun the files missing from the cache are dealt to the ranks in whole batches (each
rank writes its own shards); after a barrier every rank reads every row from the cache. When the
cache folder is not shared between the ranks (several nodes, each with its own disk), the rows
are exchanged over the process group instead and each node's cache receives the rows it lacked.
The unreadable files met by any rank are gathered, so every rank reports the same ones.
"""

from __future__ import annotations

import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fakescope.data.dataset import ImageDataset, cpu_threads, make_loader, plan_loader
from fakescope.data.transforms import Pipeline
from fakescope.engine import runtime
from fakescope.engine.feature_cache import (
    FAILED,
    FEATURE_DTYPE,
    MISSING,
    FeatureCache,
    FeatureTable,
    extractor_key,
    file_key,
)
from fakescope.engine.runtime import Precision, Runtime
from fakescope.progress import progress
from fakescope.utils import cache_dir

DEFAULT_BATCH = 64
"""Extraction batch size when the runtime sets none."""
SHARD_ROWS = 65536
"""Rows per cache shard written during extraction (at most ``SHARD_ROWS x D x 2`` bytes in memory)."""


def _forward_features(model, x: torch.Tensor, precision: Precision, device: torch.device) -> torch.Tensor:
    """Features ``[B, D]``; for a batch of crops ``[B, K, 3, S, S]`` the K crops' features side by
    side, ``[B, K * D]`` (one cache row per file)."""
    k = x.shape[1] if x.dim() == 5 else 0
    if k:
        x = x.flatten(0, 1)
    with torch.no_grad(), precision.autocast(device):
        f = model.features(precision.prepare(x)).float()
    return f.reshape(-1, k * f.shape[1]) if k else f


def iter_features(model, files: list[str], pipeline: Pipeline, rt: Runtime, *, order: list[int] | None = None,
                  desc: str = "features"):
    """Yield ``(positions, float16 features [b, D], {position: error})`` batch by batch, in ``order``
    (``rt``: device, precision, batch size (None: :data:`DEFAULT_BATCH`), workers, pixel limit, thread cap)."""
    device, precision, batch_size = rt.device, rt.precision, rt.batch_size or DEFAULT_BATCH
    ds = ImageDataset(files, pipeline, stage_only=True, max_pixels=rt.max_pixels)
    picked = [files[i] for i in order] if order is not None else files
    plan = plan_loader(picked, pipeline, device, rt.num_workers)
    loader = make_loader(ds, batch_size, order, num_workers=plan.workers, pin_memory=device.type == "cuda")
    with cpu_threads(runtime.fewest_threads(plan.threads, runtime.model_threads(model, device), rt.threads)):
        for batch in progress(loader, desc=desc, total=len(loader)):
            errors = dict(batch.errors)
            if not len(batch.index):
                yield np.zeros(0, np.int64), None, errors
                continue
            x = pipeline.finish(batch.image.to(device, non_blocking=True)).float().div_(255)
            f = _forward_features(model, x, precision, device).cpu().numpy().astype(FEATURE_DTYPE)
            yield batch.index.numpy(), f, errors


def _deal_batches(positions: list[int], batch_size: int) -> list[int]:
    """This rank's share of ``positions``: whole batches dealt round-robin (the batches a single
    process would form, so features are bit-identical whatever the number of ranks)."""
    return [positions[i] for b in runtime.shard_batches(len(positions), batch_size) for i in b]


@dataclass
class _Computed:
    """What this process computed: shards it wrote, rows it holds in memory (no cache, or the cache
    could not be written), and the unreadable files (file key -> reason)."""

    written: list[str] = field(default_factory=list)
    mem_keys: list[str] = field(default_factory=list)
    mem_rows: list[np.ndarray] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def keep(self, keys: list[str], rows: np.ndarray) -> None:
        self.mem_keys.extend(keys)
        self.mem_rows.append(rows)

    def take_memory(self) -> tuple[list[str], np.ndarray | None]:
        keys, rows = self.mem_keys, (np.concatenate(self.mem_rows) if self.mem_rows else None)
        self.mem_keys, self.mem_rows = [], []
        return keys, rows


def _compute(model, files: list[str], keys: list[str], mine: list[int], cache: FeatureCache | None,
             pipeline: Pipeline, rt: Runtime, desc: str) -> _Computed:
    """Features of the positions ``mine``, written to ``cache`` shard by shard (kept in memory
    without a cache, or when the cache cannot be written)."""
    out = _Computed()
    pending_keys: list[str] = []
    pending: list[np.ndarray] = []
    writable = cache is not None

    def flush() -> None:
        nonlocal writable
        if not pending_keys:
            return
        feats = np.concatenate(pending)
        if writable:
            try:
                out.written.append(cache.add(list(pending_keys), feats))
            except OSError as e:  # a read-only or full cache folder costs the cache, not the run
                writable = False
                warnings.warn(f"cannot write the feature cache in {cache.folder} ({e}); keeping features in memory",
                              stacklevel=3)
        if not writable:
            out.keep(list(pending_keys), feats)
        pending_keys.clear()
        pending.clear()

    if not mine:
        return out
    for pos, f, errs in iter_features(model, files, pipeline, rt, order=mine, desc=desc):
        out.errors.update({keys[i]: r for i, r in errs.items()})
        if f is None:
            continue
        if cache is None:
            out.keep([keys[i] for i in pos], f)
            continue
        pending_keys.extend(keys[i] for i in pos)
        pending.append(f)
        if len(pending_keys) >= SHARD_ROWS:
            flush()
    flush()
    return out


def _gather_rows(parts) -> tuple[list[str], list[np.ndarray]]:
    keys: list[str] = []
    rows: list[np.ndarray] = []
    for k, f in parts:
        keys.extend(k)
        if len(k):
            rows.append(f)
    return keys, rows


def _exchange_through_cache(cache: FeatureCache, keys: list[str], done: _Computed, errors: dict[str, str]):
    """Under torchrun with a cache: every rank reads the others' shards from the cache folder; where
    some ranks cannot see them (one folder per node), the rows go over the process group and the
    lowest rank of each folder writes the rows its folder lacked. Returns ``(src, rows, extra keys,
    extra rows)``: the lookup after the exchange and the rows held in memory."""
    runtime.barrier()
    cache.reload()
    src, rows = cache.lookup(keys)
    lacking = any(s == MISSING and k not in errors for s, k in zip(src, keys, strict=True))
    # (host, folder) of every rank: the lowest rank of each cache folder writes to it
    place = (socket.gethostname(), str(cache.folder.resolve()), lacking)
    places = runtime.all_gather_objects(place)
    writer = [p[:2] for p in places].index(place[:2]) == runtime.rank()
    if not any(p[2] for p in places):
        return src, rows, [], []
    mine_k, mine_f = cache.read_shards(done.written)
    mem_k, mem_f = done.take_memory()  # rows this rank could not write
    if mem_k:
        mine_k = mine_k + mem_k
        mine_f = np.concatenate(([mine_f] if mine_f is not None else []) + [mem_f])
    extra_keys, extra_rows = _gather_rows(runtime.all_gather_objects((mine_k, mine_f)))
    if lacking and writer:
        take = [j for j, k in enumerate(extra_keys) if k not in cache]
        if take:
            try:
                cache.add([extra_keys[j] for j in take], np.concatenate(extra_rows)[take])
            except OSError as e:
                warnings.warn(f"cannot write the feature cache in {cache.folder} ({e})", stacklevel=3)
    return src, rows, extra_keys, extra_rows


def extract_features(model, files: list[str], pipeline: Pipeline, rt: Runtime, *,
                     desc: str = "features") -> tuple[FeatureTable, dict[int, str]]:
    """Features of every file as a :class:`FeatureTable` ``[N, D]`` (rows of unreadable files are
    zero), and ``{position: reason}`` for the unreadable files.

    Cached files are read from the cache (``rt.cache_dir``, default the user cache directory's
    ``features``); the missing ones are computed (dealt to torchrun ranks in whole batches of
    ``rt.batch_size``, default :data:`DEFAULT_BATCH`) and written to it shard by shard. With
    ``rt.use_cache`` off everything is computed in memory (``N x D x 2`` bytes). Every rank returns
    the full table and the same errors.
    """
    model.eval()
    n = len(files)
    cache = None
    if rt.use_cache:
        cache = FeatureCache(Path(rt.cache_dir or cache_dir() / "features") /
                             extractor_key(model, pipeline, rt.precision, rt.device, rt.max_pixels))
    keys = [file_key(f) for f in files]
    if cache is not None:
        src, rows = cache.lookup(keys)
    else:
        src, rows = np.full(n, MISSING, np.int32), np.zeros(n, np.int64)
    missing = np.nonzero(src == MISSING)[0].tolist()
    if runtime.is_distributed():  # the same work list on every rank, even if their caches differ
        missing = sorted(set().union(*runtime.all_gather_objects(missing)))
    done = _compute(model, files, keys, _deal_batches(missing, rt.batch_size or DEFAULT_BATCH), cache, pipeline,
                    rt, desc)

    errors = done.errors
    extra_keys: list[str] = []
    extra_rows: list[np.ndarray] = []
    if runtime.is_distributed():
        errors = {k: r for part in runtime.all_gather_objects(done.errors) for k, r in part.items()}
        if cache is not None:
            src, rows, extra_keys, extra_rows = _exchange_through_cache(cache, keys, done, errors)
        else:
            extra_keys, extra_rows = _gather_rows(runtime.all_gather_objects(done.take_memory()))
    elif cache is not None and done.written:
        cache.reload()
        src, rows = cache.lookup(keys)

    sources = cache.sources() if cache is not None else []
    mem_keys = done.mem_keys + extra_keys
    mem_rows = done.mem_rows + extra_rows
    if mem_keys:
        where = {k: j for j, k in enumerate(mem_keys)}
        u = len(sources)
        sources.append(np.concatenate(mem_rows))
        for i in np.nonzero(src == MISSING)[0]:
            j = where.get(keys[i])
            if j is not None:
                src[i], rows[i] = u, j
    failed: dict[int, str] = {}
    for i in np.nonzero(src == MISSING)[0]:
        src[i] = FAILED
        failed[int(i)] = errors.get(keys[i]) or "features could not be computed"
    dims = {s.shape[1] for s in sources if s.ndim == 2 and len(s)}
    dim = dims.pop() if dims else 0
    return FeatureTable(n, dim, sources, src, rows), failed
