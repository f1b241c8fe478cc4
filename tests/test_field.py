"""Native-scale geometry, recipes applied to training options, attribution metrics."""

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support

from fakescope.data.geometry import center_crop, grid_crops, grid_positions, random_crop
from fakescope.data.transforms import Augment, Pipeline
from fakescope.engine.hyperparams import Schedule, apply_recipe
from fakescope.errors import FakescopeError
from fakescope.metrics import attribution_metrics
from fakescope.models import create_model
from fakescope.options import RuntimeOptions

from synth import assert_close


def _img(h, w):
    return torch.arange(3 * h * w, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, h, w)


def test_center_crop_keeps_the_pixels_and_enlarges_only_small_images():
    img = _img(300, 500)
    c = center_crop(img, 224)
    assert c.shape == (3, 224, 224)
    assert torch.equal(c, img[:, 38:262, 138:362])  # the same pixels: no resampling
    small = center_crop(_img(100, 150), 224)
    assert small.shape == (3, 224, 224)


def test_grid_crops_cover_the_image_up_to_three_sizes_a_side():
    assert grid_positions(224, 224, 224) == [(0, 0)] * 9  # coinciding crops: the mean is the crop's score
    pos = grid_positions(500, 300, 224)
    assert pos == [(0, 0), (0, 38), (0, 76), (138, 0), (138, 38), (138, 76), (276, 0), (276, 38), (276, 76)]
    covered = np.zeros((500, 300), bool)
    for t, left in pos:
        covered[t:t + 224, left:left + 224] = True
    assert covered.all()
    big = grid_positions(5000, 3000, 224)
    assert len(big) == 9 and big[-1] == (5000 - 224, 3000 - 224)  # corner to corner on big images
    crops = grid_crops(_img(500, 300), 224)
    assert len(crops) == 9 and torch.equal(crops[-1], _img(500, 300)[:, 276:, 76:])


def test_pipeline_geometries():
    img = _img(300, 500)
    resize = Pipeline(64)
    assert resize(img).shape == (3, 64, 64) and resize.reduce_size() == 64
    cc = Pipeline(224, native_size=100, geometry="center_crop")
    assert cc.stage_size() == 224 and cc.reduce_size() is None  # no native-size step, no box reduction
    assert torch.equal(cc(img), img[:, 38:262, 138:362])
    crops = Pipeline(224, geometry="crops")
    out = crops(img)
    assert out.shape == (9, 3, 224, 224) and crops.crops == 9 and torch.equal(out[0], img[:, :224, :224])
    train = Pipeline(224, geometry="center_crop", augment=Augment(native_crop=True))
    a = train.to_stage(img, torch.Generator().manual_seed(1))
    assert a.shape == (3, 224, 224) and not torch.equal(a, cc(img))
    with pytest.raises(ValueError, match="expected a geometry among"):
        Pipeline(224, geometry="zoom")


def test_random_crop_is_seeded_and_in_bounds():
    img = _img(260, 300)
    a = random_crop(img, 224, torch.Generator().manual_seed(3))
    b = random_crop(img, 224, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (3, 224, 224)


@dataclass
class _Opts:
    lr: float | None = None
    batch_size: int | None = None
    lr_schedule: str | None = None
    schedule: dict | None = None
    betas: tuple | None = None
    augment: Augment | None = None
    paired: bool | None = None
    recipe: dict = field(default_factory=dict)


def test_recipe_fills_only_what_the_user_left_unset():
    spot = create_model("cnnspot", pretrained=False)
    o = apply_recipe(_Opts(), spot.recipe)
    assert (o.lr, o.batch_size, o.lr_schedule, o.betas) == (1e-4, 64, "plateau", (0.9, 0.999))
    assert o.augment == Augment(jpeg_prob=0.5, jpeg_quality=(30, 100), blur_prob=0.5, blur_sigma=(0.0, 3.0),
                                native_crop=True, flip=True)
    assert o.schedule["factor"] == 0.1 and o.recipe["from_recipe"] == ["augment", "batch_size", "lr", "lr_schedule"]
    mine = apply_recipe(_Opts(lr=3e-3, augment=Augment()), spot.recipe)
    assert (mine.lr, mine.batch_size, mine.augment) == (3e-3, 64, Augment())  # the user's choices win
    plain = apply_recipe(_Opts(), create_model("cnn32").recipe)  # no recipe: fakescope's defaults
    assert (plain.lr, plain.batch_size, plain.lr_schedule, plain.augment) == (1e-3, 32, "constant", Augment())
    with pytest.raises(FakescopeError, match="expected --lr-schedule among"):
        apply_recipe(_Opts(lr_schedule="linear"), None)


def test_plateau_schedule_divides_by_ten_then_stops():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=1e-4)
    s = Schedule(opt, "plateau", {"factor": 0.1, "patience": 2, "threshold": 0.001, "min_lr": 1e-6}, epochs=10)
    for acc in (0.80, 0.85, 0.8505, 0.85):  # +0.0005 is no improvement
        s.step(acc)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)
    s.step(0.9)
    s.step(0.9)
    s.step(0.9)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6) and not s.done
    s.step(0.9)
    s.step(0.9)
    assert s.done and opt.param_groups[0]["lr"] == pytest.approx(1e-6)
    restored = Schedule(opt, "plateau", s.params, epochs=10)
    restored.load_state_dict(s.state_dict())
    assert restored.done and restored.best == 0.9


def test_attribution_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    classes = ["nature", "a", "b", "c"]
    y = rng.integers(0, 3, 60)  # class 'c' never occurs
    probs = rng.dirichlet(np.ones(4), 60)
    probs[np.arange(60), y] += rng.uniform(0, 0.6, 60)  # better than chance
    m = attribution_metrics(y, probs, classes)
    pred = probs.argmax(1)
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=[0, 1, 2], zero_division=0)
    for i, name in enumerate(classes[:3]):
        assert m["per_class"][name]["recall"] == pytest.approx(r[i])
        assert m["per_class"][name]["f1"] == pytest.approx(f[i])
        assert m["per_class"][name]["support"] == s[i]
    assert m["per_class"]["c"]["recall"] is None and m["per_class"]["c"]["support"] == 0
    assert m["macro_f1"] == pytest.approx(f.mean())
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    assert np.array(m["confusion"]).shape == (4, 4) and np.array(m["confusion"]).sum() == 60
    assert np.trace(np.array(m["confusion"])) == (pred == y).sum()


# --- through the engines -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pattern_root(tmp_path_factory):
    from synth import make_pattern_root

    return make_pattern_root(tmp_path_factory.mktemp("patterns") / "data", train=24, val=8, size=48, strength=40)


def test_train_applies_the_recipe_and_records_geometry(pattern_root, tmp_path):
    import json

    from fakescope.engine.train import TrainOptions, train

    out = tmp_path / "npr"
    train(TrainOptions(model="npr", data=str(pattern_root), epochs=1, patience=0, model_options={"input_size": 32}),
          out)
    cfg = json.loads((out / "config.json").read_text())
    t = cfg["train"]
    assert (t["lr"], t["batch_size"], t["lr_schedule"], t["schedule"]) == (2e-4, 32, "step",
                                                                            {"every": 10, "factor": 0.9})
    assert t["augment"]["native_crop"] and t["augment"]["flip"] and cfg["test_geometry"] == "center_crop"
    assert cfg["recipe"]["from_recipe"] == ["augment", "batch_size", "lr", "lr_schedule"]
    assert cfg["task"] == "binary" and cfg["classes"] is None
    mine = tmp_path / "npr-mine"
    train(TrainOptions(model="npr", data=str(pattern_root), epochs=1, patience=0, lr=1e-3, batch_size=8,
                       augment=Augment(), test_geometry="resize", model_options={"input_size": 32}), mine)
    cfg = json.loads((mine / "config.json").read_text())
    assert (cfg["train"]["lr"], cfg["train"]["batch_size"], cfg["test_geometry"]) == (1e-3, 8, "resize")
    assert cfg["recipe"]["from_recipe"] == ["lr_schedule"]


def test_attribution_run_evaluates_and_predicts_generators(pattern_root, tmp_path):
    import json

    from fakescope.engine.evaluation import evaluate_run, predict_paths
    from fakescope.engine.train import TrainOptions, train
    from fakescope.report.artifacts import write_evaluation

    out = tmp_path / "attr"
    summary = train(TrainOptions(model="cnn32", data=str(pattern_root), epochs=8, patience=0, seed=1, lr=3e-3,
                                 batch_size=16, task="attribution", test_geometry="center_crop"), out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["classes"] == ["nature", "checker", "stripes"] and cfg["task"] == "attribution"
    assert summary["validation"]["n"] > 0
    res = evaluate_run(out, pattern_root)
    att = res["attribution"]
    assert att["classes"] == ["nature", "checker", "stripes"] and np.array(att["confusion"]).shape == (3, 3)
    assert np.array(att["confusion"]).sum() == att["n"] == res["overall"]["n"] == 32
    assert set(att["per_class"]) == {"nature", "checker", "stripes"} and att["unknown_generator"] == 0
    # the two patterns are learnable at the images' pixel scale (resizing 48 -> 32 px would blur them away)
    assert att["accuracy"] > 0.8 and att["macro_f1"] > 0.8
    assert res["overall"]["roc_auc"] > 0.9  # binary metrics from p_ai = 1 - P(nature)
    outputs = write_evaluation(res, tmp_path / "ev")
    assert (tmp_path / "ev" / "attribution-confusion.png").is_file() and outputs["attribution_confusion"]
    img = sorted((pattern_root / "stripes" / "val" / "ai").iterdir())[0]
    row = predict_paths(out, [str(img)])[0]
    assert row["generator"] in cfg["classes"] and len(row["top3"]) == 3
    probs = dict((c, p) for c, p in row["top3"])
    assert row["p_ai"] == pytest.approx(1 - probs["nature"], abs=2e-6)
    assert row["generator_p"] == max(probs.values())

    # the server reports the same generator fields as predict (and the classes in /v1/models)
    from fastapi.testclient import TestClient

    from fakescope.serve import ServeOptions, create_app

    with TestClient(create_app([out], ServeOptions(max_wait_ms=2))) as client:
        for _ in range(400):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.025)
        assert client.get("/v1/models").json()["models"][0]["classes"] == cfg["classes"]
        served = client.post("/v1/predict", files=[("file", (img.name, img.read_bytes(), "image/png"))]).json()
    got = served["results"][0]
    assert_close((got["p_ai"], got["generator"], got["generator_p"]),
                 (row["p_ai"], row["generator"], row["generator_p"]))  # the server pads batches
    assert [[c, pytest.approx(p, abs=1e-6)] for c, p in row["top3"]] == got["top3"]


def test_test_geometry_override_reaches_evaluation(pattern_root, tmp_path):
    from fakescope.engine.evaluation import evaluate_run
    from fakescope.engine.train import TrainOptions, train

    out = tmp_path / "cnn"
    train(TrainOptions(model="cnn32", data=str(pattern_root), epochs=1, patience=0), out)
    a = evaluate_run(out, pattern_root)
    b = evaluate_run(out, pattern_root, geometry="crops")
    assert a["data"]["test_geometry"] == "resize" and b["data"]["test_geometry"] == "crops"
    assert a["overall"]["n"] == b["overall"]["n"] == 32
    assert not np.allclose(a["scores"]["p_ai"], b["scores"]["p_ai"])  # 48 px images: resized vs 9 native crops
    with pytest.raises(FakescopeError, match="expected a test geometry among"):
        evaluate_run(out, pattern_root, geometry="zoom")


def test_benchmark_takes_presets_and_attribution_runs_and_reports_unseen_generators(pattern_root, tmp_path):
    import shutil

    from fakescope.engine.evaluation import predict_paths
    from fakescope.study import run_benchmark

    photos = tmp_path / "photos"  # a flat folder of real images, one of them unreadable
    photos.mkdir()
    for i, f in enumerate(sorted((pattern_root / "checker" / "val" / "nature").iterdir())[:5]):
        shutil.copy(f, photos / f"p{i}{f.suffix}")
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    res = run_benchmark({"data": str(pattern_root), "out": str(tmp_path / "bench"), "epochs": 1,
                         "precision_check": False, "leave_one_out": True, "real_photos": str(photos),
                         "models": {"npr": {"input_size": 32},
                                    "cnn32-attr": {"model": "cnn32", "task": "attribution"}}})
    assert set(res["models"]) == {"npr", "cnn32-attr"}
    for label, m in res["models"].items():  # false alarms on the real photos, as predict scores them
        rp = m["real_photos"]
        ref = predict_paths(m["runs"][0]["dir"], sorted(str(f) for f in photos.iterdir()), provenance=False)
        assert rp["n"] == 5 and list(rp["errors"]) == ["broken.png"]
        assert rp["called_ai"] == sum(r.get("verdict") == "ai" for r in ref) and rp["fpr"] == rp["called_ai"] / 5
        assert_close(rp["p_ai"], {os.path.basename(r["path"]): r["p_ai"] for r in ref if "p_ai" in r})
        assert rp["test_geometry"] == ("center_crop" if label == "npr" else "resize") == m["test_geometry"]
    npr_cfg = json.loads((tmp_path / "bench" / "runs" / "npr-seed42" / "config.json").read_text())
    assert npr_cfg["train"]["lr"] == 2e-4 and npr_cfg["test_geometry"] == "center_crop"  # the recipe applied
    attr = json.loads((tmp_path / "bench" / "runs" / "cnn32-attr-seed42" / "config.json").read_text())
    assert attr["classes"] == ["nature", "checker", "stripes"]
    loo = res["leave_one_out"]["npr"]
    assert set(loo["held_out"]) == {"checker", "stripes"} and loo["protocol"] == "leave-one-out"
    report = (tmp_path / "bench" / "report.md").read_text()
    assert "## Unseen generators" in report
    unseen = report.split("## Unseen generators")[1]
    line = next(r for r in unseen.splitlines() if r.startswith("| cnn32-attr"))
    assert line.count(" / ") == 3  # accuracy / ROC-AUC for each generator left out and the mean
    photos_table = report.split("### False alarms on real photos")[1]
    assert f"| npr | center_crop | 0.5000 | {res['models']['npr']['real_photos']['called_ai']} | 5 |" in photos_table


def test_crops_score_the_same_from_the_feature_cache_and_streamed(pattern_root, tmp_path):
    """A frozen backbone under the crops geometry: one cache row holds the 9 crops' features side by
    side; the head's mean score equals the streamed one."""
    from fakescope.engine.evaluation import evaluate_run
    from fakescope.engine.train import TrainOptions, train

    out = tmp_path / "frozen"
    train(TrainOptions(model="timm:resnet18", data=str(pattern_root), epochs=1, patience=0,
                       model_options={"pretrained": False, "input_size": 32}), out)
    cached = evaluate_run(out, pattern_root, geometry="crops", runtime_options=RuntimeOptions(precision="fp32"))
    streamed = evaluate_run(out, pattern_root, geometry="crops",
                            runtime_options=RuntimeOptions(precision="fp32", use_cache=False))
    center = evaluate_run(out, pattern_root, geometry="center_crop", runtime_options=RuntimeOptions(precision="fp32"))
    assert np.allclose(cached["scores"]["p_ai"], streamed["scores"]["p_ai"], atol=1e-6)
    assert not np.allclose(cached["scores"]["p_ai"], center["scores"]["p_ai"], atol=1e-4)


def test_scale_augmentation_downscales_before_the_crop():
    img = _img(400, 400)
    p = Pipeline(100, geometry="center_crop", augment=Augment(scale=(0.5, 0.5)))
    out = p.to_stage(img, torch.Generator().manual_seed(0))
    from fakescope.data.transforms import downscale

    assert torch.equal(out, center_crop(downscale(img, 0.5), 100))
    assert Augment(scale=(0.5, 1.0)).active and not Augment().active


def test_the_server_scores_crops_as_predict_does(pattern_root, tmp_path):
    from fakescope.engine.evaluation import predict_paths
    from fakescope.engine.predictor import Predictor
    from fakescope.engine.train import TrainOptions, train

    out = tmp_path / "cnn"
    train(TrainOptions(model="cnn32", data=str(pattern_root), epochs=1, patience=0, test_geometry="crops"), out)
    img = sorted((pattern_root / "checker" / "val" / "ai").iterdir())[0]
    pred = Predictor(out)
    assert pred.stage_shape == (9, 3, 32, 32)  # the run's geometry, from its config
    _, stage = pred.decode(img.read_bytes(), img.name)
    p = pred.score([stage, stage])
    row = predict_paths(out, [str(img)])[0]
    assert p[0] == pytest.approx(row["p_ai"], abs=1e-6) and p[0] == p[1]
    assert Predictor(out, geometry="resize").stage_shape == (3, 48, 48)  # the native-size step
