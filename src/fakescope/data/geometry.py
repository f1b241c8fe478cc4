"""Crops at the image's own pixel scale: how crop-geometry models see an image of any size.

Resizing a large photo down to the model's input destroys the pixel-level traces (up-sampling
residuals, sensor noise, JPEG grids) that detectors such as CNNSpot and NPR read, and turns "large
and sharp" into a feature. These functions take ``size x size`` squares out of the image without
resampling it; only an image smaller than ``size`` on a side is enlarged (shorter side to ``size``,
bilinear) so that a square fits. All work on ``uint8 [..., 3, H, W]`` tensors.

* :func:`center_crop` -- the centre square (test geometry ``center_crop``);
* :func:`grid_crops` -- ``per_side x per_side`` squares (:data:`GRID_CROPS`) on an even grid (test
  geometry ``crops``): on each axis ``per_side`` starts evenly spaced from one border to the other,
  so every pixel is covered when the image is at most ``per_side`` sizes on a side (crops overlap,
  or coincide on an image of exactly ``size``: the mean of their scores weighs the grid evenly);
* :func:`random_crop` -- a uniformly placed square (training).
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF


def at_least(img: torch.Tensor, size: int) -> torch.Tensor:
    """``img`` unchanged when both sides are >= ``size``, else its shorter side enlarged to ``size``."""
    h, w = img.shape[-2:]
    if min(h, w) >= size:
        return img
    nh, nw = (size, max(size, round(w * size / h))) if h <= w else (max(size, round(h * size / w)), size)
    return TF.resize(img, [nh, nw], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    img = at_least(img, size)
    h, w = img.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return img[..., top:top + size, left:left + size]


CROPS_PER_SIDE = 3
GRID_CROPS = CROPS_PER_SIDE * CROPS_PER_SIDE
"""Crops per image of the ``crops`` geometry."""


def _starts(length: int, size: int, n: int) -> list[int]:
    if n <= 1:
        return [(length - size) // 2]
    return [round(i * (length - size) / (n - 1)) for i in range(n)]


def grid_positions(h: int, w: int, size: int, per_side: int = CROPS_PER_SIDE) -> list[tuple[int, int]]:
    """``(top, left)`` of the grid crops of an ``h x w`` image (already at least ``size`` on each side)."""
    return [(t, left) for t in _starts(h, size, per_side) for left in _starts(w, size, per_side)]


def grid_crops(img: torch.Tensor, size: int, per_side: int = CROPS_PER_SIDE) -> list[torch.Tensor]:
    img = at_least(img, size)
    h, w = img.shape[-2:]
    return [img[..., t:t + size, left:left + size] for t, left in grid_positions(h, w, size, per_side)]


def random_crop(img: torch.Tensor, size: int, rng: torch.Generator) -> torch.Tensor:
    img = at_least(img, size)
    h, w = img.shape[-2:]
    top = int(torch.randint(0, h - size + 1, (), generator=rng))
    left = int(torch.randint(0, w - size + 1, (), generator=rng))
    return img[..., top:top + size, left:left + size]
