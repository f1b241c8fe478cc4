"""Where and how tensors run: device, precision, memory format, (torchrun's process group: :mod:`fakescope.ranks`).

Nothing here runs at import time; :func:`init_distributed` is called by the commands that
support ``torchrun`` and is a no-op in a single process.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fakescope.errors import FakescopeError
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

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto") -> torch.device:
    if device not in DEVICES and not device.startswith("cuda:"):
        raise FakescopeError(f"expected --device to be one of {', '.join(DEVICES)}, got {device!r}")
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
    if precision not in PRECISIONS:
        raise FakescopeError(f"expected --precision to be one of {', '.join(PRECISIONS)}, got {precision!r}")
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
