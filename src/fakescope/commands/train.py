"""``fakescope train``: train a detector into a run directory."""

from __future__ import annotations

from fakescope import validate
from fakescope.commands import args as a
from fakescope.errors import FakescopeError


def add_parser(sub):
    t = sub.add_parser("train", help="train a detector into a run directory")
    a.add_model_options(t)
    a.add_data(t, split_default=None)
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--epochs", type=a.positive_int, default=10)
    t.add_argument("--lr", type=a.number, default=1e-3)
    t.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    t.add_argument("--patience", type=a.nonneg_int, default=3, help="early stopping patience (0 = off)")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--val-fraction", type=a.number, default=0.1)
    t.add_argument("--limit", type=a.positive_int, default=None, help="at most N images per generator and class")
    t.add_argument("--native-size", default="auto", help="auto, off or N (pixels)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    t.add_argument("--strict", action="store_true", help="any unreadable file is an error before training starts")
    t.add_argument("--preload", default="auto", choices=["auto", "on", "off"],
                   help="decode the split once into memory: auto (images of native size <= 64), on, off")
    g = t.add_argument_group("augmentation (off by default, as in the study)")
    g.add_argument("--aug-jpeg", type=a.fraction, default=0.0, metavar="P", help="probability of random JPEG")
    g.add_argument("--aug-jpeg-quality", default="30,100", help="quality range lo,hi")
    g.add_argument("--aug-blur", type=a.fraction, default=0.0, metavar="P", help="probability of Gaussian blur")
    g.add_argument("--aug-blur-sigma", default="0,3", help="sigma range lo,hi")
    g.add_argument("--aug-crop", type=a.number, default=1.0, metavar="F", help="random crop of this fraction")
    g.add_argument("--aug-flip", action="store_true", help="random horizontal flip")
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


def run(args) -> int:
    from fakescope.data.transforms import Augment
    from fakescope.engine import runtime
    from fakescope.engine.train import TrainOptions, train
    from fakescope.report.tables import markdown_table

    aug = Augment(jpeg_prob=args.aug_jpeg, jpeg_quality=_range("--aug-jpeg-quality", args.aug_jpeg_quality, int),
                  blur_prob=args.aug_blur, blur_sigma=_range("--aug-blur-sigma", args.aug_blur_sigma, float),
                  crop=args.aug_crop, flip=args.aug_flip)
    opts = TrainOptions(
        model=args.model, data=args.data, generators=args.generators, epochs=args.epochs,
        batch_size=args.batch_size or 32, lr=args.lr, lr_schedule=args.lr_schedule, patience=args.patience,
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
