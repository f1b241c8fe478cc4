"""The training loop: seeded, resumable, early-stopped, single process or torchrun DDP.

:func:`train` runs named steps: resolve the options (``--resume`` reads them from the run),
index and carve the data, build the model and the run's config, build the input sources
(:mod:`fakescope.engine.sources`: cached features, images in memory, or streamed files), then
train epoch by epoch, keeping the best weights and the state of the last complete epoch, and
finally score the validation carve with the best weights.

Randomness is a function of ``(seed, epoch)``: the data order comes from a generator seeded per
epoch and the global RNG is reseeded at each epoch start, so a run resumed from its last complete
epoch ends with the same weights as one that was never interrupted.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from fakescope import __version__
from fakescope.attacks import create_attack
from fakescope.choices import TASKS
from fakescope.data.dataset import typical_size
from fakescope.data.layout import carve_validation, data_roots, index_root, limit_per_class, pair_groups
from fakescope.data.transforms import Augment, Pipeline
from fakescope.engine import checkpoint as ckpt
from fakescope.engine import runtime
from fakescope.engine.hyperparams import Schedule, apply_recipe
from fakescope.engine.infer import attribution_labels, forward_logits
from fakescope.engine.runtime import Precision
from fakescope.engine.sources import Source, SourceOptions, make_source, on_features, shard_order
from fakescope.errors import CheckpointError, DataError, FakescopeError
from fakescope.metrics import binary_metrics
from fakescope.models import check_model_name, create_model, set_num_outputs
from fakescope.models.recipe import check_geometry
from fakescope.progress import progress
from fakescope.utils import atomic_write_text, seed_everything, torch_seed, write_json


@dataclass
class TrainOptions:
    """Everything a training run depends on; saved in the run's config.json."""

    model: str
    data: str | list[str]
    generators: list[str] | None = None
    epochs: int = 10
    batch_size: int | None = None
    lr: float | None = None
    lr_schedule: str | None = None
    patience: int = 3
    seed: int = 42
    val_fraction: float = 0.1
    limit: int | None = None
    native_size: str = "auto"
    max_side: int | None = None
    jpeg_align: int | None = None
    augment: Augment | None = None
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
    task: str = "binary"
    test_geometry: str | None = None
    schedule: dict | None = None
    betas: tuple[float, float] | None = None
    recipe: dict = field(default_factory=dict)
    paired: bool | None = None
    """``batch_size``, ``lr``, ``lr_schedule`` (with ``schedule``, its parameters), ``betas`` and
    ``augment`` left as None take the model's recipe (:func:`fakescope.engine.hyperparams.apply_recipe`);
    ``recipe`` then records where they came from. ``task``: ``binary`` (ai vs nature) or
    ``attribution`` (one class per generator plus nature). ``test_geometry``: the run's test-time
    geometry (default: the model's); crop geometries also train on crops at native pixel scale.
    ``data``: one root or a list of roots (their generators together). ``paired`` (None: the recipe's,
    else off): both members of each aligned pair in the same batch, with the same crop, flip and
    augmentation (Rajan et al.'s "Sync"); the root must hold pairs (``fakescope data align``)."""

    def source_options(self) -> SourceOptions:
        """The options a training source reads (batch size, decoding, caching, augmentation)."""
        return SourceOptions(**{f.name: getattr(self, f.name) for f in fields(SourceOptions)})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainOptions:
        d = dict(d)
        aug = d.pop("augment", None)
        if aug is not None:
            aug = {k: tuple(v) if isinstance(v, list) else v for k, v in aug.items()}
        if d.get("betas") is not None:
            d["betas"] = tuple(d["betas"])
        return cls(augment=Augment(**aug) if aug is not None else None, **d)


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


def _inf_if_none(x: float | None) -> float:
    return math.inf if x is None else x  # JSON stores an infinite best loss (no finite loss yet) as null


def _check_classes(labels: list[int], what: str) -> None:
    for cls, name in ((0, "nature"), (1, "ai")):
        if (cls not in labels) if cls == 0 else not any(y >= 1 for y in labels):
            raise DataError(f"the {what} has no '{name}' images: a detector needs both 'ai' and 'nature' "
                            f"folders with images")


# --- step 1: options ------------------------------------------------------------------------------

RESUME_CHANGES = ("epochs", "patience")
"""Options a resumed run may change: how long it goes on (a cosine schedule spans the run's epochs,
so under it ``epochs`` is fixed too)."""
RESUME_RUNTIME = ("device", "num_workers")
"""Where a resumed run runs: the caller's, never the checkpoint's."""
_FLAGS = {"num_workers": "--workers", "use_cache": "--no-cache", "augment": "--aug-*",
          "model_options": "--filters/--pretrained-file/--no-pretrained/--freeze/--finetune"}


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _plain(v):
    """``v`` as JSON would store it (tuples as lists, an :class:`Augment` as its fields)."""
    if isinstance(v, Augment):
        v = asdict(v)
    return json.loads(json.dumps(v))


def _apply_changes(stored: TrainOptions, config: dict, changes: dict, out: Path) -> TrainOptions:
    """The stored options with ``changes`` applied: :data:`RESUME_CHANGES` and :data:`RESUME_RUNTIME`
    are honoured, any other option that differs from the run's is an error (one line)."""
    honoured = {}
    for k, v in changes.items():
        if k not in TrainOptions.__dataclass_fields__:
            raise FakescopeError(f"expected a training option, got {k!r}")
        if k in RESUME_RUNTIME:
            honoured[k] = v
            continue
        if k == "data" and isinstance(v, (str, os.PathLike)) and isinstance(stored.data, (str, os.PathLike)):
            same = Path(v).resolve() == Path(config.get("data", {}).get("root", stored.data)).resolve()
        elif k == "data":  # several roots
            same = [str(Path(x).resolve()) for x in v] == [str(Path(x).resolve()) for x in stored.data]
        elif k == "model_options":
            have = _plain(stored.model_options)
            same = all(have.get(o) == _plain(x) for o, x in v.items())
        else:
            same = _plain(v) == _plain(getattr(stored, k))
        if same:
            continue
        if k == "epochs" and stored.lr_schedule == "cosine":
            raise FakescopeError(f"{_flag(k)}: expected {stored.epochs} for a resumed run with a cosine schedule "
                                 f"(it spans the run's epochs), got {v}; start a new run instead")
        if k not in RESUME_CHANGES:
            was = _plain(getattr(stored, k))
            raise FakescopeError(f"{_flag(k)}: expected the value of the run in {out} ({was!r}), got {_plain(v)!r}; "
                                 f"a resumed run may change only --epochs and --patience")
        honoured[k] = v
    return replace(stored, **honoured)


def _resolve_options(opts: TrainOptions | None, out: Path, resume: bool,
                     changes: dict | None = None) -> tuple[TrainOptions, dict | None]:
    """The options in force and, when resuming, the run's stored config (None for a fresh run).

    A resumed run takes every option from its config.json except where it runs (device, workers: the
    caller's ``opts``) and ``changes`` (see :func:`_apply_changes`)."""
    if resume and runtime.is_main() and out.is_dir():
        ckpt.remove_partial_files(out)  # temporary files of writes a crash interrupted
    if resume and not (out / ckpt.CONFIG).exists() and not (out / ckpt.LAST_STATE).exists():
        resume = False  # killed before its config was written: there is nothing to continue
        if opts is None:
            raise FakescopeError(f"expected a run to resume in {out} (its config.json), got none; start it with "
                                 f"--model and --data")
        opts = replace(opts, **(changes or {}))
    stored = None
    if resume:
        stored = ckpt.read_config(out)
        try:
            kept = TrainOptions.from_dict(stored["train"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{out / ckpt.CONFIG} holds no usable training options ({type(e).__name__}: {e}); "
                                  f"it cannot be resumed") from None
        if opts is not None:
            kept = replace(kept, device=opts.device, num_workers=opts.num_workers)
        opts = _apply_changes(kept, stored, changes or {}, out)
    elif opts is None:
        raise FakescopeError("expected training options (--model and --data) for a new run, got none")
    elif (out / ckpt.CONFIG).exists() and (out / ckpt.LAST_STATE).exists():
        raise FakescopeError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    _check_numbers(opts)
    if opts.task not in TASKS:
        raise FakescopeError(f"expected --task among {', '.join(TASKS)}, got {opts.task!r}")
    if opts.test_geometry is not None:
        check_geometry(opts.test_geometry)
    check_model_name(opts.model)
    return opts, stored


def _check_numbers(opts: TrainOptions) -> None:
    """The numeric options, once set (the recipe fills the ones left as None)."""
    bad = (opts.epochs < 1 or (opts.batch_size is not None and opts.batch_size < 1)
           or (opts.lr is not None and opts.lr <= 0) or opts.patience < 0)
    if bad:
        raise FakescopeError(f"expected --epochs >= 1, --batch-size >= 1, --lr > 0 and --patience >= 0, got "
                             f"{opts.epochs}, {opts.batch_size}, {opts.lr}, {opts.patience}")
    if opts.max_side is not None and (isinstance(opts.max_side, bool) or not isinstance(opts.max_side, int)
                                      or opts.max_side < 1):
        raise FakescopeError(f"expected --max-side a positive number of pixels, got {opts.max_side!r}")


# --- step 2: data ---------------------------------------------------------------------------------

@dataclass
class _Splits:
    """The training split and the validation carve, as absolute file paths and labels."""

    train_files: list[str]
    train_labels: list[int]
    val_files: list[str]
    val_labels: list[int]
    generators: list[str]
    classes: list[str] | None = None
    partners: dict[int, int] = field(default_factory=dict)
    """Aligned pairs of the training split: position of a member -> position of its twin (both ways)."""


def _partners(index) -> dict[int, int]:
    """Positions of the aligned pairs in ``index``: a pair is one ``nature`` and one ``ai`` file of the
    same group (:func:`~fakescope.data.layout.pair_groups`), split and file name."""
    import os

    members: dict[tuple, dict[int, int]] = {}
    for i, g in pair_groups(index).items():
        key = (g, index.splits[i], os.path.basename(index.paths[i]))
        members.setdefault(key, {})[min(index.labels[i], 1)] = i
    out: dict[int, int] = {}
    for m in members.values():
        if len(m) == 2:
            out[m[0]], out[m[1]] = m[1], m[0]
    return out


def _load_splits(opts: TrainOptions) -> _Splits:
    """Labels are 0 (nature) / 1 (ai); for attribution, 0 (nature) / 1 + the generator's position in
    ``classes = ["nature", *generators]``."""
    index = index_root(opts.data).select(opts.generators, "train")
    if opts.limit:
        index = limit_per_class(index, opts.limit)
    _check_classes(index.labels, "training split")
    tr, va = carve_validation(index, opts.val_fraction)
    _check_classes(va.labels, "validation carve (use more data or a larger --val-fraction)")
    classes = None
    tr_labels, va_labels = list(tr.labels), list(va.labels)
    if opts.task == "attribution":
        classes = ["nature", *index.generator_names]
        if "nature" in index.generator_names:
            raise DataError("expected no generator named 'nature' for --task attribution (it is the real class)")
        tr_labels = attribution_labels(tr.labels, tr.generators, classes).tolist()
        va_labels = attribution_labels(va.labels, va.generators, classes).tolist()
    return _Splits([tr.abspath(i) for i in range(len(tr))], tr_labels,
                   [va.abspath(i) for i in range(len(va))], va_labels, index.generator_names, classes, _partners(tr))


def _check_paired(opts: TrainOptions, splits: _Splits) -> None:
    """``--paired`` (from the flag or the recipe) needs pairs and an even batch; without it, no pairs are kept."""
    if not opts.paired:
        splits.partners = {}
        return
    if not splits.partners:
        raise DataError(f"expected aligned pairs for --paired, got none in {', '.join(data_roots(opts.data))} "
                        f"(no manifest.json of `fakescope data align`): drop --paired or make pairs with "
                        f"`fakescope data align`")
    if opts.batch_size % 2:
        raise FakescopeError(f"expected an even --batch-size with --paired (both members of a pair in one batch), "
                             f"got {opts.batch_size}")


# --- step 3: model, pipeline and the run's config ---------------------------------------------------

def _versions() -> dict:
    import timm
    import torchvision

    return {"fakescope": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "python": platform.python_version()}


def _data_config(opts: TrainOptions, splits: _Splits) -> dict:
    """The run's data: ``root`` (the first root, for readers of one root) and, for several, ``roots``."""
    roots = [str(Path(r).resolve()) for r in data_roots(opts.data)]
    d = {"root": roots[0], "generators": splits.generators, "train_images": len(splits.train_files),
         "val_images": len(splits.val_files)}
    if len(roots) > 1:
        d["roots"] = roots
    if opts.paired:
        d["train_pairs"] = len(splits.partners) // 2
    return d


def _run_config(opts: TrainOptions, model, native: int | None, splits: _Splits, device: torch.device,
                train_precision: Precision, infer_precision: Precision) -> dict:
    """config.json: everything needed to rebuild the model and its preprocessing, and to resume."""
    options = {k: v for k, v in opts.model_options.items() if k != "pretrained_file"}
    return {
        "model": {"name": opts.model, "options": options, "pretrained_file": opts.model_options.get("pretrained_file")},
        "preprocess": model.preprocess.to_dict(),
        "native_size": native,
        "max_side": opts.max_side,
        "data": _data_config(opts, splits),
        "seed": opts.seed,
        "task": opts.task,
        "classes": splits.classes,
        "test_geometry": opts.test_geometry or model.test_geometry,
        "recipe": opts.recipe,
        "precision": {"train": train_precision.name, "inference": infer_precision.name,
                      "channels_last": infer_precision.channels_last,
                      "train_channels_last": train_precision.channels_last},
        "device": device.type,
        "train": opts.to_dict(),
        "versions": _versions(),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.trainable_parameters()),
    }


# --- step 4: sources and the readability checks --------------------------------------------------------

def _fail_strict(train_src: Source, val_src: Source, splits: _Splits, out: Path) -> None:
    bad = [(splits.train_files[i], r) for i, r in train_src.errors.items()] + \
          [(splits.val_files[i], r) for i, r in val_src.errors.items()]
    if runtime.is_main():
        write_json(out / ckpt.BAD_FILES, dict(bad))
    raise DataError(f"--strict: {len(bad)} unreadable files (listed in {out / ckpt.BAD_FILES}), "
                    f"e.g. {bad[0][0]}: {bad[0][1]}")


def _check_readable(sources: list[tuple[Source, list[str], str]], out: Path) -> None:
    """Unreadable files are skipped, but a class left with no readable image is an error (bad files listed)."""
    bad = {files[i]: r for src, files, _ in sources for i, r in sorted(src.errors.items())}
    for src, files, what in sources:
        have = {min(y, 1) for y in src.labels[src.usable].tolist()}
        for cls, name in ((0, "nature"), (1, "ai")):
            if cls not in have:
                if runtime.is_main():
                    write_json(out / ckpt.BAD_FILES, bad)
                eg = next((f"e.g. {files[i]}: {r}" for i, r in sorted(src.errors.items()) if src.labels[i] == cls), "")
                raise DataError(f"no readable '{name}' images in the {what} ({len(bad)} unreadable files, listed in "
                                f"{out / ckpt.BAD_FILES}; {eg})")


def _bad_files(train_src: Source, val_src: Source, splits: _Splits) -> dict[str, str]:
    bad = {splits.train_files[i]: r for i, r in sorted(train_src.errors.items())}
    bad.update({splits.val_files[i]: r for i, r in sorted(val_src.errors.items())})
    return bad


# --- step 5: the optimisation setup ----------------------------------------------------------------

@dataclass
class _Trainer:
    """The model and everything that updates it. ``forward`` is what training calls (the head alone
    on features; wrapped in DDP under torchrun), ``forward_plain`` what validation calls."""

    model: torch.nn.Module
    forward: torch.nn.Module
    forward_plain: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: Schedule
    adversary: object | None
    on_features: bool
    device: torch.device
    precision: Precision


def _make_trainer(model, opts: TrainOptions, features: bool, device: torch.device, precision: Precision) -> _Trainer:
    trainable = model.head_net if features else model
    forward_plain = model.head if features else model
    forward = forward_plain
    if runtime.is_distributed():
        from torch.nn.parallel import DistributedDataParallel as DDP

        forward = DDP(trainable, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=opts.lr, betas=tuple(opts.betas))
    scaler = torch.amp.GradScaler(device.type, enabled=precision.dtype == torch.float16)
    scheduler = Schedule(optimizer, opts.lr_schedule, opts.schedule or {}, opts.epochs)
    adversary = None
    if opts.adv_train:

        kw = {"steps": opts.adv_steps} if opts.adv_train == "pgd" else {}
        adversary = create_attack(opts.adv_train, model, eps=opts.adv_eps, seed=opts.seed, **kw)
    return _Trainer(model, forward, forward_plain, optimizer, scaler, scheduler, adversary, features, device,
                    precision)


# --- step 6: epochs --------------------------------------------------------------------------------

@dataclass
class _Progress:
    """Where the run stands after its last complete epoch (what ``last.json`` holds)."""

    start: int = 0
    best: float = math.inf
    bad_epochs: int = 0
    best_epoch: int | None = None
    history: list[dict] = field(default_factory=list)


def _restore(out: Path, t: _Trainer, train_src: Source, opts: TrainOptions) -> _Progress:
    """The state of the last complete epoch of an interrupted run (a fresh start when there is none).

    Whether the run had stopped early is decided again under the options in force (a resume may
    raise ``patience``); a run that already ran more epochs than ``opts.epochs`` is an error."""
    state = ckpt.load_train_state(out, t.model, t.optimizer, t.scheduler)
    if state is None:
        return _Progress()
    done = len(state["history"])
    if done > opts.epochs:
        raise FakescopeError(f"--epochs: expected at least the {done} epochs the run in {out} already ran, "
                             f"got {opts.epochs}")
    train_src.errors.update({int(k): v for k, v in state.get("train_errors", {}).items()})
    stopped = t.scheduler.done or (opts.patience > 0 and state["bad_epochs"] >= opts.patience)
    return _Progress(start=opts.epochs if stopped else state["epoch"] + 1,
                     best=_inf_if_none(state["best_val_loss"]), bad_epochs=state["bad_epochs"],
                     best_epoch=state.get("best_epoch"), history=state["history"])


def _epoch_order(src: Source, seed: int, epoch: int, partners: dict[int, int] | None = None) -> torch.Tensor:
    """This rank's training order for ``epoch``: a permutation of the usable files seeded by ``(seed, epoch)``.

    With ``partners`` (``--paired``) the order is made of two-file units: each aligned pair (both
    members readable) side by side, and the other files two by two in random order; an even batch size
    then always holds both members of a pair."""
    g = torch.Generator().manual_seed(torch_seed(seed * 7919 + epoch))
    usable = src.usable
    if not partners:
        return shard_order(usable[torch.randperm(len(usable), generator=g)])
    ok = set(usable.tolist())
    pairs = [(i, j) for i, j in sorted(partners.items()) if i < j and i in ok and j in ok]
    paired = {k for p in pairs for k in p}
    singles = torch.tensor([i for i in usable.tolist() if i not in paired], dtype=torch.long)
    singles = singles[torch.randperm(len(singles), generator=g)].tolist()
    units = [list(p) for p in pairs] + [singles[k:k + 2] for k in range(0, len(singles) - 1, 2)]
    units = [units[k] for k in torch.randperm(len(units), generator=g).tolist()]
    if len(singles) % 2:
        units.append([singles[-1]])
    flat = torch.tensor([i for u in units for i in u], dtype=torch.long)
    return shard_order(flat, unit=2)


def _train_epoch(t: _Trainer, src: Source, opts: TrainOptions, epoch: int,
                 partners: dict[int, int] | None = None) -> tuple[float, int]:
    """One pass over this rank's share of the training files; returns ``(summed loss, images seen)``."""
    torch.manual_seed(torch_seed(opts.seed * 1000 + epoch))
    order = _epoch_order(src, opts.seed, epoch, partners)
    t.model.train()
    loss_sum, n_seen = 0.0, 0
    nb = math.ceil(len(order) / opts.batch_size)
    for x, y in progress(src.batches(order, opts.batch_size, epoch), desc=f"epoch {epoch + 1}/{opts.epochs}",
                         total=nb):
        if t.adversary is not None:
            t.adversary.seed = torch_seed(opts.seed * 1_000_003 + epoch * 100_003 + n_seen)  # fresh start per batch
            x_adv = t.adversary(x, y)
            if opts.adv_mix > 0:
                k = int(round(len(x) * opts.adv_mix))
                x_adv = torch.cat([x[:k], x_adv[k:]])
            x = x_adv
        with t.precision.autocast(t.device):
            logits = t.forward(t.precision.prepare(x) if not t.on_features else x)
        loss = t.model.loss(logits, y)
        t.optimizer.zero_grad(set_to_none=True)
        t.scaler.scale(loss).backward()  # fp16 autocast (CUDA) needs loss scaling; a no-op otherwise
        t.scaler.step(t.optimizer)
        t.scaler.update()
        loss_sum += float(loss.detach()) * len(y)
        n_seen += len(y)
    return loss_sum, n_seen


def _evaluate_source(model, forward, src: Source, batch_size: int, device, precision) -> dict:
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
    src.agree_errors()  # streamed validation files found unreadable by one rank are left out by all
    loss = sum(p[0] for p in parts)
    p = np.concatenate([p[1] for p in parts])
    y = np.concatenate([p[2] for p in parts])
    n = max(len(y), 1)
    y = np.minimum(y, 1)  # attribution classes -> nature (0) / ai (1): accuracy and metrics are real-vs-AI
    return {"loss": loss / n, "accuracy": float(((p >= 0.5) == y).mean()) if len(y) else None, "p": p, "y": y}


def _final_validation(model, features: bool, val_src: Source, device: torch.device, precision: Precision) -> dict:
    """The validation carve scored with the best weights the way ``evaluate`` scores images: the
    inference precision and memory format (:func:`~fakescope.engine.infer.forward_logits`), the head in
    fp32 on cached features."""
    runtime.prepare_model(model, precision)
    if features:
        def forward(f):
            return model.head(f.float()).float()
    else:
        def forward(x):
            return forward_logits(model, x, precision, device)
    plain = runtime.resolve_precision("fp32", device, inference=True)  # forward applies its own autocast
    return _evaluate_source(model, forward, val_src, 256, device, plain)


def _save_epoch(out: Path, t: _Trainer, train_src: Source, state: _Progress, epoch: int, stopped: bool) -> None:
    """The state of a complete epoch (for --resume) and the log; rank 0 writes, every rank waits."""
    if runtime.is_main():
        ckpt.save_train_state(out, t.model, t.optimizer, t.scheduler,
                              {"epoch": epoch, "best_val_loss": state.best, "bad_epochs": state.bad_epochs,
                               "best_epoch": state.best_epoch, "history": state.history, "stopped": stopped,
                               "train_errors": {str(k): v for k, v in train_src.errors.items()}})
        _write_log(out, state.history)
    runtime.barrier()


def _write_log(out: Path, history: list[dict]) -> None:
    atomic_write_text(out / ckpt.LOG, "".join(json.dumps(r) + "\n" for r in history))


def _run_epochs(out: Path, t: _Trainer, train_src: Source, val_src: Source, opts: TrainOptions, state: _Progress,
                readable: list, partners: dict[int, int] | None = None) -> int:
    """Train from ``state.start`` until the last epoch or early stopping; returns the images seen."""
    seen = 0
    for epoch in range(state.start, opts.epochs):
        t0 = time.perf_counter()
        loss_sum, n_seen = _train_epoch(t, train_src, opts, epoch, partners)
        seen += n_seen
        train_src.agree_errors()  # the ranks' streamed shards met different unreadable files
        if epoch == state.start:  # streamed inputs: bad files known after one pass
            _check_readable(readable, out)
        val = _evaluate_source(t.model, t.forward_plain, val_src, max(opts.batch_size, 256), t.device, t.precision)
        improved = val["loss"] < state.best
        if improved:
            state.best, state.bad_epochs, state.best_epoch = val["loss"], 0, epoch
            if runtime.is_main():
                ckpt.save_tensors(out / ckpt.WEIGHTS, t.model.state_dict(), {"epoch": epoch})
        else:
            state.bad_epochs += 1
        t.scheduler.step(val["accuracy"])  # "lr" below: the rate of the next epoch
        stopped = (opts.patience > 0 and state.bad_epochs >= opts.patience) or t.scheduler.done
        state.history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(n_seen, 1), "val_loss": val["loss"],
                              "val_accuracy": val["accuracy"], "lr": t.optimizer.param_groups[0]["lr"],
                              "seconds": round(time.perf_counter() - t0, 3), "best": improved})
        _save_epoch(out, t, train_src, state, epoch, stopped)
        if stopped:
            break
    return seen


# --- the run ---------------------------------------------------------------------------------------

def train(opts: TrainOptions | None, out: str | Path, *, resume: bool = False, changes: dict | None = None) -> dict:
    """Train ``opts.model`` on ``opts.data`` into run directory ``out``; return the final metrics.

    With ``resume`` the options come from the run (``opts`` may then be None; when given, only its
    device and workers are used); ``changes`` (option name -> value, e.g. the flags a user gave) may
    set ``epochs`` and ``patience``, and must otherwise agree with the run's options."""
    runtime.init_distributed(opts.device if opts is not None else (changes or {}).get("device", "auto"))
    out = Path(out)
    opts, stored = _resolve_options(opts, out, resume, changes)
    resume = stored is not None
    device = runtime.resolve_device(opts.device)
    train_precision = runtime.resolve_precision(opts.precision, device, inference=False)
    infer_precision = runtime.resolve_precision(opts.precision, device, inference=True)
    splits = _load_splits(opts)
    model, opts, requested = _build_model(opts, splits, device, train_precision)
    # a resumed run keeps the native size its first epochs were trained with (the data may have changed since)
    native = stored["native_size"] if resume and "native_size" in stored else _native_size(opts.native_size,
                                                                                          splits.train_files)
    pipeline = _train_pipeline(model, opts, native)
    config = _run_config(opts, model, native, splits, device, train_precision, infer_precision)
    config["train_requested"] = requested
    _write_run_config(out, config, opts, stored)

    t_data = time.perf_counter()
    train_src, val_src = _make_sources(model, opts, splits, pipeline, device, infer_precision)
    data_seconds = time.perf_counter() - t_data
    readable = _check_sources(out, opts, splits, train_src, val_src)

    t = _make_trainer(model, opts, on_features(model, opts.source_options()), device, train_precision)
    state = _restore(out, t, train_src, opts) if resume else _Progress()
    t_train = time.perf_counter()
    seen = _run_epochs(out, t, train_src, val_src, opts, state, readable, splits.partners)
    train_seconds = time.perf_counter() - t_train
    if runtime.is_main():  # also when a resumed run had no epoch left (killed before its log was written)
        _write_log(out, state.history)
    timing = {"train_seconds": train_seconds, "data_seconds": data_seconds,
              "train_images_per_second": seen / train_seconds if train_seconds > 0 and seen else None}
    return _finish(out, opts, t, splits, train_src, val_src, state, timing, infer_precision)


def _build_model(opts: TrainOptions, splits: _Splits, device: torch.device,
                 precision: Precision) -> tuple[torch.nn.Module, TrainOptions, dict]:
    """``(model, options, requested)``: the seeded model on ``device`` (one output per class for an
    attribution run), the options completed by its recipe and checked, and the options as asked
    for, before the recipe filled the rest (the run's ``train_requested``)."""
    seed_everything(opts.seed)
    model = create_model(opts.model, **opts.model_options)
    if splits.classes is not None:
        set_num_outputs(model, len(splits.classes))
    model.to(device)
    requested = opts.to_dict()
    opts = apply_recipe(opts, model.recipe)
    _check_numbers(opts)
    _check_paired(opts, splits)
    runtime.prepare_model(model, precision, compile=opts.compile)  # memory format; torch.compile
    return model, opts, requested


def _write_run_config(out: Path, config: dict, opts: TrainOptions, stored: dict | None) -> None:
    """Creates the run folder and writes config.json: the new run's, or for a resumed run the stored
    one with the options a resume may change updated. Rank 0 writes, every rank waits."""
    if runtime.is_main():
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # e.g. a path under a plain file, a read-only folder
            raise FakescopeError(f"--out: expected a run folder that can be created, got {out} "
                                 f"({e.strerror or e}); choose another --out") from None
        if stored is None:
            ckpt.write_config(out, config)
        elif any(stored["train"].get(k) != getattr(opts, k) for k in RESUME_CHANGES):
            stored["train"].update({k: getattr(opts, k) for k in RESUME_CHANGES})  # what a later resume compares
            ckpt.write_config(out, stored)
    runtime.barrier()


def _train_pipeline(model, opts: TrainOptions, native: int | None) -> Pipeline:
    """The training preprocessing (with the options' augmentation)."""
    # crop geometries train on one input-size square at the image's pixel scale (random with augment.native_crop)
    geometry = "resize" if (opts.test_geometry or model.test_geometry) == "resize" else "center_crop"
    pipeline = Pipeline(model.preprocess.input_size, native, opts.jpeg_align, None, opts.augment, geometry=geometry,
                        max_side=opts.max_side)
    return pipeline


def _make_sources(model, opts: TrainOptions, splits: _Splits, pipeline: Pipeline, device: torch.device,
                  precision: Precision) -> tuple[Source, Source]:
    """The training and validation inputs (:func:`~fakescope.engine.sources.make_source`), validation
    without augmentation."""
    # a pair's twins draw their augmentation from one generator: the same crop, flip, blur, JPEG and scale
    aug_keys = [min(i, splits.partners.get(i, i)) for i in range(len(splits.train_files))] if splits.partners else None
    src_opts = opts.source_options()
    train_src = make_source(model, splits.train_files, splits.train_labels, pipeline, src_opts, device,
                            precision, "train data", aug_keys=aug_keys)
    val_src = make_source(model, splits.val_files, splits.val_labels, replace(pipeline, augment=Augment()), src_opts,
                          device, precision, "val data")
    return train_src, val_src


def _check_sources(out: Path, opts: TrainOptions, splits: _Splits, train_src: Source,
                   val_src: Source) -> list[tuple[Source, list[str], str]]:
    """Stops on unreadable files under ``strict`` and on a split left without readable images; returns
    the ``(source, files, what)`` list that streamed inputs check again after their first epoch."""
    if opts.strict and (train_src.errors or val_src.errors):
        _fail_strict(train_src, val_src, splits, out)
    readable = [(train_src, splits.train_files, "training split"), (val_src, splits.val_files, "validation carve")]
    _check_readable(readable, out)
    return readable


def _finish(out: Path, opts: TrainOptions, t: _Trainer, splits: _Splits, train_src: Source, val_src: Source,
            state: _Progress, timing: dict, precision: Precision) -> dict:
    """The final validation metrics with the best weights, written with the bad files' list; the summary."""
    model = t.model
    ckpt.load_state_into(model, ckpt.load_tensors(out / ckpt.WEIGHTS), str(out / ckpt.WEIGHTS))
    val = _final_validation(model, t.on_features, val_src, t.device, precision)
    bad_files = _bad_files(train_src, val_src, splits)
    summary = {
        "validation": binary_metrics(val["y"], val["p"]),
        "task": opts.task,
        "best_epoch": (state.best_epoch + 1) if state.best_epoch is not None else None,
        "epochs_run": len(state.history),
        "train_seconds": timing["train_seconds"],
        "data_seconds": timing["data_seconds"],
        "train_images_per_second": timing["train_images_per_second"],
        "bad_files": len(bad_files),
        "input_path": train_src.kind,
    }
    if runtime.is_main():
        write_json(out / ckpt.METRICS, summary)
        write_json(out / ckpt.BAD_FILES, bad_files)
    runtime.barrier()
    return summary
