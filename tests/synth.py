"""Small datasets generated in code, for tests: learnable, deterministic, tiny."""

from __future__ import annotations

import tarfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAKE_TAR = SHARED / "data" / "cifake_sdv14.tar"
PHOTOS_TAR = SHARED / "data" / "real_photos_misc.tar"
LITE0_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0_imagenet.safetensors"


@contextmanager
def quiet_single_thread(tmp: Path):
    """For module fixtures that train: one torch thread (the arithmetic of the subprocess tests), a
    cache folder of their own under ``tmp`` and no progress bars; everything restored afterwards."""
    import pytest
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FAKESCOPE_CACHE_DIR", str(tmp / "cache"))
            mp.setenv("FAKESCOPE_PROGRESS", "0")
            yield
    finally:
        torch.set_num_threads(threads)


def synthetic_image(label: int, rng: np.random.Generator, size: int = 32, strength: float = 0.12) -> np.ndarray:
    """'nature' (0): smooth colour gradients; 'ai' (1): the same plus a faint periodic grid (an
    up-sampling trace). Separable by a small CNN, not by mean colour."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.clip(rng.uniform(0.2, 0.8) + rng.uniform(-0.3, 0.3) * xx + rng.uniform(-0.3, 0.3) * yy, 0, 1)
                     for _ in range(3)], axis=-1)
    base += rng.normal(0, 0.02, base.shape)
    if label == 1:
        grid = ((np.arange(size)[:, None] % 2) ^ (np.arange(size)[None, :] % 2)).astype(float)
        base += strength * (grid[..., None] - 0.5)
    return (np.clip(base, 0, 1) * 255).round().astype(np.uint8)


def make_dataset(root: Path, generators=("alpha", "beta"), n_train: int = 40, n_val: int = 16, size: int = 32,
                 single: bool = False, seed: int = 0, fmt: str = "png", strength: float = 0.12) -> Path:
    """``root/<gen>/{train,val}/{ai,nature}/*.png`` (or ``root/{train,val}/...`` when ``single``)."""
    rng = np.random.default_rng(seed)
    for gen in ([None] if single else generators):
        for split, n in (("train", n_train), ("val", n_val)):
            if n == 0:
                continue
            for label, cls in ((0, "nature"), (1, "ai")):
                d = root / split / cls if gen is None else root / gen / split / cls
                d.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    Image.fromarray(synthetic_image(label, rng, size, strength)).save(d / f"{i:04d}.{fmt}")
    return root


def make_pattern_root(root: Path, generators=("checker", "stripes"), train: int = 24, val: int = 8, size: int = 32,
                      seed: int = 0, nature_format: str = "JPEG", strength: float = 10) -> Path:
    """``root/<generator>/{train,val}/{nature, ai}``: smooth random images, 'nature' saved as JPEG
    (GenImage's real images; PNG with ``nature_format="PNG"``) and 'ai' as PNG with a
    generator-specific periodic pattern (checkerboard or stripes, of amplitude ``strength``), like
    GenImage's AI images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    patterns = {"checker": ((yy + xx) % 2) * 2 - 1, "stripes": (xx % 4 < 2) * 2 - 1}
    for g in generators:
        for split, n in (("train", train), ("val", val)):
            for cls in ("nature", "ai"):
                d = root / g / split / cls
                d.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    low = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
                    img = np.asarray(Image.fromarray(low).resize((size, size), Image.BILINEAR), dtype=np.float64)
                    img = img + rng.normal(0, 4, (size, size, 3))
                    if cls == "ai":
                        img += strength * patterns[g][..., None]
                    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
                    if cls == "nature" and nature_format == "JPEG":
                        im.save(d / f"{i:03d}.jpg", quality=90)
                    else:
                        im.save(d / f"{i:03d}.png")
    return root


def extract_cifake(dest: Path, per_class_train: int, per_class_val: int) -> Path:
    """The first N members of each CIFAKE folder (the tar is read once, sequentially)."""
    want = {("train", "ai"): per_class_train, ("train", "nature"): per_class_train,
            ("val", "ai"): per_class_val, ("val", "nature"): per_class_val}
    got = dict.fromkeys(want, 0)
    with tarfile.open(CIFAKE_TAR) as tar:
        for m in tar:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) < 4:
                continue
            key = (parts[-3], parts[-2])
            if key in want and got[key] < want[key]:
                tar.extract(m, dest, filter="data")
                got[key] += 1
            if got == want:
                break
    return dest / "cifake_sdv14"


def make_run(run_dir: Path, name: str = "cnn32", options: dict | None = None, native_size: int | None = None,
             seed: int = 0) -> Path:
    """A run directory (config.json + model.safetensors) holding a model with random weights: no training."""
    import torch

    from fakescope.engine import checkpoint as ckpt
    from fakescope.models import create_model

    options = {**({} if name == "cnn32" else {"pretrained": False}), **(options or {})}
    torch.manual_seed(seed)
    model = create_model(name, **options)
    ckpt.write_config(run_dir, {"model": {"name": name, "options": options}, "native_size": native_size})
    ckpt.save_tensors(Path(run_dir) / ckpt.WEIGHTS, model.state_dict())
    return Path(run_dir)


def assert_close(a, b, *, rtol: float = 1e-5, atol: float = 1e-6, path: str = "") -> None:
    """``a == b`` for JSON-like results (dicts, lists, numbers, strings, None), floats within a tolerance:
    for the same numbers computed along different paths (batch sizes, thread counts, padding, ranks),
    where PyTorch promises no bit-identical results. Integers, strings and keys must match exactly."""
    import math

    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), (path, sorted(set(a) ^ set(b)))
        for k in a:
            assert_close(a[k], b[k], rtol=rtol, atol=atol, path=f"{path}.{k}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b), (path, len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, rtol=rtol, atol=atol, path=f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), (path, a, b)
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rtol, abs_tol=atol), (path, a, b)
    else:
        assert a == b, (path, a, b)


def accuracy_on(run_dir, data, *, split: str = "val", limit: int | None = None) -> tuple[float, int]:
    """``(accuracy, n)`` of ``predict`` on a split (``limit`` images per generator and class, as the
    attack's ``--limit`` picks them): an independent reference for what attack and benchmark report."""
    from fakescope.data.layout import index_root, limit_per_class
    from fakescope.engine.evaluation import predict_paths

    index = index_root(data).select(None, split)
    if limit:
        index = limit_per_class(index, limit)
    rows = predict_paths(run_dir, [index.abspath(i) for i in range(len(index))], provenance=False)
    right = sum((r["verdict"] == "ai") == bool(y) for r, y in zip(rows, index.labels))
    return right / len(rows), len(rows)
