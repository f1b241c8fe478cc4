"""Where and how tensors run: device, precision, memory format, and torchrun's process group.

Nothing here runs at import time; :func:`init_distributed` is called by the commands that
support ``torchrun`` and is a no-op in a single process.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fakescope.errors import FakescopeError

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


def resolve_precision(precision: str, device: torch.device, *, inference: bool) -> Precision:
    """``auto``: bf16 autocast + channels_last for inference where the processor supports bf16
    (AVX-512 bf16 / AMX on CPU, Ampere+ on GPU), fp32 otherwise and always fp32 for training,
    which keeps training bit-reproducible."""
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
    return Precision("fp32", None, False)


# --- torchrun ---------------------------------------------------------------------------------

def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init_distributed() -> bool:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1): NCCL on GPU, gloo on CPU."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return True


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj):
    """Every rank's ``obj``, in rank order (a one-element list in a single process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_batches(n: int, batch_size: int) -> list[list[int]]:
    """Split ``range(n)`` into whole batches and deal them to ranks round-robin.

    Each image is computed exactly once, in the same batch as in a single process, so a
    sharded evaluation gives bit-identical scores and no padded duplicates."""
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    return batches[rank():: world_size()]
