"""ImageDataset and typical_size: which failures become a listed bad file, and which stop the run."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fakescope.data import transforms
from fakescope.data.dataset import ImageDataset
from fakescope.data.transforms import Pipeline


def _png(path, w, h, value=100):
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)
    return str(path)


def test_unreadable_file_is_an_error_item(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"<html>not an image</html>")
    ds = ImageDataset([_png(tmp_path / "ok.png", 8, 8), str(tmp_path / "bad.png")], Pipeline(8))
    assert ds[0]["image"].shape == (3, 8, 8)
    assert "not an image" in ds[1]["error"]


def test_a_bug_in_a_transform_propagates(tmp_path, monkeypatch):
    files = [_png(tmp_path / "ok.png", 8, 8)]

    def boom(img, size):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(transforms, "fit", boom)
    with pytest.raises(RuntimeError, match="out of memory"):
        ImageDataset(files, Pipeline(8))[0]
    monkeypatch.setattr(transforms, "fit", lambda img, size: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        ImageDataset(files, Pipeline(8))[0]


def test_an_image_jpeg_cannot_hold_is_a_bad_file_not_a_crash(tmp_path):
    """torchvision's JPEG encoder kills the process on a side over 65500 pixels: refused first."""
    wide = _png(tmp_path / "wide.png", 65536, 1)
    item = ImageDataset([wide], Pipeline(8, jpeg_align=90))[0]
    assert "error" in item and "65536x1" in item["error"] and "JPEG" in item["error"]
    assert ImageDataset([wide], Pipeline(8))[0]["image"].shape == (3, 8, 8)  # no JPEG step: fine


def test_downscale_to_one_pixel_works(tmp_path):
    """A 2x2 image degraded by resize 0.25 is 1x1 (torch's uint8 kernel fails on that size)."""
    item = ImageDataset([_png(tmp_path / "tiny.png", 2, 2, 77)], Pipeline(4, degrade=("resize", 0.25)))[0]
    assert "image" in item and item["image"].dtype == torch.uint8
    assert (item["image"] == 77).all()


def test_typical_size_does_not_depend_on_where_the_data_lives(tmp_path, monkeypatch):
    """The sample is chosen by path relative to the data, so moving the data keeps the same files."""
    from fakescope.data import dataset

    first = tmp_path / "a" / "data"
    for i in range(40):
        d = first / ("ai" if i % 2 else "nature")
        d.mkdir(parents=True, exist_ok=True)
        _png(d / f"{i:03d}.png", 20 + i, 30 + i)
    probed = []
    real_probe = dataset.probe_image
    monkeypatch.setattr(dataset, "probe_image", lambda f, *a: probed.append(f) or real_probe(f, *a))
    results, samples = [], []
    where = first
    for dest in ("b/data", "c/deeper/still/data", "d/x"):
        files = sorted(str(p) for p in where.rglob("*.png"))
        probed.clear()
        results.append(dataset.typical_size(files, sample=5))
        samples.append(sorted(str(Path(p).relative_to(where)) for p in probed))
        new = tmp_path / dest
        new.parent.mkdir(parents=True, exist_ok=True)
        where = where.rename(new)
    assert len(samples[0]) == 5 and samples.count(samples[0]) == 3  # the same 5 of 40 files each time
    assert results.count(results[0]) == 3
    files = sorted(str(p) for p in where.rglob("*.png"))
    assert dataset.typical_size(files, sample=5, root=str(where)) == results[0]
