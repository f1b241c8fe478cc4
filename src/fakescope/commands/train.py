"""``fakescope train``: train a detector into a run directory."""

from __future__ import annotations

import argparse

from fakescope import parsing
from fakescope.choices import LR_SCHEDULES, TASKS
from fakescope.commands import args as a
from fakescope.data.transforms import Augment
from fakescope.errors import FakescopeError


def add_parser(sub):
    t = sub.add_parser("train", help="train a detector into a run directory")
    a.add_model_options(t, required=False)
    a.add_data(t, split_default=None, several=True, required=False)
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--epochs", type=a.positive_int, default=10)
    t.add_argument("--lr", type=a.number, default=None, help="Adam's learning rate (default: the model's recipe, "
                                                             "else 1e-3)")
    t.add_argument("--lr-schedule", default=None, choices=list(LR_SCHEDULES),
                   help="default: the model's recipe, else constant; plateau: lr / 10 when validation accuracy "
                        "stalls for 5 epochs; step: x 0.9 every 10 epochs")
    t.add_argument("--task", default="binary", choices=list(TASKS),
                   help="attribution: one class per generator plus nature (softmax); p_ai = 1 - P(nature)")
    a.add_geometry(t, "the run's test-time geometry (default: the model's); center_crop and crops also train on "
                      "crops at the image's pixel scale")
    t.add_argument("--patience", type=a.nonneg_int, default=3, help="early stopping patience (0 = off)")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--val-fraction", type=a.number, default=0.1)
    t.add_argument("--limit", type=a.positive_int, default=None, help="at most N images per generator and class")
    t.add_argument("--native-size", default="auto", help="auto, off or N (pixels)")
    t.add_argument("--max-side", type=a.positive_int, default=None, metavar="N",
                   help="down-scale any image whose longer side exceeds N pixels to N first, at training and at "
                        "test (recorded in the run): the model never reads an image at a finer pixel scale than "
                        "its training data's (default: off)")
    pr = t.add_mutually_exclusive_group()
    pr.add_argument("--paired", dest="paired", action="store_true", default=None,
                    help="aligned pairs (a root made by `data align`): both members of each pair in the same batch "
                         "with the same crop, flip and blur/JPEG/scale augmentation (default: the model's recipe)")
    pr.add_argument("--unpaired", dest="paired", action="store_false",
                    help="sample the members of aligned pairs independently (overrides a paired recipe)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last complete epoch: every option comes from the run "
                        "(--model and --data are not needed) except --device and --workers; --epochs and "
                        "--patience may change (not --epochs under a cosine schedule), any other option given must "
                        "agree with the run's")
    t.add_argument("--strict", action="store_true", help="any unreadable file is an error before training starts")
    t.add_argument("--preload", default="auto", choices=["auto", "on", "off"],
                   help="decode the split once into memory: auto (images of native size <= 64), on, off")
    g = t.add_argument_group("augmentation (default: the model's recipe, else off as in the study; "
                             "any of these options replaces the recipe's augmentation)")
    g.add_argument("--aug-jpeg", type=a.fraction, default=None, metavar="P", help="probability of random JPEG")
    g.add_argument("--aug-jpeg-quality", default=None, help="quality range lo,hi (30,100)")
    g.add_argument("--aug-blur", type=a.fraction, default=None, metavar="P", help="probability of Gaussian blur")
    g.add_argument("--aug-blur-sigma", default=None, help="sigma range lo,hi (0,3)")
    g.add_argument("--aug-crop", type=a.number, default=None, metavar="F", help="random crop of this fraction")
    g.add_argument("--aug-flip", action="store_true", default=None, help="random horizontal flip")
    g.add_argument("--aug-native-crop", action="store_true", default=None,
                   help="crop geometries: a random input-size square at the image's pixel scale (not the centre)")
    g.add_argument("--aug-scale", default=None, metavar="LO,HI",
                   help="down-scale each image by a random factor in [LO, HI] first, e.g. 0.5,1 (scale augmentation)")
    g.add_argument("--aug-color", type=a.fraction, default=None, metavar="P",
                   help="probability of colour jitter (brightness, contrast, saturation, hue)")
    g.add_argument("--aug-color-strength", type=a.fraction, default=None, metavar="S",
                   help="colour jitter factors in [1-S, 1+S], hue shift in [-S/4, S/4] (0.4)")
    g.add_argument("--aug-gray", type=a.fraction, default=None, metavar="P", help="probability of greyscale")
    g.add_argument("--aug-nature-blur", type=a.fraction, default=None, metavar="P",
                   help="probability of a Gaussian blur of the real images only, so that smoothness is not a "
                        "feature of the AI class")
    g.add_argument("--aug-nature-blur-sigma", default=None, metavar="LO,HI", help="its sigma range (0.5,2)")
    v = t.add_argument_group("adversarial training")
    v.add_argument("--adv-train", default=None, choices=["pgd", "fgsm"], help="train on adversarial examples")
    v.add_argument("--adv-eps", type=a.number, default=2 / 255)
    v.add_argument("--adv-steps", type=a.positive_int, default=7)
    v.add_argument("--adv-mix", type=a.fraction, default=0.0, help="fraction of each batch kept clean")
    a.add_runtime(t)
    # every option's default is applied in run(): None there means "not given", so a resume knows what the user set
    for x in t._actions:  # the first action of a dest sets its default, as in argparse (--freeze before --finetune)
        if x.dest not in _NOT_OPTIONS:
            _DEFAULTS.setdefault(x.dest, x.default)
    t.set_defaults(**dict.fromkeys(_DEFAULTS))
    return t


_NOT_OPTIONS = {"help", "out", "resume"}
_DEFAULTS: dict = {}
_AUG = ("aug_jpeg", "aug_jpeg_quality", "aug_blur", "aug_blur_sigma", "aug_crop", "aug_flip", "aug_native_crop",
        "aug_scale", "aug_color", "aug_color_strength", "aug_gray", "aug_nature_blur", "aug_nature_blur_sigma")
_MODEL = ("filters", "pretrained_file", "no_pretrained", "freeze")
_RENAMED = {"workers": "num_workers", "no_cache": "use_cache"}


def _range(flag: str, s: str, kind) -> tuple:
    try:
        return parsing.value_range(s, kind)
    except ValueError as e:
        raise FakescopeError(f"{flag}: {e}") from None


def _scale(s: str | None) -> tuple[float, float]:
    lo, hi = _range("--aug-scale", s or "1,1", float)
    if not 0 < lo <= hi <= 1:
        raise FakescopeError(f"--aug-scale: expected factors in (0, 1] like 0.5,1, got {s!r}")
    return lo, hi


def _augment(args) -> Augment | None:
    if all(getattr(args, f) is None for f in _AUG):
        return None  # the model's recipe
    return Augment(jpeg_prob=args.aug_jpeg or 0.0,
                   jpeg_quality=_range("--aug-jpeg-quality", args.aug_jpeg_quality or "30,100", int),
                   blur_prob=args.aug_blur or 0.0,
                   blur_sigma=_range("--aug-blur-sigma", args.aug_blur_sigma or "0,3", float),
                   crop=1.0 if args.aug_crop is None else args.aug_crop, flip=bool(args.aug_flip),
                   native_crop=bool(args.aug_native_crop),
                   scale=_scale(args.aug_scale), color_prob=args.aug_color or 0.0,
                   color_strength=0.4 if args.aug_color_strength is None else args.aug_color_strength,
                   gray_prob=args.aug_gray or 0.0, nature_blur_prob=args.aug_nature_blur or 0.0,
                   nature_blur_sigma=_range("--aug-nature-blur-sigma", args.aug_nature_blur_sigma or "0.5,2", float))


def _given(args) -> dict:
    """The training options the command line set, by their :class:`TrainOptions` names (device and
    workers always: a run, resumed or not, runs where this command runs)."""
    out: dict = {}
    for dest in _DEFAULTS:
        v = getattr(args, dest)
        if v is None or dest in _AUG or dest in _MODEL:
            continue
        out[_RENAMED.get(dest, dest)] = (not v) if dest == "no_cache" else v
    if any(getattr(args, f) is not None for f in _AUG):
        out["augment"] = _augment(args)
    if any(getattr(args, f) is not None for f in _MODEL):
        out["model_options"] = a.model_options_from_args(args)
    if "data" in out:
        out["data"] = a.data_option(out["data"])  # --data given several times: a list of roots
    out["device"] = args.device or _DEFAULTS["device"]
    out["num_workers"] = args.workers
    return out


def run(args) -> int:
    from fakescope.engine import checkpoint as ckpt
    from fakescope.engine import runtime
    from fakescope.engine.train import TrainOptions, train
    from fakescope.report.model_card import write_training_card
    from fakescope.report.tables import markdown_table

    given = _given(args)
    opts = None
    if args.model is not None and args.data is not None:
        full = argparse.Namespace(**{**vars(args), **{k: _DEFAULTS[k] if getattr(args, k) is None else getattr(args, k)
                                                      for k in _DEFAULTS}})
        opts = TrainOptions(
            model=full.model, data=a.data_option(full.data), generators=full.generators, paired=full.paired,
            epochs=full.epochs,
            batch_size=full.batch_size, lr=full.lr, lr_schedule=full.lr_schedule, patience=full.patience,
            task=full.task, test_geometry=full.test_geometry,
            seed=full.seed, val_fraction=full.val_fraction, limit=full.limit, native_size=full.native_size,
            max_side=full.max_side, jpeg_align=full.jpeg_align, augment=_augment(args),
            model_options=a.model_options_from_args(full), device=full.device,
            precision=full.precision, use_cache=not full.no_cache, cache_dir=full.cache_dir,
            adv_train=full.adv_train, adv_eps=full.adv_eps, adv_steps=full.adv_steps, adv_mix=full.adv_mix,
            strict=full.strict, num_workers=full.workers, max_pixels=full.max_pixels, compile=full.compile,
            preload=full.preload,
        )
    elif not args.resume:
        raise FakescopeError(f"expected --model and --data for a new run, got "
                             f"{'neither' if args.model is None and args.data is None else 'only one of them'} "
                             f"(pass --resume to continue the run in {args.out})")
    summary = train(opts, args.out, resume=args.resume, changes=given if args.resume else None)
    model = opts.model if opts is not None else ckpt.read_config(args.out)["model"]["name"]
    if runtime.is_main():
        write_training_card(args.out)
        print(markdown_table({model: summary["validation"]}, first="validation"))
        print(f"\nbest epoch {summary['best_epoch']} of {summary['epochs_run']}, "
              f"{summary['train_seconds']:.1f} s training ({summary['input_path']} inputs), "
              f"{summary['bad_files']} unreadable files skipped")
        print(f"run directory: {args.out}")
    return 0
