"""Datasets and loaders: decode once, resize on uint8, convert to float only at the end.

A :class:`ImageDataset` yields ``uint8`` images at the pipeline's stage size (or at the model's
input size); a file that cannot be read yields its error reason instead, so one bad file never
stops a run. :func:`preload` keeps a whole split of small images in memory as one ``uint8``
tensor; large images always stream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from fakescope.data.io import DEFAULT_MAX_PIXELS, read_image
from fakescope.data.transforms import Pipeline
from fakescope.errors import ImageReadError
from fakescope.progress import progress


class ImageDataset(Dataset):
    """Images from ``files`` through ``pipeline``; item = ``{"index", "image"}`` or ``{"index", "error"}``.

    With ``stage_only`` the model's final resize is left to the caller (it is applied to whole
    batches), which keeps small images small in memory. Augmentation randomness is drawn from a
    generator seeded by ``(seed, epoch, index)``, so it is reproducible with any worker count.
    """

    def __init__(self, files: list[str], pipeline: Pipeline, *, stage_only: bool = False, seed: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_file_size: int | None = None) -> None:
        self.files = files
        self.pipeline = pipeline
        self.stage_only = stage_only
        self.seed = seed
        self.epoch = 0
        self.max_pixels = max_pixels
        self.max_file_size = max_file_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        try:
            img = read_image(self.files[i], max_pixels=self.max_pixels, max_file_size=self.max_file_size,
                             draft_size=self.pipeline.stage_size())
        except ImageReadError as e:
            return {"index": i, "error": e.reason}
        rng = None
        if self.pipeline.augment.active:
            rng = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
        try:
            x = self.pipeline.to_stage(img, rng) if self.stage_only else self.pipeline(img, rng)
        except (RuntimeError, ValueError) as e:  # e.g. a 1-pixel-wide image the encoder rejects
            return {"index": i, "error": f"cannot transform image ({e})"}
        return {"index": i, "image": x}


@dataclass
class Batch:
    image: torch.Tensor  # uint8 [B, 3, S, S]
    index: torch.Tensor  # long [B], positions in the dataset
    errors: list[tuple[int, str]]


def collate(items: list[dict]) -> Batch:
    good = [it for it in items if "image" in it]
    errors = [(it["index"], it["error"]) for it in items if "error" in it]
    if good:
        image = torch.stack([it["image"] for it in good])
    else:
        image = torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    return Batch(image, torch.tensor([it["index"] for it in good], dtype=torch.long), errors)


def default_workers() -> int:
    """DataLoader workers sized to the machine (one per core, at most 8; 0 on a single core)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if n <= 1 else min(8, n)


def make_loader(dataset: Dataset, batch_size: int, order: list[int] | None = None, *,
                num_workers: int | None = None, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``order`` (default: dataset order) that never drops or pads items."""
    workers = default_workers() if num_workers is None else num_workers
    return DataLoader(
        dataset, batch_size=batch_size, sampler=order if order is not None else range(len(dataset)),
        num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=4 if workers else None,
    )


@dataclass
class Preloaded:
    """A whole split as one ``uint8`` tensor at stage size; ``ok[i]`` is False for unreadable files."""

    images: torch.Tensor
    ok: torch.Tensor
    errors: dict[int, str]


def preload(dataset: ImageDataset, *, batch_size: int = 256, num_workers: int | None = None,
            desc: str = "loading") -> Preloaded:
    """Decode every image once into memory (for small images such as CIFAKE's 32x32)."""
    if not dataset.stage_only:
        raise ValueError("expected a stage_only dataset for preload")
    s = dataset.pipeline.stage_size()
    n = len(dataset)
    images = torch.zeros(n, 3, s, s, dtype=torch.uint8)
    ok = torch.zeros(n, dtype=torch.bool)
    errors: dict[int, str] = {}
    for batch in progress(make_loader(dataset, batch_size, num_workers=num_workers), desc=desc,
                          total=(n + batch_size - 1) // batch_size):
        images[batch.index] = batch.image if len(batch.index) else images[batch.index]
        ok[batch.index] = True
        errors.update(batch.errors)
    return Preloaded(images, ok, errors)


def should_preload(pipeline: Pipeline, n: int, limit_bytes: int = 2 << 30) -> bool:
    """Preload when the stage images are small (native size <= 64) and the split fits in ``limit_bytes``."""
    s = pipeline.stage_size()
    return pipeline.native_size is not None and s <= 64 and n * 3 * s * s <= limit_bytes \
        and not pipeline.augment.active


def typical_size(files: list[str], sample: int = 200) -> int | None:
    """The median shorter side of up to ``sample`` readable files (headers only), or None."""
    import hashlib
    import statistics

    from fakescope.data.io import probe_image

    sizes = []
    for f in sorted(files, key=lambda f: hashlib.sha1(f.encode()).hexdigest()):
        try:
            _, w, h = probe_image(f)
        except ImageReadError:
            continue
        sizes.append(min(w, h))
        if len(sizes) >= sample:
            break
    return int(statistics.median(sizes)) if sizes else None
