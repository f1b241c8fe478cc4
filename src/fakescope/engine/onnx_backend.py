"""Scoring with an exported model under onnxruntime (``--backend onnxruntime`` of predict, evaluate and
serve): the same decoding pipeline as the PyTorch backend. The export itself is :mod:`fakescope.export`.

Needs ``onnxruntime`` (``pip install 'fakescope[onnx]'``), imported when a detector is opened, not at import
time (start-up speed of the commands that never use it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from fakescope.calibration import logit, sigmoid
from fakescope.data.dataset import ImageDataset, make_loader
from fakescope.data.io import DEFAULT_MAX_PIXELS
from fakescope.errors import FakescopeError
from fakescope.options import RuntimeOptions
from fakescope.progress import progress


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise FakescopeError(f"expected the {module!r} package for ONNX export/inference, got none installed: "
                             f"pip install 'fakescope[onnx]' (onnx and onnxruntime)") from None


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
        p = self.p_ai(x)
        return p if not self.calibrated else sigmoid(logit(p) * self.temperature)


def score_files_onnx(detector: OnnxDetector, files: list[str], pipeline, runtime_options: RuntimeOptions | None = None,
                     *, raw: bool = False) -> tuple[np.ndarray, dict[int, str]]:
    """``(p_ai, errors)`` of image files through fakescope's decoding ``pipeline`` and onnxruntime:
    the same images as the PyTorch backend gets. ``raw`` removes an exported temperature.
    ``runtime_options``: batch size (None: 64), workers and the reader's limits (device and precision
    are onnxruntime's: the CPU, fp32)."""
    options = runtime_options if runtime_options is not None else RuntimeOptions()
    kw = {"max_file_size": options.max_file_size} if options.max_file_size else {}
    ds = ImageDataset(files, pipeline, stage_only=True, max_pixels=options.max_pixels or DEFAULT_MAX_PIXELS, **kw)
    loader = make_loader(ds, options.batch_size or 64, num_workers=options.num_workers)
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
