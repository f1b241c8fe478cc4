"""Frozen-backbone features, computed once per (backbone, weights, preprocessing, image file).

Features live on disk as memory-mapped float16 shards under the cache directory
(``<cache>/features/<key>/shard-*.npy`` + ``.json``), so training a head for many epochs,
evaluating and benchmarking all cost one backbone pass. The key hashes the backbone's name, a
digest of its weights, the preprocessing (input size, native size, JPEG alignment, degradation,
pixel limit), the precision, the device type and the versions of the decoding and numeric
libraries; each file is identified by its absolute path, size and modification time, so an edited
image is recomputed.

Extraction writes a shard every :data:`SHARD_ROWS` rows, so an interrupted extraction keeps what
it computed, and never holds more than one shard in memory. :func:`extract_features` returns a
:class:`FeatureTable`, a read-only ``[N, D]`` view that gathers rows from the memory-mapped
shards: at GenImage scale (2.6 M images x 2048 float16 = 10 GiB for ResNet-50) nothing forces
the features into RAM; :meth:`FeatureTable.materialize` copies them into memory when they fit.

Under torchrun the files missing from the cache are dealt to the ranks in whole batches (each
rank writes its own shards); after a barrier every rank reads every row from the cache. When the
cache folder is not shared between the ranks (several nodes, each with its own disk), the rows
are exchanged over the process group instead and each node's cache receives the rows it lacked.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import socket
import uuid
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from fakescope.data.dataset import ImageDataset, cpu_threads, make_loader, plan_loader
from fakescope.data.io import DEFAULT_MAX_PIXELS
from fakescope.data.transforms import Pipeline
from fakescope.engine import runtime
from fakescope.engine.runtime import Precision
from fakescope.progress import progress
from fakescope.utils import atomic_write_text, cache_dir

FEATURE_DTYPE = np.float16
SHARD_ROWS = 65536
"""Rows per cache shard written during extraction (at most ``SHARD_ROWS x D x 2`` bytes in memory)."""
MISSING, FAILED = -1, -2


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _library_versions() -> dict:
    import PIL
    import torchvision

    return {"torch": torch.__version__.split("+")[0], "torchvision": torchvision.__version__.split("+")[0],
            "pillow": PIL.__version__}


def extractor_key(model, pipeline: Pipeline, precision: Precision, device: torch.device | str = "cpu",
                  max_pixels: int | None = None) -> str:
    """The cache folder name: a hash of everything that changes a file's features."""
    desc = {
        "backbone": getattr(model, "backbone_name", type(model).__name__),
        "weights": weights_digest(model.backbone),
        "preprocess": model.preprocess.to_dict(),
        "pipeline": {k: v for k, v in asdict(pipeline).items() if k != "augment"},
        "precision": precision.name,
        "device": torch.device(device).type,
        "max_pixels": max_pixels or DEFAULT_MAX_PIXELS,
        "libraries": _library_versions(),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:24]


def file_key(path: str) -> str:
    try:
        st = os.stat(path)
        return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        return f"{os.path.abspath(path)}|missing"


class FeatureTable:
    """A read-only ``[N, D]`` float16 table whose rows come from memory-mapped shards or arrays.

    ``table[ids]`` gathers rows into a ``torch.float16`` tensor (rows of unreadable files are
    zero). Only the rows asked for are read, so a table larger than RAM works."""

    def __init__(self, n: int, dim: int, sources: list[np.ndarray], src: np.ndarray, rows: np.ndarray) -> None:
        self.n, self.dim = n, dim
        self.sources, self.src, self.rows = sources, src, rows

    @classmethod
    def dense(cls, array: np.ndarray) -> FeatureTable:
        n = len(array)
        return cls(n, array.shape[1] if array.ndim == 2 else 0, [array], np.zeros(n, np.int32), np.arange(n))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.dim)

    def __len__(self) -> int:
        return self.n

    @property
    def nbytes(self) -> int:
        return self.n * self.dim * np.dtype(FEATURE_DTYPE).itemsize

    @property
    def in_memory(self) -> bool:
        return all(not isinstance(s, np.memmap) for s in self.sources)

    def gather(self, ids) -> np.ndarray:
        if isinstance(ids, torch.Tensor):
            ids = ids.cpu().numpy()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.zeros((len(ids), self.dim), FEATURE_DTYPE)
        s, r = self.src[ids], self.rows[ids]
        for u in np.unique(s):
            if u < 0:
                continue
            m = s == u
            rr = r[m]
            order = np.argsort(rr, kind="stable")  # ascending reads from a memory map
            block = np.empty((len(rr), self.dim), FEATURE_DTYPE)
            block[order] = self.sources[u][rr[order]]
            out[m] = block
        return out

    def __getitem__(self, ids) -> torch.Tensor:
        if isinstance(ids, slice):
            ids = np.arange(self.n)[ids]
        elif isinstance(ids, (int, np.integer)):
            return torch.from_numpy(self.gather([ids])[0])
        return torch.from_numpy(self.gather(ids))

    def numpy(self) -> np.ndarray:
        return self.gather(np.arange(self.n))

    def materialize(self, limit_bytes: int | None = None) -> FeatureTable:
        """The same table held in memory as one dense array when it fits in ``limit_bytes``
        (default: a quarter of the physical memory, shared by the node's torchrun ranks), else
        ``self``: still memory-mapped, so the ranks of a node share one copy in the page cache."""
        if self.in_memory and len(self.sources) == 1 and np.array_equal(self.rows, np.arange(self.n)):
            return self
        if limit_bytes is None:
            limit_bytes = _physical_memory() // (4 * runtime.local_world_size())
        if self.nbytes > limit_bytes:
            return self
        dense = np.zeros((self.n, self.dim), FEATURE_DTYPE)
        for u, source in enumerate(self.sources):
            m = np.nonzero(self.src == u)[0]
            if len(m):
                rr = self.rows[m]
                order = np.argsort(rr, kind="stable")
                dense[m[order]] = source[rr[order]]
        self.release()
        return FeatureTable.dense(dense)

    def release(self) -> None:
        """Drop the memory-mapped pages read so far from this process's resident set (they stay in
        the page cache), so that streaming through a large table keeps memory flat."""
        for s in self.sources:
            mm = getattr(s, "_mmap", None)
            if isinstance(s, np.memmap) and mm is not None and hasattr(mm, "madvise"):
                try:
                    mm.madvise(mmap.MADV_DONTNEED)
                except (OSError, ValueError, AttributeError):
                    pass


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class FeatureCache:
    """Append-only shards of ``(file keys, float16 features)`` in one folder per extractor key."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._rows: dict[str, tuple[int, int]] = {}
        self._errors: dict[str, str] = {}
        self._names: list[str] = []
        self._arrays: dict[str, np.ndarray] = {}
        self.reload()

    def reload(self) -> None:
        self._rows.clear()
        self._errors.clear()
        self._names = []
        if not self.folder.is_dir():
            return
        for meta in sorted(self.folder.glob("shard-*.json")):
            try:
                blob = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue
            npy = meta.with_suffix(".npy")
            if not npy.is_file():
                continue
            if blob.get("keys"):
                self._names.append(npy.name)
                u = len(self._names) - 1
                for row, key in enumerate(blob["keys"]):
                    self._rows[key] = (u, row)
            self._errors.update(blob.get("errors", {}))

    def __len__(self) -> int:
        return len(self._rows)

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = np.load(self.folder / name, mmap_mode="r")
        return self._arrays[name]

    def lookup(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """``(shard per key, row per key, {position: error})``; the shard is ``MISSING`` for keys not
        in the cache and ``FAILED`` for files known to be unreadable."""
        src = np.full(len(keys), MISSING, np.int32)
        rows = np.zeros(len(keys), np.int64)
        errors: dict[int, str] = {}
        for i, k in enumerate(keys):
            hit = self._rows.get(k)
            if hit is not None:
                src[i], rows[i] = hit
            elif k in self._errors:
                src[i] = FAILED
                errors[i] = self._errors[k]
        return src, rows, errors

    def sources(self) -> list[np.ndarray]:
        return [self._array(n) for n in self._names]

    def add(self, keys: list[str], feats: np.ndarray, errors: dict[str, str]) -> str:
        """Write one shard (atomically: the ``.npy`` first, then the ``.json`` that makes it visible)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = f"shard-{uuid.uuid4().hex[:12]}"
        tmp = self.folder / f".{stem}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(feats, dtype=FEATURE_DTYPE))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / f"{stem}.npy")
        atomic_write_text(self.folder / f"{stem}.json", json.dumps({"keys": keys, "errors": errors}))
        return stem


def _forward_features(model, x: torch.Tensor, precision: Precision, device: torch.device) -> torch.Tensor:
    with torch.no_grad(), precision.autocast(device):
        return model.features(precision.prepare(x)).float()


def iter_features(model, files: list[str], pipeline: Pipeline, *, device: torch.device, precision: Precision,
                  batch_size: int = 64, order: list[int] | None = None, num_workers: int | None = None,
                  desc: str = "features", max_pixels: int | None = None):
    """Yield ``(positions, float16 features [b, D], {position: error})`` batch by batch, in ``order``."""
    ds = ImageDataset(files, pipeline, stage_only=True, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    picked = [files[i] for i in order] if order is not None else files
    plan = plan_loader(picked, pipeline, device, num_workers)
    loader = make_loader(ds, batch_size, order, num_workers=plan.workers, pin_memory=device.type == "cuda")
    with cpu_threads(runtime.fewest_threads(plan.threads, runtime.model_threads(model, device))):
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


def extract_features(model, files: list[str], pipeline: Pipeline, *, device: torch.device, precision: Precision,
                     batch_size: int = 64, num_workers: int | None = None, use_cache: bool = True,
                     cache_root: str | os.PathLike | None = None, desc: str = "features",
                     max_pixels: int | None = None) -> tuple[FeatureTable, dict[int, str]]:
    """Features of every file as a :class:`FeatureTable` ``[N, D]`` (rows of unreadable files are
    zero), and ``{position: reason}`` for the unreadable files.

    Cached files are read from the cache; the missing ones are computed (dealt to torchrun ranks
    in whole batches) and written to it shard by shard. With ``use_cache=False`` everything is
    computed in memory (``N x D x 2`` bytes). Every rank returns the full table.
    """
    model.eval()
    n = len(files)
    cache = None
    if use_cache:
        key = extractor_key(model, pipeline, precision, device, max_pixels)
        cache = FeatureCache(Path(cache_root or cache_dir() / "features") / key)
    keys = [file_key(f) for f in files]
    if cache is not None:
        src, rows, errors = cache.lookup(keys)
    else:
        src, rows, errors = np.full(n, MISSING, np.int32), np.zeros(n, np.int64), {}
    missing = np.nonzero(src == MISSING)[0].tolist()
    if runtime.is_distributed():  # the same work list on every rank, even if their caches differ
        missing = sorted(set().union(*runtime.all_gather_objects(missing)))
    mine = _deal_batches(missing, batch_size)

    mem_keys: list[str] = []  # rows computed here and not (yet) in the cache
    mem_rows: list[np.ndarray] = []
    written: list[str] = []
    pending_keys: list[str] = []
    pending: list[np.ndarray] = []
    pending_err: dict[str, str] = {}
    new_errors: dict[str, str] = {}
    cache_ok = True

    def flush() -> None:
        nonlocal cache_ok
        if pending_keys or pending_err:
            feats = np.concatenate(pending) if pending else np.zeros((0, 1), FEATURE_DTYPE)
            if cache_ok:
                try:
                    written.append(cache.add(list(pending_keys), feats, dict(pending_err)))
                except OSError as e:  # a read-only or full cache folder costs the cache, not the run
                    cache_ok = False
                    warnings.warn(f"cannot write the feature cache in {cache.folder} ({e}); "
                                  f"keeping features in memory", stacklevel=2)
            if not cache_ok and pending_keys:
                mem_keys.extend(pending_keys)
                mem_rows.append(feats)
            pending_keys.clear()
            pending.clear()
            pending_err.clear()

    if mine or runtime.is_distributed():
        for pos, f, errs in iter_features(model, files, pipeline, device=device, precision=precision,
                                          batch_size=batch_size, order=mine, num_workers=num_workers, desc=desc,
                                          max_pixels=max_pixels):
            errs = {keys[i]: r for i, r in errs.items()}
            new_errors.update(errs)
            if cache is None:
                if f is not None:
                    mem_keys.extend(keys[i] for i in pos)
                    mem_rows.append(f)
                continue
            pending_err.update(errs)
            if f is not None:
                pending_keys.extend(keys[i] for i in pos)
                pending.append(f)
            if len(pending_keys) >= SHARD_ROWS:
                flush()
        if cache is not None:
            flush()

    extra_keys: list[str] = []
    extra_rows: list[np.ndarray] = []
    if runtime.is_distributed():
        if cache is not None:
            runtime.barrier()
            cache.reload()
            src, rows, errors = cache.lookup(keys)
            lacking = bool((src == MISSING).any())
            # (host, folder) of every rank: the lowest rank of each cache folder writes to it
            place = (socket.gethostname(), str(cache.folder.resolve()), lacking)
            places = runtime.all_gather_objects(place)
            writer = [p[:2] for p in places].index(place[:2]) == runtime.rank()
            if any(p[2] for p in places):  # some ranks do not see the others' shards: exchange the rows
                mine_k, mine_f, mine_e = _read_back(cache, written)
                if mem_keys:  # rows this rank could not write
                    mine_k = mine_k + mem_keys
                    mine_f = np.concatenate(([mine_f] if mine_f is not None else []) + mem_rows)
                    mem_keys, mem_rows = [], []
                for k, f, e in runtime.all_gather_objects((mine_k, mine_f, mine_e)):
                    extra_keys.extend(k)
                    if len(k):
                        extra_rows.append(f)
                    new_errors.update(e)
                if lacking and writer and cache_ok:
                    have = set(cache._rows)
                    take = [j for j, k in enumerate(extra_keys) if k not in have]
                    if take:
                        try:
                            cache.add([extra_keys[j] for j in take], np.concatenate(extra_rows)[take],
                                      {k: r for k, r in new_errors.items() if k not in cache._errors})
                        except OSError as e:
                            warnings.warn(f"cannot write the feature cache in {cache.folder} ({e})", stacklevel=2)
        else:
            for k, f, e in runtime.all_gather_objects((mem_keys, np.concatenate(mem_rows) if mem_rows else None,
                                                       new_errors)):
                extra_keys.extend(k)
                if len(k):
                    extra_rows.append(f)
                new_errors.update(e)
            mem_keys, mem_rows = [], []
    elif cache is not None and written:
        cache.reload()
        src, rows, errors = cache.lookup(keys)

    sources = cache.sources() if cache is not None else []
    mem_keys = mem_keys + extra_keys
    mem_rows = mem_rows + extra_rows
    if mem_keys:
        where = {k: j for j, k in enumerate(mem_keys)}
        u = len(sources)
        sources.append(np.concatenate(mem_rows))
        for i in np.nonzero(src == MISSING)[0]:
            j = where.get(keys[i])
            if j is not None:
                src[i], rows[i] = u, j
    for i in np.nonzero(src == MISSING)[0]:
        reason = new_errors.get(keys[i])
        src[i] = FAILED
        errors[int(i)] = reason or "features could not be computed"
    dims = {s.shape[1] for s in sources if s.ndim == 2 and len(s)}
    dim = dims.pop() if dims else 0
    return FeatureTable(n, dim, sources, src, rows), errors


def _read_back(cache: FeatureCache, stems: list[str]) -> tuple[list[str], np.ndarray | None, dict[str, str]]:
    keys: list[str] = []
    rows: list[np.ndarray] = []
    errors: dict[str, str] = {}
    for stem in stems:
        blob = json.loads((cache.folder / f"{stem}.json").read_text())
        errors.update(blob.get("errors", {}))
        if blob["keys"]:
            keys.extend(blob["keys"])
            rows.append(np.load(cache.folder / f"{stem}.npy"))
    return keys, (np.concatenate(rows) if rows else None), errors
