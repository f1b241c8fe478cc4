"""The detector interface every model implements.

A :class:`Detector` takes images in [0, 1] (float, ``[B, 3, S, S]`` at ``preprocess.input_size``)
and normalises them itself, so attacks and callers never see mean/std. It is split into
``features`` (the backbone) and ``head`` so that a frozen backbone's features can be cached.
Its output is one logit (sigmoid, P(ai)) or two logits (softmax over nature, ai); ``ai_logit``
turns either into the same decision score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Preprocess:
    """What a model expects, as data: square input size and the normalisation it applies inside."""

    input_size: int
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def to_dict(self) -> dict:
        return asdict(self)


class Detector(nn.Module):
    """Base class: subclasses build ``self.backbone`` (may be empty) and ``self.head_net``."""

    num_outputs: int = 1
    frozen: bool = False

    def __init__(self, preprocess: Preprocess) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.register_buffer("_mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(preprocess.std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._mean.to(x.dtype)) / self._std.to(x.dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> feature vectors ``[B, D]``."""
        raise NotImplementedError

    def head(self, f: torch.Tensor) -> torch.Tensor:
        """Feature vectors -> logits ``[B, num_outputs]``."""
        return self.head_net(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True) -> Detector:
        super().train(mode)
        if self.frozen:  # a frozen backbone keeps its BatchNorm statistics and has no dropout
            self.backbone.eval()
        return self

    def ai_logit(self, logits: torch.Tensor) -> torch.Tensor:
        """The decision score: log-odds of 'ai' (``z`` for one logit, ``z_ai - z_nature`` for two)."""
        return logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]

    def p_ai(self, logits: torch.Tensor) -> torch.Tensor:
        """P(ai), computed in float64 so that the logit stays recoverable (|z| up to ~36, where float32
        saturates at ~17): calibration divides that logit by a temperature."""
        return torch.sigmoid(self.ai_logit(logits.double()))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy for one logit, categorical cross-entropy for two (as in the study)."""
        if logits.shape[1] == 1:
            return F.binary_cross_entropy_with_logits(logits[:, 0].float(), labels.float())
        return F.cross_entropy(logits.float(), labels.long())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
