"""A small built-in demo dataset in the GenImage layout — a demo, not GenImage.

'nature' images are random crops of real photographs that ship inside installed packages
(scikit-learn's ``china.jpg`` and ``flower.jpg``, matplotlib's ``grace_hopper.jpg``). 'ai' images
are produced from other crops of the same photographs by two fixed, randomly initialised
generator-like upsampling networks: each reduces a crop to low resolution and upsamples it back
with learned-style layers (transposed convolutions, pixel shuffle), leaving the periodic
up-sampling traces that real generators leave. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fakescope.data.io import read_image
from fakescope.errors import FakescopeError
from fakescope.progress import progress


def photo_sources() -> list[str]:
    """Paths of real photographs shipped inside installed packages."""
    paths = []
    try:
        import sklearn.datasets

        base = Path(sklearn.datasets.__file__).parent / "images"
        paths += [str(base / "china.jpg"), str(base / "flower.jpg")]
    except ImportError:
        pass
    try:
        import matplotlib

        paths.append(str(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"))
    except ImportError:
        pass
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise FakescopeError("no sample photographs found (scikit-learn and matplotlib provide them)")
    return paths


class _UpConv(nn.Module):
    """x4 up-sampling with two stride-2 transposed convolutions (GAN-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.ConvTranspose2d(3, 16, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(16, 3, 4, 2, 1))

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        base = F.interpolate(low, scale_factor=4, mode="bilinear", align_corners=False)
        return base + 0.15 * torch.tanh(self.net(low))


class _Shuffle(nn.Module):
    """x2 up-sampling with a convolution and pixel shuffle (super-resolution style)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.PixelShuffle(2))

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        base = F.interpolate(low, scale_factor=2, mode="nearest")
        return base + 0.12 * torch.tanh(self.net(low))


GENERATORS = {"demo_upconv": (_UpConv, 4), "demo_shuffle": (_Shuffle, 2)}


def _crop(photo: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    _, h, w = photo.shape
    c = int(rng.integers(size, max(size + 1, min(h, w) // 2)))
    top, left = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
    crop = photo[:, top:top + c, left:left + c].float().unsqueeze(0) / 255
    crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if rng.random() < 0.5:
        crop = crop.flip(-1)
    return crop


def _save(x: torch.Tensor, path: Path) -> None:
    arr = (x.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(path)


def make_demo_dataset(out: str | os.PathLike, *, train_per_class: int = 300, val_per_class: int = 100,
                      size: int = 64, seed: int = 42) -> Path:
    """Write ``out/<generator>/{train,val}/{ai,nature}/*.png``; returns ``out``."""
    out = Path(out)
    photos = [read_image(p) for p in photo_sources()]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    jobs = [(g, s, n) for g in GENERATORS for s, n in (("train", train_per_class), ("val", val_per_class))]
    total = sum(2 * n for _, _, n in jobs)
    bar = progress(range(total), desc="demo data", total=total)
    it = iter(bar)
    with torch.no_grad():
        for gen, split, n in jobs:
            cls, factor = GENERATORS[gen]
            net = cls().eval()
            for label in ("nature", "ai"):
                (out / gen / split / label).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                photo = photos[int(rng.integers(len(photos)))]
                _save(_crop(photo, size, rng), out / gen / split / "nature" / f"{i:05d}.png")
                next(it, None)
                src = _crop(photos[int(rng.integers(len(photos)))], size, rng)
                low = F.interpolate(src, scale_factor=1 / factor, mode="bilinear", antialias=True,
                                    align_corners=False)
                _save(net(low), out / gen / split / "ai" / f"{i:05d}.png")
                next(it, None)
    (out / "README.txt").write_text(
        "fakescope demo dataset: NOT GenImage. 'nature' = crops of real photographs shipped with scikit-learn "
        "and matplotlib; 'ai' = crops passed through fixed random up-sampling networks.\n")
    return out
