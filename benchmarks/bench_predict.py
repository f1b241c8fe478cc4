"""(b) ``predict`` on a folder versus the bare model on preloaded tensors, images per second.

A frozen tf_efficientnet_lite0 run (real ImageNet weights from ../shared, its head trained for
one epoch on a few CIFAKE images) scores a folder of CIFAKE val images with
:func:`fakescope.engine.evaluation.predict_paths` (everything ``fakescope predict`` does after
start-up: listing, loading the run, decoding, resizing, batching, the forward pass) and, side
by side, the same model runs on the same images already decoded and resized in memory, at the
same precision and batch size. Optionally (``--photos``) also on the 47 real photographs of
many sizes (JPEG and PNG up to 5120 px, hard-linked ``--photo-copies`` times), at the model's
native 224 pipeline: there decoding costs about as much as the forward pass.

    python benchmarks/bench_predict.py                 # 512 images, 3 interleaved reps
    python benchmarks/bench_predict.py --images 256 --reps 1 --photos
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from _common import LITE0, Workdir, emit, extract_cifake, extract_photos, fakescope, like_the_cli, median, need, parser


def bare_rate(model, x: torch.Tensor, prec, dev, batch_size: int) -> float:
    from fakescope.engine.infer import forward_p_ai

    t = time.perf_counter()
    for s in range(0, len(x), batch_size):
        forward_p_ai(model, x[s:s + batch_size].to(dev), prec, dev)
    return len(x) / (time.perf_counter() - t)


def main() -> None:
    like_the_cli()
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512, help="CIFAKE val images in the folder")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--photos", action="store_true", help="also the real photographs folder")
    p.add_argument("--photo-copies", type=int, default=4, help="copies of the 47 photos in that folder")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    need(LITE0)

    from fakescope.data.dataset import ImageDataset, collate
    from fakescope.data.io import list_images
    from fakescope.engine.evaluation import predict_paths, prepare
    from fakescope.engine.infer import default_batch_size
    from fakescope.options import PREDICT_MAX_FILE_SIZE, RuntimeOptions

    with Workdir(args.workdir, args.keep) as wd:
        data = extract_cifake(wd, 20, args.images // 2)
        run = wd / "run"
        fakescope("train", "--model", "timm:tf_efficientnet_lite0", "--pretrained-file", LITE0, "--data", data,
                  "--out", run, "--epochs", 1, "--device", args.device, cache=wd / "cache")
        folders = {"cifake val (32 px JPEG)": (data / "val", None)}
        if args.photos:  # the 47 photos, hard-linked --photo-copies times (one batch is too few to pipeline)
            photos, many = extract_photos(wd), wd / "photos"
            for k in range(args.photo_copies):
                for f in photos.iterdir():
                    (many / str(k)).mkdir(parents=True, exist_ok=True)
                    os.link(f, many / str(k) / f.name)
            folders[f"real photos x{args.photo_copies} (300-5120 px)"] = (many, "off")
        rows = []
        options = RuntimeOptions(device=args.device, max_file_size=PREDICT_MAX_FILE_SIZE)  # predict's defaults
        for label, (folder, native) in folders.items():
            model, config, pipeline, rt = prepare(run, options, native_size=native)
            dev, prec = rt.device, rt.precision
            files = list_images([folder])
            bs = default_batch_size(model.preprocess.input_size)
            ds = ImageDataset(files, pipeline, stage_only=False)
            items = [ds[i] for i in range(len(ds))]
            x = collate(items).image.float().div_(255)  # preloaded: decoded and resized, in memory
            bare_rate(model, x[:bs], prec, dev, bs)  # warm-up
            predict_paths(run, [str(folder)], native_size=native, runtime_options=options)
            bare, pred = [], []
            for _ in range(args.reps):
                bare.append(bare_rate(model, x, prec, dev, bs))
                t = time.perf_counter()
                out = predict_paths(run, [str(folder)], native_size=native, runtime_options=options)
                pred.append(len(files) / (time.perf_counter() - t))
                assert sum("p_ai" in r for r in out) == len(x)
            b, q = median(bare), median(pred)
            rows.append({"folder": label, "images": len(files), "precision": prec.name, "batch": bs,
                         "bare_images_per_s": round(b, 1), "predict_images_per_s": round(q, 1),
                         "ratio": round(q / b, 3)})
        cli_wall, _ = fakescope("predict", run, data / "val", "--format", "csv")
        emit("predict", rows, ["folder", "images", "precision", "batch", "bare_images_per_s",
                               "predict_images_per_s", "ratio"],
             {"target": "predict >= 0.8x bare", "met": all(r["ratio"] >= 0.8 for r in rows),
              "cli_wall_seconds_cifake_folder": round(cli_wall, 2), "reps": args.reps,
              "run_dir_kept": str(run) if args.keep or args.workdir else None,
              "data": str(Path(data).name)})


if __name__ == "__main__":
    main()
