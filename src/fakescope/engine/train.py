"""The training loop: seeded, resumable, early-stopped, single process or torchrun DDP.

Three input paths, chosen from the model and the data (never from a name):

* a frozen backbone without augmentation trains its head on cached features (one backbone pass);
* small images (native size <= 64) are decoded once into a uint8 tensor and batched from memory;
* anything else streams through DataLoader workers.

Randomness is a function of ``(seed, epoch)``: the data order comes from a generator seeded per
epoch and the global RNG is reseeded at each epoch start, so a run resumed from its last complete
epoch ends with the same weights as one that was never interrupted.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from fakescope import __version__
from fakescope.data.dataset import (
    ImageDataset,
    cpu_threads,
    make_loader,
    plan_loader,
    preload,
    should_preload,
    typical_size,
)
from fakescope.data.layout import carve_validation, index_root, limit_per_class
from fakescope.data.transforms import Augment, Pipeline
from fakescope.engine import checkpoint as ckpt
from fakescope.engine import runtime
from fakescope.engine.features import extract_features
from fakescope.errors import CheckpointError, DataError, FakescopeError
from fakescope.metrics import binary_metrics
from fakescope.models import check_model_name, create_model
from fakescope.progress import progress
from fakescope.utils import atomic_write_text, seed_everything, write_json


@dataclass
class TrainOptions:
    """Everything a training run depends on; saved in the run's config.json."""

    model: str
    data: str
    generators: list[str] | None = None
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: str = "constant"
    patience: int = 3
    seed: int = 42
    val_fraction: float = 0.1
    limit: int | None = None
    native_size: str = "auto"
    jpeg_align: int | None = None
    augment: Augment = field(default_factory=Augment)
    model_options: dict = field(default_factory=dict)
    device: str = "auto"
    precision: str = "auto"
    use_cache: bool = True
    cache_dir: str | None = None
    adv_train: str | None = None
    adv_eps: float = 2 / 255
    adv_steps: int = 7
    adv_mix: float = 0.0
    strict: bool = False
    num_workers: int | None = None
    max_pixels: int | None = None
    compile: bool = False
    preload: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainOptions:
        d = dict(d)
        aug = d.pop("augment", {}) or {}
        aug = {k: tuple(v) if isinstance(v, list) else v for k, v in aug.items()}
        return cls(augment=Augment(**aug), **d)


def _versions() -> dict:
    import timm
    import torchvision

    return {"fakescope": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "python": platform.python_version()}


def _native_size(option: str | int | None, files: list[str]) -> int | None:
    if option in (None, "off"):
        return None
    if option == "auto":
        return typical_size(files)
    try:
        n = int(option)
    except (TypeError, ValueError):
        raise FakescopeError(f"expected --native-size auto, off or a positive integer, got {option!r}") from None
    if n <= 0:
        raise FakescopeError(f"expected --native-size auto, off or a positive integer, got {option!r}")
    return n


class _Source:
    """Training or validation inputs: ``batches(order, batch_size)`` yields ``(x, y)`` on the device."""

    def __init__(self, labels: torch.Tensor, errors: dict[int, str]) -> None:
        self.labels = labels
        self.errors = errors

    @property
    def usable(self) -> torch.Tensor:
        bad = torch.zeros(len(self.labels), dtype=torch.bool)
        if self.errors:
            bad[list(self.errors)] = True
        return torch.nonzero(~bad).flatten()


class _TensorSource(_Source):
    def __init__(self, data: torch.Tensor, labels, errors, finish, device, threads: int | None = None) -> None:
        super().__init__(labels, errors)
        self.data, self.finish, self.device, self.threads = data, finish, device, threads

    def batches(self, order: torch.Tensor, batch_size: int, epoch: int = 0):
        with cpu_threads(self.threads):  # applies to the steps run between the yields
            for s in range(0, len(order), batch_size):
                ids = order[s:s + batch_size]
                yield self.finish(self.data[ids].to(self.device)), self.labels[ids].to(self.device)


class _StreamSource(_Source):
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


def _scan_errors(dataset: ImageDataset, num_workers) -> dict[int, str]:
    """Decode every file once (for --strict with streamed data) and return the unreadable ones."""
    errors: dict[int, str] = {}
    for batch in progress(make_loader(dataset, 128, num_workers=num_workers), desc="checking files"):
        errors.update(batch.errors)
    return errors


def _shard(order: torch.Tensor) -> torch.Tensor:
    w = runtime.world_size()
    if w == 1:
        return order
    per = math.ceil(len(order) / w)
    padded = torch.cat([order, order[: per * w - len(order)]])  # training may repeat a few samples
    return padded[runtime.rank():: w]


def _make_source(model, files, labels, pipeline, opts, device, infer_precision, desc):
    y = torch.tensor(labels, dtype=torch.long)
    if model.frozen and not opts.augment.active and not opts.adv_train:
        runtime.prepare_model(model, infer_precision)  # extraction as evaluate does it (the head is linear)
        feats, errors = extract_features(model, files, pipeline, device=device, precision=infer_precision,
                                         batch_size=max(opts.batch_size, 64), num_workers=opts.num_workers,
                                         use_cache=opts.use_cache, cache_root=opts.cache_dir, desc=desc,
                                         max_pixels=opts.max_pixels)
        # in memory when it fits (a quarter of RAM), else batches gather rows from the memory-mapped cache
        # a head's operators on a batch of feature vectors are too small to gain from a CPU thread team, and
        # an oversubscribed team stalls at each of them: one thread (a fixed count, so runs stay reproducible)
        return _TensorSource(feats.materialize(), y, errors, lambda f: f.float(), device,
                             threads=1 if device.type == "cpu" else None), True
    kw = {"max_pixels": opts.max_pixels} if opts.max_pixels else {}
    ds = ImageDataset(files, pipeline, stage_only=True, seed=opts.seed, **kw)
    try:
        preload_now = should_preload(pipeline, len(files), mode=opts.preload)
    except ValueError as e:
        raise FakescopeError(str(e).replace("preload", "--preload")) from None
    if preload_now:
        pre = preload(ds, num_workers=opts.num_workers, desc=desc)
        return _TensorSource(pre.images, y, pre.errors, lambda x: pipeline.finish(x).float().div_(255), device,
                             threads=runtime.model_threads(model, device)), False
    errors = _scan_errors(ds, opts.num_workers) if opts.strict else {}
    return _StreamSource(ds, y, errors, device, opts.num_workers, runtime.model_threads(model, device)), False


def _check_readable(sources: list[tuple[_Source, list[str], str]], out: Path) -> None:
    """Unreadable files are skipped, but a class left with no readable image is an error (bad files listed)."""
    bad = {files[i]: r for src, files, _ in sources for i, r in sorted(src.errors.items())}
    for src, files, what in sources:
        have = set(src.labels[src.usable].tolist())
        for cls, name in ((0, "nature"), (1, "ai")):
            if cls not in have:
                if runtime.is_main():
                    write_json(out / ckpt.BAD_FILES, bad)
                eg = next((f"e.g. {files[i]}: {r}" for i, r in sorted(src.errors.items()) if src.labels[i] == cls), "")
                raise DataError(f"no readable '{name}' images in the {what} ({len(bad)} unreadable files, listed in "
                                f"{out / ckpt.BAD_FILES}; {eg})")


def _inf_if_none(x: float | None) -> float:
    return math.inf if x is None else x  # JSON stores an infinite best loss (no finite loss yet) as null


def _check_classes(labels: list[int], what: str) -> None:
    for cls, name in ((0, "nature"), (1, "ai")):
        if cls not in labels:
            raise DataError(f"the {what} has no '{name}' images: a detector needs both 'ai' and 'nature' "
                            f"folders with images")


def _evaluate_source(model, forward, src: _Source, batch_size: int, device, precision) -> dict:
    """Validation loss, accuracy and scores, sharded by whole batches and reduced across ranks."""
    model.eval()
    ids = src.usable
    mine = torch.tensor([i for b in runtime.shard_batches(len(ids), batch_size) for i in b], dtype=torch.long)
    loss_sum, ps, ys = 0.0, [], []
    with torch.no_grad():
        for x, y in src.batches(ids[mine] if len(mine) else ids[:0], batch_size):
            with precision.autocast(device):
                logits = forward(x)
            loss_sum += float(model.loss(logits, y)) * len(y)
            ps.append(model.p_ai(logits).cpu().double().numpy())
            ys.append(y.cpu().numpy())
    parts = runtime.all_gather_objects((loss_sum, np.concatenate(ps) if ps else np.zeros(0),
                                        np.concatenate(ys) if ys else np.zeros(0, np.int64)))
    loss = sum(p[0] for p in parts)
    p = np.concatenate([p[1] for p in parts])
    y = np.concatenate([p[2] for p in parts])
    n = max(len(y), 1)
    return {"loss": loss / n, "accuracy": float(((p >= 0.5) == y).mean()) if len(y) else None, "p": p, "y": y}


def train(opts: TrainOptions, out: str | Path, *, resume: bool = False) -> dict:
    """Train ``opts.model`` on ``opts.data`` into run directory ``out``; return the final metrics."""
    runtime.init_distributed(opts.device)
    out = Path(out)
    if resume and runtime.is_main() and out.is_dir():
        ckpt.remove_partial_files(out)  # temporary files of writes a crash interrupted
    if resume and not (out / ckpt.CONFIG).exists() and not (out / ckpt.LAST_STATE).exists():
        resume = False  # killed before its config was written: there is nothing to continue
    if resume:
        stored = ckpt.read_config(out)
        try:
            opts = replace(TrainOptions.from_dict(stored["train"]), device=opts.device, num_workers=opts.num_workers)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{out / ckpt.CONFIG} holds no usable training options ({type(e).__name__}: {e}); "
                                  f"it cannot be resumed") from None
    elif (out / ckpt.CONFIG).exists() and (out / ckpt.LAST_STATE).exists():
        raise FakescopeError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    if opts.epochs < 1 or opts.batch_size < 1 or opts.lr <= 0 or opts.patience < 0:
        raise FakescopeError(f"expected --epochs >= 1, --batch-size >= 1, --lr > 0 and --patience >= 0, got "
                             f"{opts.epochs}, {opts.batch_size}, {opts.lr}, {opts.patience}")
    if opts.lr_schedule not in ("constant", "cosine"):
        raise FakescopeError(f"expected --lr-schedule constant or cosine, got {opts.lr_schedule!r}")
    check_model_name(opts.model)
    device = runtime.resolve_device(opts.device)
    train_precision = runtime.resolve_precision(opts.precision, device, inference=False)
    infer_precision = runtime.resolve_precision(opts.precision, device, inference=True)

    index = index_root(opts.data).select(opts.generators, "train")
    if opts.limit:
        index = limit_per_class(index, opts.limit)
    _check_classes(index.labels, "training split")
    tr, va = carve_validation(index, opts.val_fraction)
    _check_classes(va.labels, "validation carve (use more data or a larger --val-fraction)")
    tr_files = [tr.abspath(i) for i in range(len(tr))]
    va_files = [va.abspath(i) for i in range(len(va))]

    seed_everything(opts.seed)
    model = create_model(opts.model, **opts.model_options).to(device)
    runtime.prepare_model(model, train_precision, compile=opts.compile)  # memory format; torch.compile
    native = _native_size(opts.native_size, tr_files)
    pipeline = Pipeline(model.preprocess.input_size, native, opts.jpeg_align, None, opts.augment)
    eval_pipeline = replace(pipeline, augment=Augment())
    options_for_config = {k: v for k, v in opts.model_options.items() if k != "pretrained_file"}
    config = {
        "model": {"name": opts.model, "options": options_for_config,
                  "pretrained_file": opts.model_options.get("pretrained_file")},
        "preprocess": model.preprocess.to_dict(),
        "native_size": native,
        "data": {"root": str(Path(opts.data).resolve()), "generators": index.generator_names,
                 "train_images": len(tr), "val_images": len(va)},
        "seed": opts.seed,
        "precision": {"train": train_precision.name, "inference": infer_precision.name,
                      "channels_last": infer_precision.channels_last,
                      "train_channels_last": train_precision.channels_last},
        "device": device.type,
        "train": opts.to_dict(),
        "versions": _versions(),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.trainable_parameters()),
    }
    if runtime.is_main():
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            ckpt.write_config(out, config)
    runtime.barrier()

    t_data = time.perf_counter()
    train_src, on_features = _make_source(model, tr_files, tr.labels, pipeline, opts, device, infer_precision,
                                          "train data")
    val_src, _ = _make_source(model, va_files, va.labels, eval_pipeline, opts, device, infer_precision, "val data")
    data_seconds = time.perf_counter() - t_data
    if opts.strict and (train_src.errors or val_src.errors):
        bad = [(tr_files[i], r) for i, r in train_src.errors.items()] + \
              [(va_files[i], r) for i, r in val_src.errors.items()]
        if runtime.is_main():
            write_json(out / ckpt.BAD_FILES, dict(bad))
        raise DataError(f"--strict: {len(bad)} unreadable files (listed in {out / ckpt.BAD_FILES}), "
                        f"e.g. {bad[0][0]}: {bad[0][1]}")
    readable = [(train_src, tr_files, "training split"), (val_src, va_files, "validation carve")]
    _check_readable(readable, out)

    trainable = model.head_net if on_features else model
    forward_plain = model.head if on_features else model
    forward = forward_plain
    if runtime.is_distributed():
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(trainable, device_ids=[device.index] if device.type == "cuda" else None)
        forward = ddp
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=opts.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=train_precision.dtype == torch.float16)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=opts.epochs)
                 if opts.lr_schedule == "cosine" else None)
    adversary = None
    if opts.adv_train:
        from fakescope.attacks import create_attack

        kw = {"steps": opts.adv_steps} if opts.adv_train == "pgd" else {}
        adversary = create_attack(opts.adv_train, model, eps=opts.adv_eps, seed=opts.seed, **kw)

    start, best, bad_epochs, history, best_epoch = 0, math.inf, 0, [], None
    if resume:
        state = ckpt.load_train_state(out, model, optimizer, scheduler)
        if state is not None:
            start, best, bad_epochs = state["epoch"] + 1, _inf_if_none(state["best_val_loss"]), state["bad_epochs"]
            history, best_epoch = state["history"], state.get("best_epoch")
            train_src.errors.update({int(k): v for k, v in state.get("train_errors", {}).items()})
            if state.get("stopped"):
                start = opts.epochs

    t_train = time.perf_counter()
    seen = 0
    for epoch in range(start, opts.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(opts.seed * 1000 + epoch)
        g = torch.Generator().manual_seed(opts.seed * 7919 + epoch)
        usable = train_src.usable
        order = _shard(usable[torch.randperm(len(usable), generator=g)])
        model.train()
        loss_sum, n_seen = 0.0, 0
        nb = math.ceil(len(order) / opts.batch_size)
        for x, y in progress(train_src.batches(order, opts.batch_size, epoch), desc=f"epoch {epoch + 1}/{opts.epochs}",
                             total=nb):
            if adversary is not None:
                adversary.seed = opts.seed * 1_000_003 + epoch * 100_003 + n_seen  # fresh random start per batch
                x_adv = adversary(x, y)
                if opts.adv_mix > 0:
                    k = int(round(len(x) * opts.adv_mix))
                    x_adv = torch.cat([x[:k], x_adv[k:]])
                x = x_adv
            with train_precision.autocast(device):
                logits = forward(train_precision.prepare(x) if not on_features else x)
            loss = model.loss(logits, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # fp16 autocast (CUDA) needs loss scaling; a no-op otherwise
            scaler.step(optimizer)
            scaler.update()
            loss_sum += float(loss.detach()) * len(y)
            n_seen += len(y)
        if scheduler is not None:
            scheduler.step()
        seen += n_seen
        if epoch == start and not runtime.is_distributed():  # streamed inputs: bad files known after one pass
            _check_readable(readable, out)
        val = _evaluate_source(model, forward_plain, val_src, max(opts.batch_size, 256), device, train_precision)
        improved = val["loss"] < best
        if improved:
            best, bad_epochs, best_epoch = val["loss"], 0, epoch
            if runtime.is_main():
                ckpt.save_tensors(out / ckpt.WEIGHTS, model.state_dict(), {"epoch": epoch})
        else:
            bad_epochs += 1
        stopped = opts.patience > 0 and bad_epochs >= opts.patience
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(n_seen, 1), "val_loss": val["loss"],
                  "val_accuracy": val["accuracy"], "lr": optimizer.param_groups[0]["lr"],
                  "seconds": round(time.perf_counter() - t0, 3), "best": improved}
        history.append(record)
        if runtime.is_main():
            ckpt.save_train_state(out, model, optimizer, scheduler,
                                  {"epoch": epoch, "best_val_loss": best, "bad_epochs": bad_epochs,
                                   "best_epoch": best_epoch, "history": history, "stopped": stopped,
                                   "train_errors": {str(k): v for k, v in train_src.errors.items()}})
            atomic_write_text(out / ckpt.LOG, "".join(json.dumps(r) + "\n" for r in history))
        runtime.barrier()
        if stopped:
            break
    train_seconds = time.perf_counter() - t_train
    if runtime.is_main():  # also when a resumed run had no epoch left (killed before its log was written)
        atomic_write_text(out / ckpt.LOG, "".join(json.dumps(r) + "\n" for r in history))

    # final validation metrics with the best weights
    ckpt.load_state_into(model, ckpt.load_tensors(out / ckpt.WEIGHTS), str(out / ckpt.WEIGHTS))
    val = _evaluate_source(model, forward_plain, val_src, 256, device, train_precision)
    metrics = binary_metrics(val["y"], val["p"])
    bad_files = {tr_files[i]: r for i, r in sorted(train_src.errors.items())}
    bad_files.update({va_files[i]: r for i, r in sorted(val_src.errors.items())})
    summary = {
        "validation": metrics,
        "best_epoch": (best_epoch + 1) if best_epoch is not None else None,
        "epochs_run": len(history),
        "train_seconds": train_seconds,
        "data_seconds": data_seconds,
        "train_images_per_second": seen / train_seconds if train_seconds > 0 and seen else None,
        "bad_files": len(bad_files),
        "input_path": "features" if on_features else ("memory" if isinstance(train_src, _TensorSource) else "stream"),
    }
    if runtime.is_main():
        write_json(out / ckpt.METRICS, summary)
        write_json(out / ckpt.BAD_FILES, bad_files)
    runtime.barrier()
    return summary
