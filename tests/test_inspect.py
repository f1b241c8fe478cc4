"""``data inspect`` warnings about shortcuts in the data: the classes' image sizes and local detail."""

import numpy as np
import pytest
from PIL import Image

from fakescope.data.inspect import inspect_index
from fakescope.data.layout import index_root


def _root(tmp_path, sizes: dict[str, list[tuple[int, int]]], gen: str = "gen"):
    rng = np.random.default_rng(0)
    for cls, whs in sizes.items():
        d = tmp_path / gen / "train" / cls
        d.mkdir(parents=True, exist_ok=True)
        for i, (w, h) in enumerate(whs):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    return tmp_path


def _size_warnings(root):
    info = inspect_index(index_root(root, use_cache=False), num_workers=0)
    return [w for w in info["warnings"] if w.startswith("size shortcut")], info


VARIED = [(40, 56), (64, 48), (72, 54), (50, 80), (44, 44), (90, 60), (60, 90), (48, 64), (70, 52), (56, 42)]


def test_fixed_size_ai_against_varied_nature_is_a_shortcut(tmp_path):
    """Like ../shared/data/multigen.tar: every AI image is 512x512, real photos come in many sizes."""
    warn, info = _size_warnings(_root(tmp_path, {"ai": [(48, 48)] * 10, "nature": VARIED}))
    assert len(warn) == 1 and "gen: 100% of 'ai' images are 48x48 against 0% of 'nature' images" in warn[0], warn
    assert info["sizes"]["by_class"]["ai"] == {"48x48": 10}
    assert sum(info["sizes"]["by_class"]["nature"].values()) == 5  # the five most common


def test_fixed_size_nature_is_a_shortcut_too(tmp_path):
    warn, _ = _size_warnings(_root(tmp_path, {"ai": VARIED, "nature": [(48, 48)] * 9 + [(40, 56)]}))
    assert len(warn) == 1 and "90% of 'nature' images are 48x48 against 0% of 'ai'" in warn[0], warn


def test_larger_ai_images_are_a_shortcut(tmp_path):
    warn, _ = _size_warnings(_root(tmp_path, {"ai": [(w * 2, h * 2) for w, h in VARIED], "nature": VARIED}))
    assert len(warn) == 1 and "median shorter side 'ai' 98, 'nature' 49" in warn[0], warn


@pytest.mark.parametrize("ai,nature", [([(32, 32)] * 6, [(32, 32)] * 6),  # CIFAKE: one size for both
                                       (VARIED, VARIED[::-1]),  # the same spread of sizes
                                       ([(48, 48)] * 6, [(48, 48)] * 4 + [(40, 56), (64, 48)])])
def test_matching_sizes_are_not_flagged(tmp_path, ai, nature):
    warn, _ = _size_warnings(_root(tmp_path, {"ai": ai, "nature": nature}))
    assert warn == []


def test_generators_are_checked_separately_and_named_together(tmp_path):
    _root(tmp_path, {"ai": [(48, 48)] * 5, "nature": VARIED[:5]}, gen="one")
    _root(tmp_path, {"ai": [(48, 48)] * 5, "nature": VARIED[5:]}, gen="two")
    _root(tmp_path, {"ai": VARIED[:5], "nature": VARIED[:5]}, gen="three")
    warn, _ = _size_warnings(tmp_path)
    assert len(warn) == 1 and "one, two: 100% of 'ai' images are 48x48" in warn[0] and "three" not in warn[0]


def _detail_root(tmp_path, ai_noise: float, nature_noise: float, n: int = 12):
    """Both classes 64x64 gradients with added noise of the given strength (grey levels)."""
    rng = np.random.default_rng(1)
    ramp = np.linspace(40, 200, 64)[None, :, None] + np.zeros((64, 1, 3))
    for cls, noise in (("ai", ai_noise), ("nature", nature_noise)):
        d = tmp_path / "gen" / "train" / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = ramp + rng.normal(0, noise, ramp.shape) + rng.uniform(-20, 20)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i:03d}.png")
    return tmp_path


def _detail_warnings(root):
    info = inspect_index(index_root(root, use_cache=False), num_workers=0)
    return [w for w in info["warnings"] if w.startswith("detail shortcut")], info


def test_smooth_ai_against_cluttered_nature_is_a_detail_shortcut(tmp_path):
    """Like multigen: clean renders against cluttered snapshots (smooth real photos then look AI)."""
    warn, info = _detail_warnings(_detail_root(tmp_path, ai_noise=2, nature_noise=12))
    d = info["local_detail"]
    assert d["roc_auc"] == 0.0 and d["ai"]["n"] == d["nature"]["n"] == 12  # every 'ai' image smoother
    assert d["ai"]["median"] < d["nature"]["median"]
    assert len(warn) == 1 and "ROC-AUC 1.00" in warn[0] and "'ai' images are smoother" in warn[0], warn
    assert "call smooth real photos AI" in warn[0]


def test_the_same_detail_in_both_classes_is_not_flagged(tmp_path):
    warn, info = _detail_warnings(_detail_root(tmp_path, ai_noise=8, nature_noise=8))
    assert warn == [] and 0.25 < info["local_detail"]["roc_auc"] < 0.75


def test_local_detail_is_the_mean_absolute_laplacian_of_the_centre_square():
    import torch

    from fakescope.data.inspect import local_detail

    flat = torch.full((3, 300, 400), 90, dtype=torch.uint8)
    assert local_detail(flat) == 0.0
    dots = flat.clone()
    dots[:, ::2, ::2] = 100  # by hand: |Laplacian| 40 on a dot, 20 beside one, 0 diagonal to one: mean 20
    assert local_detail(dots) == pytest.approx(20.0)
    dots[:, :10] = 0  # outside the centre 256-px square: no effect
    assert local_detail(dots) == pytest.approx(20.0)
