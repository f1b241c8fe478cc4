"""Reconstruction throughput of ``data align``'s autoencoder: pairs/s by precision and memory format.

The real taef2 weights from ../shared, random photo-sized inputs (throughput does not depend on the
pixels), ``--size`` px crops in batches of ``--batch-size``. Modes are measured interleaved (rep 1: every
mode, rep 2: every mode, ...) and the median is reported, so a machine whose load changes affects all
alike; the 1-minute load average is printed with the figures (the CPU here is shared).

    python benchmarks/bench_align.py                          # 256 px, batches of 8, 3 reps
    python benchmarks/bench_align.py --size 128 --reps 2
"""

from __future__ import annotations

import os

import torch
from _common import SHARED, emit, like_the_cli, median, need, parser, seconds

MODES = ("fp32", "fp32+channels_last", "bf16+channels_last")


def timed(ae, x: torch.Tensor, mode: str, dev: torch.device) -> float:
    cl = mode.endswith("channels_last")
    ae.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x.contiguous()
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=mode.startswith("bf16")):
        return seconds(lambda: ae.reconstruct(x), dev)


def main() -> None:
    like_the_cli()
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    from fakescope.engine.runtime import bf16_supported, resolve_device
    from fakescope.models.autoencoders import create_autoencoder

    dev = resolve_device(args.device)
    ae = create_autoencoder("taef2", need(SHARED / "weights")).to(dev)
    modes = [m for m in MODES if not m.startswith("bf16") or bf16_supported(dev)]
    x = torch.rand(args.batch_size, 3, args.size, args.size, device=dev)
    timed(ae, x[:1], "fp32", dev)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in modes}
    loads = []
    for _ in range(args.reps):
        for m in modes:
            times[m].append(timed(ae, x, m, dev))
            loads.append(os.getloadavg()[0])
    rows = [{"mode": m, "s_per_batch": median(times[m]), "pairs_per_s": args.batch_size / median(times[m])}
            for m in modes]
    best = max(rows, key=lambda r: r["pairs_per_s"])
    emit("align", rows, ["mode", "s_per_batch", "pairs_per_s"],
         {"size": args.size, "batch_size": args.batch_size, "device": str(dev), "best": best["mode"],
          "load_avg_1min_during": [round(v, 2) for v in loads]})


if __name__ == "__main__":
    main()
