"""Per-image transforms on ``uint8`` tensors: sizing, JPEG alignment, degradations, augmentation.

Everything here works on RGB ``uint8`` tensors ``[..., 3, H, W]`` and returns ``uint8``;
conversion to float happens once, at the end of the pipeline. Normalisation is never done
here: it belongs to the model (every model input is an image in [0, 1]).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import decode_jpeg, encode_jpeg


def fit(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bilinear, antialiased) and centre-crop a square."""
    h, w = img.shape[-2:]
    if h == size and w == size:
        return img
    if min(h, w) != size:
        short = size
        nh, nw = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
        img = TF.resize(img, [nh, nw], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(img, [size, size])


JPEG_MAX_SIDE = 65500
"""libjpeg's limit; torchvision's encoder crashes the process (not an exception) on a larger side."""


class TransformError(ValueError):
    """An image a transform cannot process (a property of the image, not a bug): the dataset
    reports its file as unreadable with this message, as for a file that cannot be decoded."""


def _jpeg_roundtrip(img: torch.Tensor, quality: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    if max(h, w) > JPEG_MAX_SIDE:
        raise TransformError(f"cannot re-encode a {w}x{h} image as JPEG (at most {JPEG_MAX_SIDE} pixels a side)")
    with warnings.catch_warnings():  # torchvision announces the move of its image codecs to torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(encode_jpeg(img.contiguous(), quality=quality))


def jpeg(img: torch.Tensor, quality: float) -> torch.Tensor:
    """Re-encode as JPEG at ``quality`` (1-100). Quality 100 or more is the identity."""
    q = int(quality)
    if q >= 100:
        return img
    if not 1 <= q:
        raise ValueError(f"expected a JPEG quality in [1, 100], got {quality}")
    return _jpeg_roundtrip(img, q)


def jpeg_align(img: torch.Tensor, quality: int) -> torch.Tensor:
    """Shortcut control: every image of both classes re-encoded as JPEG at the same quality."""
    return _jpeg_roundtrip(img, int(quality))


def blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with standard deviation ``sigma`` pixels; sigma 0 is the identity."""
    if sigma <= 0:
        return img
    k = 2 * math.ceil(3 * sigma) + 1
    h, w = img.shape[-2:]
    k = max(3, min(k, (min(h, w) // 2) * 2 - 1)) if min(h, w) >= 3 else 1
    if k < 3:
        return img
    return TF.gaussian_blur(img, kernel_size=[k, k], sigma=[float(sigma), float(sigma)])


def downscale(img: torch.Tensor, factor: float) -> torch.Tensor:
    """Down-scale both sides by ``factor`` (GenImage's low-resolution degradation); 1 is the identity."""
    if not 0 < factor <= 1:
        raise ValueError(f"expected a down-scaling factor in (0, 1], got {factor}")
    if factor == 1:
        return img
    h, w = img.shape[-2:]
    size = [max(1, round(h * factor)), max(1, round(w * factor))]
    if size == [1, 1] and h > 1:  # torch's uint8 antialiased kernel fails an internal assert on a 1x1 output
        return TF.resize(img.float(), size, antialias=True).round_().clamp_(0, 255).to(torch.uint8)
    return TF.resize(img, size, antialias=True)


DEGRADATIONS = {"jpeg": jpeg, "blur": blur, "resize": downscale}
"""Degradation name -> function(img, level). Levels: JPEG quality, blur sigma, scale factor."""

IDENTITY_LEVEL = {"jpeg": 100, "blur": 0, "resize": 1}


def parse_degradations(specs: list[str] | None) -> list[tuple[str, list[float]]]:
    """Parse ``["jpeg:95,75", "blur:1,2"]`` into ``[("jpeg", [95, 75]), ("blur", [1, 2])]``."""
    out = []
    for spec in specs or []:
        name, _, levels = spec.partition(":")
        name = name.strip().lower()
        if name not in DEGRADATIONS:
            raise ValueError(f"expected a degradation among {sorted(DEGRADATIONS)}, got {name!r}")
        try:
            values = [float(v) for v in levels.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"expected numeric levels like 'jpeg:95,75', got {spec!r}") from None
        if not values:
            raise ValueError(f"expected levels after the colon, e.g. '{name}:1,2', got {spec!r}")
        for v in values:
            if name == "jpeg" and not 1 <= v <= 100:
                raise ValueError(f"expected JPEG qualities in [1, 100], got {v:g}")
            if name == "blur" and v < 0:
                raise ValueError(f"expected blur sigmas >= 0, got {v:g}")
            if name == "resize" and not 0 < v <= 1:
                raise ValueError(f"expected resize factors in (0, 1], got {v:g}")
        out.append((name, values))
    return out


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation, CNNDetection style. Everything is off by default.

    ``jpeg_prob``/``jpeg_quality``: random JPEG re-encoding; ``blur_prob``/``blur_sigma``:
    random Gaussian blur; ``crop``: random crop covering this fraction of the shorter side
    (1 = off); ``flip``: random horizontal flip.
    """

    jpeg_prob: float = 0.0
    jpeg_quality: tuple[int, int] = (30, 100)
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.0, 3.0)
    crop: float = 1.0
    flip: bool = False

    @property
    def active(self) -> bool:
        return self.jpeg_prob > 0 or self.blur_prob > 0 or self.crop < 1 or self.flip


@dataclass(frozen=True)
class Pipeline:
    """Everything between the decoded image and the model's input, in this order:

    1. ``jpeg_align`` (shortcut control) and ``degrade`` (evaluation under degradation),
    2. training augmentation (JPEG/blur on the original, then crop and flip),
    3. the native-size step (``fit`` to the training data's typical size),
    4. the model's own resize (``fit`` to its input size).

    The result is ``uint8 [3, S, S]``; the caller divides by 255.
    """

    input_size: int
    native_size: int | None = None
    jpeg_align: int | None = None
    degrade: tuple[str, float] | None = None
    augment: Augment = field(default_factory=Augment)

    def pre_native(self, img: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
        if self.jpeg_align is not None:
            img = jpeg_align(img, self.jpeg_align)
        if self.degrade is not None:
            name, level = self.degrade
            img = DEGRADATIONS[name](img, level)
        a = self.augment
        if rng is not None and a.active:
            if a.blur_prob > 0 and torch.rand((), generator=rng) < a.blur_prob:
                lo, hi = a.blur_sigma
                img = blur(img, lo + (hi - lo) * torch.rand((), generator=rng).item())
            if a.jpeg_prob > 0 and torch.rand((), generator=rng) < a.jpeg_prob:
                lo, hi = a.jpeg_quality
                img = jpeg(img, int(torch.randint(lo, hi + 1, (), generator=rng)))
            if a.crop < 1:
                h, w = img.shape[-2:]
                c = max(1, round(min(h, w) * a.crop))
                top = int(torch.randint(0, h - c + 1, (), generator=rng))
                left = int(torch.randint(0, w - c + 1, (), generator=rng))
                img = img[..., top : top + c, left : left + c]
            if a.flip and torch.rand((), generator=rng) < 0.5:
                img = img.flip(-1)
        return img

    def stage_size(self) -> int:
        """Size of the intermediate (cacheable) image: the native size when set, else the input size."""
        return self.native_size or self.input_size

    def to_stage(self, img: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
        return fit(self.pre_native(img, rng), self.stage_size())

    def finish(self, img: torch.Tensor) -> torch.Tensor:
        """Stage image(s) -> model input size; works on one image or a batch."""
        return fit(img, self.input_size)

    def __call__(self, img: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
        return self.finish(self.to_stage(img, rng))
