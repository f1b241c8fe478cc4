"""``fakescope data inspect|show|demo|align``: look at a data root, write the built-in demo dataset, or turn
folders of real photos into aligned real/reconstruction pairs."""

from __future__ import annotations

from pathlib import Path

from fakescope.commands import args as a
from fakescope.errors import FakescopeError


def add_parser(sub):
    d = sub.add_parser("data", help="inspect, show or create datasets")
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=a.Parser)
    di = dsub.add_parser("inspect", help="counts, formats, sizes and unreadable files of a data root")
    di.add_argument("root")
    di.add_argument("--json", action="store_true", help="print JSON instead of a table")
    di.add_argument("--sample", type=a.positive_int, default=None,
                    help="decode at most N files per generator/split/class (counts still cover everything)")
    di.add_argument("--workers", type=a.nonneg_int, default=None)
    di.add_argument("--max-pixels", type=a.positive_int, default=None)
    ds = dsub.add_parser("show", help="a labelled grid of sample images per generator and class")
    ds.add_argument("root")
    ds.add_argument("--out", required=True)
    ds.add_argument("--per-class", type=a.positive_int, default=6)
    dd = dsub.add_parser("demo", help="write the small built-in demo dataset (not GenImage)")
    dd.add_argument("out")
    dd.add_argument("--train-per-class", type=a.positive_int, default=300)
    dd.add_argument("--val-per-class", type=a.positive_int, default=100)
    _add_align(dsub)
    return d


def _add_align(dsub) -> None:
    from fakescope.models.autoencoders import list_autoencoders

    da = dsub.add_parser("align", help="real photos -> aligned pairs: each image and its autoencoder "
                                       "reconstruction (a GenImage-layout root for train)")
    da.add_argument("src", nargs="+", metavar="SRC",
                    help="folders of real images (searched recursively) or GenImage roots (their nature images)")
    da.add_argument("--autoencoder", required=True, choices=list(list_autoencoders()),
                    help="the autoencoder whose reconstructions are the fakes (see fakescope models --autoencoders)")
    da.add_argument("--weights", default=None,
                    help="a weights file, a folder with <name>_encoder.* and <name>_decoder.*, or a diffusers "
                         "folder (default: the Hugging Face hub)")
    da.add_argument("--out", required=True, help="output root: pairs go to OUT/<autoencoder>/{train,val}/{nature,ai}")
    da.add_argument("--crop", type=a.positive_int, default=None,
                    help="take native-scale NxN crops (offsets on the 8-px grid) instead of whole images")
    da.add_argument("--crops-per-image", type=a.positive_int, default=1, help="with --crop: crops per image")
    da.add_argument("--max-side", type=a.positive_int, default=None,
                    help="down-scale an image whose longer side exceeds N before anything else")
    da.add_argument("--format", default="png", help="png (default) or jpeg:Q, for both members of a pair")
    da.add_argument("--val-fraction", type=a.fraction, default=0.2,
                    help="share of source images (by a hash of their path) whose pairs go to val (default 0.2)")
    da.add_argument("--inpaint", type=a.fraction, default=0.0, metavar="P",
                    help="with probability P the fake is the real image with only a random 10-50%% region "
                         "(rectangles and blobs) replaced by its reconstruction")
    da.add_argument("--limit", type=a.positive_int, default=None,
                    help="use N source images drawn with the seed (default: all)")
    da.add_argument("--seed", type=a.nonneg_int, default=0)
    da.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    da.add_argument("--batch-size", type=a.positive_int, default=8)
    da.add_argument("--reuse", default=None, metavar="ROOT",
                    help="read the reconstructions from an earlier PNG root made with the same weights, crops and "
                         "seed instead of recomputing them (e.g. its --inpaint or jpeg variant)")
    da.add_argument("--json", action="store_true", help="print the run's summary as JSON")


def run(args) -> int:
    return {"demo": _demo, "show": _show, "inspect": _inspect, "align": _align}[args.data_command](args)


def _align(args) -> int:
    from fakescope.engine.align import AlignOptions, align

    opts = AlignOptions(args.autoencoder, crop=args.crop, crops_per_image=args.crops_per_image,
                        max_side=args.max_side, format=args.format, val_fraction=args.val_fraction,
                        inpaint=args.inpaint, limit=args.limit, seed=args.seed, batch_size=args.batch_size)
    m = align(args.src, args.out, opts, weights=args.weights, device=args.device, reuse=args.reuse)
    summary = {k: m[k] for k in ("autoencoder", "weights_sha256", "sources", "counts", "new_pairs", "seconds",
                                 "pairs_per_s", "mean_psnr")}
    summary["root"] = str(Path(args.out) / args.autoencoder)
    summary["unreadable"] = m["unreadable"]
    if args.json:
        from fakescope.utils import dumps

        print(dumps(summary))
    else:
        c = m["counts"]
        rate = f", {m['pairs_per_s']:.2f} pairs/s" if m["pairs_per_s"] else ""
        psnr = f"; mean PSNR {m['mean_psnr']:.2f} dB" if m["mean_psnr"] is not None else ""
        print(f"{summary['root']}: {c['train']} train + {c['val']} val pairs from {m['sources']} sources "
              f"({m['new_pairs']} new in {m['seconds']:.1f} s{rate}){psnr}")
        if m["unreadable"]:
            print(f"unreadable ({len(m['unreadable'])}):")
            for u in m["unreadable"][:20]:
                print(f"  {u['path']}: {u['error']}")
    return 0


def _demo(args) -> int:
    from fakescope.data.demo import make_demo_dataset

    out = make_demo_dataset(args.out, train_per_class=args.train_per_class, val_per_class=args.val_per_class)
    print(f"demo dataset (not GenImage) written to {out}")
    return 0


def _show(args) -> int:
    from fakescope.data.inspect import sample_images
    from fakescope.data.layout import index_root
    from fakescope.report.plots import image_grid

    index = index_root(args.root)
    rows = sample_images(index, args.per_class)
    if not rows:
        raise FakescopeError(f"no readable images under {args.root}")
    print(image_grid(rows, args.out, title=Path(index.root).name))
    return 0


def _inspect(args) -> int:
    from fakescope.data.inspect import inspect_index
    from fakescope.data.layout import index_root

    index = index_root(args.root)
    kw = {"max_pixels": args.max_pixels} if args.max_pixels else {}
    info = inspect_index(index, sample=args.sample, num_workers=args.workers, **kw)
    if args.json:
        from fakescope.utils import dumps

        print(dumps(info))
    else:
        print(f"{info['root']}  ({info['layout']} layout, {info['total']} images, {info['checked']} decoded)\n")
        from fakescope.report.tables import markdown

        print(markdown(["generator", "split", "nature", "ai"], [[g, s, c["nature"], c["ai"]]
                                                                for g, splits in info["counts"].items()
                                                                for s, c in splits.items()]))
        print(f"\nformats: nature {info['formats']['nature']}, ai {info['formats']['ai']}")
        print(f"sizes: {info['sizes']['most_common']}  shorter side: {info['sizes']['shorter_side']}")
        d = info["local_detail"]
        if "roc_auc" in d:
            print(f"local detail (mean |Laplacian| of the centre square): ai median {d['ai']['median']:.1f}, "
                  f"nature median {d['nature']['median']:.1f}; ROC-AUC of detail alone {d['roc_auc']:.2f}")
        if info["unreadable"]:
            print(f"\nunreadable ({len(info['unreadable'])}):")
            for f, r in list(info["unreadable"].items())[:20]:
                print(f"  {f}: {r}")
        for w in info["warnings"]:
            print(f"WARNING: {w}")
    readable = info["checked"] - len(info["unreadable"])
    return 0 if readable > 0 or info["checked"] == 0 else 1
