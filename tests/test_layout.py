import os
import time

import pytest

from fakescope.data import layout
from fakescope.data.layout import canonical_generator, carve_validation, index_root, limit_per_class
from fakescope.errors import DataError

from synth import make_dataset


def _touch(p, name="x.png"):
    p.mkdir(parents=True, exist_ok=True)
    (p / name).write_bytes(b"not decoded by the index")


def test_indexing_labels_ai_folders_positive(tmp_path):
    """The label map reaches the index: every file under ai/ (any case) is 1, under nature/ is 0."""
    _touch(tmp_path / "train" / "AI", "a.png")
    _touch(tmp_path / "train" / "AI", "b.png")
    _touch(tmp_path / "train" / "Nature", "c.png")
    idx = index_root(tmp_path, use_cache=False)
    by_name = {os.path.basename(p): y for p, y in zip(idx.paths, idx.labels)}
    assert by_name == {"a.png": 1, "b.png": 1, "c.png": 0}
    assert idx.counts() == {tmp_path.name: {"train": {"nature": 1, "ai": 2}}}


def test_two_folders_for_one_class_are_an_error(tmp_path):
    _touch(tmp_path / "train" / "ai", "a.png")
    _touch(tmp_path / "train" / "AI", "b.png")  # a case-sensitive file system keeps both
    _touch(tmp_path / "train" / "nature", "c.png")
    with pytest.raises(DataError, match="'AI' and 'ai'"):
        index_root(tmp_path, use_cache=False)


@pytest.mark.parametrize("folder,canon", [
    ("Midjourney", "midjourney"), ("imagenet_midjourney", "midjourney"),
    ("Stable Diffusion V1.4", "sd14"), ("stable_diffusion_v_1_4", "sd14"), ("imagenet_ai_0419_sdv4", "sd14"),
    ("Stable Diffusion V1.5", "sd15"), ("imagenet_ai_0424_sdv5", "sd15"),
    ("ADM", "adm"), ("imagenet_ai_0508_adm", "adm"), ("GLIDE", "glide"), ("imagenet_glide", "glide"),
    ("Wukong", "wukong"), ("imagenet_ai_0424_wukong", "wukong"), ("VQDM", "vqdm"),
    ("imagenet_ai_0419_vqdm", "vqdm"), ("BigGAN", "biggan"), ("imagenet_ai_0419_biggan", "biggan"),
])
def test_genimage_names_map_to_canonical(folder, canon):
    assert canonical_generator(folder) == canon


def test_genimage_layout_with_readme_inner_and_plain_names(tmp_path):
    _touch(tmp_path / "Stable Diffusion V1.4" / "train" / "ai")
    _touch(tmp_path / "Stable Diffusion V1.4" / "train" / "nature")
    _touch(tmp_path / "BigGAN" / "imagenet_ai_0419_biggan" / "val" / "ai", "a.JPG")  # nested inner folder
    _touch(tmp_path / "BigGAN" / "imagenet_ai_0419_biggan" / "val" / "nature", "b.JPEG")
    _touch(tmp_path / "imagenet_glide" / "val" / "Nature", "c.WebP")
    _touch(tmp_path / "my_gan" / "train" / "ai", "d.tiff")
    (tmp_path / "my_gan" / "train" / "ai" / "notes.txt").write_text("ignored")
    idx = index_root(tmp_path, use_cache=False)
    assert idx.layout == "genimage"
    assert idx.generator_names == ["biggan", "glide", "my_gan", "sd14"]
    assert len(idx) == 6
    rows = {(g, s, y) for g, s, y in zip(idx.generators, idx.splits, idx.labels)}
    assert ("biggan", "val", 1) in rows and ("glide", "val", 0) in rows and ("sd14", "train", 0) in rows


def test_single_generator_layout_and_eval_only_root(tmp_path):
    root = tmp_path / "cifake_sdv14"
    _touch(root / "val" / "ai")
    _touch(root / "val" / "nature")
    idx = index_root(root, use_cache=False)
    assert idx.layout == "single" and idx.generator_names == ["cifake_sdv14"]
    assert idx.select(split="val").splits == ["val", "val"]
    with pytest.raises(DataError, match="has no 'train' split"):
        idx.select(split="train")


def test_unknown_layout_names_the_expected_ones(tmp_path):
    _touch(tmp_path / "images")
    with pytest.raises(DataError, match=r"ROOT/<generator>/\{train,val\}/\{ai,nature\}"):
        index_root(tmp_path, use_cache=False)
    with pytest.raises(DataError, match="not found"):
        index_root(tmp_path / "missing")


def test_select_generators_by_canonical_or_folder_name(tmp_path):
    for g in ("ADM", "imagenet_glide"):
        _touch(tmp_path / g / "train" / "ai")
        _touch(tmp_path / g / "train" / "nature")
    idx = index_root(tmp_path, use_cache=False)
    assert set(idx.select(["ADM"]).generators) == {"adm"}
    assert set(idx.select(["glide"]).generators) == {"glide"}
    with pytest.raises(DataError, match="expected one of adm, glide"):
        idx.select(["biggan"])


def test_index_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    make_dataset(tmp_path, n_train=3, n_val=2)
    first = index_root(tmp_path)
    monkeypatch.setattr(layout, "_scan", lambda root: (_ for _ in ()).throw(AssertionError("rescanned")))
    assert index_root(tmp_path).paths == first.paths  # served from the cache
    monkeypatch.undo()
    time.sleep(0.01)
    (tmp_path / "alpha" / "train" / "ai" / "new.png").write_bytes(b"x")
    again = index_root(tmp_path)
    assert len(again) == len(first) + 1


def test_index_does_not_open_images(tmp_path, monkeypatch):
    make_dataset(tmp_path, n_train=3, n_val=2)
    import PIL.Image

    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("opened")))
    assert len(index_root(tmp_path, use_cache=False)) == 2 * 2 * (3 + 2)


def test_validation_carve_is_deterministic_disjoint_and_stratified(tmp_path):
    make_dataset(tmp_path, n_train=30, n_val=0)
    idx = index_root(tmp_path, use_cache=False).select(split="train")
    tr, va = carve_validation(idx, 0.1)
    tr2, va2 = carve_validation(idx, 0.1)
    assert va.paths == va2.paths and tr.paths == tr2.paths
    assert not set(tr.paths) & set(va.paths)
    assert len(tr) + len(va) == len(idx)
    for g in ("alpha", "beta"):
        for y in (0, 1):
            assert sum(1 for gg, yy in zip(va.generators, va.labels) if gg == g and yy == y) == 3
    # adding files elsewhere does not move existing validation files
    os.remove(tmp_path / "beta" / "train" / "ai" / "0000.png")
    _, va3 = carve_validation(index_root(tmp_path, use_cache=False).select(split="train"), 0.1)
    assert {p for p in va.paths if p.startswith("alpha")} == {p for p in va3.paths if p.startswith("alpha")}


def test_limit_per_class(tmp_path):
    make_dataset(tmp_path, n_train=10, n_val=4)
    idx = limit_per_class(index_root(tmp_path, use_cache=False), 3)
    assert len(idx) == 2 * 2 * 2 * 3


def test_two_folders_for_one_split_are_an_error(tmp_path):
    _touch(tmp_path / "Train" / "ai", "a.png")
    _touch(tmp_path / "train" / "nature", "b.png")
    with pytest.raises(DataError, match="'Train' and 'train'"):
        index_root(tmp_path, use_cache=False)
