"""torchrun's process group: this process's rank, the world size, barriers and batch sharding.

In the base layer so that every layer (the engine, the report writers, the study) can ask "am I the
main process?" without importing the engine; :mod:`fakescope.engine.runtime` re-exports these names.
Nothing runs at import time: :func:`init_distributed` is called by the commands that support ``torchrun``
and is a no-op in a single process.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes torchrun started on this node (1 outside torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def is_main() -> bool:
    return rank() == 0


def init_distributed(device: str = "auto") -> bool:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1): NCCL on GPU, gloo on CPU
    (``--device cpu`` uses gloo on a GPU machine too; ``FAKESCOPE_DIST_BACKEND`` overrides)."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    gpu = torch.cuda.is_available() and str(device) != "cpu"
    backend = os.environ.get("FAKESCOPE_DIST_BACKEND") or ("nccl" if gpu else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    atexit.register(shutdown_distributed)
    return True


def shutdown_distributed() -> None:
    """Leave the process group (registered at exit by :func:`init_distributed`)."""
    if is_distributed():
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError):
            pass


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


def shard_batches(n: int, batch_size: int) -> list[list[int]]:
    """Split ``range(n)`` into whole batches and deal them to ranks round-robin.

    Each image is computed exactly once, in the same batch as in a single process, so a
    sharded evaluation gives bit-identical scores and no padded duplicates."""
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    return batches[rank():: world_size()]
