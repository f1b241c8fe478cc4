"""Training on aligned pairs: the manifest reader, the pair-aware carve, --paired batches (Sync),
several data roots and the aligned-crops recipe. Fixtures are written here (a manifest and tiny
images), independent of `data align`."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fakescope.cli import main
from fakescope.data.layout import carve_validation, index_root, limit_per_class, pair_groups
from fakescope.data.pairs import read_pairs
from fakescope.data.transforms import Augment, Pipeline
from fakescope.engine.calibrate import holdout_index
from fakescope.engine.train import TrainOptions, _epoch_order, _load_splits, _partners, train
from fakescope.errors import DataError

from synth import make_dataset, synthetic_image


def make_aligned(root: Path, ae: str = "taefx", sources: int = 12, crops: int = 2, size: int = 40,
                 identity: bool = False, coords: bool = False, seed: int = 0, val_sources: int = 2) -> Path:
    """``root/<ae>/{train,val}/{nature,ai}/`` + manifest.json: ``crops`` pairs per source photo.

    ``identity``: the "reconstruction" has the real image's pixels (an identity autoencoder);
    ``coords``: each pixel's R, G hold its column and row (B: 0 real, 255 fake), so any crop and flip
    can be read back from the pixels; else real = smooth noise, fake = the same plus a faint grid."""
    rng = np.random.default_rng(seed)
    gen = root / ae
    pairs = []
    for s in range(sources):
        split = "val" if s < val_sources else "train"
        src = f"/photos/src{s:03d}.jpg"
        for c in range(crops):
            name = f"src{s:03d}_{c}.png"
            if coords:
                yy, xx = np.mgrid[0:size, 0:size]
                real = np.stack([xx * 5 % 256, yy * 5 % 256, np.zeros_like(xx)], -1).astype(np.uint8)
                fake = real.copy()
                fake[..., 2] = 255
            else:
                real = synthetic_image(0, rng, size)
                fake = real.copy() if identity else synthetic_image(1, np.random.default_rng(s * 100 + c), size)
                if not identity:  # a reconstruction close to its source: the real pixels plus the grid trace
                    grid = ((np.arange(size)[:, None] % 2) ^ (np.arange(size)[None, :] % 2)) * 30 - 15
                    fake = np.clip(real.astype(int) + grid[..., None], 0, 255).astype(np.uint8)
            for cls, img in (("nature", real), ("ai", fake)):
                d = gen / split / cls
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(d / name)
            pairs.append({"name": name, "split": split, "source": src, "crop": [0, 0, size, size],
                          "inpaint_box": None, "psnr": 30.0})
    (gen / "manifest.json").write_text(json.dumps({"format": "fakescope-aligned", "version": 1,
                                                   "autoencoder": ae, "pairs": pairs}))
    return root


def _old_carve(index, fraction):
    """The carve as it was before pairs existed (per (generator, class), by path hash)."""
    strata = {}
    for i, (g, y) in enumerate(zip(index.generators, index.labels)):
        strata.setdefault((g, y), []).append(i)
    val = set()
    for members in strata.values():
        members.sort(key=lambda i: hashlib.sha1(index.paths[i].encode()).hexdigest())
        val.update(members[: round(fraction * len(members))])
    return sorted(index.paths[i] for i in val)


def test_read_pairs_maps_both_members_to_their_source(tmp_path):
    make_aligned(tmp_path, sources=3, crops=2)
    pairs = read_pairs(tmp_path / "taefx")
    assert len(pairs) == 3 * 2 * 2
    gen = os.path.abspath(tmp_path / "taefx")
    assert pairs[os.path.join(gen, "val", "nature", "src000_1.png")] == "/photos/src000.jpg"
    assert pairs[os.path.join(gen, "val", "ai", "src000_1.png")] == "/photos/src000.jpg"
    assert all(os.path.isfile(p) for p in pairs)
    assert read_pairs(tmp_path) == {}  # no manifest: no pairs


def test_pairs_and_crops_of_one_source_never_straddle_the_carve(tmp_path):
    make_aligned(tmp_path, sources=40, crops=3, size=24, val_sources=0)
    index = index_root(tmp_path).select(None, "train")
    groups = pair_groups(index)
    assert len(groups) == len(index) == 40 * 3 * 2
    tr, va = carve_validation(index, 0.2)
    side = {}
    for part, name in ((tr, "train"), (va, "val")):
        for p in part.paths:
            src = os.path.basename(p).split("_")[0]
            side.setdefault(src, set()).add(name)
    assert all(len(s) == 1 for s in side.values()), {k: v for k, v in side.items() if len(v) > 1}
    assert sum(s == {"val"} for s in side.values()) == 8  # round(0.2 * 40) source groups
    assert len(va) == 8 * 3 * 2 and sorted(va.labels).count(0) == len(va) // 2
    # the rule a per-file carve would have used splits pairs: the test would catch a fallback to it
    old = _old_carve(index, 0.2)
    old_src = {}
    for p in index.paths:
        old_src.setdefault(os.path.basename(p).split("_")[0], set()).add(p in old)
    assert any(len(s) > 1 for s in old_src.values())


def test_roots_without_a_manifest_carve_exactly_as_before(tmp_path):
    root = make_dataset(tmp_path / "d", n_train=30, n_val=2)
    index = index_root(root).select(None, "train")
    _, va = carve_validation(index, 0.1)
    assert sorted(va.paths) == _old_carve(index, 0.1)
    assert pair_groups(index) == {}


def test_limit_keeps_whole_pairs(tmp_path):
    make_aligned(tmp_path, sources=20, crops=1, size=24, val_sources=0)
    index = limit_per_class(index_root(tmp_path).select(None, "train"), 5)
    names = {y: sorted(os.path.basename(p) for p, lab in zip(index.paths, index.labels) if lab == y) for y in (0, 1)}
    assert len(names[0]) == 5 and names[0] == names[1]


def test_holdout_uses_the_pair_aware_carve(tmp_path):
    make_aligned(tmp_path / "a", sources=30, crops=2, size=24, val_sources=0)
    opts = TrainOptions(model="cnn32", data=str(tmp_path / "a"), val_fraction=0.2)
    splits = _load_splits(opts)
    config = {"data": {"root": str(tmp_path / "a"), "generators": splits.generators},
              "train": {"val_fraction": 0.2, "limit": None}}
    held = holdout_index(config)
    assert sorted(held.abspath(i) for i in range(len(held))) == sorted(splits.val_files)


def test_paired_epoch_order_keeps_each_pair_in_one_batch(tmp_path):
    make_aligned(tmp_path / "a", sources=10, crops=2, size=24, val_sources=0)
    make_dataset(tmp_path / "m", generators=("other",), n_train=5, n_val=1)
    index = index_root([tmp_path / "a", tmp_path / "m"]).select(None, "train")
    partners = _partners(index)
    assert len(partners) == 10 * 2 * 2

    class Src:  # what _epoch_order reads of a source
        usable = torch.arange(len(index))

    order = _epoch_order(Src(), 42, 0, partners).tolist()
    assert sorted(order) == list(range(len(index)))
    for k in range(0, len(order) - 1, 2):  # pairs sit at even offsets: an even batch never splits one
        a, b = order[k], order[k + 1]
        assert (a in partners) == (b in partners)
        if a in partners:
            assert partners[a] == b
    assert _epoch_order(Src(), 42, 1, partners).tolist() != order  # a new order every epoch
    assert _epoch_order(Src(), 42, 0, partners).tolist() == order  # seeded


def _paired_batch(tmp_path, augment, keyed: bool, **kw):
    from fakescope.engine.sources import make_source

    root = make_aligned(tmp_path / "pairs", sources=6, crops=1, size=48, val_sources=0, **kw)
    index = index_root(root).select(None, "train")
    partners = _partners(index)
    files = [index.abspath(i) for i in range(len(index))]
    order = []
    for i in sorted(partners):
        if partners[i] > i:
            order += [i, partners[i]] if index.labels[i] == 0 else [partners[i], i]
    pipeline = Pipeline(32, None, None, None, augment, geometry="center_crop")
    opts = TrainOptions(model="cnn32", data=str(root), batch_size=len(order), augment=augment, preload="off",
                        num_workers=0)
    keys = [min(i, partners.get(i, i)) for i in range(len(files))] if keyed else None
    src = make_source(None, files, index.labels, pipeline, opts.source_options(), torch.device("cpu"), None, "t",
                      aug_keys=keys)
    x, y = next(src.batches(torch.tensor(order), len(order), epoch=3))
    assert y[0::2].tolist() == [0] * (len(order) // 2) and y[1::2].tolist() == [1] * (len(order) // 2)
    return x


FULL_AUG = Augment(jpeg_prob=0.5, jpeg_quality=(30, 90), blur_prob=0.5, blur_sigma=(0.5, 2.0), flip=True,
                   native_crop=True, scale=(0.6, 1.0), color_prob=0.8, gray_prob=0.3)


def test_paired_batch_halves_share_crop_flip_and_augmentation(tmp_path, monkeypatch):
    import fakescope.engine.sources as sources

    monkeypatch.setattr(sources, "on_features", lambda model, opts: False)
    monkeypatch.setattr(sources.runtime, "model_threads", lambda model, device: None)
    x = _paired_batch(tmp_path / "a", FULL_AUG, keyed=True, identity=True)
    assert torch.equal(x[0::2], x[1::2])  # identity autoencoder: the twins' inputs are the same tensor
    unsynced = _paired_batch(tmp_path / "b", FULL_AUG, keyed=False, identity=True)
    assert not torch.equal(unsynced[0::2], unsynced[1::2])  # without --paired each file draws its own
    # different images (R, G = column, row): the same crop box and flip on both members
    c = _paired_batch(tmp_path / "c", Augment(flip=True, native_crop=True), keyed=True, coords=True)
    assert torch.equal(c[0::2, :2], c[1::2, :2])
    assert (c[0::2, 2] == 0).all() and (c[1::2, 2] == 1).all()
    assert len({tuple(c[k, 0, 0, :2].tolist()) for k in range(0, len(c), 2)}) > 1  # crops do vary between pairs


def test_nature_blur_reaches_the_real_member_of_each_training_pair(tmp_path, monkeypatch):
    import fakescope.engine.sources as sources

    monkeypatch.setattr(sources, "on_features", lambda model, opts: False)
    monkeypatch.setattr(sources.runtime, "model_threads", lambda model, device: None)
    aug = Augment(native_crop=True, flip=True, nature_blur_prob=1.0, nature_blur_sigma=(1.5, 1.5))
    x = _paired_batch(tmp_path, aug, keyed=True, identity=True)  # identity autoencoder: twins are the same image

    def detail(t):
        f = t.float().mean(1)
        return (4 * f[:, 1:-1, 1:-1] - f[:, :-2, 1:-1] - f[:, 2:, 1:-1] - f[:, 1:-1, :-2] - f[:, 1:-1, 2:]).abs().mean()

    assert detail(x[0::2]) < 0.8 * detail(x[1::2])  # the real members (even rows) were blurred, the fakes not
    assert torch.allclose(x[0::2].mean((1, 2, 3)), x[1::2].mean((1, 2, 3)), atol=0.02)  # same crop, same flip


def test_paired_on_a_root_without_pairs_fails_in_one_line(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", n_train=6, n_val=2)
    rc = main(["train", "--model", "cnn32", "--data", str(root), "--out", str(tmp_path / "run"), "--epochs", "1",
               "--paired"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "expected aligned pairs for --paired" in err


def test_paired_training_run_records_pairs(tmp_path):
    root = make_aligned(tmp_path / "a", sources=16, crops=2, size=32, val_sources=2)
    out = tmp_path / "run"
    summary = train(TrainOptions(model="cnn32", data=str(root), epochs=1, patience=0, batch_size=8, paired=True,
                                 augment=Augment(flip=True), val_fraction=0.25), out)
    cfg = json.loads((out / "config.json").read_text())
    # 14 training sources, 2 crops each; round(0.25 * 14) sources carved out for validation
    assert cfg["train"]["paired"] is True and cfg["data"]["train_pairs"] == (14 - round(0.25 * 14)) * 2
    assert summary["epochs_run"] == 1
    with pytest.raises(Exception, match="even --batch-size"):
        train(TrainOptions(model="cnn32", data=str(root), epochs=1, batch_size=7, paired=True), tmp_path / "odd")


def test_several_roots_train_together_and_holdout_follows(tmp_path):
    a = make_dataset(tmp_path / "a", generators=("alpha",), n_train=12, n_val=2)
    b = make_aligned(tmp_path / "b", sources=10, crops=1, size=32, val_sources=1)
    index = index_root([a, b])
    assert index.generator_names == ["alpha", "taefx"] and index.roots == [str(a), str(b)]
    alone = carve_validation(index_root(a).select(None, "train"), 0.25)[1]
    both = carve_validation(index.select(None, "train"), 0.25)[1]
    mine = {both.abspath(i) for i in range(len(both)) if both.generators[i] == "alpha"}
    assert mine == {alone.abspath(i) for i in range(len(alone))}  # a root carves alike alone and with others
    out = tmp_path / "run"
    rc = main(["train", "--model", "cnn32", "--data", str(a), "--data", str(b), "--out", str(out), "--epochs", "1",
               "--val-fraction", "0.25", "--batch-size", "8"])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["roots"] == [str(a), str(b)] and cfg["data"]["root"] == str(a)
    assert cfg["data"]["generators"] == ["alpha", "taefx"]
    held = holdout_index(cfg)
    assert set(held.generator_names) == {"alpha", "taefx"}
    assert len(held) == cfg["data"]["val_images"]
    rc = main(["calibrate", str(out), "--split", "holdout", "--target-fpr", "0.5", "--confidence", "0"])
    assert rc == 0
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["data"]["roots"] == [str(a), str(b)]  # the promise names both roots, not their parent folder
    assert "of a + b (the training images the run did not train on)" in cal["guarantee"]["statement"]


def test_two_roots_with_one_generator_name_fail_in_one_line(tmp_path, capsys):
    a = make_dataset(tmp_path / "a", generators=("alpha",), n_train=4, n_val=1)
    b = make_dataset(tmp_path / "b", generators=("alpha",), n_train=4, n_val=1)
    with pytest.raises(DataError, match="generator 'alpha' is defined by two data roots"):
        index_root([a, b])
    rc = main(["train", "--model", "cnn32", "--data", str(a), "--data", str(b), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "defined by two data roots" in err


def test_benchmark_config_takes_a_list_of_roots(tmp_path):
    from fakescope.study.config import make_config, resolve_data

    a = make_dataset(tmp_path / "a", generators=("alpha",), n_train=4, n_val=2)
    b = make_dataset(tmp_path / "b", generators=("beta",), n_train=4, n_val=2)
    cfg = resolve_data(make_config({"data": [str(a), str(b)], "models": ["cnn32"], "paired": False}))
    assert cfg.data == [str(a), str(b)] and cfg.generators == ["alpha", "beta"]
    assert make_config({"data": str(a), "models": ["cnn32"]}).data == str(a)  # one string still works
    c = make_dataset(tmp_path / "c", generators=("alpha",), n_train=4, n_val=2)
    with pytest.raises(DataError, match="defined by two data roots"):
        resolve_data(make_config({"data": [str(a), str(c)], "models": ["cnn32"]}))


def test_cross_and_benchmark_accept_several_data_flags(tmp_path):
    from fakescope.cli import build_parser
    from fakescope.commands.benchmark import study_options

    for cmd in (["cross", "--model", "cnn32"], ["benchmark"]):
        args = build_parser().parse_args([*cmd, "--data", "A", "--data", "B"])
        assert study_options(args)[1]["data"] == ["A", "B"]
        args = build_parser().parse_args([*cmd, "--data", "A"])
        assert study_options(args)[1]["data"] == "A"


def test_benchmark_trains_and_evaluates_on_two_roots(tmp_path):
    from fakescope.study import run_benchmark

    a = make_dataset(tmp_path / "a", generators=("alpha",), n_train=10, n_val=4)
    b = make_dataset(tmp_path / "b", generators=("beta",), n_train=10, n_val=4)
    res = run_benchmark({"data": [str(a), str(b)], "models": ["cnn32"], "epochs": 1, "out": str(tmp_path / "bm"),
                         "gallery": False, "precision_check": False, "report": False})
    per = res["models"]["cnn32"]["per_generator"]
    assert set(per) == {"alpha", "beta"}


def test_aligned_crops_preset_keeps_full_resolution_and_pairs_batches(tmp_path):
    from fakescope.models import create_model

    m = create_model("aligned-crops", pretrained=False, input_size=32).eval()
    feats = m.backbone.forward_features(torch.zeros(1, 3, 32, 32))
    ref = create_model("aligned-crops", pretrained=False, input_size=32, stem_stride=2).eval()
    assert feats.shape[-1] == 2 * ref.backbone.forward_features(torch.zeros(1, 3, 32, 32)).shape[-1]  # no first stride
    assert m.test_geometry == "crops" and m.recipe.paired and m(torch.rand(2, 3, 32, 32)).shape == (2, 1)
    root = make_aligned(tmp_path / "a", sources=8, crops=1, size=40, val_sources=1)
    out = tmp_path / "run"
    train(TrainOptions(model="aligned-crops", data=str(root), epochs=1, patience=0, batch_size=4,
                       model_options={"pretrained": False, "input_size": 32, "stem_stride": 2}, val_fraction=0.3), out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["paired"] is True and cfg["test_geometry"] == "crops"
    assert cfg["train"]["augment"]["native_crop"] and cfg["train"]["augment"]["scale"] == [0.5, 1.0]


def test_paired_order_is_dealt_to_ranks_in_whole_pairs(monkeypatch):
    from fakescope.engine import sources

    order = torch.tensor([4, 5, 0, 1, 8, 9, 2, 3, 6])  # pairs (4,5) (0,1) (8,9) (2,3), then a single
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(sources.runtime, "world_size", lambda: 2)
        monkeypatch.setattr(sources.runtime, "rank", lambda r=rank: r)
        shares.append(sources.shard_order(order, unit=2).tolist())
    assert shares[0] == [4, 5, 8, 9, 6, 4] and shares[1] == [0, 1, 2, 3, 4, 5]  # padded with the first items
    assert len(shares[0]) == len(shares[1])
