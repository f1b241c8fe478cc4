"""The study's custom CNN for 32x32 inputs."""

from __future__ import annotations

import torch
from torch import nn

from fakescope.errors import FakescopeError
from fakescope.models.base import Detector, Preprocess
from fakescope.models.registry import register_model


class CNN32(Detector):
    """Three 3x3 'same' convolutions with ReLU, each followed by 2x2 max-pooling; flatten;
    dense ``hidden`` + ReLU; dropout; dense 2 (softmax over nature, ai). Input 32x32x3 in [0, 1]
    (the study rescales by 1/255 and applies no other normalisation)."""

    num_outputs = 2
    pretrained_weights = False

    def __init__(self, filters: tuple[int, ...] = (32, 64, 128), hidden: int = 128, dropout: float = 0.5,
                 input_size: int = 32) -> None:
        super().__init__(Preprocess(input_size=input_size))
        layers: list[nn.Module] = []
        c = 3
        for f in filters:
            layers += [nn.Conv2d(c, f, 3, padding="same"), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = f
        self.backbone = nn.Sequential(*layers, nn.Flatten())
        side = input_size // 2 ** len(filters)
        self.head_net = nn.Sequential(
            nn.Linear(c * side * side, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, 2)
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))


@register_model("cnn32", "the study's custom CNN: 3 conv layers (32/64/128), dense 128, dropout 0.5, "
                         "2-way softmax; 32x32 input", options=("filters", "hidden", "dropout", "input_size"))
def cnn32(filters: tuple[int, ...] | list[int] = (32, 64, 128), hidden: int = 128, dropout: float = 0.5,
          input_size: int = 32) -> CNN32:
    filters = tuple(int(f) for f in filters)
    if not filters or input_size < 2 ** len(filters):
        raise FakescopeError(f"expected cnn32 filters (one per conv layer) and an input_size of at least "
                             f"2**layers = {2 ** len(filters)} pixels, got filters {list(filters)} and input_size "
                             f"{input_size}")
    return CNN32(filters, int(hidden), float(dropout), int(input_size))
