"""Datasets and loaders: decode once, resize on uint8, convert to float only at the end.

A :class:`ImageDataset` yields ``uint8`` images at the pipeline's stage size (or at the model's
input size); a file that cannot be read yields its error reason instead, so one bad file never
stops a run. With ``variants`` it decodes each file once and yields one stage image per pipeline
(an evaluation under several degradation levels reads every file once). :func:`preload` keeps a
whole split of small images in memory as one ``uint8`` tensor; large images always stream.

:func:`plan_loader` sizes DataLoader workers and the main process's threads to the machine: on a
CPU the forward pass and the decoding workers share the same cores, and an OpenMP team that is
larger than the cores left to it stalls at every operator (each waits for a descheduled thread),
so on small machines and for cheap-to-decode images (small files)
decoding happens in the main process, and expensive images on larger machines get workers whose
cores are taken off the forward pass.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from fakescope.data.io import DEFAULT_MAX_PIXELS, probe_image, read_image
from fakescope.data.transforms import Pipeline, TransformError
from fakescope.errors import ImageReadError
from fakescope.progress import progress
from fakescope.utils import torch_seed


class ImageDataset(Dataset):
    """Images from ``files`` through ``pipeline``; item = ``{"index", "image"}`` or ``{"index", "error"}``.

    With ``stage_only`` the model's final resize is left to the caller (it is applied to whole
    batches), which keeps small images small in memory. Augmentation randomness is drawn from a
    generator seeded by ``(seed, epoch, index)``, so it is reproducible with any worker count;
    ``aug_keys`` replaces the index in that seed (files with one key draw the same crop, flip, blur,
    JPEG and scale: the two members of an aligned pair, for ``train --paired``). ``labels`` (0 nature,
    1 ai, one per file) reach the augmentation, for its class-conditional steps (``nature_blur_prob``).
    """

    def __init__(self, files: list[str], pipeline: Pipeline, *, stage_only: bool = False, seed: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_file_size: int | None = None,
                 variants: Sequence[Pipeline] | None = None, aug_keys: Sequence[int] | None = None,
                 labels: Sequence[int] | None = None) -> None:
        self.files = files
        self.pipeline = pipeline
        self.variants = tuple(variants) if variants else None
        if self.variants and len({v.stage_size() for v in self.variants}) != 1:
            raise ValueError("expected variants that share one stage size")
        self.stage_only = stage_only
        self.seed = seed
        self.epoch = 0
        self.max_pixels = max_pixels
        self.max_file_size = max_file_size
        if aug_keys is not None and len(aug_keys) != len(files):
            raise ValueError(f"expected one augmentation key per file, got {len(aug_keys)} for {len(files)} files")
        self.aug_keys = list(aug_keys) if aug_keys is not None else None
        if labels is not None and len(labels) != len(files):
            raise ValueError(f"expected one label per file, got {len(labels)} for {len(files)} files")
        self.labels = [int(y) for y in labels] if labels is not None else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        try:
            img = read_image(self.files[i], max_pixels=self.max_pixels, max_file_size=self.max_file_size,
                             reduce_to=self.pipeline.reduce_size())
        except ImageReadError as e:
            return {"index": i, "error": e.reason}
        rng = None
        label = self.labels[i] if self.labels is not None else None
        if self.pipeline.augment.active:
            key = self.aug_keys[i] if self.aug_keys is not None else i
            rng = torch.Generator().manual_seed(torch_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + key))
        try:
            if self.variants:
                x = torch.stack([v.to_stage(img, rng, label) if self.stage_only else v(img, rng, label)
                                 for v in self.variants])
            else:
                x = self.pipeline.to_stage(img, rng, label) if self.stage_only else self.pipeline(img, rng, label)
        except TransformError as e:  # e.g. a 70000-pixel-wide image cannot be re-encoded as JPEG; bugs propagate
            return {"index": i, "error": str(e)}
        return {"index": i, "image": x}


@dataclass
class Batch:
    image: torch.Tensor  # uint8 [B, 3, S, S] ([B, V, 3, S, S] with variants)
    index: torch.Tensor  # long [B], positions in the dataset
    errors: list[tuple[int, str]]

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread (``pin_memory=True``, on CUDA): page-locked
        images make the ``non_blocking`` copy to the GPU asynchronous."""
        return Batch(self.image.pin_memory(), self.index, self.errors)


def collate(items: list[dict]) -> Batch:
    good = [it for it in items if "image" in it]
    errors = [(it["index"], it["error"]) for it in items if "error" in it]
    if good:
        image = torch.stack([it["image"] for it in good])
    else:
        image = torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    return Batch(image, torch.tensor([it["index"] for it in good], dtype=torch.long), errors)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which honours taskset and cgroups' cpusets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """Workers for pure decoding (no forward pass competes): one per core, at most 8; 0 on a single core."""
    n = available_cores()
    return 0 if n <= 1 else min(8, n)


CHEAP_DECODE_MS = 3.0
"""Below this estimated decode time per image, decoding in the main process costs less than the
cores a worker would take from the forward pass (on machines with up to 8 cores)."""


def estimate_decode_ms(files: Sequence[str], stage_size: int | None = None, sample: int = 16) -> float:
    """Estimated milliseconds to decode one of ``files``, from the headers of up to ``sample`` of them.

    Every image is decoded in full (then box-reduced, a small extra cost), so the cost grows with
    the pixel count; JPEG decodes faster per pixel than PNG. ``stage_size`` is accepted for the
    callers' convenience and does not change the estimate. Unreadable samples are skipped; 0.0
    when none can be read."""
    costs = []
    picks = list(files[:: max(1, len(files) // sample)])[:sample]  # evenly spread, deterministic
    for f in picks:
        try:
            fmt, w, h = probe_image(f)
        except ImageReadError:
            continue
        ns_per_pixel = 6.0 if fmt == "JPEG" else 15.0
        costs.append(0.08 + w * h * ns_per_pixel * 1e-6)
    return sorted(costs)[len(costs) // 2] if costs else 0.0


@dataclass(frozen=True)
class LoaderPlan:
    """DataLoader ``workers`` and the main process's intra-op ``threads`` (None: leave torch's setting)."""

    workers: int
    threads: int | None
    reason: str

    def to_dict(self) -> dict:
        return {"workers": self.workers, "threads": self.threads, "reason": self.reason}


def plan_loader(files: Sequence[str], pipeline: Pipeline | None, device: torch.device | str = "cpu",
                num_workers: int | None = None) -> LoaderPlan:
    """Workers and main-process threads for a loop that decodes ``files`` and runs a model on ``device``.

    * CUDA: the GPU runs the model, so every core (up to 8) decodes.
    * CPU: the cores are split, never oversubscribed. On up to 2 cores everything runs in the
      main process (measured on 2 cores, when JPEGs were still draft-decoded: a
      tf_efficientnet_lite0 ``predict`` of large photos ran at 29 images/s decoding inline against
      15 with one worker; tiny images gain nothing from a worker). On more cores, cheap images
      (see :data:`CHEAP_DECODE_MS`) are decoded in the main process up to 8 cores, and expensive
      ones get ``cores // 4`` workers (at most 8); the remaining cores run the model.
    An explicit ``num_workers`` is honoured and the main process gets the cores left over.
    Under torchrun the node's cores are divided among its ranks."""
    cores = max(1, available_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    device = torch.device(device)
    if device.type == "cuda":
        workers = min(8, cores) if num_workers is None else num_workers
        return LoaderPlan(workers, None, "cuda: workers decode, the GPU computes")
    if num_workers is None:
        if cores <= 2:
            return LoaderPlan(0, None, f"{cores} core(s): decode in the main process")
        stage = pipeline.stage_size() if pipeline is not None else None
        cost = estimate_decode_ms(files, stage)
        if cost < CHEAP_DECODE_MS and cores <= 8:
            return LoaderPlan(0, None, f"cheap decoding (~{cost:.2f} ms/image): decode in the main process")
        workers = max(1, min(8, cores // 4 if cost >= CHEAP_DECODE_MS else cores // 8))
        reason = f"decoding ~{cost:.2f} ms/image: {workers} workers, {cores - workers} threads for the model"
    else:
        workers, reason = num_workers, "workers set explicitly"
    threads = max(1, cores - workers) if workers else None
    return LoaderPlan(workers, threads, reason)


class cpu_threads:  # noqa: N801 - used like a function: ``with cpu_threads(n): ...``
    """Context manager: torch's intra-op threads set to ``n`` (None: unchanged), restored on exit."""

    def __init__(self, n: int | None) -> None:
        self.n = n
        self.before = torch.get_num_threads()

    def __enter__(self) -> cpu_threads:
        if self.n is not None and self.n != self.before:
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc) -> None:
        if torch.get_num_threads() != self.before:
            torch.set_num_threads(self.before)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # torch does this too; explicit, as decoding must never spawn a thread team


def make_loader(dataset: Dataset, batch_size: int, order: list[int] | None = None, *,
                num_workers: int | None = None, pin_memory: bool = False, collate_fn=None) -> DataLoader:
    """A DataLoader over ``order`` (default: dataset order) that never drops or pads items
    (``collate_fn``: default :func:`collate`, for :class:`ImageDataset` items)."""
    workers = default_workers() if num_workers is None else num_workers
    return DataLoader(
        dataset, batch_size=batch_size, sampler=order if order is not None else range(len(dataset)),
        num_workers=workers, collate_fn=collate_fn or collate, pin_memory=pin_memory,
        worker_init_fn=_worker_init if workers else None, persistent_workers=False,
        prefetch_factor=4 if workers else None,
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


PRELOAD_CHOICES = ("auto", "on", "off")


def should_preload(pipeline: Pipeline, n: int, limit_bytes: int = 2 << 30, mode: str = "auto") -> bool:
    """Whether to decode a split once into memory.

    ``auto``: when the stage images are small (native size <= 64), no augmentation draws new
    randomness per epoch, and the split fits in ``limit_bytes``. ``on``: whenever augmentation
    allows it and the split fits in ``limit_bytes`` (raise the limit by choosing ``on`` for
    larger stage images); ``off``: never."""
    if mode not in PRELOAD_CHOICES:
        raise ValueError(f"expected preload to be one of {', '.join(PRELOAD_CHOICES)}, got {mode!r}")
    if mode == "off" or pipeline.augment.active:
        return False
    s = pipeline.stage_size()
    fits = n * 3 * s * s <= limit_bytes
    if mode == "on":
        return fits
    return pipeline.native_size is not None and s <= 64 and fits


def typical_size(files: list[str], sample: int = 200, root: str | None = None) -> int | None:
    """The median shorter side of up to ``sample`` readable files (headers only), or None.

    The files are taken in the order of a hash of their path relative to ``root`` (default: the
    files' common folder), so the result does not change when the data is moved or mounted
    elsewhere."""
    import hashlib
    import statistics


    if not files:
        return None
    absolute = [os.path.abspath(f) for f in files]
    base = os.path.abspath(root) if root is not None else os.path.commonpath(absolute)

    def key(f: str) -> str:
        rel = os.path.relpath(f, base).replace(os.sep, "/")
        return hashlib.sha1(rel.encode("utf-8", "surrogateescape")).hexdigest()

    sizes = []
    for f in sorted(absolute, key=key):
        try:
            _, w, h = probe_image(f)
        except ImageReadError:
            continue
        sizes.append(min(w, h))
        if len(sizes) >= sample:
            break
    return int(statistics.median(sizes)) if sizes else None
