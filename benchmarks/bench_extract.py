"""(f) Frozen-feature extraction throughput of ``train`` versus the bare model at the same precision.

Three figures, measured in one run on the same CIFAKE images (32x32 JPEGs, resized to 224):

* ``fakescope train`` with an empty cache: its extraction time (``data_seconds`` in
  ``metrics.json``, train + validation carve) per image;
* :func:`fakescope.engine.features.extract_features` as ``train`` calls it (decode, resize,
  batch, forward, float16, write the cache shard), in this process, interleaved with
* the bare backbone on a batch already in memory, same precision, memory format and batch size.

    python benchmarks/bench_extract.py                     # 512 images, 3 interleaved reps
    python benchmarks/bench_extract.py --images 256 --reps 1
"""

from __future__ import annotations

import json
import math
import shutil
import time

import torch
from _common import LITE0, Workdir, emit, extract_cifake, fakescope, like_the_cli, median, need, parser


def main() -> None:
    like_the_cli()
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-cli", action="store_true", help="skip the `fakescope train` measurement")
    args = p.parse_args()
    need(LITE0)

    from fakescope.data.layout import index_root
    from fakescope.data.transforms import Pipeline
    from fakescope.engine import runtime
    from fakescope.engine.features import _forward_features, extract_features
    from fakescope.models import create_model

    with Workdir(args.workdir, args.keep) as wd:
        data = extract_cifake(wd, args.images // 2, 0)
        index = index_root(data).select(None, "train")
        files = [index.abspath(i) for i in range(len(index))]
        dev = runtime.resolve_device(args.device)
        prec = runtime.resolve_precision("auto", dev, inference=True)
        model = create_model("timm:tf_efficientnet_lite0", pretrained_file=str(LITE0)).eval().to(dev)
        runtime.prepare_model(model, prec)
        pipeline = Pipeline(model.preprocess.input_size, 32)  # what train uses for CIFAKE (native size 32)
        s = model.preprocess.input_size
        x = torch.rand(args.batch_size, 3, s, s, device=dev)
        _forward_features(model, x, prec, dev)
        batches = math.ceil(len(files) / args.batch_size)
        bare, lib = [], []
        for rep in range(args.reps):
            t = time.perf_counter()
            for _ in range(batches):
                _forward_features(model, x, prec, dev)
            bare.append(batches * args.batch_size / (time.perf_counter() - t))
            cache = wd / f"lib-cache-{rep}"
            t = time.perf_counter()
            table, errors = extract_features(model, files, pipeline,
                                             runtime.fixed(dev, prec, batch_size=args.batch_size, cache_dir=cache))
            lib.append(len(files) / (time.perf_counter() - t))
            assert not errors and table.shape[0] == len(files)
            shutil.rmtree(cache, ignore_errors=True)
        b, q = median(bare), median(lib)
        rows = [{"what": f"bare backbone, batch in memory ({prec.name})", "images_per_s": round(b, 1), "ratio": 1.0},
                {"what": "extract_features (as train calls it)", "images_per_s": round(q, 1),
                 "ratio": round(q / b, 3)}]
        summary = {"images": len(files), "reps": args.reps, "precision": prec.name,
                   "channels_last": prec.channels_last}
        if not args.skip_cli:
            run = wd / "run"
            fakescope("train", "--model", "timm:tf_efficientnet_lite0", "--pretrained-file", LITE0, "--data", data,
                      "--out", run, "--epochs", 1, "--device", args.device, cache=wd / "cli-cache")
            m = json.loads((run / "metrics.json").read_text())
            cli = len(files) / m["data_seconds"]
            rows.append({"what": "fakescope train: extraction (data_seconds)", "images_per_s": round(cli, 1),
                         "ratio": round(cli / b, 3)})
        met = all(r["ratio"] >= 0.8 for r in rows)
        emit("extract", rows, ["what", "images_per_s", "ratio"],
             {**summary, "target": "extraction >= 0.8x bare", "met": met})


if __name__ == "__main__":
    main()
