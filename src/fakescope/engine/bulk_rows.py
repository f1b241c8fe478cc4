"""What one input of ``predict --out DIR`` becomes, for both engines (:mod:`fakescope.engine.bulk`, this
process or torchrun; :mod:`fakescope.engine.ray_bulk`, Ray Data): the input decoded into the run's stage
image and its fields (:func:`decode_input`), the shard's columns (:func:`schema`), the scored fields
(:class:`Scoring`) and the test hook that kills the process after N committed shards (:class:`KillHook`).
pyarrow and c2pa are imported where they are used (optional dependencies, not needed at start-up)."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from fakescope.data.io import DEFAULT_MAX_PIXELS, Decoded, decode_file, read_image_bytes
from fakescope.engine.evaluation import attribution_fields
from fakescope.errors import ImageReadError
from fakescope.provenance import inspect_bytes, inspect_provenance

KILL_AFTER_ENV = "FAKESCOPE_TEST_KILL_AFTER_SHARDS"
"""Test hook: the process SIGKILLs itself right after committing this many shards (a deterministic crash)."""


def schema(attribution: bool):
    """The Parquet schema of a shard (``generator``/``generator_p`` only for an attribution run)."""
    import pyarrow as pa

    fields = [("path", pa.string()), ("p_ai", pa.float64()), ("verdict", pa.string()), ("threshold", pa.float64()),
              ("threshold_source", pa.string()), ("calibrated", pa.bool_())]
    if attribution:
        fields += [("generator", pa.string()), ("generator_p", pa.float64())]
    fields += [("width", pa.int32()), ("height", pa.int32()), ("format", pa.string()), ("bytes", pa.int64()),
               ("error", pa.string()), ("metadata_says_ai", pa.bool_()), ("generator_hint", pa.string())]
    return pa.schema(fields)


COLUMNS = tuple(schema(True).names)


def is_uri(path: str) -> bool:
    """A path with a scheme (``s3://``, ``gs://``, ``file://``, ...): read through pyarrow's filesystems."""
    head, sep, _ = path.partition("://")
    return bool(sep) and head.isascii() and head.replace("+", "").isalnum() and len(head) > 1


def reason_kind(reason: str) -> str:
    """The kind of an error, for the summary's counts: the reason without its details in parentheses
    (``truncated or corrupt image data (...)`` -> ``truncated or corrupt image data``)."""
    return reason.split(" (", 1)[0].strip() or reason


def _filesystem_read(uri: str, max_file_size: int | None) -> bytes:
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(path)
    except Exception as e:  # noqa: BLE001 - unknown scheme, no credentials, unreachable store
        raise ImageReadError(uri, f"cannot open ({' '.join(str(e).split())[:200]})") from None
    if info.type == pafs.FileType.NotFound:
        raise ImageReadError(uri, "file not found")
    if info.type == pafs.FileType.Directory:
        raise ImageReadError(uri, "a folder, not an image file")
    if max_file_size is not None and info.size is not None and info.size > max_file_size:
        raise ImageReadError(uri, f"file too large ({info.size} bytes > limit {max_file_size}; raise --max-file-size)")
    try:
        with fs.open_input_file(path) as f:
            return f.read()
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(uri, f"cannot read ({' '.join(str(e).split())[:200]})") from None


def _provenance(path: str, data: bytes | None) -> dict:

    rep = inspect_bytes(data, path) if data is not None else inspect_provenance(path)
    return {"metadata_says_ai": rep.get("metadata_says_ai"), "generator_hint": rep.get("generator_hint")}


def decode_input(path: str, pipeline, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_file_size: int | None = None,
                 provenance: bool = True) -> tuple[torch.Tensor | None, dict]:
    """``(stage image or None, fields)`` for one input: the image through the run's pipeline (as
    ``predict`` prepares it) and its ``width``, ``height``, ``format``, ``bytes``, ``error`` and
    provenance summary. Local paths are read by :func:`fakescope.data.io.decode_file` (the reader
    ``predict`` uses, with the same messages); URIs through pyarrow's filesystems and
    :func:`fakescope.data.io.read_image_bytes`. A bad file is an ``error``, never an exception."""
    meta: dict = {"width": None, "height": None, "format": None, "bytes": None, "error": None,
                  "metadata_says_ai": None, "generator_hint": None}
    data = None
    stage = None
    try:
        if is_uri(path):
            data = _filesystem_read(path, max_file_size)
            d: Decoded = read_image_bytes(data, path, max_pixels=max_pixels, max_file_size=max_file_size,
                                          reduce_to=pipeline.reduce_size())
        elif not os.path.lexists(path):
            raise ImageReadError(path, "file not found")
        else:
            d = decode_file(path, max_pixels=max_pixels, max_file_size=max_file_size,
                            reduce_to=pipeline.reduce_size())
        meta.update(width=d.width, height=d.height, format=d.format, bytes=d.bytes)
        try:
            stage = pipeline.to_stage(d.image)
        except (RuntimeError, ValueError) as e:  # as ImageDataset/Predictor: e.g. a 1-pixel-wide image
            raise ImageReadError(path, f"cannot transform image ({e})") from None
    except ImageReadError as e:
        meta["error"] = e.reason
        if data is not None:
            meta["bytes"] = len(data)
        elif not is_uri(path):
            try:
                meta["bytes"] = os.stat(path).st_size if os.path.isfile(path) else None
            except OSError:
                pass
    if provenance and (data is not None or (not is_uri(path) and os.path.isfile(path))):
        meta.update(_provenance(path, data))
    return stage, meta


class FileDataset(Dataset):
    """``{"index", "stage" | None, "meta"}`` per input (:func:`decode_input`), for a DataLoader."""

    def __init__(self, paths: list[str], pipeline, *, max_pixels: int, max_file_size: int | None,
                 provenance: bool) -> None:
        self.paths, self.pipeline = paths, pipeline
        self.kw = {"max_pixels": max_pixels, "max_file_size": max_file_size, "provenance": provenance}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        stage, meta = decode_input(self.paths[i], self.pipeline, **self.kw)
        return {"index": i, "stage": stage, "meta": meta}


def collate_files(items: list[dict]) -> dict:
    good = [it for it in items if it["stage"] is not None]
    return {"index": [it["index"] for it in items], "meta": [it["meta"] for it in items],
            "good": [it["index"] for it in good],
            "stage": torch.stack([it["stage"] for it in good]) if good else None}


@dataclass
class Scoring:
    """What turns a run's raw scores into rows: the decision (calibration, threshold) and the classes."""

    decision: object
    classes: list[str] | None

    def fields(self, scores: np.ndarray) -> list[dict]:
        """One dict per image from :meth:`Predictor.scores` output ``[B, W]`` (raw P(ai), then class
        probabilities): ``p_ai`` (calibrated, unrounded float64), ``verdict``, ``threshold``,
        ``threshold_source``, ``calibrated`` and for an attribution run ``generator``/``generator_p``
        -- or ``{"error"}`` where the score is not a finite number, as ``predict`` reports it."""
        d = self.decision
        raw = np.asarray(scores[:, 0], dtype=np.float64)
        p = np.asarray(d.p_ai(raw), dtype=np.float64)
        out = []
        for i in range(len(raw)):
            if not np.isfinite(raw[i]):
                out.append({"error": f"the model returned a non-finite score ({float(raw[i])})"})
            elif not np.isfinite(p[i]):
                out.append({"error": f"the model scored this image {p[i]} (not a finite number)"})
            else:
                row = {"p_ai": float(p[i]), "verdict": "ai" if p[i] >= d.threshold else "nature",
                       "threshold": float(d.threshold), "threshold_source": d.source, "calibrated": d.calibrated}
                if self.classes:
                    a = attribution_fields(scores[i, 1:], self.classes)
                    row.update(generator=a["generator"], generator_p=a["generator_p"])
                out.append(row)
        return out


def empty_row(path: str) -> dict:
    return dict.fromkeys(COLUMNS) | {"path": path}


class KillHook:
    """The :data:`KILL_AFTER_ENV` test hook: SIGKILL this process right after the N-th committed shard."""

    def __init__(self) -> None:
        v = os.environ.get(KILL_AFTER_ENV)
        self.after = int(v) if v else None
        self.done = 0

    def committed(self) -> None:
        self.done += 1
        if self.after is not None and self.done >= self.after:
            os.kill(os.getpid(), signal.SIGKILL)
