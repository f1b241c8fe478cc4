"""Progress bars that only rank 0 shows, and that stay quiet when output is not a terminal and
FAKESCOPE_PROGRESS=0."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def _enabled() -> bool:
    if os.environ.get("FAKESCOPE_PROGRESS", "1") == "0":
        return False
    return int(os.environ.get("RANK", "0")) == 0


def progress(it: Iterable[T] | None, desc: str = "", total: int | None = None, leave: bool = False,
             unit: str = "it") -> Iterable[T]:
    """A tqdm bar over ``it`` (or, with ``it=None``, a bar updated by hand up to ``total``)."""
    return tqdm(it, desc=desc, total=total, leave=leave, disable=not _enabled(), file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5, unit=unit)
