"""``attack`` for a run directory: load the run and its data, run an attack at several eps,
write the JSON, the robust-accuracy curve and (optionally) example images."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from fakescope.data.dataset import ImageDataset, make_loader
from fakescope.data.layout import index_root, limit_per_class
from fakescope.engine.evaluate import prepare
from fakescope.engine.runtime import Precision, resolve_precision
from fakescope.errors import FakescopeError
from fakescope.utils import write_json


class _Autocast(nn.Module):
    """Runs a detector under autocast (e.g. bf16 on CPU) and returns float32 logits; gradients
    with respect to the input still flow. Delegates the Detector helpers (``ai_logit``...)."""

    def __init__(self, model: nn.Module, precision: Precision, device: torch.device) -> None:
        super().__init__()
        self.model, self.precision, self.device = model, precision, device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast(self.device):
            return self.model(x).float()

    def ai_logit(self, logits):
        return self.model.ai_logit(logits)

    def p_ai(self, logits):
        return self.model.p_ai(logits)

    def loss(self, logits, labels):
        return self.model.loss(logits, labels)


def _batches(index, pipeline, device, batch_size, num_workers):
    files = [index.abspath(i) for i in range(len(index))]
    ds = ImageDataset(files, pipeline, stage_only=True)
    for batch in make_loader(ds, batch_size, num_workers=num_workers):
        if not len(batch.index):
            continue
        x = pipeline.finish(batch.image.to(device)).float().div_(255)
        y = torch.tensor([index.labels[i] for i in batch.index.tolist()], device=device)
        yield x, y, [index.generators[i] for i in batch.index.tolist()]


def attack_run(run_dir: str | os.PathLike, data: str | os.PathLike, *, attack: str = "pgd",
               eps_list: list[float], steps: int = 10, step_size: float | None = None, direction: str = "both",
               split: str = "val", generators=None, limit: int | None = None, source: str | None = None,
               save_examples: str | None = None, threshold: float = 0.5, seed: int = 42, device: str = "auto",
               precision: str = "fp32", batch_size: int = 64, num_workers: int | None = None,
               json_out: str | None = None, out_dir: str | None = None, attack_options: dict | None = None) -> dict:
    """Robust accuracy of a run under ``attack`` at each eps; writes JSON and a curve PNG."""
    from fakescope.attacks import robustness

    if precision == "auto":
        precision = "fp32"  # gradients in full precision unless bf16 is asked for explicitly
    model, config, pipeline, dev, _ = prepare(run_dir, device=device, precision="fp32")
    prec = resolve_precision(precision, dev, inference=True)
    src_model = None
    if source is not None:
        src_model, src_cfg, src_pipe, _, _ = prepare(source, device=device, precision="fp32")
        if src_model.preprocess.input_size != model.preprocess.input_size:
            raise FakescopeError(f"expected --source to take the same input size as the target run, got "
                                 f"{src_model.preprocess.input_size} and {model.preprocess.input_size}")
        src_model = _Autocast(src_model, prec, dev) if prec.dtype is not None else src_model
    target = _Autocast(model, prec, dev) if prec.dtype is not None else model
    index = index_root(data).select(generators, split)
    if limit:
        index = limit_per_class(index, limit)
    if len(index) == 0:
        raise FakescopeError(f"no images in {data} for split {split!r}")
    torch.manual_seed(seed)
    result = robustness(target, _batches(index, pipeline, dev, batch_size, num_workers), attack=attack,
                        eps_list=eps_list, steps=steps, step_size=step_size, direction=direction, seed=seed,
                        source_model=src_model, save_examples=save_examples, threshold=threshold,
                        attack_options=attack_options)
    result["model"] = {"name": config["model"]["name"], "run": str(Path(run_dir).resolve()),
                       "source": str(Path(source).resolve()) if source else None}
    result["data"] = {"root": index.root, "split": split, "generators": index.generator_names, "n_files": len(index),
                      "limit_per_class": limit}
    result["precision"] = prec.name
    result["seed"] = seed
    folder = Path(out_dir or Path(run_dir) / f"attack-{attack}")
    json_path = Path(json_out) if json_out else folder / "attack.json"
    from fakescope.report.plots import curve_plot

    eps = [r["eps"] for r in result["results"]]
    series = {"robust accuracy": [r["robust_accuracy"] for r in result["results"]]}
    for d in ("ai-to-real", "real-to-ai"):
        vals = [r.get("per_direction", {}).get(d, {}).get("robust_accuracy") for r in result["results"]]
        if any(v is not None for v in vals):
            series[d] = vals
    result["outputs"] = {"json": str(json_path),
                         "plot": curve_plot([e * 255 for e in eps], series, folder / "robust_accuracy.png",
                                            xlabel="eps (x 1/255)" if attack != "pgd-l2" else "eps (L2, x 1/255)",
                                            ylabel="accuracy", title=f"{attack} on {config['model']['name']}")}
    write_json(json_path, result)
    return result
