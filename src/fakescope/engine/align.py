"""``data align``: real photos -> aligned real/reconstruction pairs (Rajan et al., ICLR 2025; B-Free, CVPR 2025).

Each real image (or native-scale crop) is passed through a latent-diffusion autoencoder with no denoising;
the real image and its reconstruction are written under the same file name, at the same size and by the
same encoder into ``ROOT/<autoencoder>/{train,val}/{nature,ai}/``, so a detector trained on them can only
learn the autoencoder's trace. Everything about a pair (split, crop box, inpainting mask) is a function of
the seed and the source path alone, so a run is deterministic, and an interrupted run resumes where it
stopped: pairs already recorded in ``ROOT/<autoencoder>/.journal.jsonl`` are never recomputed nor rewritten.
The manifest (:mod:`fakescope.data.pairs`) is written at the end.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from fakescope import __version__
from fakescope.data.io import is_image_path, read_image
from fakescope.data.layout import index_root
from fakescope.data.pairs import MANIFEST, MANIFEST_FORMAT, MANIFEST_VERSION, read_manifest
from fakescope.engine.runtime import resolve_device
from fakescope.errors import DataError, FakescopeError, ImageReadError
from fakescope.models.autoencoders import Autoencoder, create_autoencoder
from fakescope.progress import progress
from fakescope.utils import atomic_write_bytes, slug, write_json

JOURNAL = ".journal.jsonl"
OPTIONS_FILE = ".options.json"
CROP_GRID = 8
"""Crop offsets are multiples of this (the JPEG block grid), so a crop of a JPEG keeps its block alignment."""
INPAINT_MIN, INPAINT_MAX = 0.10, 0.50
KILL_AFTER_ENV = "FAKESCOPE_ALIGN_KILL_AFTER"
"""Test hook: SIGKILL this process after this many pairs are recorded (tests resume after a real kill)."""


@dataclass(frozen=True)
class AlignOptions:
    autoencoder: str
    crop: int | None = None
    crops_per_image: int = 1
    max_side: int | None = None
    format: str = "png"
    val_fraction: float = 0.2
    inpaint: float = 0.0
    limit: int | None = None
    seed: int = 0
    batch_size: int = 8

    def check(self) -> None:
        if not 0 <= self.val_fraction <= 1:
            raise FakescopeError(f"expected --val-fraction in [0, 1], got {self.val_fraction}")
        if not 0 <= self.inpaint <= 1:
            raise FakescopeError(f"expected --inpaint (a probability) in [0, 1], got {self.inpaint}")
        if self.crop is not None and self.crop < CROP_GRID:
            raise FakescopeError(f"expected --crop of at least {CROP_GRID} pixels, got {self.crop}")
        parse_format(self.format)

    def recorded(self) -> dict:
        """The options that decide what is written (not the batch size, limit or device)."""
        d = asdict(self)
        for k in ("batch_size", "limit"):
            d.pop(k)
        return d


def parse_format(spec: str) -> tuple[str, int | None]:
    """``png`` or ``jpeg:Q`` (1 <= Q <= 100) -> (format, quality)."""
    if spec == "png":
        return "png", None
    if spec.startswith("jpeg:"):
        try:
            q = int(spec.split(":", 1)[1])
        except ValueError:
            q = -1
        if 1 <= q <= 100:
            return "jpeg", q
    raise FakescopeError(f"expected --format png or jpeg:Q with 1 <= Q <= 100, got {spec!r}")


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def split_of(source: str, val_fraction: float) -> str:
    """'val' for a ``val_fraction`` share of sources, by a hash of the source path (never by crop)."""
    u = int.from_bytes(_digest(source)[:8], "big") / 2**64
    return "val" if u < val_fraction else "train"


def source_rng(seed: int, source: str, salt: str) -> np.random.Generator:
    """A generator that depends only on (seed, source, salt): the same crops and masks in any order."""
    return np.random.default_rng([int(seed) % 2**63, int.from_bytes(_digest(f"{salt}\0{source}")[:8], "big")])


# --- sources ------------------------------------------------------------------------------------

def collect_sources(srcs: list[str]) -> list[str]:
    """Absolute image paths: a GenImage-layout root contributes its ``nature`` images only; any other
    folder is searched recursively, skipping folders named ``ai``; a file is taken as it is. Sorted,
    without duplicates."""
    out: set[str] = set()
    for s in srcs:
        if not os.path.exists(s):
            raise DataError(f"source not found: {s} (expected a folder of real images or a GenImage root)")
        if os.path.isdir(s):
            try:
                idx = index_root(s)
            except DataError:
                idx = None
            if idx is not None and any(y == 0 for y in idx.labels):
                out.update(idx.abspath(i) for i, y in enumerate(idx.labels) if y == 0)
                continue
        out.update(_real_images(s))
    return sorted(out)


def _real_images(path: str) -> list[str]:
    """Image files under ``path`` (recursively), never inside a folder named ``ai`` (any case): a class
    folder of generated images is not a source of real ones."""
    if not os.path.isdir(path):
        return [os.path.abspath(path)]
    out = []
    for root, dirs, files in os.walk(path, followlinks=False):
        dirs[:] = sorted(d for d in dirs if d.lower() != "ai")
        out.extend(os.path.abspath(os.path.join(root, f)) for f in sorted(files) if is_image_path(f))
    return out


def crop_boxes(width: int, height: int, crop: int | None, k: int, rng: np.random.Generator,
               factor: int) -> list[tuple[int, int, int, int] | None]:
    """``k`` native-scale ``crop x crop`` boxes (left, top, w, h) with offsets on the 8-px grid; a side
    shorter than ``crop`` is taken whole (rounded down to the autoencoder's factor when it can be).
    ``[None]`` (the whole image) without ``crop``."""
    if crop is None:
        return [None]
    boxes = []
    cw, ch = min(crop, width), min(crop, height)
    cw, ch = (cw - cw % factor) or cw, (ch - ch % factor) or ch
    for _ in range(k):
        left = CROP_GRID * int(rng.integers(0, (width - cw) // CROP_GRID + 1))
        top = CROP_GRID * int(rng.integers(0, (height - ch) // CROP_GRID + 1))
        boxes.append((left, top, cw, ch))
    return boxes


def inpaint_mask(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of rectangles and elliptic blobs covering 10-50 % of the area (B-Free's partial fakes)."""
    area = height * width
    target = rng.uniform(INPAINT_MIN, INPAINT_MAX)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(20):
        m = np.zeros((height, width), dtype=bool)
        while m.mean() < target:
            s = np.sqrt(area * rng.uniform(0.05, 0.3))  # one shape's side, 5-30 % of the area as a square
            aspect = np.exp(rng.uniform(-0.7, 0.7))
            h = int(np.clip(s / aspect, 2, height))
            w = int(np.clip(s * aspect, 2, width))
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            if rng.random() < 0.5:
                m[top:top + h, left:left + w] = True
            else:
                cy, cx = top + h / 2, left + w / 2
                m |= ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1
        if INPAINT_MIN <= m.mean() <= INPAINT_MAX:
            return m
    h = max(1, int(round(height * np.sqrt(target))))  # shapes kept overshooting: one rectangle of the target area
    w = min(width, max(1, int(round(target * area / h))))
    m = np.zeros((height, width), dtype=bool)
    m[:h, :w] = True
    return m


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def encode_image(hwc: np.ndarray, fmt: str, quality: int | None) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(hwc)
    if fmt == "png":
        im.save(buf, format="PNG")
    else:
        im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --- the run -------------------------------------------------------------------------------------

@dataclass
class _Item:
    source: str
    name: str
    split: str
    crop: list[int] | None
    image: torch.Tensor  # uint8 [3, H, W]


def _pair_name(source: str, k: int | None, ext: str) -> str:
    stem = slug(Path(source).stem)[:60]
    tag = hashlib.sha256(source.encode("utf-8")).hexdigest()[:10]
    return f"{stem}-{tag}" + (f"-c{k}" if k is not None else "") + ext


def _items_of(source: str, opts: AlignOptions, factor: int, ext: str) -> list[_Item]:
    img = read_image(source)
    if opts.max_side and max(img.shape[-2:]) > opts.max_side:
        h, w = img.shape[-2:]
        s = opts.max_side / max(h, w)
        img = TF.resize(img, [max(1, round(h * s)), max(1, round(w * s))], antialias=True)
    h, w = img.shape[-2:]
    split = split_of(source, opts.val_fraction)
    boxes = crop_boxes(w, h, opts.crop, opts.crops_per_image, source_rng(opts.seed, source, "crop"), factor)
    items = []
    for k, box in enumerate(boxes):
        if box is None:
            items.append(_Item(source, _pair_name(source, None, ext), split, None, img))
        else:
            left, top, cw, ch = box
            items.append(_Item(source, _pair_name(source, k, ext), split, list(box),
                               img[:, top:top + ch, left:left + cw].contiguous()))
    return items


def _read_journal(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill: that pair is simply redone
            done[rec["name"]] = rec
    return done


class AlignRun:
    """One ``data align`` run into ``out/<autoencoder>/``."""

    def __init__(self, sources: list[str], out: str, opts: AlignOptions, *, weights: str | None = None,
                 device: str = "auto", autoencoder: Autoencoder | None = None, reuse: str | None = None) -> None:
        opts.check()
        self.opts = opts
        self.fmt, self.quality = parse_format(opts.format)
        self.ext = ".png" if self.fmt == "png" else ".jpg"
        self.device = resolve_device(device)
        self.ae = autoencoder if autoencoder is not None else create_autoencoder(opts.autoencoder, weights)
        self.ae.to(self.device)
        # measured on this project's shared 2-core Xeon CPU (benchmarks/bench_align.py, taef2, 8 crops of 256 px):
        # fp32 + channels_last 2.03 pairs/s, fp32 1.33, bf16 autocast + channels_last 1.79 (load 3); 0.50, 0.24,
        # 0.42 (load 6-11): bf16 is slower here, so fp32 + channels_last on every device.
        self.ae.to(memory_format=torch.channels_last)
        self.dir = Path(out) / opts.autoencoder
        self.sources = sources
        self.weights = weights
        self.reuse_dir, self.reused = self._reusable(reuse) if reuse else (None, {})

    def _reusable(self, reuse: str) -> tuple[str, dict[str, str]]:
        """``{name stem: path of its reconstruction}`` in an earlier aligned root made with the same weights,
        crops, max side and seed, as lossless PNG; only its pairs without inpainting (pure reconstructions)."""
        gen = Path(reuse)
        if not (gen / MANIFEST).is_file() and (gen / self.opts.autoencoder / MANIFEST).is_file():
            gen = gen / self.opts.autoencoder
        m = read_manifest(gen)
        if m is None:
            raise FakescopeError(f"--reuse {reuse}: expected a root made by fakescope data align (with "
                                 f"{self.opts.autoencoder}/{MANIFEST}), found no manifest")
        o = m["options"]
        want = {"weights_sha256": self.ae.weights_sha256, "crop": self.opts.crop, "max_side": self.opts.max_side,
                "crops_per_image": self.opts.crops_per_image, "seed": self.opts.seed, "format": "png"}
        have = {**{k: o.get(k) for k in want}, "weights_sha256": m.get("weights_sha256")}
        diff = sorted(k for k in want if want[k] != have[k])
        if diff:
            raise FakescopeError(f"--reuse {reuse}: expected a PNG root made with the same weights, --crop, "
                                 f"--crops-per-image, --max-side and --seed; {', '.join(diff)} differ")
        return str(gen), {Path(p["name"]).stem: os.path.join(str(gen), p["split"], "ai", p["name"])
                          for p in m["pairs"] if p.get("inpaint_box") is None}

    def _reused_reconstruction(self, it: _Item) -> np.ndarray | None:
        path = self.reused.get(Path(it.name).stem)
        if path is None:
            return None
        try:
            arr = np.asarray(Image.open(path).convert("RGB"))
        except OSError:
            return None
        return arr if arr.shape[:2] == tuple(it.image.shape[-2:]) else None

    def _check_options(self) -> None:
        f = self.dir / OPTIONS_FILE
        rec = {**self.opts.recorded(), "weights_sha256": self.ae.weights_sha256}
        if f.is_file():
            try:
                old = json.loads(f.read_text())
            except ValueError:
                old = None
            if old is not None and old != rec:
                diff = sorted(k for k in set(old) | set(rec) if old.get(k) != rec.get(k))
                raise FakescopeError(f"{self.dir} was made with other options ({', '.join(diff)} differ): "
                                     f"expected the same options to resume, or another --out")
        write_json(f, rec)

    @torch.no_grad()
    def _reconstruct(self, batch: list[_Item]) -> list[np.ndarray]:
        x = torch.stack([it.image for it in batch]).to(self.device).float().div_(255)
        x = x.contiguous(memory_format=torch.channels_last)
        y = self.ae.reconstruct(x)
        return list(y.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())

    def _finish(self, it: _Item, recon: np.ndarray) -> dict:
        real = it.image.permute(1, 2, 0).numpy()
        fake = recon
        box = None
        rng = source_rng(self.opts.seed, f"{it.name}", "inpaint")
        if self.opts.inpaint > 0 and rng.random() < self.opts.inpaint:
            m = inpaint_mask(real.shape[0], real.shape[1], rng)
            fake = np.where(m[..., None], recon, real)
            box = _bbox(m)
        for cls, arr in (("nature", real), ("ai", fake)):
            atomic_write_bytes(self.dir / it.split / cls / it.name, encode_image(arr, self.fmt, self.quality))
        return {"name": it.name, "split": it.split, "source": it.source, "crop": it.crop, "inpaint_box": box,
                "psnr": round(psnr(real, fake), 4), "size": [int(real.shape[1]), int(real.shape[0])]}

    def run(self) -> dict:
        """Align every source not yet in the journal, then write and return the manifest."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._check_options()
        journal_path = self.dir / JOURNAL
        done = _read_journal(journal_path)
        t0 = time.perf_counter()
        bar = progress(None, desc=f"align {self.opts.autoencoder}", total=len(self.sources), unit="src")
        with open(journal_path, "a", encoding="utf-8") as f:
            journal = _Journal(f, done, bar, t0)
            unreadable = self._align_sources(journal)
        bar.close()
        manifest = self._manifest(done, unreadable, journal.written, time.perf_counter() - t0)
        write_json(self.dir / MANIFEST, manifest)
        return manifest

    def _align_sources(self, journal: _Journal) -> list[dict]:
        """Pass each source's pairs not yet done through the autoencoder, in batches of one size; a source
        whose every pair is done is not even decoded. Returns the sources that could not be read."""
        unreadable: list[dict] = []
        pending: dict[tuple[int, int], list[_Item]] = {}
        for src in self.sources:
            ks = range(self.opts.crops_per_image) if self.opts.crop is not None else [None]
            if all(_pair_name(src, k, self.ext) in journal.done for k in ks):  # finished: not even decoded
                journal.bar.update(1)
                continue
            try:
                items = _items_of(src, self.opts, self.ae.spec.factor, self.ext)
            except ImageReadError as e:
                unreadable.append({"path": src, "error": e.reason})
                journal.bar.update(1)
                continue
            for it in items:
                self._queue(it, journal, pending)
            journal.bar.update(1)
        bs = self.opts.batch_size
        for key in list(pending):
            group = pending.pop(key)
            for i in range(0, len(group), bs):
                self._flush(group[i:i + bs], journal)
        return unreadable

    def _queue(self, it: _Item, journal: _Journal, pending: dict[tuple[int, int], list[_Item]]) -> None:
        """Record ``it`` at once from a reused reconstruction, else queue it with the items of its size
        (a full batch is passed through the autoencoder); nothing for an item already done."""
        if it.name in journal.done:
            return
        recon = self._reused_reconstruction(it) if self.reused else None
        if recon is not None:
            journal.record(it.name, self._finish(it, recon))
            return
        key = tuple(it.image.shape[-2:])
        pending.setdefault(key, []).append(it)
        if len(pending[key]) >= self.opts.batch_size:
            self._flush(pending.pop(key), journal)

    def _flush(self, group: list[_Item], journal: _Journal) -> None:
        """Reconstruct one batch of same-size items, write and record each pair."""
        for it, recon in zip(group, self._reconstruct(group)):
            journal.record(it.name, self._finish(it, recon))

    def _manifest(self, done: dict[str, dict], unreadable: list[dict], written: int, seconds: float) -> dict:
        """The manifest of the root: every pair on disk, this run's and earlier runs' (resume, ``--limit``)."""
        pairs = [done[n] for n in sorted(done)]
        return {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "autoencoder": self.opts.autoencoder,
            "autoencoder_spec": self.ae.spec.to_json(), "weights_sha256": self.ae.weights_sha256,
            "weights": self.ae.weights_source,
            "options": {**self.opts.recorded(), "limit": self.opts.limit, "batch_size": self.opts.batch_size,
                        "device": str(self.device), "reuse": self.reuse_dir},
            "fakescope_version": __version__, "sources": len(self.sources), "unreadable": unreadable,
            "counts": {s: sum(p["split"] == s for p in pairs) for s in ("train", "val")},
            "new_pairs": written, "seconds": round(seconds, 3),
            "pairs_per_s": round(written / seconds, 4) if seconds > 0 and written else None,
            "mean_psnr": round(float(np.mean([p["psnr"] for p in pairs if np.isfinite(p["psnr"])])), 4)
            if pairs else None,
            "pairs": pairs,
        }


class _Journal:
    """A run's open journal: each finished pair is appended and fsynced at once, so a killed run loses at
    most the pair being written. Counts the pairs written and shows the rate on the progress bar."""

    def __init__(self, file, done: dict[str, dict], bar, t0: float) -> None:
        self.file = file
        self.done = done
        self.bar = bar
        self.t0 = t0
        self.written = 0
        self.kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)

    def record(self, name: str, rec: dict) -> None:
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.done[name] = rec
        self.written += 1
        if self.kill_after and self.written >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        self.bar.set_postfix_str(f"{self.written / (time.perf_counter() - self.t0):.2f} pairs/s, "
                                 f"{self.written} new", refresh=False)


def align(srcs: list[str], out: str, opts: AlignOptions, *, weights: str | None = None, device: str = "auto",
          autoencoder: Autoencoder | None = None, reuse: str | None = None) -> dict:
    """Build (or resume) the aligned root ``out/<autoencoder>`` from the real images of ``srcs``; returns the
    manifest. ``reuse``: an earlier PNG root of the same weights, crops and seed whose reconstructions are
    read instead of recomputed (an ``--inpaint`` or ``--format`` variant of it costs no autoencoder pass)."""
    opts.check()
    sources = collect_sources(srcs)
    if not sources:
        raise DataError(f"no images found in {', '.join(srcs)}: expected folders of real photos or a GenImage root")
    if opts.limit is not None and opts.limit < len(sources):
        rng = np.random.default_rng(int(opts.seed) % 2**63)
        sources = sorted(sources[i] for i in rng.choice(len(sources), opts.limit, replace=False))
    return AlignRun(sources, out, opts, weights=weights, device=device, autoencoder=autoencoder, reuse=reuse).run()
