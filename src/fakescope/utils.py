"""Small shared helpers: atomic file writes, the cache directory, seeding, JSON."""

from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def slug(text: str, default: str = "x") -> str:
    """``text`` as a file-name part: runs of anything but letters, digits, ``.``, ``_`` and ``-``
    become one ``-``; ``default`` when nothing is left (the package's one slug function)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or default


def cache_dir() -> Path:
    """``$FAKESCOPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fakescope``, else ``~/.cache/fakescope``."""
    if os.environ.get("FAKESCOPE_CACHE_DIR"):
        return Path(os.environ["FAKESCOPE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fakescope"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file in the same folder, flush, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)  # make the rename itself durable


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries to disk (after a rename into it); a no-op where folders cannot be opened."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def clean_floats(o: Any) -> Any:
    """Replace NaN/inf by None so the JSON is standard."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: clean_floats(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean_floats(v) for v in o]
    return o


def dumps(obj: Any) -> str:
    return json.dumps(clean_floats(obj), indent=2, default=_json_default, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, dumps(obj) + "\n")


def torch_seed(value: int) -> int:
    """``value`` as a seed torch accepts (``0 <= seed < 2**64``): reduced modulo 2**64, which is
    what torch itself does to every value it accepts, so seeds that fit are unchanged. Seeds derived
    from ``--seed`` by arithmetic go through it, so no ``--seed`` overflows them."""
    return int(value) % 2**64


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(torch_seed(seed))
