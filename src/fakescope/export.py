"""ONNX export of a run (scoring with onnxruntime: :mod:`fakescope.engine.onnx_backend`).

The exported graph is the whole detector: input ``image`` float ``[N, 3, S, S]`` in [0, 1] at the
model's input size (``N`` dynamic), normalisation inside, output ``p_ai`` ``[N]`` = P(ai). When the run
is calibrated the temperature is inside the graph too (``p_ai`` is then the calibrated score; metadata
``p_ai_calibrated``). A frozen backbone's features are rounded to float16 before the head, exactly as
fakescope's own scoring does (its feature cache stores float16), so both backends agree.

Metadata props (all strings; JSON where structured): ``fakescope_version``, ``model``, ``input_size``,
``native_size``, ``mean``, ``std``, ``label_map``, ``threshold``, ``threshold_source``,
``calibration_temperature``, ``p_ai_calibrated``, ``jpeg_align``.

Needs ``onnx`` and ``onnxruntime`` (``pip install 'fakescope[onnx]'``).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from fakescope import LABELS, __version__
from fakescope.calibration import resolve_decision
from fakescope.engine.checkpoint import load_run
from fakescope.engine.onnx_backend import (  # noqa: F401  (the onnxruntime backend, re-exported)
    OnnxDetector,
    _need,
    onnx_crop_mean,
    score_files_onnx,
)
from fakescope.errors import FakescopeError
from fakescope.utils import atomic_write_bytes

DEFAULT_OPSET = 17


class PAiGraph(nn.Module):
    """A detector as one graph: images in [0, 1] -> P(ai) ``[N]`` (optionally temperature-scaled)."""

    def __init__(self, model: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        f = m.features(x)
        if m.frozen:  # as in fakescope's scoring: frozen features pass through float16
            f = f.half().float()
        z = m.ai_logit(m.head(f))
        return torch.sigmoid(z / self.temperature)


def export_onnx(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, opset: int = DEFAULT_OPSET,
                uncalibrated: bool = False, threshold: float | None = None) -> dict:
    """Export a run to ONNX (default ``RUN/model.onnx``, written atomically); returns
    ``{"path", "metadata", "opset"}``. The run's model is not modified."""
    onnx = _need("onnx")
    if not 7 <= int(opset) <= 21:
        raise FakescopeError(f"expected an ONNX opset between 7 and 21, got {opset}")
    model, config = load_run(run_dir)
    decision = resolve_decision(run_dir, threshold, uncalibrated)
    temperature = decision.calibration.temperature if decision.calibrated else 1.0
    graph = PAiGraph(model, temperature).eval()
    size = model.preprocess.input_size
    out = Path(out) if out else Path(run_dir) / "model.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            # The TorchScript-based exporter: it honours the requested opset exactly and needs no onnxscript.
            torch.onnx.export(graph, (torch.rand(2, 3, size, size),), str(raw), input_names=["image"],
                              output_names=["p_ai"], dynamic_axes={"image": {0: "batch"}, "p_ai": {0: "batch"}},
                              opset_version=int(opset), dynamo=False, do_constant_folding=True)
        proto = onnx.load(str(raw))
    meta = {
        "fakescope_version": __version__, "model": config["model"]["name"],
        "model_options": json.dumps(config["model"].get("options", {})),
        "input_size": str(size), "native_size": json.dumps(config.get("native_size")),
        "mean": json.dumps(list(model.preprocess.mean)), "std": json.dumps(list(model.preprocess.std)),
        "label_map": json.dumps(LABELS), "threshold": repr(decision.threshold),
        "threshold_source": decision.source, "calibration_temperature": repr(temperature),
        "p_ai_calibrated": json.dumps(decision.calibrated),
        "jpeg_align": json.dumps(config.get("train", {}).get("jpeg_align")),
        "input": "image: float32 [N, 3, S, S] RGB in [0, 1], S = input_size; normalisation is inside",
        "output": "p_ai: float32 [N], P(ai); call AI when p_ai >= threshold",
    }
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name = "fakescope"
    proto.producer_version = __version__
    onnx.checker.check_model(proto)
    atomic_write_bytes(out, proto.SerializeToString())
    return {"path": str(out), "metadata": meta, "opset": int(opset)}
