"""A corpus of awkward, broken and hostile image files, generated in code.

``build_corpus(folder)`` writes every kind of input that fakescope's reader must survive and
returns ``{name: Case}``: valid-but-unusual images (with the shape they must decode to) and
invalid files (with a fragment of the reason they must be reported with). Used by
``test_io.py`` and ``test_reliability.py``; nothing here is downloaded.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass
class Case:
    kind: str  # what it is, for people
    path: Path
    ok: bool  # True: must decode; False: must be reported
    shape: tuple[int, int] | None = None  # (H, W) after decoding, for ok cases
    reason: str | None = None  # fragment of the reported reason, for bad cases
    root_skips: bool = False  # root can read it anyway (chmod 000)


def _rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth, compressible colour image (gradients + a little noise); fast even at 6000x4000."""
    rng = np.random.default_rng(seed)
    x = (np.arange(w, dtype=np.uint32) * 255 // max(w - 1, 1)).astype(np.uint8)
    y = (np.arange(h, dtype=np.uint32) * 255 // max(h - 1, 1)).astype(np.uint8)
    arr = np.empty((h, w, 3), np.uint8)
    arr[..., 0] = x[None, :]
    arr[..., 1] = y[:, None]
    arr[..., 2] = (x[None, :] // 2 + y[:, None] // 2)
    tile = rng.integers(0, 8, (min(h, 64), min(w, 64), 3), dtype=np.uint8)
    reps = (-(-h // tile.shape[0]), -(-w // tile.shape[1]), 1)
    arr = np.minimum(arr, 247) + np.tile(tile, reps)[:h, :w]
    return Image.fromarray(arr)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """A ~100-byte PNG whose header claims ``width`` x ``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (3 * 64 + 1) * 4)  # a few rows; the rest would be zeros too
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def valid_samples() -> dict[str, bytes]:
    """Small valid files of every supported format (seeds for mutation tests)."""
    im = _rgb(24, 16, seed=1)
    frames = [Image.new("RGB", (12, 10), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    webp = io.BytesIO()
    frames[0].save(webp, "WEBP", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    return {
        "png": encode(im, "PNG"),
        "jpeg": encode(im, "JPEG", quality=90),
        "gif": gif.getvalue(),
        "bmp": encode(im, "BMP"),
        "tiff": encode(im, "TIFF"),
        "webp": webp.getvalue(),
        "webp_lossy": encode(im, "WEBP", quality=80),
        "png16": encode(Image.fromarray(np.arange(16 * 8, dtype=np.uint16).reshape(8, 16) * 500), "PNG"),
        "palette": encode(im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG", transparency=0),
    }


def build_corpus(folder: str | os.PathLike, *, large: bool = True) -> dict[str, Case]:
    """Write the corpus into ``folder`` (created) and describe it."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Case] = {}

    def ok(name: str, kind: str, data: bytes, shape: tuple[int, int]) -> None:
        (d / name).write_bytes(data)
        cases[name] = Case(kind, d / name, True, shape=shape)

    def bad(name: str, kind: str, data: bytes | None, reason: str) -> None:
        if data is not None:
            (d / name).write_bytes(data)
        cases[name] = Case(kind, d / name, False, reason=reason)

    # --- valid but unusual ------------------------------------------------------------------
    ok("grey.png", "greyscale PNG (L)", encode(_rgb(20, 12).convert("L"), "PNG"), (12, 20))
    g16 = (np.linspace(0, 65535, 20 * 12).reshape(12, 20)).astype(np.uint16)
    ok("grey16.png", "16-bit greyscale PNG", encode(Image.fromarray(g16), "PNG"), (12, 20))
    ok("cmyk.jpg", "CMYK JPEG", encode(_rgb(20, 12).convert("CMYK"), "JPEG", quality=90), (12, 20))
    pal = _rgb(20, 12).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    ok("palette_transparent.png", "palette PNG with transparency", encode(pal, "PNG", transparency=0), (12, 20))
    rgba = np.zeros((12, 20, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 10:, 3] = 255  # left half fully transparent -> white background
    ok("rgba.png", "RGBA PNG (composited on white)", encode(Image.fromarray(rgba), "PNG"), (12, 20))
    la = Image.fromarray(np.dstack([np.full((12, 20), 50, np.uint8), np.full((12, 20), 128, np.uint8)]))
    ok("grey_alpha.png", "greyscale + alpha PNG (LA)", encode(la, "PNG"), (12, 20))
    frames = [Image.new("RGB", (20, 12), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    ok("animated.gif", "animated GIF (first frame)", buf.getvalue(), (12, 20))
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    ok("animated.webp", "animated WebP (first frame)", buf.getvalue(), (12, 20))
    rot = _rgb(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    ok("exif_rotated.jpg", "EXIF-rotated JPEG (orientation 6)", encode(rot, "JPEG", quality=90, exif=exif), (40, 20))
    ok("image.bmp", "BMP", encode(_rgb(20, 12), "BMP"), (12, 20))
    ok("image.tif", "TIFF", encode(_rgb(20, 12), "TIFF"), (12, 20))
    ok("png_named.jpg", "PNG named .jpg", encode(_rgb(20, 12), "PNG"), (12, 20))
    ok("one_pixel.png", "1x1 image", encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), (1, 1))
    ok("thin.png", "very thin image (2000x1)", encode(_rgb(2000, 1), "PNG"), (1, 2000))
    ok("tall_thin.png", "very thin image (1x2000)", encode(_rgb(1, 2000), "PNG"), (2000, 1))
    if large:
        ok("large_6000x4000.jpg", "very large valid JPEG (6000x4000)",
           encode(_rgb(6000, 4000), "JPEG", quality=75), (4000, 6000))
    ok("photo été 写真.png", "non-ASCII file name", encode(_rgb(20, 12, 3), "PNG"), (12, 20))
    ok("with space.jpg", "file name with spaces", encode(_rgb(20, 12, 4), "JPEG"), (12, 20))

    # --- invalid ------------------------------------------------------------------------------
    bad("empty.jpg", "zero-byte file", b"", "empty file")
    jpg = encode(_rgb(64, 48, 5), "JPEG", quality=90)
    bad("truncated.jpg", "truncated JPEG", jpg[: len(jpg) // 2], "truncated")
    png = encode(_rgb(64, 48, 6), "PNG")
    bad("truncated.png", "truncated PNG", png[: len(png) // 2], "truncated")
    bad("text.jpg", "text file named .jpg", b"this is not an image, just some notes\n" * 4, "text file")
    bad("page.png", "HTML page named .png",
        b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>nope</body></html>\n", "HTML")
    bad("random.jpg", "random bytes", np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "not an image")
    os.symlink(d / "does-not-exist.png", d / "dangling.png")
    bad("dangling.png", "dangling symbolic link", None, "dangling symbolic link")
    (d / "unreadable.png").write_bytes(encode(_rgb(20, 12), "PNG"))
    os.chmod(d / "unreadable.png", 0)
    cases["unreadable.png"] = Case("unreadable permissions (chmod 000)", d / "unreadable.png", False,
                                   reason="permission denied", root_skips=True)
    bad("bomb.png", "decompression bomb (40000x40000 claimed, ~100 bytes)", png_bomb(), "decompression bomb")
    return cases


def effective(cases: dict[str, Case]) -> dict[str, Case]:
    """The cases whose outcome holds for the current user (root reads chmod-000 files)."""
    return {k: c for k, c in cases.items() if not (c.root_skips and IS_ROOT)}
