"""Where and how a command runs, as one value: :class:`RuntimeOptions`.

Device, precision, batch size, DataLoader workers, the feature cache (use and folder), the image
limits (pixels, file size), the CPU thread cap and ``torch.compile`` used to travel as ten separate
keyword arguments through every engine function. They are one frozen value instead, built once where
the settings come from (the command line: :func:`fakescope.commands.args.runtime_from_args`; a
benchmark configuration: :attr:`fakescope.study.config.BenchmarkConfig.runtime`; the server:
:attr:`fakescope.serve.app.ServeOptions.runtime`) and passed down as it is. Its fields are checked when
it is made. The engine resolves it once (:func:`fakescope.engine.runtime.resolve`) into a
:class:`~fakescope.engine.runtime.Runtime`, which adds the ``torch.device`` and the numeric
:class:`~fakescope.engine.runtime.Precision` the low-level scoring functions take.

This module is in the base layer: it knows the lists of valid values (:mod:`fakescope.choices`), not torch.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass

from fakescope.choices import DEVICES, PRECISIONS
from fakescope.errors import FakescopeError

PREDICT_MAX_FILE_SIZE = 50 * 2**20
"""``predict``'s default file-size limit in bytes (``--max-file-size``), which
:func:`~fakescope.engine.evaluation.predict_paths` and :func:`~fakescope.engine.bulk.predict_to_folder`
use when given no runtime options."""


def check_device(device) -> str:
    """``device`` when it is one of :data:`~fakescope.choices.DEVICES` or ``cuda:N``, else a :class:`FakescopeError`."""
    ok = isinstance(device, str) and (device in DEVICES or (device.startswith("cuda:") and device[5:].isdigit()))
    if not ok:
        raise FakescopeError(f"expected --device to be one of {', '.join(DEVICES)} (or cuda:N), got {device!r}")
    return device


def check_precision(precision) -> str:
    """``precision`` when it is one of :data:`~fakescope.choices.PRECISIONS`, else a :class:`FakescopeError`."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise FakescopeError(f"expected --precision to be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def _count(name: str, value, *, least: int) -> None:
    """None, or an integer (not a bool) of at least ``least``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        what = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise FakescopeError(f"expected {name} to be {what} or None, got {value!r}")


def _flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise FakescopeError(f"expected {name} to be true or false, got {value!r}")


@dataclass(frozen=True)
class RuntimeOptions:
    """The runtime settings of a command: how it runs, never what it computes (apart from the
    numeric precision, results do not depend on them). The defaults are the command line's.

    ``device``: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``. ``precision``: ``auto``
    (bf16 + channels_last for inference where the processor supports bf16, else fp32; fp32 for
    training), ``fp32``, ``bf16`` or ``fp16``. ``batch_size``: None for each function's default (inference:
    :func:`~fakescope.engine.infer.default_batch_size` of the model's input; ``attack``: 64).
    ``num_workers``: DataLoader workers (None: sized to the machine, see
    :func:`fakescope.data.dataset.plan_loader`). ``use_cache``/``cache_dir``: the frozen-feature cache and
    its folder (None: the user cache directory). ``max_pixels``: the decompression-bomb guard (None: the
    reader's default, 120 M). ``max_file_size``: the largest file in bytes (None: no limit; ``predict``'s
    command line and its library functions, given no options, use :data:`PREDICT_MAX_FILE_SIZE`).
    ``threads``: a cap on torch's CPU intra-op threads while scoring (None: the loader plan's and the
    model's choice). ``compile``: ``torch.compile`` the model."""

    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    num_workers: int | None = None
    use_cache: bool = True
    cache_dir: str | os.PathLike | None = None
    max_pixels: int | None = None
    max_file_size: int | None = None
    threads: int | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        check_device(self.device)
        check_precision(self.precision)
        _count("batch_size", self.batch_size, least=1)
        _count("num_workers", self.num_workers, least=0)
        _flag("use_cache", self.use_cache)
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise FakescopeError(f"expected cache_dir to be a folder path or None, got {self.cache_dir!r}")
        _count("max_pixels", self.max_pixels, least=1)
        _count("max_file_size", self.max_file_size, least=1)
        _count("threads", self.threads, least=1)
        _flag("compile", self.compile)
