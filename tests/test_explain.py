import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fakescope.engine.checkpoint import load_run
from fakescope.errors import FakescopeError
from fakescope.explain import explain_files, find_target_layer, gradcam, to_image_size
from fakescope.models import create_model
from fakescope.report.artifacts import write_explanation, write_gallery

from synth import make_run

pytest.importorskip("captum", reason="captum is not installed (pip install captum)")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# random weights; the seed is one where some region pushes toward AI (with others the map is all zero)
@pytest.mark.parametrize("name,options,layer,seed", [
    ("cnn32", {}, "backbone.7", 0),  # the ReLU after the third convolution (8x8)
    ("timm:resnet10t", {"input_size": 64, "freeze": True}, "backbone.layer4", 1),
    ("timm:mobilenetv3_small_050", {"input_size": 64, "freeze": False}, "backbone.blocks", 0),
])
def test_gradcam_map_size_contrast_and_sensitivity(name, options, layer, seed):
    torch.manual_seed(seed)
    model = create_model(name, **({} if name == "cnn32" else {"pretrained": False}), **options)
    assert find_target_layer(model)[0] == layer
    s = model.preprocess.input_size
    model.train()  # a model in training mode with a frozen backbone: flags must come back as they were
    flags = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    before = _state(model)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, s, s, generator=g)
    heat, peak = gradcam(model, x)
    assert heat.shape == (2, s, s) and (peak > 0).all()
    assert heat.max() == pytest.approx(1.0) and heat.min() >= 0 and heat[0].std() > 0.01  # not constant
    other, _ = gradcam(model, torch.rand(2, 3, s, s, generator=g))
    assert np.abs(other - heat).mean() > 0.01  # changes when the input changes
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_heat_map_has_the_image_size():
    heat = np.zeros((4, 4))
    heat[0, 0] = 1.0
    out = to_image_size(heat, 30, 50)  # landscape: the model sees the centre 30x30
    assert out.shape == (30, 50)
    assert out[:, :10].max() == 0 and out[:, 40:].max() == 0 and out[:, 10:40].max() > 0.5
    assert np.unravel_index(out.argmax(), out.shape)[1] < 20  # the hot corner is top-left of the square


def test_explain_files_writes_overlays_and_json(tmp_path):
    run = make_run(tmp_path / "run", "cnn32", seed=3)
    rng = np.random.default_rng(0)
    a = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 255, (40, 64, 3), dtype=np.uint8)).save(a)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    model, _ = load_run(run)
    before = _state(model)
    data = explain_files(run, [str(a), str(bad), str(tmp_path / "missing.jpg")])
    assert not (tmp_path / "out").exists()  # the library returns data; writing is report.artifacts'
    res = write_explanation(data, tmp_path / "out")
    assert res["layer"] == "backbone.7" and res["threshold"]["source"] == "default"
    good = [r for r in res["images"] if "error" not in r]
    assert len(good) == 1 and len(res["images"]) == 3
    overlay = Image.open(good[0]["overlay"])
    assert overlay.size == (64, 40) and good[0]["seen_box"] == [12, 0, 52, 40]
    shown, orig = np.asarray(overlay, dtype=float), np.asarray(Image.open(a), dtype=float)
    np.testing.assert_allclose(shown[:, :12], 0.35 * orig[:, :12], atol=1)  # unseen strips: dimmed, no colour
    assert 0 <= good[0]["p_ai"] <= 1 and good[0]["verdict"] in ("ai", "nature")
    assert json.loads((tmp_path / "out" / "explain.json").read_text())["images"][0]["path"]
    # the run's weights on disk are untouched
    model2, _ = load_run(run)
    assert all(torch.equal(before[k], v) for k, v in model2.state_dict().items())
    with pytest.raises(FakescopeError, match="layer name"):
        explain_files(run, [str(a)], layer="nope")
    with pytest.raises(FakescopeError, match="--method gradcam"):
        explain_files(run, [str(a)], method="shap")


def test_vit_has_no_feature_map():
    model = create_model("timm:vit_tiny_patch16_224", pretrained=False)
    with pytest.raises(FakescopeError, match="3-D tokens"):
        find_target_layer(model)


def test_gallery_picks_right_and_wrong_examples(tmp_path):
    from fakescope.explain import gallery

    from synth import make_dataset

    data = make_dataset(tmp_path / "d", generators=("g",), n_train=0, n_val=12)
    run = make_run(tmp_path / "run", "cnn32", seed=3)
    res = write_gallery(gallery(run, data, per_kind=2, pool=12), tmp_path / "gal")
    assert Image.open(res["png"]).size[0] > 200 and res["layer"] == "backbone.7"
    assert 1 <= len(res["items"]) <= 8
    thr = res["threshold"]["value"]
    for it in res["items"]:
        called_ai = it["p_ai"] >= thr
        assert it["correct"] == (called_ai == (it["label"] == "ai"))
        assert it["path"].split("/")[-2] == it["label"] and Path(it["overlay"]).is_file()
