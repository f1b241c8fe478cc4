"""Where and how tensors run: device, precision, memory format, (torchrun's process group: :mod:`fakescope.ranks`).

Nothing here runs at import time; :func:`init_distributed` is called by the commands that
support ``torchrun`` and is a no-op in a single process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fakescope.choices import DEVICES, PRECISIONS  # noqa: F401  (defined in the base layer; re-exported here)
from fakescope.data.io import DEFAULT_MAX_PIXELS
from fakescope.errors import FakescopeError
from fakescope.options import RuntimeOptions, check_device, check_precision
from fakescope.ranks import (  # noqa: F401  (torchrun's helpers live in the base layer; re-exported here)
    all_gather_objects,
    barrier,
    init_distributed,
    is_distributed,
    is_main,
    local_rank,
    local_world_size,
    rank,
    shard_batches,
    shutdown_distributed,
    world_size,
)


def resolve_device(device: str = "auto") -> torch.device:
    check_device(device)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() if is_distributed() else torch.cuda.current_device())
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FakescopeError("--device cuda was asked for but no CUDA GPU is available: use --device cpu or auto")
    if device == "cuda" and is_distributed():
        return torch.device("cuda", local_rank())
    return torch.device(device)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class Precision:
    """The resolved numeric setup: autocast dtype (None = fp32) and memory format."""

    name: str
    dtype: torch.dtype | None
    channels_last: bool

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


def prepare_model(model: torch.nn.Module, precision: Precision, *, compile: bool = False) -> torch.nn.Module:
    """Put ``model`` in ``precision``'s memory format (channels_last or the default one) and, with
    ``compile``, compile it in place."""
    model.to(memory_format=torch.channels_last if precision.channels_last else torch.contiguous_format)
    if compile:
        compile_model(model)
    return model


SMALL_INPUT = 64
"""Models whose input side is at most this many pixels (cnn32's 32x32) run single-threaded on a CPU."""


def model_threads(model, device: torch.device) -> int | None:
    """Intra-op CPU threads for ``model``: 1 for small-input models, None (torch's default) otherwise.

    A 32x32 model's operators last microseconds to a millisecond: a thread team gains little on
    them and, when any other process takes a core, each operator waits for a descheduled thread
    (measured on a shared 2-core machine, a 2,000-image cnn32 epoch: 1.3-1.4 s on one thread,
    1.8-2.3 s on two with OMP_WAIT_POLICY=PASSIVE, 5-38 s on two with OpenMP's default spinning).
    The count depends only on the model, so a training command stays reproducible."""
    if torch.device(device).type != "cpu":
        return None
    size = getattr(getattr(model, "preprocess", None), "input_size", None)
    return 1 if size is not None and size <= SMALL_INPUT else None


def fewest_threads(*counts: int | None) -> int | None:
    """The smallest of the thread counts that are set (None when none is)."""
    set_ = [c for c in counts if c is not None]
    return min(set_) if set_ else None


def compile_model(model: torch.nn.Module, backend: str | Callable = "inductor") -> torch.nn.Module:
    """``torch.compile`` a detector in place: its backbone and head modules are compiled (so the
    state dict keeps its names and checkpoints are unchanged); ``features``/``head``/``forward``
    all use the compiled modules. Where compilation fails at run time (no C++ compiler, an
    unsupported operator) these modules fall back to eager mode with a logged warning instead of
    stopping; torch's ``suppress_errors`` is set only while they run, never for the whole process."""
    parts = [getattr(model, name, None) for name in ("backbone", "head_net")]
    parts = [m for m in parts if isinstance(m, torch.nn.Module) and any(True for _ in m.parameters())]
    for m in parts or [model]:
        m.forward = _eager_on_failure(torch.compile(m.forward, backend=backend))
    return model


def _eager_on_failure(compiled: Callable) -> Callable:
    @functools.wraps(compiled)
    def call(*args, **kwargs):
        import torch._dynamo

        with torch._dynamo.config.patch(suppress_errors=True):
            return compiled(*args, **kwargs)

    return call


def resolve_precision(precision: str, device: torch.device, *, inference: bool) -> Precision:
    """``auto``: bf16 autocast + channels_last for inference where the processor supports bf16
    (AVX-512 bf16 / AMX on CPU, Ampere+ on GPU), fp32 otherwise and always fp32 for training,
    which keeps training bit-reproducible. Training uses channels_last in every precision (a
    cnn32 epoch on CPU: 25-30 % faster); fp32 inference keeps the default memory format."""
    check_precision(precision)
    if precision == "auto":
        precision = "bf16" if inference and bf16_supported(device) else "fp32"
    if precision == "bf16":
        if not bf16_supported(device):
            raise FakescopeError(f"--precision bf16 is not supported on this {device.type} device: use fp32")
        return Precision("bf16", torch.bfloat16, True)
    if precision == "fp16":
        if device.type != "cuda":
            raise FakescopeError("--precision fp16 needs a CUDA GPU: on CPU use bf16 or fp32")
        return Precision("fp16", torch.float16, True)
    return Precision("fp32", None, not inference)


@dataclass(frozen=True)
class Runtime:
    """:class:`~fakescope.options.RuntimeOptions` resolved on this machine: the ``torch.device`` and the
    numeric :class:`Precision` they stand for, beside the options themselves (batch size, workers,
    cache, image limits, threads, compile). Made by :func:`resolve` (or :func:`fixed`); the low-level
    scoring functions (:func:`fakescope.engine.infer.score_variants`, ``evaluate_index``,
    :func:`fakescope.engine.features.extract_features`) take it as one argument."""

    options: RuntimeOptions
    device: torch.device
    precision: Precision
    inference: bool = True

    @property
    def batch_size(self) -> int | None:
        return self.options.batch_size

    @property
    def num_workers(self) -> int | None:
        return self.options.num_workers

    @property
    def use_cache(self) -> bool:
        return self.options.use_cache

    @property
    def cache_dir(self):
        return self.options.cache_dir

    @property
    def max_pixels(self) -> int:
        """The pixel limit, with the reader's default (120 M) for None."""
        return self.options.max_pixels or DEFAULT_MAX_PIXELS

    @property
    def max_file_size(self) -> int | None:
        return self.options.max_file_size

    @property
    def threads(self) -> int | None:
        return self.options.threads

    def replace(self, **changes) -> Runtime:
        """The same runtime with some options changed; a changed ``precision`` is resolved again on the
        same device (the device itself cannot change: resolve new options instead)."""
        if "device" in changes:
            raise ValueError("Runtime.replace cannot change the device: resolve new RuntimeOptions instead")
        options = dataclasses.replace(self.options, **changes)
        precision = self.precision
        if "precision" in changes:
            precision = resolve_precision(options.precision, self.device, inference=self.inference)
        return Runtime(options, self.device, precision, self.inference)


def resolve(options: RuntimeOptions | None = None, *, inference: bool = True) -> Runtime:
    """The one place :class:`~fakescope.options.RuntimeOptions` become a :class:`Runtime`: the device
    (:func:`resolve_device`) and the precision for inference or training (:func:`resolve_precision`)."""
    options = options if options is not None else RuntimeOptions()
    device = resolve_device(options.device)
    return Runtime(options, device, resolve_precision(options.precision, device, inference=inference), inference)


def fixed(device: torch.device | str, precision: Precision, **options) -> Runtime:
    """A :class:`Runtime` for a device and precision already resolved (training's sources, tests),
    with the other :class:`~fakescope.options.RuntimeOptions` fields from ``options``."""
    device = torch.device(device)
    return Runtime(RuntimeOptions(device=str(device), precision=precision.name, **options), device, precision)
