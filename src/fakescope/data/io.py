"""The one safe image reader.

Every image that enters fakescope goes through :func:`read_image`. It returns an RGB
``uint8`` tensor of shape ``[3, H, W]`` or raises :class:`~fakescope.errors.ImageReadError`
with a short reason; it never returns garbage and never
raises anything else for a bad file (whatever the bytes, the caller sees an ``ImageReadError``).
Only the errors a decoder raises on malformed data (:data:`DECODE_ERRORS`) make a bad file: a
``RuntimeError`` (a bug, torch running out of memory) or a ``MemoryError`` is never turned into
one, it propagates.

What it handles: greyscale and 16-bit images, CMYK JPEG, palette images with transparency,
RGBA and LA (composited on a fixed white background), animated GIF/WebP (first frame),
EXIF orientation, BMP/TIFF/WebP, files whose extension lies about their format.
What it rejects: empty, truncated or non-image files, dangling links, unreadable files, files
over ``max_file_size`` bytes, and images with more than ``max_pixels`` pixels (decompression
bombs: the limit is checked on the header, before any pixel memory is allocated).
Only the decoders of :data:`FORMATS` are ever run, whatever the file claims to be.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from fakescope.errors import ImageReadError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF")
"""The Pillow decoders fakescope runs (by content, not by extension); anything else is refused."""
DEFAULT_MAX_PIXELS = 120_000_000  # 6000x4000 is 24 M; a 40000x40000 bomb is 1.6 G
READER_VERSION = 1
"""Bump whenever :func:`read_image` can return different pixels for the same file (decoding,
orientation, compositing, draft scaling): caches of decoded-image results key on it."""
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
_ORIENTATION = 0x0112
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, EOFError, ValueError, ZeroDivisionError, OverflowError, struct.error,
    Image.DecompressionBombError,
)
"""What Pillow's decoders raise on malformed bytes (truncated data included: ``ImageFile.LOAD_TRUNCATED_IMAGES``
stays False, so Pillow raises ``OSError`` on it). ``TypeError``, ``KeyError``, ``IndexError``, ``RuntimeError``,
``MemoryError`` and anything else are not a bad file: they are a bug (in fakescope or in a decoder) and propagate.
Decoding sets no process-wide state (no warning filters, no Pillow globals), so threads may decode at once."""


def is_image_path(path: str | os.PathLike) -> bool:
    """True when the file name has an image extension (any case)."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def _check_file(path: str, max_file_size: int | None) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageReadError(path, f"dangling symbolic link (its target {os.readlink(path)} does not exist)") \
                from None
        raise ImageReadError(path, "file not found") from None
    except PermissionError:
        raise ImageReadError(path, "permission denied") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot stat file ({e.strerror or e})") from None
    if not os.path.isfile(path):
        kind = "a folder" if os.path.isdir(path) else "not a regular file"
        raise ImageReadError(path, f"{kind}, not an image file")
    if st.st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    if max_file_size is not None and st.st_size > max_file_size:
        raise ImageReadError(path, f"file too large ({st.st_size} bytes > limit {max_file_size}; "
                                   f"raise --max-file-size)")
    if not os.access(path, os.R_OK):
        raise ImageReadError(path, "permission denied")
    return st.st_size


def _what_is_it(path: str) -> str:
    """The reason for a file no decoder recognises: say what it looks like, when that is clear."""
    try:
        with open(path, "rb") as f:
            head = f.read(2048)
    except OSError:
        head = b""
    return describe_bytes(head)


def describe_bytes(head: bytes) -> str:
    """Why bytes that no decoder recognises are not an image, from their first 2 KiB."""
    head = head[:2048]
    low = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if low.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in low[:512]:
        return "not an image: an HTML page (often a failed download)"
    if low.startswith(b"<?xml") or b"<svg" in low[:512]:
        return "not an image: an XML/SVG document (vector images are not supported)"
    if head and b"\x00" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as e:  # a multi-byte character cut at the end of the block
            text = head[: e.start].decode("utf-8", "replace") if e.start > len(head) - 4 else ""
        if text and sum(c.isprintable() or c.isspace() for c in text) >= 0.95 * len(text):
            return "not an image: a text file"
    return f"not an image (unrecognised or unsupported format; supported: {', '.join(FORMATS[:-2])}, TIFF)"


_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
          (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def sniff_format(head: bytes) -> str | None:
    """The image format the first bytes announce (one of :data:`FORMATS`' families), or None.

    Only the signature is read: the name and any claimed content type play no part."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    return None


_NOT_MINE = (SyntaxError, IndexError, TypeError, struct.error)
"""What a Pillow format plugin raises on a header that is not its format (``Image.open`` moves on to the next)."""


def _plugins() -> list[tuple[str, type, object]]:
    """``(format, image class, accept)`` for :data:`FORMATS` that this Pillow has."""
    Image.init()
    found = []
    for fmt in FORMATS:
        if fmt not in Image.OPEN:
            continue
        factory, accept = Image.OPEN[fmt]
        if fmt == "JPEG":  # jpeg_factory also probes for MPO and warns when that fails: the base JPEG is the image
            factory = JpegImagePlugin.JpegImageFile
        found.append((fmt, factory, accept))
    return found


def _pillow_open(src) -> Image.Image:
    """``Image.open(src, formats=FORMATS)`` without Pillow's process-wide parts: its decompression-bomb
    guard (a global limit, a warning above it; ``max_pixels`` alone decides here) and its warnings.
    ``src``: a path or a seekable binary file object."""
    if hasattr(src, "read"):
        src.seek(0)
        prefix = src.read(16)
    else:
        with open(src, "rb") as f:
            prefix = f.read(16)
    for _fmt, factory, accept in _plugins():
        ok = accept(prefix) if accept else True
        if not ok or isinstance(ok, str):
            continue
        if hasattr(src, "read"):
            src.seek(0)
        try:
            return factory(src)
        except _NOT_MINE:
            continue
    raise UnidentifiedImageError(f"cannot identify image file {src if isinstance(src, str) else 'data'!r}")


def _reason(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."


def _failure(what: str, e: BaseException) -> str:
    msg = _reason(e)
    if "truncated" in msg.lower() or isinstance(e, EOFError):
        return f"truncated or corrupt image data ({msg})"
    return f"{what} ({msg})"


def _open(path: str, max_pixels: int, src=None) -> Image.Image:
    """Open (header only) and check the pixel count before anything is decoded. ``src``: a file
    object to read instead of ``path`` (which then only names the image in messages)."""
    try:
        im = _pillow_open(path if src is None else src)
    except UnidentifiedImageError:
        raise ImageReadError(path, _what_is_it(path) if src is None else describe_bytes(src.getvalue())) from None
    except PermissionError:
        raise ImageReadError(path, "permission denied") from None
    except DECODE_ERRORS as e:  # a decoder failure on malformed bytes is a bad file, never a crash
        raise ImageReadError(path, _failure("cannot open image", e)) from None
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


def _grey_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit integer and float greyscale to 8 bits."""
    if mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
        return np.clip(arr * scale, 0, 255).astype(np.uint8)
    arr = np.clip(arr.astype(np.int64), 0, None)
    if mode.startswith("I;16") or (arr.size and 255 < arr.max() <= 65535):
        return (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
    if arr.size and arr.max() > 65535:  # 32-bit data: scale the full range down
        return (arr * 255 // int(arr.max())).astype(np.uint8)
    return arr.astype(np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        arr = _grey_to_uint8(np.asarray(im), mode)
        return Image.fromarray(np.repeat(arr[:, :, None], 3, axis=2))
    if "transparency" in im.info and mode in ("P", "L", "RGB"):
        im = im.convert("RGBA")
        mode = im.mode
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, BACKGROUND + (255,))
        im = Image.alpha_composite(bg, im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def reduce_factor(width: int, height: int, size: int | None) -> int:
    """The box-averaging factor for an image that will be resized to ``size``: the largest integer
    that keeps the shorter side at least ``2 * size`` (1, no reduction, when ``size`` is None)."""
    if not size:
        return 1
    return max(1, min(width, height) // (2 * size))


def _reduce(im: Image.Image, size: int | None) -> Image.Image:
    """Average ``f x f`` blocks (:func:`reduce_factor`), on the centred part of the image that is a
    whole number of blocks, so the centre stays the centre. The same for every file format."""
    w, h = im.size
    f = reduce_factor(w, h, size)
    if f == 1:
        return im
    cw, ch = w - w % f, h - h % f
    left, top = (w - cw) // 2, (h - ch) // 2
    return im.reduce(f, box=(left, top, left + cw, top + ch))


def _orient(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block must not cost the image (it is shown as stored)."""
    try:
        if im.getexif().get(_ORIENTATION, 1) in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(im)
    except DECODE_ERRORS:
        return im
    return im


def read_image(
    path: str | os.PathLike,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_size: int | None = None,
    reduce_to: int | None = None,
) -> torch.Tensor:
    """Decode ``path`` into an RGB ``uint8`` tensor ``[3, H, W]``.

    ``reduce_to``: the image will be resized to this size; a large image is first averaged over
    ``f x f`` blocks (``Image.reduce``, the largest ``f`` that keeps the shorter side at least
    ``2 * reduce_to``), which makes the resize of big photos cheap. Every format is decoded in full
    and reduced the same way, so a JPEG and a PNG of the same pixels give the same image (JPEG's
    DCT-domain draft decoding, faster but a different resampling, is never used).
    Raises :class:`ImageReadError` with a one-line reason for anything that is not a valid image,
    and nothing else.
    """
    return decode_file(path, max_pixels=max_pixels, max_file_size=max_file_size, reduce_to=reduce_to).image


def decode_file(
    path: str | os.PathLike,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_size: int | None = None,
    reduce_to: int | None = None,
) -> Decoded:
    """:func:`read_image` with what it learnt on the way: the image, its format, its size (after EXIF
    orientation) and the file's size in bytes (:class:`Decoded`). The same checks, decoders and pixels."""
    path = str(path)
    size = _check_file(path, max_file_size)
    d = _decode(path, _open(path, max_pixels), reduce_to)
    return Decoded(d.image, d.format, d.width, d.height, size)


def from_array(rgb: np.ndarray, reduce_to: int | None = None) -> torch.Tensor:
    """An RGB ``uint8`` array ``[H, W, 3]`` decoded elsewhere (e.g. by ``ray.data.read_images(mode="RGB")``)
    as :func:`read_image` returns it: ``[3, H', W']``, box-reduced for ``reduce_to`` exactly as the reader does."""
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"expected an RGB uint8 array of shape [H, W, 3], got {arr.dtype} {tuple(arr.shape)}")
    arr = np.array(_reduce(Image.fromarray(np.ascontiguousarray(arr), "RGB"), reduce_to))
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class Decoded:
    """A decoded image: RGB ``uint8 [3, H, W]`` (H, W smaller than the image's own size when it was
    box-reduced for a small target, see :func:`read_image`), its format, its size after EXIF orientation
    and the size of the encoded data in bytes (None where unknown)."""

    image: torch.Tensor
    format: str
    width: int
    height: int
    bytes: int | None = None


def read_image_bytes(
    data: bytes,
    name: str = "upload",
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_size: int | None = None,
    reduce_to: int | None = None,
) -> Decoded:
    """:func:`read_image` for an image held in memory (an upload): the same checks, decoders and
    result, and nothing written anywhere. ``name`` only labels the messages."""
    if len(data) == 0:
        raise ImageReadError(name, "empty file (0 bytes)")
    if max_file_size is not None and len(data) > max_file_size:
        raise ImageReadError(name, f"file too large ({len(data)} bytes > limit {max_file_size}; "
                                   f"raise --max-file-size)")
    d = _decode(name, _open(name, max_pixels, io.BytesIO(data)), reduce_to)
    return Decoded(d.image, d.format, d.width, d.height, len(data))


def _decode(path: str, im: Image.Image, reduce_to: int | None) -> Decoded:
    fmt = (im.format or "unknown").upper()
    try:
        if getattr(im, "is_animated", False):
            im.seek(0)
        im.load()  # truncated data: OSError (ImageFile.LOAD_TRUNCATED_IMAGES is never set)
        oriented = _orient(im)
        width, height = oriented.size
        arr = np.array(_reduce(_to_rgb(oriented), reduce_to))
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"decompression bomb ({_reason(e)})") from None
    except DECODE_ERRORS as e:  # a decoder failure on malformed bytes is a bad file
        raise ImageReadError(path, _failure("cannot decode image", e)) from None
    finally:
        im.close()
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageReadError(path, f"unexpected decoded shape {arr.shape}")
    return Decoded(torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous(), fmt, width, height)


def list_images(paths: list[str | os.PathLike]) -> list[str]:
    """Expand files and folders (recursively, sorted) into image paths.

    Folders contribute files with an image extension; a file named explicitly is always kept
    (its content decides whether it is an image, so a PNG named ``.dat`` still works).
    """
    return list(iter_images(paths))


def iter_images(paths) -> Iterator[str]:
    """:func:`list_images`, one path at a time (a folder is walked as the paths are consumed; only
    one folder's listing is held at once)."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for root, dirs, files in os.walk(p, followlinks=False):
                dirs.sort()
                yield from (os.path.join(root, f) for f in sorted(files) if is_image_path(f))
        else:
            yield str(p)
