"""``fakescope data inspect|show|demo``: look at a data root, or write the built-in demo dataset."""

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
    return d


def run(args) -> int:
    return {"demo": _demo, "show": _show, "inspect": _inspect}[args.data_command](args)


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
