"""(e) Forward-pass throughput: fp32 versus bf16 autocast + channels_last (and fp16 on CUDA).

resnet50, convnext_small and tf_efficientnet_lite0 with random weights (throughput does not
depend on them), at 224x224, on this CPU and on CUDA when present. Modes are measured
interleaved (rep 1: fp32, bf16; rep 2: fp32, bf16; ...) and the median is reported, so a
machine whose load changes affects both alike.

    python benchmarks/bench_precision.py                     # full: 3 reps x 4 batches of 32
    python benchmarks/bench_precision.py --batches 1 --reps 2 --models tf_efficientnet_lite0
"""

from __future__ import annotations

import torch
from _common import emit, like_the_cli, median, parser, seconds

MODELS = {"resnet50": "resnet50", "convnext_small": "convnext_small",
          "tf_efficientnet_lite0": "timm:tf_efficientnet_lite0"}


def modes(device: torch.device) -> list[str]:
    from fakescope.engine.runtime import bf16_supported

    out = ["fp32"]
    if bf16_supported(device):
        out.append("bf16")
    if device.type == "cuda":
        out.append("fp16")
    return out


def timed(net, x: torch.Tensor, prec, dev: torch.device, n: int) -> float:
    """Seconds for ``n`` forward passes of ``net`` on ``x``."""
    with torch.no_grad(), prec.autocast(dev):
        return seconds(lambda: [net(x) for _ in range(n)], dev)


def main() -> None:
    like_the_cli()
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, from " + ", ".join(MODELS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=4, help="timed batches per measurement")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median reported)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--devices", default="auto", help="auto (cpu, plus cuda when present), cpu or cuda")
    args = p.parse_args()

    from fakescope.engine.runtime import resolve_precision
    from fakescope.models import create_model

    devices = [torch.device("cpu")] if args.devices in ("auto", "cpu") else []
    if args.devices in ("auto", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    rows = []
    for dev in devices:
        for name in args.models.split(","):
            torch.manual_seed(0)
            base = create_model(MODELS[name], pretrained=False).eval().to(dev)
            nets, inputs, precs = {}, {}, {}
            for mode in modes(dev):
                prec = resolve_precision(mode, dev, inference=True)
                net = create_model(MODELS[name], pretrained=False).eval().to(dev)
                net.load_state_dict(base.state_dict())
                x = torch.rand(args.batch_size, 3, args.size, args.size, device=dev)
                if prec.channels_last:
                    net.to(memory_format=torch.channels_last)
                nets[mode], inputs[mode], precs[mode] = net, prec.prepare(x), prec
            times: dict[str, list[float]] = {m: [] for m in nets}

            for mode in nets:  # warm-up: kernel selection, oneDNN primitive caches
                timed(nets[mode], inputs[mode], precs[mode], dev, 1 if dev.type == "cpu" else 3)
            for _ in range(args.reps):
                for mode in nets:
                    times[mode].append(timed(nets[mode], inputs[mode], precs[mode], dev, args.batches))
            ips = {m: args.batch_size * args.batches / median(t) for m, t in times.items()}
            for mode, v in ips.items():
                rows.append({"device": dev.type, "model": name, "precision": mode + (
                    " + channels_last" if precs[mode].channels_last else ""), "images_per_s": round(v, 1),
                    "speedup_vs_fp32": round(v / ips["fp32"], 2)})
            del nets, inputs, base
    emit("precision", rows, ["device", "model", "precision", "images_per_s", "speedup_vs_fp32"],
         {"batch_size": args.batch_size, "input": args.size, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
