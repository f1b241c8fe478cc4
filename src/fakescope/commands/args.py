"""Argument types and option groups shared by the command modules.

The checks themselves live in :mod:`fakescope.parsing` (configuration files use the same ones);
here they only become argparse types."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from fakescope import parsing
from fakescope.choices import GEOMETRIES, PRECISIONS
from fakescope.options import RuntimeOptions


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def argtype(check: Callable, name: str) -> Callable:
    """A :mod:`fakescope.parsing` check as an argparse type (its ValueError becomes the usage error)."""
    def convert(s: str):
        try:
            return check(s)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name  # argparse names the type in "invalid <name> value" fallbacks
    return convert


threshold = argtype(parsing.threshold, "threshold")
number = argtype(parsing.number, "number")
fraction = argtype(parsing.fraction, "fraction")
confidence = argtype(parsing.confidence, "confidence")
positive_int = argtype(parsing.positive_int, "positive_int")
nonneg_int = argtype(parsing.nonneg_int, "nonneg_int")
quality = argtype(parsing.quality, "quality")
csv = argtype(parsing.csv, "csv")


def add_runtime(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    g.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                   help="auto: bf16 + channels_last for inference where the processor supports it; fp32 training")
    g.add_argument("--batch-size", type=positive_int, default=None)
    g.add_argument("--workers", type=nonneg_int, default=None, help="DataLoader workers (default: one per core)")
    g.add_argument("--cache-dir", default=None, help="feature cache folder (default: the user cache directory)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the frozen-feature cache")
    g.add_argument("--max-pixels", type=positive_int, default=None,
                   help="refuse images with more pixels than this (decompression-bomb guard; default 120M)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")


def runtime_from_args(args: argparse.Namespace) -> RuntimeOptions:
    """The one :class:`~fakescope.options.RuntimeOptions` of a command, from its parsed flags
    (:func:`add_runtime`'s, plus ``--max-file-size`` where the command has it; a flag the command
    lacks keeps the default). Built once per command and passed down as it is."""
    return RuntimeOptions(device=getattr(args, "device", "auto"), precision=getattr(args, "precision", "auto"),
                          batch_size=getattr(args, "batch_size", None), num_workers=getattr(args, "workers", None),
                          use_cache=not getattr(args, "no_cache", False), cache_dir=getattr(args, "cache_dir", None),
                          max_pixels=getattr(args, "max_pixels", None),
                          max_file_size=getattr(args, "max_file_size", None), compile=getattr(args, "compile", False))


DATA_HELP = "data root (GenImage layout or ROOT/{train,val}/{ai,nature})"
SEVERAL_HELP = "; repeat for several roots (their generators together, each name in one root only)"


def data_option(value):
    """``--data`` given with ``action="append"``: one root as a string (as before), several as a list."""
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


def add_data(p: argparse.ArgumentParser, split_default: str | None = "val", *, several: bool = False,
             required: bool = True) -> None:
    if several:
        p.add_argument("--data", required=required, action="append", help=DATA_HELP + SEVERAL_HELP)
    else:
        p.add_argument("--data", required=required, help=DATA_HELP)
    p.add_argument("--generators", type=csv, default=None, help="comma-separated generators to use")
    if split_default is not None:
        p.add_argument("--split", default=split_default, choices=["train", "val"])
    p.add_argument("--jpeg-align", type=quality, default=None, metavar="Q",
                   help="re-encode every image of both classes as JPEG at quality Q (format-shortcut control)")


def add_geometry(p: argparse.ArgumentParser, what: str = "override the run's test-time geometry") -> None:
    p.add_argument("--test-geometry", default=None, choices=list(GEOMETRIES),
                   help=f"{what}: resize (whole image to the input size), center_crop (centre square at the "
                        f"image's pixel scale) or crops (mean score of a 3x3 grid of such squares)")


def max_side(value: str) -> str | int:
    """``--max-side``: ``off``, ``auto`` or a positive number of pixels."""
    v = value.strip().lower()
    if v in ("off", "auto"):
        return v
    if v.isdigit() and int(v) > 0:
        return int(v)
    raise argparse.ArgumentTypeError(f"expected --max-side auto, off or a positive integer, got {value!r}")


def add_max_side(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-side", type=max_side, default=None, metavar="N|off",
                   help="override the run's max side: down-scale any image whose longer side exceeds N pixels to "
                        "N first (off: read every image at its own pixel scale; default: the run's)")


def add_model_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required,
                   help="cnn32, resnet50, convnext_small, npr, cnnspot, univfd or timm:<name> (see `fakescope models`)")
    add_backbone_options(g)
    g.add_argument("--filters", type=csv, default=None, help="cnn32 filters, e.g. 32,64,128")
    g.add_argument("--input-size", type=positive_int, default=None,
                   help="the model's input (crop) size in pixels, for models that take it (e.g. aligned-crops: 96)")
    g.add_argument("--backbone", default=None, help="aligned-crops: its timm backbone (default tf_efficientnet_lite0)")
    g.add_argument("--stem-stride", type=positive_int, default=None, choices=[1, 2],
                   help="aligned-crops: 1 = no first down-sampling (Rajan et al.; default), 2 = the backbone's own")


def add_backbone_options(g) -> None:
    g.add_argument("--pretrained-file", default=None, help="local ImageNet weights for the backbone")
    g.add_argument("--no-pretrained", action="store_true", help="random backbone weights, on purpose")
    fr = g.add_mutually_exclusive_group()
    fr.add_argument("--freeze", dest="freeze", action="store_true", default=None, help="freeze the backbone")
    fr.add_argument("--finetune", dest="freeze", action="store_false", help="train the backbone too")


def model_options_from_args(args: argparse.Namespace) -> dict:
    """The model options the command line set (only those: a configuration file's own options stay
    unless a flag overrides them), normalised by :func:`fakescope.study.config.normalise_model_options`, the one
    helper that configuration files use too (``pretrained_file`` made absolute, ``~`` expanded)."""
    from fakescope.study.config import normalise_model_options as normalise

    return normalise(pretrained=False if getattr(args, "no_pretrained", False) else None,
                     pretrained_file=getattr(args, "pretrained_file", None), freeze=getattr(args, "freeze", None),
                     filters=getattr(args, "filters", None) or None, input_size=getattr(args, "input_size", None),
                     backbone=getattr(args, "backbone", None), stem_stride=getattr(args, "stem_stride", None),
                     key=None)
