"""``max_side``: a run that never reads an image at a finer pixel scale than its training data's.

An image whose longer side exceeds the run's ``max_side`` is down-scaled to it before anything else
(at training, evaluation, prediction, serving and in bulk); ``--max-side N|off`` overrides it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from fakescope.cli import main
from fakescope.data.transforms import Pipeline, cap_side
from fakescope.engine import checkpoint as ckpt
from fakescope.engine import runtime
from fakescope.engine.bulk import predict_to_folder
from fakescope.engine.evaluation import max_side_for, predict_paths
from fakescope.engine.feature_cache import extractor_key
from fakescope.engine.train import TrainOptions, train
from fakescope.errors import FakescopeError
from fakescope.models import create_model

from synth import make_dataset, make_run, quiet_single_thread


def _noise(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8))


def test_cap_side_brings_the_longer_side_down_and_leaves_smaller_images_alone():
    img = _noise(288, 512)
    out = cap_side(img, 128)
    assert out.shape == (3, 72, 128)
    assert torch.equal(out, TF.resize(img, [72, 128], antialias=True))
    tall = cap_side(_noise(500, 100), 100)
    assert tall.shape == (3, 100, 20)
    small = _noise(100, 60)
    assert cap_side(small, 128) is small and cap_side(small, 100) is small  # never up-scaled


def test_the_pipeline_caps_the_side_before_its_crops():
    img = _noise(256, 512)
    capped = Pipeline(32, geometry="crops", max_side=64)(img)
    assert torch.equal(capped, Pipeline(32, geometry="crops")(cap_side(img, 64)))
    assert not torch.equal(capped, Pipeline(32, geometry="crops")(img))
    small = _noise(48, 60)
    assert torch.equal(Pipeline(32, geometry="crops", max_side=64)(small), Pipeline(32, geometry="crops")(small))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_the_pipeline_rejects_a_max_side_that_is_not_a_positive_integer(bad):
    with pytest.raises(ValueError, match="expected max_side None or a positive integer"):
        Pipeline(32, max_side=bad)


def test_max_side_for_reads_the_run_and_its_override():
    cfg = {"max_side": 640}
    assert max_side_for(cfg, None) == 640 and max_side_for(cfg, "auto") == 640
    assert max_side_for(cfg, "off") is None and max_side_for({}, None) is None
    assert max_side_for(cfg, "128") == 128 and max_side_for(cfg, 96) == 96
    for bad in ("0", "-1", "big", 0, 1.5):
        with pytest.raises(FakescopeError, match="expected --max-side auto, off or a positive integer"):
            max_side_for(cfg, bad)


def test_the_feature_cache_key_depends_on_max_side():
    model = create_model("cnn32")
    prec = runtime.resolve_precision("fp32", torch.device("cpu"), inference=True)
    plain = extractor_key(model, Pipeline(32), prec)
    assert extractor_key(model, Pipeline(32), prec) == plain
    assert extractor_key(model, Pipeline(32, max_side=64), prec) != plain


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A 512x256 one-pixel checkerboard (grey once down-scaled by 8, full contrast at its own scale) and
    the same image brought to max side 64 beforehand (PNG: the same pixels)."""
    d = tmp_path_factory.mktemp("max_side")
    board = ((np.indices((256, 512)).sum(0) % 2) * 255).astype(np.uint8)
    big = np.repeat(board[..., None], 3, axis=-1)
    big[..., 1] //= 2
    Image.fromarray(big).save(d / "big.png")
    small = cap_side(torch.from_numpy(big).permute(2, 0, 1).contiguous(), 64)
    Image.fromarray(small.permute(1, 2, 0).numpy()).save(d / "small.png")
    return d


def _crops_run(path: Path, max_side: int | None) -> Path:
    run = make_run(path)
    cfg = ckpt.read_config(run)
    ckpt.write_config(run, {**cfg, "test_geometry": "crops", "max_side": max_side,
                            "preprocess": create_model("cnn32").preprocess.to_dict()})
    return run


def _p(rows: list[dict]) -> float:
    assert len(rows) == 1 and "error" not in rows[0], rows
    return rows[0]["p_ai"]


def test_predict_reads_the_runs_max_side_and_the_override_turns_it_off(tmp_path, images):
    run = _crops_run(tmp_path / "run", 64)
    capped = _p(predict_paths(run, [str(images / "big.png")], provenance=False))
    assert capped == pytest.approx(_p(predict_paths(run, [str(images / "small.png")], provenance=False)), abs=1e-6)
    native = _p(predict_paths(run, [str(images / "big.png")], max_side="off", provenance=False))
    assert abs(native - capped) > 1e-4
    plain = _crops_run(tmp_path / "plain", None)
    assert _p(predict_paths(plain, [str(images / "big.png")], provenance=False)) == pytest.approx(native, abs=1e-6)
    assert _p(predict_paths(plain, [str(images / "big.png")], max_side=64, provenance=False)) == pytest.approx(
        capped, abs=1e-6)


def test_the_predict_command_and_bulk_scoring_take_the_override(tmp_path, images, capsys):
    run = _crops_run(tmp_path / "run", 64)
    big = str(images / "big.png")
    assert main(["predict", str(run), big, "--format", "json", "--max-side", "off", "--device", "cpu"]) == 0
    native = json.loads(capsys.readouterr().out)[0]["p_ai"]
    assert native == pytest.approx(_p(predict_paths(run, [big], max_side="off", provenance=False)), abs=1e-6)
    with pytest.raises(SystemExit):
        main(["predict", str(run), big, "--max-side", "zero"])
    assert "expected --max-side auto, off or a positive integer" in capsys.readouterr().err
    summary = predict_to_folder(run, tmp_path / "bulk", [big], provenance=False)
    assert summary["scored"] == 1
    job = json.loads((tmp_path / "bulk" / "job.json").read_text())
    assert job["max_side"] == 64
    predict_to_folder(run, tmp_path / "bulk-native", [big], provenance=False, max_side="off")
    assert "max_side" not in json.loads((tmp_path / "bulk-native" / "job.json").read_text())


def test_train_records_max_side_and_trains_on_capped_images(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", generators=("alpha",), n_train=8, n_val=4, size=48)
    seen: list[tuple[int, int]] = []
    real = cap_side

    def spy(img, max_side):
        seen.append(tuple(img.shape[-2:]))
        return real(img, max_side)

    monkeypatch.setattr("fakescope.data.transforms.cap_side", spy)
    with quiet_single_thread(tmp_path):
        train(TrainOptions(model="cnn32", data=str(data), epochs=1, num_workers=0, max_side=40, native_size="off",
                           use_cache=False), tmp_path / "run")
    assert seen and set(seen) == {(48, 48)}
    cfg = ckpt.read_config(tmp_path / "run")
    assert cfg["max_side"] == 40 and cfg["train"]["max_side"] == 40
    with pytest.raises(FakescopeError, match="expected --max-side a positive number of pixels, got 0"):
        train(TrainOptions(model="cnn32", data=str(data), epochs=1, num_workers=0, max_side=0), tmp_path / "bad")


def test_the_model_card_says_how_an_image_is_read(tmp_path):
    from fakescope.report.model_card import build_model_card

    card = build_model_card(_crops_run(tmp_path / "run", 640))
    assert "an image whose longer side exceeds 640 px is first down-scaled to 640 px" in card
    assert "3 x 3 grid of 32-px crops at the image's own pixel scale" in card and "max_side: 640" in card
    plain = build_model_card(make_run(tmp_path / "plain", native_size=32))
    assert "first down-scaled" not in plain and "typical size (32 px)" in plain
