"""What feeds the training and validation loops: ``source.batches(order, batch_size)`` yields
``(x, y)`` on the device, whatever the input path.

Three paths, chosen from the model and the data (never from a name):

* ``features``: a frozen backbone without augmentation trains its head on cached features (one
  backbone pass, :func:`~fakescope.engine.features.extract_features`);
* ``memory``: small images (native size <= 64) are decoded once into a uint8 tensor and batched
  from memory;
* ``stream``: anything else streams through DataLoader workers.

A source knows its unreadable files (``errors``, position -> reason) and leaves them out of
``usable``. Streamed files are found unreadable while an epoch reads them; under torchrun each rank
reads only its shard, so :meth:`Source.agree_errors` unites the ranks' lists: every rank then
leaves out the same files, deals the same shards and runs the same number of batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fakescope.data.dataset import ImageDataset, cpu_threads, make_loader, plan_loader, preload, should_preload
from fakescope.data.transforms import Augment, Pipeline
from fakescope.engine import runtime
from fakescope.engine.features import extract_features
from fakescope.engine.runtime import Precision
from fakescope.errors import FakescopeError
from fakescope.progress import progress


@dataclass(frozen=True)
class SourceOptions:
    """The training options a source reads (:meth:`fakescope.engine.train.TrainOptions.source_options`
    picks them out of a run's options): batch size, decoding, caching and what decides the input path."""

    batch_size: int
    num_workers: int | None = None
    use_cache: bool = True
    cache_dir: str | None = None
    max_pixels: int | None = None
    seed: int = 42
    preload: str = "auto"
    strict: bool = False
    augment: Augment = field(default_factory=Augment)
    adv_train: str | None = None


class Source:
    """Training or validation inputs: labels, unreadable files, and ``batches(order, batch_size)``."""

    kind = ""

    def __init__(self, labels: torch.Tensor, errors: dict[int, str]) -> None:
        self.labels = labels
        self.errors = errors

    @property
    def usable(self) -> torch.Tensor:
        """Positions of the files not known to be unreadable, ascending."""
        bad = torch.zeros(len(self.labels), dtype=torch.bool)
        if self.errors:
            bad[list(self.errors)] = True
        return torch.nonzero(~bad).flatten()

    def agree_errors(self) -> None:
        """Under torchrun: every rank takes the union of all ranks' unreadable files (a collective:
        every rank must call it at the same point). A no-op in a single process."""
        if not runtime.is_distributed():
            return
        merged: dict[int, str] = {}
        for part in runtime.all_gather_objects(self.errors):
            for i, reason in part.items():
                merged.setdefault(int(i), reason)
        self.errors = dict(sorted(merged.items()))

    def batches(self, order: torch.Tensor, batch_size: int, epoch: int = 0):
        raise NotImplementedError


class TensorSource(Source):
    """Rows of an in-memory tensor (decoded images or features) finished on the device by ``finish``."""

    def __init__(self, data, labels, errors, finish, device, threads: int | None = None, kind: str = "memory") -> None:
        super().__init__(labels, errors)
        self.data, self.finish, self.device, self.threads, self.kind = data, finish, device, threads, kind

    def batches(self, order: torch.Tensor, batch_size: int, epoch: int = 0):
        with cpu_threads(self.threads):  # applies to the steps run between the yields
            for s in range(0, len(order), batch_size):
                ids = order[s:s + batch_size]
                yield self.finish(self.data[ids].to(self.device)), self.labels[ids].to(self.device)


class StreamSource(Source):
    """Files decoded by DataLoader workers every epoch; unreadable ones are recorded as they are met."""

    kind = "stream"

    def __init__(self, dataset: ImageDataset, labels, errors, device, num_workers, threads: int | None = None) -> None:
        super().__init__(labels, errors)
        self.dataset, self.device = dataset, device
        # workers and main-process threads sized once, from the files (the same plan every epoch)
        self.plan = plan_loader(dataset.files, dataset.pipeline, device, num_workers)
        self.threads = runtime.fewest_threads(self.plan.threads, threads)

    def batches(self, order: torch.Tensor, batch_size: int, epoch: int = 0):
        self.dataset.epoch = epoch
        loader = make_loader(self.dataset, batch_size, order.tolist(), num_workers=self.plan.workers,
                             pin_memory=self.device.type == "cuda")
        with cpu_threads(self.threads):
            for batch in loader:
                for i, reason in batch.errors:
                    self.errors.setdefault(i, reason)
                if len(batch.index):
                    x = self.dataset.pipeline.finish(batch.image.to(self.device, non_blocking=True)).float().div_(255)
                    yield x, self.labels[batch.index].to(self.device)


SCAN_BATCH = 128


def scan_errors(dataset: ImageDataset, num_workers) -> dict[int, str]:
    """Decode every file once and return the unreadable ones (under torchrun each rank decodes a
    share of the files and the ranks' findings are united)."""
    mine = [i for b in runtime.shard_batches(len(dataset), SCAN_BATCH) for i in b]
    errors: dict[int, str] = {}
    for batch in progress(make_loader(dataset, SCAN_BATCH, mine, num_workers=num_workers), desc="checking files"):
        errors.update(batch.errors)
    if runtime.is_distributed():
        errors = dict(sorted((int(i), r) for part in runtime.all_gather_objects(errors) for i, r in part.items()))
    return errors


def shard_order(order: torch.Tensor, unit: int = 1) -> torch.Tensor:
    """This rank's share of a training order: every rank gets the same count (the order is padded
    with its first items, so training may repeat a few samples). With ``unit`` > 1 the order is dealt
    in runs of ``unit`` consecutive items (the two members of an aligned pair stay together)."""
    w = runtime.world_size()
    if w == 1:
        return order
    if unit > 1:
        n = math.ceil(len(order) / unit) * unit
        runs = torch.cat([order, order[: n - len(order)]]).view(-1, unit)
        per = math.ceil(len(runs) / w)
        padded = torch.cat([runs, runs[: per * w - len(runs)]])
        return padded[runtime.rank():: w].flatten()
    per = math.ceil(len(order) / w)
    padded = torch.cat([order, order[: per * w - len(order)]])
    return padded[runtime.rank():: w]


def on_features(model, opts: SourceOptions) -> bool:
    """Whether training runs on cached backbone features: a frozen backbone that sees every image
    exactly as evaluation does (no augmentation, no adversarial examples)."""
    return bool(model.frozen and not opts.augment.active and not opts.adv_train)


def make_source(model, files: list[str], labels: list[int], pipeline: Pipeline, opts: SourceOptions,
                device: torch.device, infer_precision: Precision, desc: str, *,
                aug_keys: list[int] | None = None) -> Source:
    """The source for ``files`` under ``opts``: features, memory or stream (see the module doc).

    Streamed files are checked up front (every file decoded once) with ``--strict`` and under
    torchrun, so that every rank starts the first epoch with the same list of unreadable files.
    ``aug_keys``: the key each file's augmentation randomness is drawn from (default: its position);
    files that share a key get the same crop, flip, blur, JPEG and scale (``--paired``)."""
    y = torch.tensor(labels, dtype=torch.long)
    if on_features(model, opts):
        runtime.prepare_model(model, infer_precision)  # extraction as evaluate does it (the head is linear)
        rt = runtime.fixed(device, infer_precision, batch_size=max(opts.batch_size, 64), num_workers=opts.num_workers,
                           use_cache=opts.use_cache, cache_dir=opts.cache_dir, max_pixels=opts.max_pixels)
        feats, errors = extract_features(model, files, pipeline, rt, desc=desc)
        # in memory when it fits (a quarter of RAM), else batches gather rows from the memory-mapped cache
        # a head's operators on a batch of feature vectors are too small to gain from a CPU thread team, and
        # an oversubscribed team stalls at each of them: one thread (a fixed count, so runs stay reproducible)
        src: Source = TensorSource(feats.materialize(), y, errors, lambda f: f.float(), device,
                                   threads=1 if device.type == "cpu" else None, kind="features")
    else:
        kw = {"max_pixels": opts.max_pixels} if opts.max_pixels else {}
        ds = ImageDataset(files, pipeline, stage_only=True, seed=opts.seed, aug_keys=aug_keys,
                          labels=[min(int(v), 1) for v in labels], **kw)
        try:
            preload_now = should_preload(pipeline, len(files), mode=opts.preload)
        except ValueError as e:
            raise FakescopeError(str(e).replace("preload", "--preload")) from None
        if preload_now:
            pre = preload(ds, num_workers=opts.num_workers, desc=desc)
            src = TensorSource(pre.images, y, pre.errors, lambda x: pipeline.finish(x).float().div_(255), device,
                               threads=runtime.model_threads(model, device))
        else:
            errors = scan_errors(ds, opts.num_workers) if opts.strict or runtime.is_distributed() else {}
            src = StreamSource(ds, y, errors, device, opts.num_workers, runtime.model_threads(model, device))
    src.agree_errors()  # decoding the same file can fail on one rank only (a flaky disk, a file being replaced)
    return src
