"""The on-disk feature cache: memory-mapped float16 shards, one folder per extractor key.

Layout: ``<cache>/features/<key>/shard-*.npy`` (rows) + ``shard-*.json`` (the file key of each
row). The key (:func:`extractor_key`) hashes everything that produces the numbers: the backbone's
name, a digest of its weights, the preprocessing (input size, native size, JPEG alignment,
degradation, pixel limit), the precision, the device type, the image reader's version and the
versions of fakescope, timm and the decoding and numeric libraries. Each file is identified by its
absolute path, size and modification time (:func:`file_key`), so an edited image is recomputed.

Only features are cached. Unreadable files are not: a file that failed to decode is tried again
by the next extraction (it may have been repaired, its permissions fixed, or a newer decoder may
read it), so a read error never outlives the run that met it.

:class:`FeatureTable` is a read-only ``[N, D]`` view that gathers rows from the memory-mapped
shards: at GenImage scale (2.6 M images x 2048 float16 = 10 GiB for ResNet-50) nothing forces
the features into RAM; :meth:`FeatureTable.materialize` copies them into memory when they fit.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import fakescope
from fakescope.data import io
from fakescope.data.io import DEFAULT_MAX_PIXELS
from fakescope.data.transforms import Pipeline
from fakescope.engine import runtime
from fakescope.engine.runtime import Precision
from fakescope.utils import atomic_write_text

FEATURE_DTYPE = np.float16
MISSING, FAILED = -1, -2
"""Shard numbers in a lookup: not in the cache / unreadable file (a zero row)."""


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def producer_versions() -> dict:
    """Versions of everything between a file and its features other than the model and options:
    fakescope (the pipeline), its image reader, timm (the backbones) and the numeric and decoding
    libraries. Read at call time, so an upgrade in place changes the key."""
    import PIL
    import timm
    import torchvision


    return {"fakescope": fakescope.__version__, "reader": io.READER_VERSION, "timm": timm.__version__,
            "torch": torch.__version__.split("+")[0], "torchvision": torchvision.__version__.split("+")[0],
            "pillow": PIL.__version__, "numpy": np.__version__}


def extractor_key(model, pipeline: Pipeline, precision: Precision, device: torch.device | str = "cpu",
                  max_pixels: int | None = None) -> str:
    """The cache folder name: a hash of everything that changes a file's features."""
    desc = {
        "backbone": getattr(model, "backbone_name", type(model).__name__),
        "weights": weights_digest(model.backbone),
        "preprocess": model.preprocess.to_dict(),
        # max_side only when set: the keys of every cache written before it existed stay valid
        "pipeline": {k: v for k, v in asdict(pipeline).items()
                     if k != "augment" and not (k == "max_side" and v is None)},
        "precision": precision.name,
        "device": torch.device(device).type,
        "max_pixels": max_pixels or DEFAULT_MAX_PIXELS,
        "versions": producer_versions(),
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
        self._names: list[str] = []
        self._arrays: dict[str, np.ndarray] = {}
        self.reload()

    def reload(self) -> None:
        """Read the shard list again (other processes may have added shards)."""
        self._rows.clear()
        self._names = []
        if not self.folder.is_dir():
            return
        for meta in sorted(self.folder.glob("shard-*.json")):
            try:
                blob = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue
            npy = meta.with_suffix(".npy")
            if not npy.is_file() or not blob.get("keys"):
                continue
            self._names.append(npy.name)
            u = len(self._names) - 1
            for row, key in enumerate(blob["keys"]):
                self._rows[key] = (u, row)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = np.load(self.folder / name, mmap_mode="r")
        return self._arrays[name]

    def lookup(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(shard per key, row per key)``; the shard is ``MISSING`` for keys not in the cache."""
        src = np.full(len(keys), MISSING, np.int32)
        rows = np.zeros(len(keys), np.int64)
        for i, k in enumerate(keys):
            hit = self._rows.get(k)
            if hit is not None:
                src[i], rows[i] = hit
        return src, rows

    def sources(self) -> list[np.ndarray]:
        return [self._array(n) for n in self._names]

    def add(self, keys: list[str], feats: np.ndarray) -> str:
        """Write one shard (atomically: the ``.npy`` first, then the ``.json`` that makes it visible)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = f"shard-{uuid.uuid4().hex[:12]}"
        tmp = self.folder / f".{stem}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(feats, dtype=FEATURE_DTYPE))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / f"{stem}.npy")
        atomic_write_text(self.folder / f"{stem}.json", json.dumps({"keys": keys}))
        return stem

    def read_shards(self, stems: list[str]) -> tuple[list[str], np.ndarray | None]:
        """The keys and rows of the shards ``stems`` (this process's own, read back for an exchange)."""
        keys: list[str] = []
        rows: list[np.ndarray] = []
        for stem in stems:
            blob = json.loads((self.folder / f"{stem}.json").read_text())
            if blob["keys"]:
                keys.extend(blob["keys"])
                rows.append(np.load(self.folder / f"{stem}.npy"))
        return keys, (np.concatenate(rows) if rows else None)
