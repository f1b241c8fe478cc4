"""(a) Training a head on a frozen backbone: 10 epochs versus 1 epoch, and versus one bare forward pass.

``fakescope train --model timm:tf_efficientnet_lite0`` (real ImageNet weights from ../shared,
frozen) on CIFAKE images, early stopping off, each command with an empty feature cache: the
backbone runs once per image (features cached as float16), then every epoch trains the head on
the cached features. Side by side: one bare forward pass of the same backbone over the same
number of images, at the same precision and batch size, on a batch already in memory.

    python benchmarks/bench_frozen_train.py                 # 500 + 500 train images
    python benchmarks/bench_frozen_train.py --per-class 150
"""

from __future__ import annotations

import json
import math
import time

import torch
from _common import LITE0, Workdir, emit, extract_cifake, fakescope, like_the_cli, need, parser


def bare_seconds(n: int, batch_size: int, device: str = "auto") -> tuple[float, str]:
    from fakescope.engine import runtime
    from fakescope.engine.features import _forward_features
    from fakescope.models import create_model

    dev = runtime.resolve_device(device)
    prec = runtime.resolve_precision("auto", dev, inference=True)
    model = create_model("timm:tf_efficientnet_lite0", pretrained_file=str(LITE0)).eval().to(dev)
    runtime.prepare_model(model, prec)
    x = torch.rand(batch_size, 3, model.preprocess.input_size, model.preprocess.input_size, device=dev)
    _forward_features(model, x, prec, dev)  # warm-up
    batches = math.ceil(n / batch_size)
    t = time.perf_counter()
    for _ in range(batches):
        _forward_features(model, x, prec, dev)
    return (time.perf_counter() - t) * n / (batches * batch_size), prec.name


def main() -> None:
    like_the_cli()
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=500, help="CIFAKE train images per class")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    need(LITE0)
    with Workdir(args.workdir, args.keep) as wd:
        data = extract_cifake(wd, args.per_class, 0)
        n = 2 * args.per_class
        rows, walls = [], {}
        for epochs in (1, 10):
            run = wd / f"run-{epochs}"
            wall, _ = fakescope("train", "--model", "timm:tf_efficientnet_lite0", "--pretrained-file", LITE0,
                                "--data", data, "--out", run, "--epochs", epochs, "--patience", 0,
                                "--device", args.device, cache=wd / f"cache-{epochs}")  # empty cache each
            m = json.loads((run / "metrics.json").read_text())
            assert m["input_path"] == "features" and m["epochs_run"] == epochs
            walls[epochs] = wall
            rows.append({"what": f"fakescope train, {epochs} epoch(s), empty cache", "seconds": round(wall, 2),
                         "extract_seconds": round(m["data_seconds"], 2), "head_seconds": round(m["train_seconds"], 2)})
        bare, prec = bare_seconds(n, 64, args.device)
        rows.append({"what": f"bare forward pass over {n} images ({prec})", "seconds": round(bare, 2)})
        ratio = walls[10] / walls[1]
        emit("frozen_train", rows, ["what", "seconds", "extract_seconds", "head_seconds"],
             {"images": n, "ratio_10_vs_1_epoch": round(ratio, 3),
              "ratio_1_epoch_vs_bare_forward": round(walls[1] / bare, 2),
              "note": "seconds = whole command (start-up, indexing, extraction, training, final validation)",
              "target": "10 epochs <= 1.3x 1 epoch", "met": ratio <= 1.3})


if __name__ == "__main__":
    main()
