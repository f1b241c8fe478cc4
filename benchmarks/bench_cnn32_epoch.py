"""(c) A ``cnn32`` training epoch on CIFAKE: ``fakescope train`` versus a plain PIL loop.

The plain loop is what one writes first: a per-sample ``Dataset`` that opens each file with
PIL and applies ``ToTensor``, a shuffling ``DataLoader`` (``--plain-workers`` workers, default
one per core), the same cnn32, Adam, batch size and training/validation carve, and a validation
pass per epoch. ``fakescope train`` decodes the split once into a uint8 tensor (CIFAKE images
are 32x32) and batches from memory. Both train for ``--epochs`` epochs; the table shows the
mean epoch time (training + validation) and, for fakescope, the one-time decoding. A third row
runs the same plain loop tuned by hand (no workers, one thread) to separate what the input
pipeline gains from what the thread count gains.

    python benchmarks/bench_cnn32_epoch.py                   # all 20,000 CIFAKE train images
    python benchmarks/bench_cnn32_epoch.py --per-class 2500 --epochs 1
"""

from __future__ import annotations

import json
import os
import time

import torch
from _common import Workdir, emit, extract_cifake, fakescope, like_the_cli, parser


class PlainDataset(torch.utils.data.Dataset):
    def __init__(self, files, labels) -> None:
        from torchvision import transforms

        self.files, self.labels, self.to_tensor = files, labels, transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return self.to_tensor(im.convert("RGB")), self.labels[i]


def plain_loop(data, epochs: int, batch_size: int, workers: int, seed: int = 42,
               threads: int | None = None) -> list[float]:
    """Seconds per epoch (training + validation) of the plain loop; ``threads`` sets torch's intra-op threads."""
    from fakescope.data.dataset import cpu_threads
    from fakescope.data.layout import carve_validation, index_root
    from fakescope.models import create_model

    tr, va = carve_validation(index_root(data).select(None, "train"), 0.1)
    train = PlainDataset([tr.abspath(i) for i in range(len(tr))], tr.labels)
    val = PlainDataset([va.abspath(i) for i in range(len(va))], va.labels)
    torch.manual_seed(seed)
    model = create_model("cnn32")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    seconds = []
    with cpu_threads(threads):
        for _ in range(epochs):
            t = time.perf_counter()
            model.train()
            for x, y in torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=workers):
                loss = model.loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                for x, y in torch.utils.data.DataLoader(val, batch_size=256, num_workers=workers):
                    model.loss(model(x), y)
            seconds.append(time.perf_counter() - t)
    return seconds


def main() -> None:
    like_the_cli()
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=10_000, help="CIFAKE train images per class (max 10000)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--plain-workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--skip-tuned", action="store_true", help="skip the plain loop with 0 workers and 1 thread")
    args = p.parse_args()
    with Workdir(args.workdir, args.keep) as wd:
        data = extract_cifake(wd, args.per_class, 0)
        run = wd / "run"
        wall, _ = fakescope("train", "--model", "cnn32", "--data", data, "--out", run, "--epochs", args.epochs,
                            "--patience", 0, "--batch-size", args.batch_size, cache=wd / "cache")
        metrics = json.loads((run / "metrics.json").read_text())
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        fs_epochs = [r["seconds"] for r in log]
        plain = plain_loop(data, args.epochs, args.batch_size, args.plain_workers)
        tuned = plain_loop(data, args.epochs, args.batch_size, 0, threads=1) if not args.skip_tuned else None
        n = 2 * args.per_class
        fs_mean, plain_mean = sum(fs_epochs) / len(fs_epochs), sum(plain) / len(plain)
        rows = [
            {"pipeline": f"plain PIL Dataset + DataLoader ({args.plain_workers} workers, torch's threads)",
             "epoch_seconds": round(plain_mean, 2), "one_time_seconds": 0.0, "images_per_s": round(n / plain_mean, 1)}]
        if tuned:
            tuned_mean = sum(tuned) / len(tuned)
            rows.append({"pipeline": "same plain loop, tuned: 0 workers, 1 thread", "epoch_seconds":
                         round(tuned_mean, 2), "one_time_seconds": 0.0, "images_per_s": round(n / tuned_mean, 1)})
        rows += [
            {"pipeline": f"fakescope train ({metrics['input_path']} inputs)", "epoch_seconds": round(fs_mean, 2),
             "one_time_seconds": round(metrics["data_seconds"], 2), "images_per_s": round(n / fs_mean, 1)},
        ]
        ratio = fs_mean / plain_mean
        first = (fs_epochs[0] + metrics["data_seconds"]) / plain[0]
        emit("cnn32_epoch", rows, ["pipeline", "epoch_seconds", "one_time_seconds", "images_per_s"],
             {"images": n, "epochs": args.epochs, "fakescope_epoch_seconds": fs_epochs, "plain_epoch_seconds": plain,
              "tuned_plain_epoch_seconds": tuned, "epoch_ratio": round(ratio, 3),
              "epoch_ratio_vs_tuned_plain": round(fs_mean / (sum(tuned) / len(tuned)), 3) if tuned else None,
              "first_epoch_ratio_including_decoding": round(first, 3),
              "fakescope_command_wall_seconds": round(wall, 2), "target": "epoch ratio <= 0.5",
              "met": ratio <= 0.5})


if __name__ == "__main__":
    main()
