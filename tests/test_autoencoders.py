"""The autoencoder registry: TAESD-family architecture, weight loading (files, folders, diffusers layouts),
KL VAEs through diffusers, and the one-line errors when weights are missing."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fakescope.errors import FakescopeError
from fakescope.models.autoencoders import (
    TinyAutoencoder,
    autoencoder_spec,
    create_autoencoder,
    list_autoencoders,
    sha256_files,
)

from synth import SHARED

TAEF2_DIR = SHARED / "weights"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no traffic off the machine, ever
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # an empty cache: nothing to be found there


def _random_taesd(name: str, folder, width: int = 64, seed: int = 0) -> TinyAutoencoder:
    torch.manual_seed(seed)
    ae = TinyAutoencoder(autoencoder_spec(name), None, None, width=width)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(ae.encoder.state_dict(), str(folder / f"{name}_encoder.safetensors"))
    save_file(ae.decoder.state_dict(), str(folder / f"{name}_decoder.safetensors"))
    return ae


@pytest.mark.parametrize("name,channels", [("taesd", 4), ("taesdxl", 4), ("taesd3", 16), ("taef1", 16),
                                           ("taef2", 32)])
def test_tiny_round_trip_shapes(name, channels):
    spec = autoencoder_spec(name)
    assert (spec.factor, spec.latent_channels, spec.input_range) == (8, channels, (0.0, 1.0))
    torch.manual_seed(0)
    ae = TinyAutoencoder(spec, None, None, width=8).eval()
    x = torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        assert ae.encode(x).shape == (2, channels, 5, 7)
        for h, w in ((40, 56), (37, 50), (5, 3)):  # not multiples of 8: padded, then cropped back
            y = ae.reconstruct(torch.rand(1, 3, h, w))
            assert y.shape == (1, 3, h, w) and y.min() >= 0 and y.max() <= 1
    has_pool = any(k.endswith("pool.0.weight") for k in ae.state_dict())
    assert has_pool == (name == "taef2")


def test_folder_weights_load_strictly_and_are_hashed(tmp_path):
    ref = _random_taesd("taesd", tmp_path / "w")
    ae = create_autoencoder("taesd", tmp_path / "w")
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        torch.testing.assert_close(ae.reconstruct(x), ref.eval().reconstruct(x), rtol=0, atol=0)
    files = [str(tmp_path / "w" / f"taesd_{p}.safetensors") for p in ("encoder", "decoder")]
    assert ae.weights_sha256 == sha256_files(files)
    # one of the two files named: its twin is found next to it
    assert create_autoencoder("taesd", files[1]).weights_sha256 == ae.weights_sha256
    # taesd's 4-channel weights under taef2's names: a one-line error, never a silent partial load
    for p in ("encoder", "decoder"):
        os.rename(tmp_path / "w" / f"taesd_{p}.safetensors", tmp_path / "w" / f"taef2_{p}.safetensors")
    with pytest.raises(FakescopeError, match="do not fit taef2") as e:
        create_autoencoder("taef2", tmp_path / "w")
    assert "\n" not in str(e.value)
    with pytest.raises(FakescopeError, match="no taesd weights"):
        create_autoencoder("taesd", tmp_path / "w")


def test_diffusers_autoencoder_tiny_folder_matches_diffusers(tmp_path):
    """A diffusers AutoencoderTiny folder (the hub's madebyollin/<name> layout) gives diffusers' own result."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(1)
    ref = diffusers.AutoencoderTiny(latent_channels=4).eval()
    ref.save_pretrained(tmp_path / "tiny")
    ae = create_autoencoder("taesd", tmp_path / "tiny")
    x = torch.rand(1, 3, 24, 32)
    with torch.no_grad():
        theirs = ((ref.decode(ref.encode(x * 2 - 1).latents).sample + 1) / 2).clamp(0, 1)
        torch.testing.assert_close(ae.reconstruct(x), theirs, rtol=1e-4, atol=1e-5)


def _tiny_kl(folder):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                                  sample_size=32)
    vae.save_pretrained(folder)
    return vae.eval()


def test_kl_vae_from_a_local_diffusers_folder(tmp_path):
    vae = _tiny_kl(tmp_path / "vae")
    ae = create_autoencoder("sd-vae", tmp_path / "vae")
    assert (ae.spec.factor, ae.spec.latent_channels, ae.spec.input_range) == (2, 4, (-1.0, 1.0))
    assert len(ae.weights_sha256) == 64
    x = torch.rand(2, 3, 20, 15)  # odd width: padded to 16, cropped back
    with torch.no_grad():
        assert ae.encode(x[..., :14] * 2 - 1).shape == (2, 4, 10, 7)
        y = ae.reconstruct(x)
        assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
        z = vae.encode(x[..., :14] * 2 - 1).latent_dist.mode()  # the [0,1] -> [-1,1] scaling is applied
        torch.testing.assert_close(ae.reconstruct(x[..., :14]), ((vae.decode(z).sample + 1) / 2).clamp(0, 1))
    # a parent folder with vae/ inside (a whole pipeline folder) works too
    assert create_autoencoder("sd-vae", tmp_path).weights_sha256 == ae.weights_sha256


@pytest.mark.parametrize("name", ["sd-vae", "flux-vae", "taef2"])
def test_hub_autoencoder_without_weights_is_one_line(name):
    with pytest.raises(FakescopeError, match="--weights") as e:
        create_autoencoder(name)
    assert "\n" not in str(e.value) and autoencoder_spec(name).hub_repo in str(e.value)


def test_cli_missing_weights_exit_2_one_line(tmp_path, capsys):
    from fakescope.cli import main

    (tmp_path / "src").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "src" / "a.png")
    code = main(["data", "align", str(tmp_path / "src"), "--autoencoder", "sd-vae", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "stabilityai/sd-vae-ft-mse" in err, err


def test_models_lists_autoencoders(capsys):
    from fakescope.cli import main

    assert main(["models", "--autoencoders"]) == 0
    out = capsys.readouterr().out
    for name, spec in list_autoencoders().items():
        line = next(x for x in out.splitlines() if x.startswith(name + " "))
        assert f"{spec.latent_channels} latent channels" in line and f"/{spec.factor}" in line


def test_real_taef2_reconstruction_close_but_not_identical():
    """The real taef2 weights (../shared): a real photo comes back at about 27 dB, never unchanged."""
    if not (TAEF2_DIR / "taef2_encoder.safetensors").exists():
        pytest.skip(f"{TAEF2_DIR} is absent (../shared holds the real taef2 weights; a fresh clone does not)")
    photos = SHARED / "data" / "real_photos_misc.tar"
    if not photos.exists():
        pytest.skip(f"{photos} is absent")
    ae = create_autoencoder("taef2", TAEF2_DIR)
    with tarfile.open(photos) as t:
        member = next(m for m in t.getmembers() if m.name.endswith("mate_Garden.jpg"))
        im = Image.open(io.BytesIO(t.extractfile(member).read())).convert("RGB")
    im = im.resize((im.width * 128 // im.height, 128), Image.LANCZOS).crop((0, 0, 128, 128))
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        y = ae.reconstruct(x).mul(255).round() / 255
    psnr = float(10 * torch.log10(1 / ((y - x) ** 2).mean()))
    assert 20 < psnr < 40, psnr
    assert (y != x).float().mean() > 0.5  # a reconstruction, not a copy
