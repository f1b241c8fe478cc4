"""Colour jitter and greyscale augmentation (``--aug-color``, ``--aug-gray``): colourfulness stops being a
feature; both members of an aligned pair get the same draw (tests/test_pairs.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from fakescope.cli import build_parser
from fakescope.commands.train import _augment
from fakescope.data.transforms import Augment, Pipeline, color_jitter, colour_augment
from fakescope.errors import FakescopeError
from fakescope.study.config import check_augment


def _colourful(h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    base = np.stack([np.linspace(0, 255, w)[None].repeat(h, 0), np.linspace(255, 0, h)[:, None].repeat(w, 1),
                     rng.uniform(0, 255, (h, w))])
    return torch.from_numpy(base.round().astype(np.uint8))


def _saturation(img: torch.Tensor) -> float:
    f = img.float()
    return float((f.max(0).values - f.min(0).values).mean())


def test_jitter_of_strength_zero_is_the_identity_and_a_seed_repeats_its_draw():
    img = _colourful()
    assert torch.equal(color_jitter(img, 0.0, torch.Generator().manual_seed(1)), img)
    a = color_jitter(img, 0.4, torch.Generator().manual_seed(3))
    b = color_jitter(img, 0.4, torch.Generator().manual_seed(3))
    assert a.dtype == torch.uint8 and a.shape == img.shape and torch.equal(a, b)
    assert not torch.equal(a, img)


def test_jitter_changes_saturation_within_its_strength():
    img = _colourful()
    ratios = [_saturation(color_jitter(img, 0.4, torch.Generator().manual_seed(k))) / _saturation(img)
              for k in range(40)]
    assert min(ratios) < 0.9 and max(ratios) > 1.1  # it does move colourfulness both ways
    assert 0.3 < min(ratios) and max(ratios) < 2.0  # factors in [0.6, 1.4] (brightness/contrast compound)


def test_greyscale_gives_three_equal_channels_and_probability_zero_changes_nothing():
    img = _colourful()
    grey = colour_augment(img, Augment(gray_prob=1.0), torch.Generator().manual_seed(0))
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert torch.equal(grey, TF.rgb_to_grayscale(img, num_output_channels=3))
    assert torch.equal(colour_augment(img, Augment(), torch.Generator().manual_seed(0)), img)


def test_the_pipeline_applies_colour_to_training_crops_only():
    img = _colourful(64, 64)
    aug = Pipeline(32, geometry="center_crop", augment=Augment(gray_prob=1.0))
    out = aug(img, torch.Generator().manual_seed(0))
    assert out.shape == (3, 32, 32) and torch.equal(out[0], out[2])
    assert torch.equal(aug(img), Pipeline(32, geometry="center_crop")(img))  # no rng: evaluation, no colour step
    resized = Pipeline(32, augment=Augment(gray_prob=1.0))(img, torch.Generator().manual_seed(0))
    assert torch.equal(resized[0], resized[1])


def test_the_train_command_and_configuration_files_take_the_colour_options():
    parser = build_parser()
    args = parser.parse_args(["train", "--model", "cnn32", "--data", "d", "--out", "o", "--aug-color", "0.8",
                              "--aug-gray", "0.2"])
    aug = _augment(args)
    assert (aug.color_prob, aug.color_strength, aug.gray_prob) == (0.8, 0.4, 0.2) and aug.active
    args = parser.parse_args(["train", "--model", "cnn32", "--data", "d", "--out", "o", "--aug-color", "1",
                              "--aug-color-strength", "0.2"])
    assert _augment(args).color_strength == 0.2 and _augment(args).gray_prob == 0.0
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--model", "cnn32", "--data", "d", "--out", "o", "--aug-gray", "1.5"])
    assert check_augment({"color_prob": 0.5, "gray_prob": 0.1}) == {"color_prob": 0.5, "gray_prob": 0.1}
    with pytest.raises(FakescopeError, match="color_prob"):
        check_augment({"color_prob": 2})


def _detail(img: torch.Tensor) -> float:
    f = img.float().mean(0)
    return float((4 * f[1:-1, 1:-1] - f[:-2, 1:-1] - f[2:, 1:-1] - f[1:-1, :-2] - f[1:-1, 2:]).abs().mean())


def test_nature_blur_smooths_real_images_only_and_keeps_the_draws_in_step():
    img = _colourful(64, 64)
    pipe = Pipeline(32, geometry="center_crop", augment=Augment(native_crop=True, flip=True, nature_blur_prob=1.0,
                                                                nature_blur_sigma=(1.5, 1.5)))
    out = {}
    for label in (0, 1, None):
        rng = torch.Generator().manual_seed(5)
        out[label] = pipe(img, rng, label)
        out[f"next{label}"] = torch.rand((), generator=rng).item()
    assert torch.equal(out[1], out[None])  # an AI image (or an unlabelled one) is never blurred by it
    assert _detail(out[0]) < 0.7 * _detail(out[1])  # the real one is smoother...
    assert out["next0"] == out["next1"] == out["nextNone"]  # ...and the generator is in the same state


def test_the_dataset_hands_each_files_label_to_the_augmentation(tmp_path):
    from PIL import Image

    from fakescope.data.dataset import ImageDataset

    Image.fromarray(_colourful(64, 64).permute(1, 2, 0).numpy()).save(tmp_path / "x.png")
    files = [str(tmp_path / "x.png")] * 2
    pipe = Pipeline(32, geometry="center_crop", augment=Augment(native_crop=True, nature_blur_prob=1.0))
    labelled = ImageDataset(files, pipe, stage_only=True, aug_keys=[0, 0], labels=[0, 1])
    real, fake = labelled[0]["image"], labelled[1]["image"]
    assert _detail(real) < _detail(fake)
    plain = ImageDataset(files, pipe, stage_only=True, aug_keys=[0, 0])
    assert torch.equal(plain[0]["image"], plain[1]["image"]) and torch.equal(plain[0]["image"], fake)
    with pytest.raises(ValueError, match="expected one label per file"):
        ImageDataset(files, pipe, labels=[0])


def test_the_train_command_takes_nature_blur():
    args = build_parser().parse_args(["train", "--model", "cnn32", "--data", "d", "--out", "o",
                                      "--aug-nature-blur", "0.5", "--aug-nature-blur-sigma", "1,3"])
    aug = _augment(args)
    assert (aug.nature_blur_prob, aug.nature_blur_sigma) == (0.5, (1.0, 3.0)) and aug.active
    assert check_augment({"nature_blur_prob": 0.3}) == {"nature_blur_prob": 0.3}
