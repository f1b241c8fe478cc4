"""ONNX export of a run, and scoring with onnxruntime.

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

import numpy as np
import torch
from torch import nn

from fakescope import LABELS, __version__
from fakescope.errors import FakescopeError

DEFAULT_OPSET = 17


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise FakescopeError(f"expected the {module!r} package for ONNX export/inference, got none installed: "
                             f"pip install 'fakescope[onnx]' (onnx and onnxruntime)") from None


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
    from fakescope.calibration import resolve_decision
    from fakescope.engine.checkpoint import load_run
    from fakescope.utils import atomic_write_bytes

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


class OnnxDetector:
    """An exported model under onnxruntime: ``p_ai(x)`` for float images ``[N, 3, S, S]`` in [0, 1]."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        ort = _need("onnxruntime")
        path = Path(path)
        if not path.is_file():
            raise FakescopeError(f"ONNX model not found: {path} (write it with `fakescope export RUN --format onnx`)")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise FakescopeError(f"{path} is not a loadable ONNX model ({str(e).splitlines()[0][:200]})") from None
        self.path = str(path)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        if "input_size" not in self.metadata or "p_ai_calibrated" not in self.metadata:
            raise FakescopeError(f"{path} was not exported by fakescope (no input_size / p_ai_calibrated metadata)")
        self.input_size = int(self.metadata["input_size"])
        self.native_size = json.loads(self.metadata.get("native_size", "null"))
        self.jpeg_align = json.loads(self.metadata.get("jpeg_align", "null"))
        self.calibrated = bool(json.loads(self.metadata["p_ai_calibrated"]))
        self.temperature = float(self.metadata.get("calibration_temperature", "1.0"))
        self.threshold = float(self.metadata.get("threshold", "0.5"))
        self.threshold_source = self.metadata.get("threshold_source", "default")

    def p_ai(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """P(ai) as the graph gives it (calibrated when ``self.calibrated``), float64 ``[N]``."""
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().float().numpy()
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (3, self.input_size, self.input_size):
            raise FakescopeError(f"expected images [N, 3, {self.input_size}, {self.input_size}], got {list(x.shape)}")
        return self.session.run(["p_ai"], {"image": x})[0].astype(np.float64)

    def raw_p_ai(self, x) -> np.ndarray:
        """P(ai) without the graph's temperature (the model's raw score)."""
        from fakescope.calibration import logit, sigmoid

        p = self.p_ai(x)
        return p if not self.calibrated else sigmoid(logit(p) * self.temperature)


def score_files_onnx(detector: OnnxDetector, files: list[str], pipeline, *, batch_size: int = 64,
                     num_workers: int | None = None, max_pixels: int | None = None,
                     max_file_size: int | None = None, raw: bool = False) -> tuple[np.ndarray, dict[int, str]]:
    """``(p_ai, errors)`` of image files through fakescope's decoding ``pipeline`` and onnxruntime:
    the same images as the PyTorch backend gets. ``raw`` removes an exported temperature."""
    from fakescope.data.dataset import ImageDataset, make_loader
    from fakescope.data.io import DEFAULT_MAX_PIXELS
    from fakescope.progress import progress

    kw = {"max_file_size": max_file_size} if max_file_size else {}
    ds = ImageDataset(files, pipeline, stage_only=True, max_pixels=max_pixels or DEFAULT_MAX_PIXELS, **kw)
    loader = make_loader(ds, batch_size, num_workers=num_workers)
    p = np.full(len(files), np.nan)
    errors: dict[int, str] = {}
    score = detector.raw_p_ai if raw else detector.p_ai
    for batch in progress(loader, desc="predicting (onnxruntime)", total=len(loader)):
        errors.update(dict(batch.errors))
        if len(batch.index):
            x = pipeline.finish(batch.image).float().div_(255)
            p[batch.index.numpy()] = onnx_crop_mean(score, x)
    return p, errors


def onnx_crop_mean(score, x: torch.Tensor) -> np.ndarray:
    """``score(x)`` for a batch ``[B, 3, S, S]``; for a batch of crops ``[B, K, 3, S, S]`` (the ``crops``
    test geometry) the mean over each image's K crops, as the PyTorch backend computes it."""
    if x.dim() == 5:
        k = x.shape[1]
        return np.asarray(score(x.flatten(0, 1))).reshape(-1, k).mean(1)
    return score(x)
