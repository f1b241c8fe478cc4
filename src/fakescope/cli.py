"""The ``fakescope`` command line: a thin layer over the library.

Every user error ends in one line on stderr and exit code 2; no Python traceback."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from fractions import Fraction
from pathlib import Path

from fakescope import __version__
from fakescope.errors import FakescopeError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _threshold(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a threshold in [0, 1], got {s!r}") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a threshold in [0, 1], got {s}")
    return v


def _number(s: str) -> float:
    try:
        return float(Fraction(s.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or fraction like 2/255, got {s!r}") from None


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s}")
    return v


def _quality(s: str) -> int:
    v = _positive_int(s)
    if v > 100:
        raise argparse.ArgumentTypeError(f"expected a JPEG quality in [1, 100], got {s}")
    return v


def _add_runtime(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 + channels_last for inference where the processor supports it; fp32 training")
    g.add_argument("--batch-size", type=_positive_int, default=None)
    g.add_argument("--workers", type=_nonneg_int, default=None, help="DataLoader workers (default: one per core)")
    g.add_argument("--cache-dir", default=None, help="feature cache folder (default: the user cache directory)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the frozen-feature cache")
    g.add_argument("--max-pixels", type=_positive_int, default=None,
                   help="refuse images with more pixels than this (decompression-bomb guard; default 120M)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")


def _add_data(p: argparse.ArgumentParser, split_default: str | None = "val") -> None:
    p.add_argument("--data", required=True, help="data root (GenImage layout or ROOT/{train,val}/{ai,nature})")
    p.add_argument("--generators", type=_csv, default=None, help="comma-separated generators to use")
    if split_default is not None:
        p.add_argument("--split", default=split_default, choices=["train", "val"])
    p.add_argument("--jpeg-align", type=_quality, default=None, metavar="Q",
                   help="re-encode every image of both classes as JPEG at quality Q (format-shortcut control)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="cnn32, resnet50, convnext_small or timm:<name> (see `fakescope models`)")
    g.add_argument("--pretrained-file", default=None, help="local ImageNet weights for the backbone")
    g.add_argument("--no-pretrained", action="store_true", help="random backbone weights, on purpose")
    fr = g.add_mutually_exclusive_group()
    fr.add_argument("--freeze", dest="freeze", action="store_true", default=None, help="freeze the backbone")
    fr.add_argument("--finetune", dest="freeze", action="store_false", help="train the backbone too")
    g.add_argument("--filters", type=_csv, default=None, help="cnn32 filters, e.g. 32,64,128")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fakescope", description="Train, evaluate, attack and serve detectors of AI-generated images.")
    p.add_argument("--version", action="version", version=f"fakescope {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    mo = sub.add_parser("models", help="list the registered models")
    mo.add_argument("--check", metavar="NAME", default=None,
                    help="build NAME with its pretrained weights and say whether they can be had here")
    mo.add_argument("--pretrained-file", default=None, help="with --check: local weights to try")

    d = sub.add_parser("data", help="inspect, show or create datasets")
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    di = dsub.add_parser("inspect", help="counts, formats, sizes and unreadable files of a data root")
    di.add_argument("root")
    di.add_argument("--json", action="store_true", help="print JSON instead of a table")
    di.add_argument("--sample", type=_positive_int, default=None,
                    help="decode at most N files per generator/split/class (counts still cover everything)")
    di.add_argument("--workers", type=_nonneg_int, default=None)
    di.add_argument("--max-pixels", type=_positive_int, default=None)
    ds = dsub.add_parser("show", help="a labelled grid of sample images per generator and class")
    ds.add_argument("root")
    ds.add_argument("--out", required=True)
    ds.add_argument("--per-class", type=_positive_int, default=6)
    dd = dsub.add_parser("demo", help="write the small built-in demo dataset (not GenImage)")
    dd.add_argument("out")
    dd.add_argument("--train-per-class", type=_positive_int, default=300)
    dd.add_argument("--val-per-class", type=_positive_int, default=100)

    t = sub.add_parser("train", help="train a detector into a run directory")
    _add_model_options(t)
    _add_data(t, split_default=None)
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--epochs", type=_positive_int, default=10)
    t.add_argument("--lr", type=_number, default=1e-3)
    t.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    t.add_argument("--patience", type=_nonneg_int, default=3, help="early stopping patience (0 = off)")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--val-fraction", type=_number, default=0.1)
    t.add_argument("--limit", type=_positive_int, default=None, help="at most N images per generator and class")
    t.add_argument("--native-size", default="auto", help="auto, off or N (pixels)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    t.add_argument("--strict", action="store_true", help="any unreadable file is an error before training starts")
    t.add_argument("--preload", default="auto", choices=["auto", "on", "off"],
                   help="decode the split once into memory: auto (images of native size <= 64), on, off")
    a = t.add_argument_group("augmentation (off by default, as in the study)")
    a.add_argument("--aug-jpeg", type=_number, default=0.0, metavar="P", help="probability of random JPEG")
    a.add_argument("--aug-jpeg-quality", default="30,100", help="quality range lo,hi")
    a.add_argument("--aug-blur", type=_number, default=0.0, metavar="P", help="probability of Gaussian blur")
    a.add_argument("--aug-blur-sigma", default="0,3", help="sigma range lo,hi")
    a.add_argument("--aug-crop", type=_number, default=1.0, metavar="F", help="random crop of this fraction")
    a.add_argument("--aug-flip", action="store_true", help="random horizontal flip")
    v = t.add_argument_group("adversarial training")
    v.add_argument("--adv-train", default=None, choices=["pgd", "fgsm"], help="train on adversarial examples")
    v.add_argument("--adv-eps", type=_number, default=2 / 255)
    v.add_argument("--adv-steps", type=_positive_int, default=7)
    v.add_argument("--adv-mix", type=_number, default=0.0, help="fraction of each batch kept clean")
    _add_runtime(t)

    e = sub.add_parser("evaluate", help="metrics of a run on a data root")
    e.add_argument("run")
    _add_data(e)
    e.add_argument("--threshold", type=_threshold, default=0.5)
    e.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the JSON here")
    e.add_argument("--out", default=None, help="folder for the PNGs (default: RUN/eval-<split>)")
    e.add_argument("--native-size", default=None, help="override the run's native size: N or off")
    e.add_argument("--degrade", action="append", default=None, metavar="KIND:LEVELS",
                   help="jpeg:95,75,50,30 | blur:1,2,3 | resize:0.5,0.25 (repeatable)")
    _add_runtime(e)

    pr = sub.add_parser("predict", help="P(ai) for image files and folders")
    pr.add_argument("run")
    pr.add_argument("paths", nargs="+")
    pr.add_argument("--format", default="table", choices=["table", "csv", "json"])
    pr.add_argument("--threshold", type=_threshold, default=0.5)
    pr.add_argument("--max-file-size", type=_positive_int, default=50 * 2**20, help="bytes (default 50 MiB)")
    pr.add_argument("--native-size", default=None, help="override the run's native size: N or off")
    _add_runtime(pr)

    from types import SimpleNamespace

    from fakescope import commands  # the study-level sub-commands (attack, benchmark, cross)

    commands.add_parsers(sub, SimpleNamespace(
        parser_class=_Parser, add_data=_add_data, add_runtime=_add_runtime, add_model_options=_add_model_options,
        model_options=_model_options, threshold=_threshold, number=_number, csv=_csv, positive_int=_positive_int,
        nonneg_int=_nonneg_int, quality=_quality))
    return p


# --- handlers -------------------------------------------------------------------------------------

def _cmd_models(args) -> int:
    from fakescope.models import create_model, list_models

    if args.check:
        opts = {"pretrained_file": args.pretrained_file} if args.pretrained_file else {}
        m = create_model(args.check, **opts)
        print(f"{args.check}: pretrained weights available; input {m.preprocess.input_size}px, "
              f"mean {m.preprocess.mean}, std {m.preprocess.std}, "
              f"{sum(p.numel() for p in m.parameters()):,} parameters")
        return 0

    for name, desc in list_models().items():
        if name != "timm":
            print(f"{name:16s} {desc}")
    print(f"{'timm:<name>':16s} {list_models()['timm'].split(': ', 1)[-1]}")
    return 0


def _cmd_data(args) -> int:
    from fakescope.data.layout import index_root

    if args.data_command == "demo":
        from fakescope.data.demo import make_demo_dataset

        out = make_demo_dataset(args.out, train_per_class=args.train_per_class, val_per_class=args.val_per_class)
        print(f"demo dataset (not GenImage) written to {out}")
        return 0
    index = index_root(args.root)
    if args.data_command == "show":
        from fakescope.data.inspect import sample_images
        from fakescope.report.plots import image_grid

        rows = sample_images(index, args.per_class)
        if not rows:
            raise FakescopeError(f"no readable images under {args.root}")
        print(image_grid(rows, args.out, title=Path(index.root).name))
        return 0
    from fakescope.data.inspect import inspect_index

    kw = {"max_pixels": args.max_pixels} if args.max_pixels else {}
    info = inspect_index(index, sample=args.sample, num_workers=args.workers, **kw)
    if args.json:
        from fakescope.utils import dumps

        print(dumps(info))
    else:
        print(f"{info['root']}  ({info['layout']} layout, {info['total']} images, {info['checked']} decoded)\n")
        print("| generator | split | nature | ai |\n|---|---|---|---|")
        for g, splits in info["counts"].items():
            for s, c in splits.items():
                print(f"| {g} | {s} | {c['nature']} | {c['ai']} |")
        print(f"\nformats: nature {info['formats']['nature']}, ai {info['formats']['ai']}")
        print(f"sizes: {info['sizes']['most_common']}  shorter side: {info['sizes']['shorter_side']}")
        if info["unreadable"]:
            print(f"\nunreadable ({len(info['unreadable'])}):")
            for f, r in list(info["unreadable"].items())[:20]:
                print(f"  {f}: {r}")
        for w in info["warnings"]:
            print(f"WARNING: {w}")
    readable = info["checked"] - len(info["unreadable"])
    return 0 if readable > 0 or info["checked"] == 0 else 1


def _model_options(args) -> dict:
    opts: dict = {"pretrained": not args.no_pretrained}
    if args.pretrained_file:
        opts["pretrained_file"] = str(Path(args.pretrained_file).resolve())
    if args.freeze is not None:
        opts["freeze"] = args.freeze
    if args.filters:
        opts["filters"] = [int(f) for f in args.filters]
    return opts


def _range(s: str, kind=float) -> tuple:
    try:
        lo, hi = (kind(x) for x in s.split(","))
    except ValueError:
        raise FakescopeError(f"expected a range lo,hi, got {s!r}") from None
    return lo, hi


def _cmd_train(args) -> int:
    from fakescope.data.transforms import Augment
    from fakescope.engine.train import TrainOptions, train

    aug = Augment(jpeg_prob=args.aug_jpeg, jpeg_quality=_range(args.aug_jpeg_quality, int), blur_prob=args.aug_blur,
                  blur_sigma=_range(args.aug_blur_sigma), crop=args.aug_crop, flip=args.aug_flip)
    opts = TrainOptions(
        model=args.model, data=args.data, generators=args.generators, epochs=args.epochs,
        batch_size=args.batch_size or 32, lr=args.lr, lr_schedule=args.lr_schedule, patience=args.patience,
        seed=args.seed, val_fraction=args.val_fraction, limit=args.limit, native_size=args.native_size,
        jpeg_align=args.jpeg_align, augment=aug, model_options=_model_options(args), device=args.device,
        precision=args.precision, use_cache=not args.no_cache, cache_dir=args.cache_dir, adv_train=args.adv_train,
        adv_eps=args.adv_eps, adv_steps=args.adv_steps, adv_mix=args.adv_mix, strict=args.strict,
        num_workers=args.workers, max_pixels=args.max_pixels, compile=args.compile, preload=args.preload,
    )
    summary = train(opts, args.out, resume=args.resume)
    from fakescope.engine import runtime

    if runtime.is_main():
        from fakescope.report.tables import markdown_table

        print(markdown_table({args.model: summary["validation"]}, first="validation"))
        print(f"\nbest epoch {summary['best_epoch']} of {summary['epochs_run']}, "
              f"{summary['train_seconds']:.1f} s training ({summary['input_path']} inputs), "
              f"{summary['bad_files']} unreadable files skipped")
        print(f"run directory: {args.out}")
    return 0


def _cmd_evaluate(args) -> int:
    from fakescope.engine.evaluate import evaluate_run

    result = evaluate_run(
        args.run, args.data, split=args.split, generators=args.generators, threshold=args.threshold,
        native_size=args.native_size, jpeg_align=args.jpeg_align, degrade=args.degrade, device=args.device,
        precision=args.precision, batch_size=args.batch_size, num_workers=args.workers,
        use_cache=not args.no_cache, cache_dir=args.cache_dir, out_dir=args.out, json_out=args.json_out,
        max_pixels=args.max_pixels, compile=args.compile,
    )
    from fakescope.engine import runtime

    if runtime.is_main():
        from fakescope.report.tables import markdown_table

        rows = {"overall": result["overall"], **result["per_generator"]}
        print(markdown_table(rows, first=f"{result['model']['name']} on {args.split}"))
        for kind, levels in result.get("degradations", {}).items():
            print()
            print(markdown_table({f"{kind} {lv['level']:g}": lv["overall"] for lv in levels},
                                 ("accuracy", "f1", "roc_auc", "n"), first="degradation"))
        if result["bad_files"]:
            print(f"\n{len(result['bad_files'])} unreadable files skipped (listed in the JSON)")
        print(f"\nresults: {result['outputs']['json']}  figures: {result['outputs']['folder']}")
    if not result["overall"].get("n"):  # exit code 0 unless nothing could be read
        print(f"fakescope: error: none of the {len(result['bad_files'])} images could be read", file=sys.stderr)
        return 1
    return 0


def _cmd_predict(args) -> int:
    from fakescope.engine.evaluate import predict_paths

    rows = predict_paths(args.run, args.paths, threshold=args.threshold, device=args.device,
                         precision=args.precision, batch_size=args.batch_size, num_workers=args.workers,
                         max_file_size=args.max_file_size, max_pixels=args.max_pixels,
                         native_size=args.native_size, compile=args.compile)
    from fakescope.engine import runtime

    if not runtime.is_main():
        return 0
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif args.format == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["path", "p_ai", "verdict", "error"], lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in ("path", "p_ai", "verdict", "error")})
        print(buf.getvalue(), end="")
    else:
        width = min(80, max((len(r["path"]) for r in rows), default=4))
        print(f"{'path':{width}s}  {'p_ai':>7s}  verdict")
        for r in rows:
            if "error" in r:
                print(f"{r['path']:{width}s}  {'-':>7s}  error: {r['error']}")
            else:
                print(f"{r['path']:{width}s}  {r['p_ai']:7.4f}  {r['verdict']}")
    return 0 if any("error" not in r for r in rows) else 1


HANDLERS = {"models": _cmd_models, "data": _cmd_data, "train": _cmd_train, "evaluate": _cmd_evaluate,
            "predict": _cmd_predict}


def _passive_threads() -> None:
    """CPU thread teams wait asleep instead of spinning (effective when set before torch loads OpenMP;
    a user's own setting wins): a spinning team stalls at every operator while another process holds one
    of its cores, which made forward passes 2-6x slower on a shared 2-core CPU."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main(argv: list[str] | None = None) -> int:
    _passive_threads()
    parser = build_parser()
    args = parser.parse_args(argv)
    from fakescope import commands

    handler = HANDLERS.get(args.command) or commands.HANDLERS[args.command]
    try:
        return handler(args)
    except FakescopeError as e:
        print(f"fakescope: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fakescope: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # e.g. an --out folder that cannot be written, a full disk: one line, no traceback
        print(f"fakescope: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
