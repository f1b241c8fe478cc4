"""``fakescope train``: train a detector into a run directory."""

from __future__ import annotations

from fakescope import validate
from fakescope.commands import args as a
from fakescope.errors import FakescopeError


def add_parser(sub):
    t = sub.add_parser("train", help="train a detector into a run directory")
    a.add_model_options(t)
    a.add_data(t, split_default=None, several=True)
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--epochs", type=a.positive_int, default=10)
    t.add_argument("--lr", type=a.number, default=None, help="Adam's learning rate (default: the model's recipe, "
                                                             "else 1e-3)")
    t.add_argument("--lr-schedule", default=None, choices=["constant", "cosine", "plateau", "step"],
                   help="default: the model's recipe, else constant; plateau: lr / 10 when validation accuracy "
                        "stalls for 5 epochs; step: x 0.9 every 10 epochs")
    t.add_argument("--task", default="binary", choices=["binary", "attribution"],
                   help="attribution: one class per generator plus nature (softmax); p_ai = 1 - P(nature)")
    a.add_geometry(t, "the run's test-time geometry (default: the model's); center_crop and crops also train on "
                      "crops at the image's pixel scale")
    t.add_argument("--patience", type=a.nonneg_int, default=3, help="early stopping patience (0 = off)")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--val-fraction", type=a.number, default=0.1)
    t.add_argument("--limit", type=a.positive_int, default=None, help="at most N images per generator and class")
    t.add_argument("--native-size", default="auto", help="auto, off or N (pixels)")
    pr = t.add_mutually_exclusive_group()
    pr.add_argument("--paired", dest="paired", action="store_true", default=None,
                    help="aligned pairs (a root made by `data align`): both members of each pair in the same batch "
                         "with the same crop, flip and blur/JPEG/scale augmentation (default: the model's recipe)")
    pr.add_argument("--unpaired", dest="paired", action="store_false",
                    help="sample the members of aligned pairs independently (overrides a paired recipe)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
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
    v = t.add_argument_group("adversarial training")
    v.add_argument("--adv-train", default=None, choices=["pgd", "fgsm"], help="train on adversarial examples")
    v.add_argument("--adv-eps", type=a.number, default=2 / 255)
    v.add_argument("--adv-steps", type=a.positive_int, default=7)
    v.add_argument("--adv-mix", type=a.fraction, default=0.0, help="fraction of each batch kept clean")
    a.add_runtime(t)
    return t


def _range(flag: str, s: str, kind) -> tuple:
    try:
        return validate.value_range(s, kind)
    except ValueError as e:
        raise FakescopeError(f"{flag}: {e}") from None


def _scale(s: str | None) -> tuple[float, float]:
    lo, hi = _range("--aug-scale", s or "1,1", float)
    if not 0 < lo <= hi <= 1:
        raise FakescopeError(f"--aug-scale: expected factors in (0, 1] like 0.5,1, got {s!r}")
    return lo, hi


def run(args) -> int:
    from fakescope.data.transforms import Augment
    from fakescope.engine import runtime
    from fakescope.engine.train import TrainOptions, train
    from fakescope.report.tables import markdown_table

    flags = (args.aug_jpeg, args.aug_jpeg_quality, args.aug_blur, args.aug_blur_sigma, args.aug_crop, args.aug_flip,
             args.aug_native_crop, args.aug_scale)
    aug = None  # the model's recipe
    if any(f is not None for f in flags):
        aug = Augment(jpeg_prob=args.aug_jpeg or 0.0,
                      jpeg_quality=_range("--aug-jpeg-quality", args.aug_jpeg_quality or "30,100", int),
                      blur_prob=args.aug_blur or 0.0,
                      blur_sigma=_range("--aug-blur-sigma", args.aug_blur_sigma or "0,3", float),
                      crop=1.0 if args.aug_crop is None else args.aug_crop, flip=bool(args.aug_flip),
                      native_crop=bool(args.aug_native_crop),
                      scale=_scale(args.aug_scale))
    opts = TrainOptions(
        model=args.model, data=a.data_option(args.data), generators=args.generators, paired=args.paired,
        epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, lr_schedule=args.lr_schedule, patience=args.patience,
        task=args.task, test_geometry=args.test_geometry,
        seed=args.seed, val_fraction=args.val_fraction, limit=args.limit, native_size=args.native_size,
        jpeg_align=args.jpeg_align, augment=aug,
        model_options=a.model_options(args), device=args.device,
        precision=args.precision, use_cache=not args.no_cache, cache_dir=args.cache_dir, adv_train=args.adv_train,
        adv_eps=args.adv_eps, adv_steps=args.adv_steps, adv_mix=args.adv_mix, strict=args.strict,
        num_workers=args.workers, max_pixels=args.max_pixels, compile=args.compile, preload=args.preload,
    )
    summary = train(opts, args.out, resume=args.resume)
    if runtime.is_main():
        print(markdown_table({args.model: summary["validation"]}, first="validation"))
        print(f"\nbest epoch {summary['best_epoch']} of {summary['epochs_run']}, "
              f"{summary['train_seconds']:.1f} s training ({summary['input_path']} inputs), "
              f"{summary['bad_files']} unreadable files skipped")
        print(f"run directory: {args.out}")
    return 0
