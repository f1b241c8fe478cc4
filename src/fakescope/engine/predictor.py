"""A run loaded for scoring images one request at a time: :class:`Predictor` (the server, ``predict
--out``'s torch engine and the Ray scoring actors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fakescope.data.dataset import cpu_threads
from fakescope.data.io import DEFAULT_MAX_PIXELS, Decoded, read_image_bytes
from fakescope.engine import runtime
from fakescope.engine.evaluation import prepare, prepare_onnx
from fakescope.engine.infer import stage_scores
from fakescope.engine.onnx_backend import onnx_crop_mean
from fakescope.errors import FakescopeError, ImageReadError
from fakescope.options import RuntimeOptions


class Predictor:
    """A run loaded for scoring images one request at a time (the server): decode bytes with the
    reader ``predict`` uses, then score batches of stage images through the same pipeline,
    precision, memory format and thread count as ``predict_paths``, so the P(ai) are the same.

    ``backend="onnxruntime"`` scores with the run's ONNX export (``onnx_path``, default
    ``RUN/model.onnx``), as ``predict_paths`` does; the P(ai) are then the raw model's (calibration is
    applied by the caller, as for the PyTorch backend).

    ``runtime_options``: device, precision, compile, the reader's limits (``max_pixels``,
    ``max_file_size``) and the thread cap (the batch size, workers and cache are the caller's).
    ``decode`` may run in any thread; ``score`` runs the model and belongs to one thread at a time."""

    def __init__(self, run_dir, runtime_options: RuntimeOptions | None = None, *, native_size=None,
                 backend: str = "torch", onnx_path=None, geometry: str | None = None, max_side=None) -> None:
        options = runtime_options if runtime_options is not None else RuntimeOptions()
        self.run_dir = Path(run_dir)
        self.backend = backend
        self.options = options
        self.onnx = None
        if backend == "onnxruntime":
            self.onnx, self.config, self.pipeline = prepare_onnx(run_dir, onnx_path, native_size=native_size,
                                                                geometry=geometry, threads=options.threads,
                                                                max_side=max_side)
            self.model, self.device = None, torch.device("cpu")
            self.precision = runtime.resolve_precision("fp32", self.device, inference=True)
            self.threads = None
        elif backend == "torch":
            self.model, self.config, self.pipeline, rt = prepare(run_dir, options, native_size=native_size,
                                                                 geometry=geometry, max_side=max_side)
            self.device, self.precision = rt.device, rt.precision
            self.model.eval()
            self.threads = runtime.fewest_threads(runtime.model_threads(self.model, self.device), options.threads)
        else:
            raise FakescopeError(f"expected backend torch or onnxruntime, got {backend!r}")
        self.max_pixels = options.max_pixels or DEFAULT_MAX_PIXELS
        self.max_file_size = options.max_file_size

    @property
    def stage_size(self) -> int:
        return self.pipeline.stage_size()

    @property
    def stage_shape(self) -> tuple[int, ...]:
        """The shape of one stage image: ``(3, S, S)``, or ``(K, 3, S, S)`` under the ``crops`` geometry."""
        s = self.stage_size
        return (self.pipeline.crops, 3, s, s) if self.pipeline.geometry == "crops" else (3, s, s)

    def decode(self, data: bytes, name: str = "upload") -> tuple[Decoded, torch.Tensor]:
        """``(decoded image, stage image uint8 of shape stage_shape)``; raises ``ImageReadError`` for a bad image."""
        d = read_image_bytes(data, name, max_pixels=self.max_pixels, max_file_size=self.max_file_size,
                             reduce_to=self.pipeline.reduce_size())
        try:
            return d, self.pipeline.to_stage(d.image)
        except (RuntimeError, ValueError) as e:  # as ImageDataset: e.g. a 1-pixel-wide image the encoder rejects
            raise ImageReadError(name, f"cannot transform image ({e})") from None

    @property
    def classes(self) -> list[str] | None:
        """An attribution run's classes (``nature`` first) when its class probabilities can be scored
        (the PyTorch backend), else None."""
        classes = self.config.get("classes")
        return list(classes) if classes and self.onnx is None else None

    def score(self, stages: list[torch.Tensor]) -> np.ndarray:
        """P(ai) (float64) of stage images, in one forward pass."""
        return self.scores(stages)[:, 0]

    def scores(self, stages: list[torch.Tensor]) -> np.ndarray:
        """``[B, W]`` (float64): P(ai), then an attribution run's class probabilities (see
        :func:`~fakescope.engine.infer.stage_scores`; P(ai) only with the ONNX backend), in one forward pass."""
        if self.onnx is not None:
            p = onnx_crop_mean(self.onnx.raw_p_ai, self.pipeline.finish(torch.stack(stages)).float().div_(255))
            return np.asarray(p, dtype=np.float64)[:, None]
        with cpu_threads(self.threads):
            batch = torch.stack(stages).to(self.device, non_blocking=True)
            return stage_scores(self.model, self.pipeline, batch, self.precision, self.device)
