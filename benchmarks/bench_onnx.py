"""(g) ONNX export: onnxruntime vs PyTorch images/s on the same tensors, and their max |p_ai difference|.

For each model (random weights; speed does not depend on them) a run directory is written, exported
with :func:`fakescope.export.export_onnx`, and both backends score the same random images in [0, 1]
at the model's input size, batch by batch: PyTorch through fakescope's own scoring
(:func:`fakescope.engine.infer.forward_p_ai`, fp32, and the precision ``auto`` picks here), and
onnxruntime (CPU execution provider, fp32). Reps are interleaved; the median is reported.

    python benchmarks/bench_onnx.py                                   # cnn32 and tf_efficientnet_lite0
    python benchmarks/bench_onnx.py --models cnn32 --images 2048 --reps 5
"""

from __future__ import annotations

import time

import numpy as np
import torch
from _common import Workdir, emit, like_the_cli, median, parser


def main() -> None:
    like_the_cli()
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", default="cnn32,timm:tf_efficientnet_lite0")
    p.add_argument("--images", type=int, default=None, help="images per rep (default 2048 at 32 px, 256 at 224)")
    p.add_argument("--batch-size", type=int, default=None, help="default: fakescope's inference batch size")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    from fakescope.engine import runtime
    from fakescope.engine.checkpoint import load_run
    from fakescope.engine.infer import default_batch_size, forward_p_ai
    from fakescope.export import OnnxDetector, export_onnx
    from fakescope.models import create_model

    rows = []
    dev = torch.device("cpu")
    with Workdir(args.workdir, args.keep) as wd:
        for name in args.models.split(","):
            from fakescope.engine import checkpoint as ckpt

            options = {} if name == "cnn32" else {"pretrained": False}
            torch.manual_seed(0)
            model = create_model(name, **options)
            run = wd / name.replace(":", "_")
            ckpt.write_config(run, {"model": {"name": name, "options": options}, "native_size": None})
            ckpt.save_tensors(run / ckpt.WEIGHTS, model.state_dict())
            t0 = time.perf_counter()
            det = OnnxDetector(export_onnx(run, wd / f"{run.name}.onnx")["path"])
            export_s = time.perf_counter() - t0
            model, _ = load_run(run)
            s = model.preprocess.input_size
            n = args.images or (2048 if s <= 64 else 256)
            bs = args.batch_size or default_batch_size(s)
            x = torch.rand(n, 3, s, s, generator=torch.Generator().manual_seed(1))
            precs = {"torch fp32": runtime.resolve_precision("fp32", dev, inference=True)}
            auto = runtime.resolve_precision("auto", dev, inference=True)
            if auto.name != "fp32":
                precs[f"torch auto ({auto.name})"] = auto
            for prec in precs.values():
                runtime.prepare_model(model, prec)
            rates: dict[str, list[float]] = {k: [] for k in [*precs, "onnxruntime fp32"]}
            outs: dict[str, np.ndarray] = {}
            for _ in range(args.reps):
                for label, prec in precs.items():
                    runtime.prepare_model(model, prec)
                    t = time.perf_counter()
                    out = [forward_p_ai(model, x[i:i + bs], prec, dev).numpy() for i in range(0, n, bs)]
                    rates[label].append(n / (time.perf_counter() - t))
                    outs[label] = np.concatenate(out)
                t = time.perf_counter()
                out = [det.p_ai(x[i:i + bs]) for i in range(0, n, bs)]
                rates["onnxruntime fp32"].append(n / (time.perf_counter() - t))
                outs["onnxruntime fp32"] = np.concatenate(out)
            ref = rates["torch fp32"]
            for label, r in rates.items():
                rows.append({"model": name, "backend": label, "images_per_s": median(r),
                             "vs_torch_fp32": median(r) / median(ref),
                             "max_abs_dp_vs_torch_fp32": float(np.abs(outs[label] - outs["torch fp32"]).max()),
                             "batch": bs, "images": n, "export_s": export_s if label.startswith("onnx") else ""})
    emit("onnx", rows, ["model", "backend", "images_per_s", "vs_torch_fp32", "max_abs_dp_vs_torch_fp32", "batch",
                        "images", "export_s"],
         {"target": "onnxruntime max |dp| <= 1e-4 vs torch fp32",
          "met": all(r["max_abs_dp_vs_torch_fp32"] <= 1e-4 for r in rows if r["backend"].startswith("onnx"))})


if __name__ == "__main__":
    main()
