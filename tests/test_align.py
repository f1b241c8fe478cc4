"""``fakescope data align``: pairs, splits by source, crops, inpainting, resume after a kill, bad files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fakescope.cli import main
from fakescope.data.pairs import read_manifest, read_pairs
from fakescope.engine.align import CROP_GRID, KILL_AFTER_ENV, inpaint_mask, source_rng
from fakescope.engine.align import split_of as engine_split
from fakescope.models.autoencoders import TinyAutoencoder, autoencoder_spec


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random (but fixed) taesd weights: the real architecture, no download."""
    d = tmp_path_factory.mktemp("taesd")
    torch.manual_seed(0)
    ae = TinyAutoencoder(autoencoder_spec("taesd"), None, None)
    save_file(ae.encoder.state_dict(), str(d / "taesd_encoder.safetensors"))
    save_file(ae.decoder.state_dict(), str(d / "taesd_decoder.safetensors"))
    return d


def _photos(folder, n: int = 8, seed: int = 0):
    """``n`` textured images of a few sizes (JPEG and PNG), in a nested folder tree."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = [(40, 56), (48, 48), (33, 61)][i % 3]
        yy, xx = np.mgrid[0:h, 0:w]
        base = (np.sin(xx / (2 + i)) + np.cos(yy / (3 + i)))[..., None] * 60 + 120
        arr = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        sub = folder / ("deep" if i % 2 else "") / ""
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / (f"p{i}.png" if i % 3 else f"p{i}.jpg")
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def _align(src, out, weights, *extra) -> int:
    return main(["data", "align", *map(str, src), "--autoencoder", "taesd", "--weights", str(weights),
                 "--out", str(out), "--device", "cpu", *extra])


def _files(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(root) for f in fs if not f.startswith(".")}


def _load(p) -> np.ndarray:
    return np.asarray(Image.open(p).convert("RGB"))


def test_pairs_crops_and_splits_by_source(tmp_path, weights):
    _photos(tmp_path / "src", n=10)
    assert _align([tmp_path / "src"], tmp_path / "out", weights, "--crop", "24", "--crops-per-image", "3",
                  "--val-fraction", "0.5") == 0
    gen = tmp_path / "out" / "taesd"
    m = read_manifest(gen)
    assert m["format"] == "fakescope-aligned" and m["version"] == 1 and m["autoencoder"] == "taesd"
    assert len(m["weights_sha256"]) == 64 and m["options"]["crop"] == 24 and m["unreadable"] == []
    assert len(m["pairs"]) == 30
    split_of = {}
    for p in m["pairs"]:
        split_of.setdefault(p["source"], set()).add(p["split"])
        left, top, w, h = p["crop"]
        assert left % CROP_GRID == 0 and top % CROP_GRID == 0 and (w, h) == (24, 24)
        real = _load(gen / p["split"] / "nature" / p["name"])
        fake = _load(gen / p["split"] / "ai" / p["name"])
        assert real.shape == fake.shape == (24, 24, 3)
        src = _load(p["source"])  # the real member is the source's native pixels, bit for bit (PNG)
        assert np.array_equal(real, src[top:top + h, left:left + w])
        assert not np.array_equal(real, fake) and p["inpaint_box"] is None
    assert all(len(s) == 1 for s in split_of.values())  # every crop of a photo in one split
    assert all(s == {engine_split(src, 0.5)} for src, s in split_of.items())  # the one the path's hash says
    groups = read_pairs(gen)
    assert len(groups) == 60 and set(groups.values()) == set(split_of)
    for p in m["pairs"]:
        for cls in ("nature", "ai"):
            assert groups[str(gen / p["split"] / cls / p["name"])] == p["source"]


def test_whole_images_max_side_and_jpeg_format(tmp_path, weights):
    _photos(tmp_path / "src", n=3)
    assert _align([tmp_path / "src"], tmp_path / "out", weights, "--max-side", "40", "--format", "jpeg:90") == 0
    m = read_manifest(tmp_path / "out" / "taesd")
    for p in m["pairs"]:
        assert p["crop"] is None and p["name"].endswith(".jpg")
        a, b = (Image.open(tmp_path / "out" / "taesd" / p["split"] / c / p["name"]) for c in ("nature", "ai"))
        assert a.format == b.format == "JPEG" and a.size == b.size and max(a.size) <= 40
    assert sorted(tuple(p["size"]) for p in m["pairs"]) == [(40, 22), (40, 29), (40, 40)]  # [w, h], longer side 40


def test_genimage_root_uses_nature_only_and_bad_files_are_listed(tmp_path, weights, capsys):
    root = tmp_path / "gi" / "gen" / "train"
    _photos(root / "nature", n=3)
    _photos(root / "ai", n=2, seed=1)
    (root / "nature" / "broken.jpg").write_bytes(b"not an image at all")
    (root / "nature" / "empty.png").write_bytes(b"")
    assert _align([tmp_path / "gi"], tmp_path / "out", weights) == 0
    m = read_manifest(tmp_path / "out" / "taesd")
    assert m["sources"] == 5 and len(m["pairs"]) == 3
    assert all("/nature/" in p["source"] for p in m["pairs"])
    assert sorted(os.path.basename(u["path"]) for u in m["unreadable"]) == ["broken.jpg", "empty.png"]
    assert all(u["error"] for u in m["unreadable"])
    assert "unreadable (2)" in capsys.readouterr().out
    # a plain folder with class folders inside (not a GenImage root): its ai/ folder is never searched
    assert _align([tmp_path / "gi" / "gen" / "train"], tmp_path / "out2", weights) == 0
    assert read_manifest(tmp_path / "out2" / "taesd")["sources"] == 5


def test_inpaint_mask_area():
    for seed in range(40):
        for h, w in ((24, 24), (40, 56), (64, 32)):
            m = inpaint_mask(h, w, source_rng(seed, "x", "mask"))
            assert 0.10 <= m.mean() <= 0.50


def test_inpaint_keeps_the_untouched_region_real(tmp_path, weights):
    _photos(tmp_path / "src", n=4)
    assert _align([tmp_path / "src"], tmp_path / "out", weights, "--crop", "32", "--inpaint", "1") == 0
    gen = tmp_path / "out" / "taesd"
    m = read_manifest(gen)
    for p in m["pairs"]:
        real, fake = (_load(gen / p["split"] / c / p["name"]).astype(int) for c in ("nature", "ai"))
        left, top, w, h = p["inpaint_box"]
        area = real.shape[0] * real.shape[1]
        assert w * h >= 0.10 * area
        changed = (real != fake).any(axis=2)
        assert 0 < changed.mean() <= 0.50
        outside = np.ones_like(changed)
        outside[top:top + h, left:left + w] = False
        assert not changed[outside].any()  # bit-equal outside the mask's box


def test_deterministic_for_a_seed(tmp_path, weights):
    _photos(tmp_path / "src", n=4)
    args = ("--crop", "16", "--crops-per-image", "2", "--inpaint", "0.5")
    for out in ("a", "b"):
        assert _align([tmp_path / "src"], tmp_path / out, weights, *args, "--seed", "3") == 0
    assert _align([tmp_path / "src"], tmp_path / "c", weights, *args, "--seed", "4") == 0
    a, b, c = (_files(tmp_path / x / "taesd") for x in "abc")
    pa, pb, pc = (json.loads(x.pop("manifest.json"))["pairs"] for x in (a, b, c))
    assert pa == pb and a == b  # same crops, masks, PSNRs and bytes
    assert [p["crop"] for p in pc] != [p["crop"] for p in pa]


def test_resume_after_a_kill(tmp_path, weights):
    _photos(tmp_path / "src", n=6)
    cmd = [sys.executable, "-m", "fakescope", "data", "align", str(tmp_path / "src"), "--autoencoder", "taesd",
           "--weights", str(weights), "--out", str(tmp_path / "out"), "--crop", "24", "--batch-size", "1",
           "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "FAKESCOPE_PROGRESS": "0", KILL_AFTER_ENV: "3"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr  # SIGKILL: no cleanup ran
    gen = tmp_path / "out" / "taesd"
    assert not (gen / "manifest.json").exists()
    first = [json.loads(x) for x in (gen / ".journal.jsonl").read_text().splitlines()]
    assert len(first) == 3
    stats = {p["name"]: [os.stat(gen / p["split"] / c / p["name"]) for c in ("nature", "ai")] for p in first}
    env.pop(KILL_AFTER_ENV)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = read_manifest(gen)
    assert len(m["pairs"]) == 6 and m["new_pairs"] == 3
    for name, (sn, sa) in stats.items():  # finished pairs were not rewritten
        p = next(x for x in m["pairs"] if x["name"] == name)
        for st, c in ((sn, "nature"), (sa, "ai")):
            now = os.stat(gen / p["split"] / c / name)
            assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    # and the result is the one an uninterrupted run writes (batch size 1: the same arithmetic per pair)
    assert main(["data", "align", str(tmp_path / "src"), "--autoencoder", "taesd", "--weights", str(weights),
                 "--out", str(tmp_path / "ref"), "--crop", "24", "--batch-size", "1", "--device", "cpu"]) == 0
    got, ref = _files(gen), _files(tmp_path / "ref" / "taesd")
    got.pop("manifest.json"), ref.pop("manifest.json")
    assert got == ref
    # resuming with other options is refused in one line
    assert _align([tmp_path / "src"], tmp_path / "out", weights, "--crop", "16") == 2


def test_reuse_makes_the_same_variant_without_recomputing(tmp_path, weights, monkeypatch):
    _photos(tmp_path / "src", n=4)
    common = ("--crop", "24", "--crops-per-image", "2", "--seed", "5")
    assert _align([tmp_path / "src"], tmp_path / "a", weights, *common) == 0
    assert _align([tmp_path / "src"], tmp_path / "b", weights, *common, "--inpaint", "0.7") == 0
    import fakescope.engine.align as engine

    def no_pass(self, batch):
        raise AssertionError("the autoencoder ran although every reconstruction could be reused")

    monkeypatch.setattr(engine.AlignRun, "_reconstruct", no_pass)
    assert _align([tmp_path / "src"], tmp_path / "c", weights, *common, "--inpaint", "0.7",
                  "--reuse", str(tmp_path / "a")) == 0
    b, c = _files(tmp_path / "b" / "taesd"), _files(tmp_path / "c" / "taesd")
    pb, pc = (json.loads(x.pop("manifest.json"))["pairs"] for x in (b, c))
    assert b == c and pb == pc
    assert read_manifest(tmp_path / "c" / "taesd")["options"]["reuse"] == str(tmp_path / "a" / "taesd")
    # a root made with another seed (other crops) cannot be reused
    assert _align([tmp_path / "src"], tmp_path / "d", weights, "--crop", "24", "--crops-per-image", "2",
                  "--reuse", str(tmp_path / "a")) == 2


def test_a_kl_vae_through_data_align(tmp_path):
    """The diffusers path end to end: a tiny random AutoencoderKL folder (factor 2) as --weights."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(latent_channels=4, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                            norm_num_groups=8).save_pretrained(tmp_path / "vae")
    _photos(tmp_path / "src", n=3)
    assert main(["data", "align", str(tmp_path / "src"), "--autoencoder", "sd-vae", "--weights", str(tmp_path / "vae"),
                 "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    m = read_manifest(tmp_path / "out" / "sd-vae")
    assert m["autoencoder_spec"]["factor"] == 2 and len(m["pairs"]) == 3
    for p in m["pairs"]:  # a 33x61 source among them: odd sizes padded for the VAE, written at the source's size
        real, fake = (_load(tmp_path / "out" / "sd-vae" / p["split"] / c / p["name"]) for c in ("nature", "ai"))
        assert real.shape == fake.shape == _load(p["source"]).shape
