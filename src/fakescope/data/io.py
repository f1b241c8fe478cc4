"""The one safe image reader.

Every image that enters fakescope goes through :func:`read_image`. It returns an RGB
``uint8`` tensor of shape ``[3, H, W]`` or raises :class:`~fakescope.errors.ImageReadError`
with a short reason; it never returns garbage and never lets a decoder warning pass.

What it handles: greyscale and 16-bit images, CMYK JPEG, palette images with transparency,
RGBA and LA (composited on a fixed white background), animated GIF/WebP (first frame),
EXIF orientation, BMP/TIFF/WebP, files whose extension lies about their format.
What it rejects: empty, truncated or non-image files, dangling links, unreadable files, and
images with more than ``max_pixels`` pixels (decompression bombs).
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fakescope.errors import ImageReadError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 120_000_000  # 6000x4000 is 24 M; a 40000x40000 bomb is 1.6 G
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white


def is_image_path(path: str | os.PathLike) -> bool:
    """True when the file name has an image extension (any case)."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def _check_file(path: str, max_file_size: int | None) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        kind = "dangling symbolic link" if os.path.islink(path) else "file not found"
        raise ImageReadError(path, kind) from None
    except OSError as e:
        raise ImageReadError(path, f"cannot stat file ({e.strerror})") from None
    if not os.path.isfile(path):
        raise ImageReadError(path, "not a regular file")
    if st.st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    if max_file_size is not None and st.st_size > max_file_size:
        raise ImageReadError(path, f"file too large ({st.st_size} bytes > limit {max_file_size})")
    if not os.access(path, os.R_OK):
        raise ImageReadError(path, "permission denied")
    return st.st_size


def _open(path: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError:
        raise ImageReadError(path, f"decompression bomb (more than {max_pixels} pixels)") from None
    except Image.DecompressionBombWarning:
        raise ImageReadError(path, f"decompression bomb (more than {max_pixels} pixels)") from None
    except PermissionError:
        raise ImageReadError(path, "permission denied") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(path, f"cannot open image ({e})") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageReadError(
            path, f"decompression bomb: {w}x{h} = {w * h} pixels > limit {max_pixels} (raise --max-pixels)"
        )
    if w < 1 or h < 1:
        im.close()
        raise ImageReadError(path, f"invalid image size {w}x{h}")
    return im


def probe_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, int, int]:
    """Read only the header: ``(format, width, height)``. Cheap; does not decode pixels."""
    path = str(path)
    _check_file(path, None)
    im = _open(path, max_pixels)
    try:
        return (im.format or "unknown").upper(), im.size[0], im.size[1]
    finally:
        im.close()


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im).astype(np.int64)
        arr = np.clip(arr, 0, 65535) if mode == "I" and arr.max() > 255 else arr
        if mode != "I" or arr.max() > 255:
            arr = arr >> 8
        arr = arr.astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(im)
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        arr = np.clip(np.nan_to_num(arr) * scale, 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, BACKGROUND + (255,))
        im = Image.alpha_composite(bg, im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.array(im)


def read_image(
    path: str | os.PathLike,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_size: int | None = None,
    draft_size: int | None = None,
) -> torch.Tensor:
    """Decode ``path`` into an RGB ``uint8`` tensor ``[3, H, W]``.

    ``draft_size`` lets the JPEG decoder scale down by a power of two while keeping both sides
    at least ``2 * draft_size`` (a large speed-up for big photos that will be resized anyway).
    Raises :class:`ImageReadError` with a one-line reason for anything that is not a valid image.
    """
    path = str(path)
    _check_file(path, max_file_size)
    im = _open(path, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. truncated data, bad EXIF, palette warnings
            if getattr(im, "is_animated", False):
                im.seek(0)
            if draft_size and im.format == "JPEG":
                im.draft("RGB", (2 * draft_size, 2 * draft_size))
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # a malformed EXIF block must not cost the image
                pass
            arr = _to_rgb_array(im)
    except ImageReadError:
        raise
    except Image.DecompressionBombError:
        raise ImageReadError(path, f"decompression bomb (more than {max_pixels} pixels)") from None
    except (OSError, ValueError, SyntaxError, EOFError, TypeError, IndexError, KeyError,
            MemoryError, struct.error, Warning) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower() or isinstance(e, EOFError):
            msg = f"truncated or corrupt image data ({msg})"
        else:
            msg = f"cannot decode image ({msg})"
        raise ImageReadError(path, msg) from None
    finally:
        im.close()
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageReadError(path, f"unexpected decoded shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def list_images(paths: list[str | os.PathLike]) -> list[str]:
    """Expand files and folders (recursively, sorted) into image paths.

    Folders contribute files with an image extension; a file named explicitly is always kept
    (its content decides whether it is an image, so a PNG named ``.dat`` still works).
    """
    out: list[str] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for root, dirs, files in os.walk(p, followlinks=False):
                dirs.sort()
                out.extend(os.path.join(root, f) for f in sorted(files) if is_image_path(f))
        else:
            out.append(str(p))
    return out
