"""Frozen-backbone features, computed once per (backbone, weights, preprocessing, image file).

Features live on disk as memory-mapped float16 shards under the cache directory
(``<cache>/features/<key>/``), so training a head for many epochs, evaluating and benchmarking
all cost one backbone pass. The key hashes the backbone's name, a digest of its weights, the
preprocessing (input size, native size, JPEG alignment, degradation) and the precision; each
file is identified by its absolute path, size and modification time, so an edited image is
recomputed. Under torchrun each rank extracts its share of the missing files.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from fakescope.data.dataset import ImageDataset, make_loader
from fakescope.data.transforms import Pipeline
from fakescope.engine import runtime
from fakescope.engine.runtime import Precision
from fakescope.progress import progress
from fakescope.utils import atomic_write_text, cache_dir

FEATURE_DTYPE = np.float16


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def extractor_key(model, pipeline: Pipeline, precision: Precision) -> str:
    desc = {
        "backbone": getattr(model, "backbone_name", type(model).__name__),
        "weights": weights_digest(model.backbone),
        "preprocess": model.preprocess.to_dict(),
        "pipeline": {k: v for k, v in asdict(pipeline).items() if k != "augment"},
        "precision": precision.name,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:24]


def file_key(path: str) -> str:
    try:
        st = os.stat(path)
        return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        return f"{os.path.abspath(path)}|missing"


class FeatureCache:
    """Append-only shards of ``(file keys, float16 features)`` in one folder per extractor key."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._rows: dict[str, tuple[str, int]] = {}
        self._errors: dict[str, str] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self.reload()

    def reload(self) -> None:
        self._rows.clear()
        self._errors.clear()
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
            for row, key in enumerate(blob["keys"]):
                self._rows[key] = (npy.name, row)
            self._errors.update(blob.get("errors", {}))

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = np.load(self.folder / name, mmap_mode="r")
        return self._arrays[name]

    def lookup(self, keys: list[str]) -> tuple[dict[int, np.ndarray], dict[int, str], list[int]]:
        """``(found rows, known errors, missing positions)`` for ``keys``."""
        found, errors, missing = {}, {}, []
        for i, k in enumerate(keys):
            if k in self._rows:
                name, row = self._rows[k]
                found[i] = self._array(name)[row]
            elif k in self._errors:
                errors[i] = self._errors[k]
            else:
                missing.append(i)
        return found, errors, missing

    def add(self, keys: list[str], feats: np.ndarray, errors: dict[str, str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = f"shard-{uuid.uuid4().hex[:12]}"
        tmp = self.folder / f".{stem}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, feats.astype(FEATURE_DTYPE))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / f"{stem}.npy")
        atomic_write_text(self.folder / f"{stem}.json", json.dumps({"keys": keys, "errors": errors}))


def _forward_features(model, x: torch.Tensor, precision: Precision, device: torch.device) -> torch.Tensor:
    with torch.no_grad(), precision.autocast(device):
        return model.features(precision.prepare(x)).float()


def compute_features(model, files: list[str], pipeline: Pipeline, *, device: torch.device, precision: Precision,
                     batch_size: int = 64, num_workers: int | None = None, desc: str = "features",
                     max_pixels: int | None = None) -> tuple[np.ndarray, dict[int, str], list[int]]:
    """Backbone features of ``files`` in this process: ``(features [n_ok, D], errors, ok positions)``."""
    kw = {"max_pixels": max_pixels} if max_pixels else {}
    ds = ImageDataset(files, pipeline, stage_only=True, **kw)
    out: list[np.ndarray] = []
    ok: list[int] = []
    errors: dict[int, str] = {}
    loader = make_loader(ds, batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    for batch in progress(loader, desc=desc, total=len(loader)):
        errors.update(batch.errors)
        if not len(batch.index):
            continue
        x = pipeline.finish(batch.image.to(device, non_blocking=True)).float().div_(255)
        out.append(_forward_features(model, x, precision, device).cpu().numpy().astype(FEATURE_DTYPE))
        ok.extend(batch.index.tolist())
    d = out[0].shape[1] if out else 0
    return (np.concatenate(out) if out else np.zeros((0, d), FEATURE_DTYPE)), errors, ok


def extract_features(model, files: list[str], pipeline: Pipeline, *, device: torch.device, precision: Precision,
                     batch_size: int = 64, num_workers: int | None = None, use_cache: bool = True,
                     cache_root: str | os.PathLike | None = None, desc: str = "features",
                     max_pixels: int | None = None) -> tuple[torch.Tensor, dict[int, str]]:
    """Features of every file, float16 ``[N, D]`` (rows of unreadable files are zero), and the errors.

    Cached files are read from the cache; the missing ones are computed (split across torchrun
    ranks) and added to it. With ``use_cache=False`` everything is computed in memory.
    """
    model.eval()
    key = extractor_key(model, pipeline, precision)
    cache = FeatureCache(Path(cache_root or cache_dir() / "features") / key) if use_cache else None
    keys = [file_key(f) for f in files]
    if cache is not None:
        found, errors, missing = cache.lookup(keys)
    else:
        found, errors, missing = {}, {}, list(range(len(files)))
    mine = missing[runtime.rank():: runtime.world_size()]
    if mine or runtime.is_distributed():
        feats, errs, ok = compute_features(model, [files[i] for i in mine], pipeline, device=device,
                                           precision=precision, batch_size=batch_size, num_workers=num_workers,
                                           desc=desc, max_pixels=max_pixels)
        new_rows = {mine[j]: feats[r] for r, j in enumerate(ok)}
        new_errors = {mine[j]: reason for j, reason in errs.items()}
        if cache is not None and (new_rows or new_errors):
            cache.add([keys[i] for i in new_rows], np.stack(list(new_rows.values())) if new_rows
                      else np.zeros((0, 1), FEATURE_DTYPE), {keys[i]: r for i, r in new_errors.items()})
        if runtime.is_distributed():  # every rank needs every row
            if cache is not None:
                runtime.barrier()
                cache.reload()
                found, errors, _ = cache.lookup(keys)
            else:
                for rows, errs_ in runtime.all_gather_objects((new_rows, new_errors)):
                    found.update(rows)
                    errors.update(errs_)
        else:
            found.update(new_rows)
            errors.update(new_errors)
    dim = next(iter(found.values())).shape[0] if found else 0
    out = np.zeros((len(files), dim), FEATURE_DTYPE)
    for i, row in found.items():
        out[i] = row
    return torch.from_numpy(out), errors
