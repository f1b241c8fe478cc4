"""Per-image transforms on ``uint8`` tensors: sizing, JPEG alignment, degradations, augmentation.

Everything here works on RGB ``uint8`` tensors ``[..., 3, H, W]`` and returns ``uint8``;
conversion to float happens once, at the end of the pipeline. Normalisation is never done
here: it belongs to the model (every model input is an image in [0, 1]).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, JpegImagePlugin

from fakescope.choices import GEOMETRIES
from fakescope.data.geometry import GRID_CROPS, center_crop, grid_crops, random_crop


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
"""libjpeg's limit on a side."""


class TransformError(ValueError):
    """An image a transform cannot process (a property of the image, not a bug): the dataset
    reports its file as unreadable with this message, as for a file that cannot be decoded."""


def _jpeg_roundtrip(img: torch.Tensor, quality: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    if max(h, w) > JPEG_MAX_SIDE:
        raise TransformError(f"cannot re-encode a {w}x{h} image as JPEG (at most {JPEG_MAX_SIDE} pixels a side)")
    return jpeg_decode(jpeg_encode(img, quality))


def jpeg_encode(img: torch.Tensor, quality: int) -> bytes:
    """An RGB ``uint8 [3, H, W]`` image as JPEG bytes at ``quality`` (Pillow's libjpeg: baseline, 4:2:0
    chroma subsampling, the standard tables scaled by quality; the bytes torchvision's ``encode_jpeg`` wrote)."""
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).contiguous().numpy(), "RGB").save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def jpeg_decode(data: bytes) -> torch.Tensor:
    """JPEG bytes as an RGB ``uint8 [3, H, W]`` tensor. The plugin is used directly: ``Image.open`` would
    apply Pillow's process-wide pixel limit (a warning on large images) to an image fakescope made."""
    with JpegImagePlugin.JpegImageFile(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


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


def cap_side(img: torch.Tensor, max_side: int) -> torch.Tensor:
    """Down-scale (antialiased, aspect ratio kept) so that the longer side is ``max_side``; an image
    whose longer side is at most ``max_side`` is returned unchanged (never up-scaled)."""
    h, w = img.shape[-2:]
    long = max(h, w)
    if long <= max_side:
        return img
    size = [max(1, round(h * max_side / long)), max(1, round(w * max_side / long))]
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
    (1 = off); ``flip``: random horizontal flip; ``native_crop``: for models with a crop test
    geometry, a randomly placed input-size square at the image's own pixel scale (instead of the
    centre one); ``scale``: the image first down-scaled by a random factor in this range (``(1, 1)``
    = off), so that the pixel scale of the training images is not a feature; ``color_prob``/``color_strength``:
    random colour jitter (brightness, contrast and saturation factors in ``[1 - s, 1 + s]``, hue shift in
    ``[-s/4, s/4]``, in random order, torchvision's ``ColorJitter``), so that colourfulness is not a feature;
    ``gray_prob``: random conversion to greyscale (kept as three equal channels). The colour steps act on
    the final crop (they are per pixel, but for contrast, which uses the crop's mean).

    ``nature_blur_prob``/``nature_blur_sigma``: a Gaussian blur of the *real* images only (label 0), after
    the shared blur: where the generated images of a data set are smoother than its photos (multigen's
    median Laplacian energy is a third of its photos'), smoothness stops telling the classes apart, and
    smooth real photos stop being called AI. Its random draws are made for every image, so both members
    of an aligned pair keep the same crop, flip, JPEG and scale.
    """

    jpeg_prob: float = 0.0
    jpeg_quality: tuple[int, int] = (30, 100)
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.0, 3.0)
    crop: float = 1.0
    flip: bool = False
    native_crop: bool = False
    scale: tuple[float, float] = (1.0, 1.0)
    color_prob: float = 0.0
    color_strength: float = 0.4
    gray_prob: float = 0.0
    nature_blur_prob: float = 0.0
    nature_blur_sigma: tuple[float, float] = (0.5, 2.0)

    @property
    def active(self) -> bool:
        return (self.jpeg_prob > 0 or self.blur_prob > 0 or self.crop < 1 or self.flip or self.native_crop
                or tuple(self.scale) != (1.0, 1.0) or self.color_prob > 0 or self.gray_prob > 0
                or self.nature_blur_prob > 0)


COLOR_STEPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)


def color_jitter(img: torch.Tensor, strength: float, rng: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation scaled by random factors in ``[1 - strength, 1 + strength]`` and
    the hue shifted by a random amount in ``[-strength / 4, strength / 4]``, the four in a random order
    (torchvision's ``ColorJitter(s, s, s, s / 4)``); ``uint8`` in and out."""
    s = float(strength)
    factors = [1 - s + 2 * s * torch.rand((), generator=rng).item() for _ in COLOR_STEPS]
    hue = (torch.rand((), generator=rng).item() - 0.5) * s / 2
    for k in torch.randperm(4, generator=rng).tolist():
        img = TF.adjust_hue(img, hue) if k == 3 else COLOR_STEPS[k](img, max(0.0, factors[k]))
    return img


def colour_augment(img: torch.Tensor, augment: Augment, rng: torch.Generator) -> torch.Tensor:
    """The colour steps of ``augment`` (jitter, then greyscale), each drawn from ``rng``."""
    if augment.color_prob > 0 and torch.rand((), generator=rng) < augment.color_prob:
        img = color_jitter(img, augment.color_strength, rng)
    if augment.gray_prob > 0 and torch.rand((), generator=rng) < augment.gray_prob:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    return img




@dataclass(frozen=True)
class Pipeline:
    """Everything between the decoded image and the model's input, in this order:

    0. ``max_side``: an image whose longer side exceeds it is first down-scaled (antialiased) so that
       its longer side is ``max_side``: the model never reads an image at a finer pixel scale than its
       training data's (a 5,120-px wallpaper is read as a 640-px photo); smaller images are untouched,
    1. ``jpeg_align`` (shortcut control) and ``degrade`` (evaluation under degradation),
    2. training augmentation (JPEG/blur on the original, then crop and flip),
    3. the geometry: with ``resize`` (the seed's models) the native-size step (``fit`` to the
       training data's typical size), then the model's own resize (``fit`` to its input size);
       with ``center_crop`` the centre input-size square at the image's own pixel scale (a random
       one in training with ``augment.native_crop``); with ``crops`` the
       :data:`~fakescope.data.geometry.GRID_CROPS` squares of an even grid over the image
       (:func:`~fakescope.data.geometry.grid_crops`), whose scores the caller averages.

    The result is ``uint8 [3, S, S]`` (``[K, 3, S, S]`` for ``crops``); the caller divides by 255.
    """

    input_size: int
    native_size: int | None = None
    jpeg_align: int | None = None
    degrade: tuple[str, float] | None = None
    augment: Augment = field(default_factory=Augment)
    geometry: str = "resize"
    max_side: int | None = None

    def __post_init__(self) -> None:
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"expected a geometry among {', '.join(GEOMETRIES)}, got {self.geometry!r}")
        if self.max_side is not None and (isinstance(self.max_side, bool) or int(self.max_side) != self.max_side
                                          or self.max_side < 1):
            raise ValueError(f"expected max_side None or a positive integer, got {self.max_side!r}")

    @property
    def crops(self) -> int:
        """Images per file at the stage: :data:`GRID_CROPS` for ``crops``, else 1."""
        return GRID_CROPS if self.geometry == "crops" else 1

    def reduce_size(self) -> int | None:
        """The size the decoder may box-reduce a large image towards; None (keep every pixel) for
        the crop geometries, which read the image at its own pixel scale."""
        return self.stage_size() if self.geometry == "resize" else None

    def pre_native(self, img: torch.Tensor, rng: torch.Generator | None = None,
                   label: int | None = None) -> torch.Tensor:
        if self.max_side is not None:
            img = cap_side(img, self.max_side)
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
            if a.nature_blur_prob > 0:  # drawn for both classes: a pair's twins stay in step
                hit = bool(torch.rand((), generator=rng) < a.nature_blur_prob)
                lo, hi = a.nature_blur_sigma
                sigma = lo + (hi - lo) * torch.rand((), generator=rng).item()
                if hit and label == 0:
                    img = blur(img, sigma)
            if a.jpeg_prob > 0 and torch.rand((), generator=rng) < a.jpeg_prob:
                lo, hi = a.jpeg_quality
                img = jpeg(img, int(torch.randint(lo, hi + 1, (), generator=rng)))
            if tuple(a.scale) != (1.0, 1.0):
                lo, hi = a.scale
                img = downscale(img, min(1.0, lo + (hi - lo) * torch.rand((), generator=rng).item()))
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
        """Size of the intermediate (cacheable) image: the native size when set (``resize`` only),
        else the input size."""
        return (self.native_size or self.input_size) if self.geometry == "resize" else self.input_size

    def to_stage(self, img: torch.Tensor, rng: torch.Generator | None = None,
                 label: int | None = None) -> torch.Tensor:
        """``label`` (0 nature, 1 ai) matters only to class-conditional augmentation (``nature_blur_prob``)."""
        img = self.pre_native(img, rng, label)
        if self.geometry == "resize":
            img = fit(img, self.stage_size())
        elif rng is not None and self.augment.native_crop:
            img = random_crop(img, self.input_size, rng)
        elif self.geometry == "crops":
            return torch.stack(grid_crops(img, self.input_size))
        else:
            img = center_crop(img, self.input_size)
        if rng is not None and (self.augment.color_prob > 0 or self.augment.gray_prob > 0):
            img = colour_augment(img, self.augment, rng)
        return img

    def finish(self, img: torch.Tensor) -> torch.Tensor:
        """Stage image(s) -> model input size; works on one image or a batch."""
        return fit(img, self.input_size)

    def __call__(self, img: torch.Tensor, rng: torch.Generator | None = None,
                 label: int | None = None) -> torch.Tensor:
        return self.finish(self.to_stage(img, rng, label))
