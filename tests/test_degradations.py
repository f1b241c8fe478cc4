"""Degradations, the JPEG-alignment shortcut control, the format-shortcut warning of ``data inspect``
and training augmentation: each checked on what the model actually receives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fakescope.cli import main
from fakescope.data import transforms as T
from fakescope.data.dataset import ImageDataset, make_loader
from fakescope.data.io import read_image
from fakescope.data.layout import index_root
from fakescope.engine.evaluation import evaluate_run, prepare
from fakescope.engine.infer import evaluate_index
from fakescope.engine.train import TrainOptions, train
from fakescope.options import RuntimeOptions

from synth import assert_close, make_pattern_root, quiet_single_thread

make_root = make_pattern_root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("degrade")
    with quiet_single_thread(tmp):
        data = make_root(tmp / "data")
        run = tmp / "run"
        train(TrainOptions(model="cnn32", data=str(data), epochs=1, num_workers=0,
                           model_options={"filters": [8, 16, 16], "hidden": 16}), run)
        yield {"tmp": tmp, "data": data, "run": run}


def _photo(size=48, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(0, 256, (3, 6, 6), generator=g, dtype=torch.uint8)
    img = T.fit(low, size).float() + torch.randn(3, size, size, generator=g) * 8
    return img.clamp(0, 255).to(torch.uint8)


# --- degradations -----------------------------------------------------------------------------------

CHANGING = [("jpeg", q) for q in (95, 75, 50, 30)] + [("blur", s) for s in (1, 2, 3)] + \
           [("resize", f) for f in (0.5, 0.25)]
IDENTITY = [("jpeg", 100), ("blur", 0), ("resize", 1)]


@pytest.mark.parametrize("kind,level", CHANGING)
def test_each_degradation_changes_the_input(kind, level):
    img = _photo()
    out = T.DEGRADATIONS[kind](img, level)
    assert out.dtype == torch.uint8
    if kind == "resize":
        assert out.shape[-1] == round(48 * level)
    else:
        assert out.shape == img.shape and not torch.equal(out, img)
    # through the pipeline (native size 32, model input 32): still a change, same shape
    clean = T.Pipeline(32, 32)(img)
    degraded = T.Pipeline(32, 32, degrade=(kind, float(level)))(img)
    assert degraded.shape == clean.shape and not torch.equal(degraded, clean)


@pytest.mark.parametrize("kind,level", IDENTITY)
def test_identity_levels_change_nothing(kind, level):
    img = _photo()
    assert torch.equal(T.DEGRADATIONS[kind](img, level), img)
    assert torch.equal(T.Pipeline(32, 32, degrade=(kind, float(level)))(img), T.Pipeline(32, 32)(img))


def test_stronger_degradation_moves_further():
    img = _photo().float()
    jpeg = [(T.jpeg(img.to(torch.uint8), q).float() - img).abs().mean() for q in (95, 75, 50, 30)]
    blur = [(T.blur(img.to(torch.uint8), s).float() - img).abs().mean() for s in (1, 2, 3)]
    assert jpeg == sorted(jpeg) and blur == sorted(blur)


def test_parse_degradations_errors():
    assert T.parse_degradations(["jpeg:95,75", "blur:1", "resize:0.5"]) == [
        ("jpeg", [95.0, 75.0]), ("blur", [1.0]), ("resize", [0.5])]
    for bad in ("jpeg:0", "blur:-1", "resize:2", "noise:1", "jpeg:", "jpeg:a"):
        with pytest.raises(ValueError, match="expected"):
            T.parse_degradations([bad])


def test_evaluate_feeds_the_model_degraded_inputs(env, monkeypatch):
    """Record the batches the model receives: identity levels equal the clean batch, others differ."""
    import fakescope.engine.infer as infer

    seen: list[torch.Tensor] = []
    real = infer.forward_scores

    def spy(model, x, precision, device):
        seen.append(x.clone())
        return real(model, x, precision, device)

    monkeypatch.setattr(infer, "forward_scores", spy)
    index = index_root(env["data"]).select(None, "val")
    n = len(index)
    model, _, pipeline, rt = prepare(env["run"], RuntimeOptions(precision="fp32", batch_size=n, num_workers=0,
                                                                use_cache=False))
    res = evaluate_index(model, index, pipeline, rt,
                         degradations=[("jpeg", [100, 30]), ("blur", [0, 2]), ("resize", [1, 0.5])])
    clean, *levels = seen
    assert len(levels) == 6 and all(x.shape == clean.shape for x in levels)
    for (kind, level), x in zip([("jpeg", 100), ("jpeg", 30), ("blur", 0), ("blur", 2), ("resize", 1),
                                  ("resize", 0.5)], levels, strict=True):
        assert torch.equal(x, clean) == (level == T.IDENTITY_LEVEL[kind]), (kind, level)
    rows = res["degradations"]
    assert [r["level"] for r in rows["jpeg"]] == [100.0, 30.0]
    for kind in ("jpeg", "blur", "resize"):
        assert_close(rows[kind][0]["overall"], res["overall"])  # identity level = clean metrics


def test_evaluate_cli_degrade_json_and_curves(env, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["evaluate", str(env["run"]), "--data", str(env["data"]), "--degrade", "jpeg:95,75,50,30",
               "--degrade", "blur:1,2,3", "--degrade", "resize:0.5,0.25", "--out", str(out), "--workers", "0"])
    assert rc == 0
    assert "jpeg 30" in capsys.readouterr().out
    res = json.loads((out / "metrics.json").read_text())
    assert {k: [r["level"] for r in v] for k, v in res["degradations"].items()} == {
        "jpeg": [95, 75, 50, 30], "blur": [1, 2, 3], "resize": [0.5, 0.25]}
    for rows in res["degradations"].values():
        for r in rows:
            assert {"accuracy", "roc_auc", "n"} <= set(r["overall"]) and set(r["per_generator"]) == {"checker",
                                                                                                    "stripes"}
    for kind in ("jpeg", "blur", "resize"):
        with Image.open(out / f"degrade-{kind}.png") as im:
            assert im.size[0] > 100
    assert main(["evaluate", str(env["run"]), "--data", str(env["data"]), "--degrade", "jpeg:0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected JPEG qualities" in err


# --- shortcut control -------------------------------------------------------------------------------

def _pillow_jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """The reference JPEG round trip, written out with Pillow's public API."""
    import io

    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
    return torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))).permute(2, 0, 1)


def _fixed_images() -> list[torch.Tensor]:
    rng = np.random.default_rng(11)
    noise = torch.from_numpy(rng.integers(0, 256, (3, 37, 53), dtype=np.uint8))
    smooth = torch.nn.functional.avg_pool2d(noise.float()[None], 5, 1, 2)[0].round().to(torch.uint8)
    return [noise, smooth]


@pytest.mark.parametrize("quality", [30, 75, 95])
def test_jpeg_round_trip_is_pillows_and_torchvisions(quality):
    """fakescope's JPEG degradation and alignment (Pillow) give exactly Pillow's reference round trip, and
    the pixels torchvision's deprecated codec gave (where it is still installed): caches and results
    made before the move stay valid."""
    import warnings

    for img in _fixed_images():
        got = T.jpeg(img, quality)
        assert got.dtype == torch.uint8 and got.shape == img.shape
        assert torch.equal(got, _pillow_jpeg(img, quality))
        assert torch.equal(T.jpeg_align(img, quality), got)
        assert 0 < (got.float() - img.float()).abs().mean() < 64  # lossy (noise at Q 30: ~55), not garbage
        try:
            with warnings.catch_warnings():  # the test's own filter: torchvision's deprecation notice
                warnings.simplefilter("ignore", DeprecationWarning)
                from torchvision.io import decode_jpeg, encode_jpeg

                old = decode_jpeg(encode_jpeg(img.contiguous(), quality=quality))
        except (ImportError, RuntimeError):
            continue
        diff = (old.int() - got.int()).abs()
        assert diff.max() <= 1 and diff.float().mean() <= 0.01, (int(diff.max()), float(diff.float().mean()))


def test_jpeg_align_gives_both_classes_the_same_encoding(env, monkeypatch):
    """Every file of both classes (JPEG nature, PNG ai) is encoded exactly once, at quality Q, and
    the model receives exactly the decoded JPEG of the original pixels."""
    index = index_root(env["data"]).select(["checker"], "val")
    files = [index.abspath(i) for i in range(len(index))]
    formats = {Path(f).suffix for f in files}
    assert formats == {".jpg", ".png"}
    calls: list[int] = []
    real = T.jpeg_encode

    def spy(img, quality):
        calls.append(quality)
        return real(img, quality)

    monkeypatch.setattr(T, "jpeg_encode", spy)
    q = 60
    ds = ImageDataset(files, T.Pipeline(32, 32, jpeg_align=q), stage_only=True)
    got = {int(i): x for b in make_loader(ds, 16, num_workers=0) for i, x in zip(b.index, b.image, strict=True)}
    assert calls == [q] * len(files)
    monkeypatch.setattr(T, "jpeg_encode", real)
    for i, f in enumerate(files):
        raw = read_image(f)
        expected = T.fit(_pillow_jpeg(raw, q), 32)
        assert torch.equal(got[i], expected), f
        # a PNG without alignment reaches the model untouched; with it, it carries JPEG artefacts
        if f.endswith(".png"):
            assert torch.equal(T.Pipeline(32, 32)(raw), raw) and not torch.equal(got[i], raw)
    # re-aligning an aligned image again at Q changes little for both classes alike
    drift = {ext: [] for ext in (".jpg", ".png")}
    for i, f in enumerate(files):
        again = T.jpeg_align(got[i], q)
        drift[Path(f).suffix].append((again.float() - got[i].float()).abs().mean().item())
    assert abs(np.mean(drift[".jpg"]) - np.mean(drift[".png"])) < 1.0


def test_jpeg_align_in_evaluate_and_train(env, tmp_path, monkeypatch):
    res = evaluate_run(env["run"], env["data"], jpeg_align=70,
                       runtime_options=RuntimeOptions(precision="fp32", num_workers=0, use_cache=False))
    assert res["data"]["jpeg_align"] == 70
    run = tmp_path / "aligned"
    train(TrainOptions(model="cnn32", data=str(env["data"]), generators=["checker"], epochs=1, num_workers=0,
                       jpeg_align=70, model_options={"filters": [8, 16, 16], "hidden": 16}), run)
    assert json.loads((run / "config.json").read_text())["train"]["jpeg_align"] == 70
    calls: list[int] = []
    real = T.jpeg_encode
    monkeypatch.setattr(T, "jpeg_encode", lambda img, quality: calls.append(quality) or real(img, quality))
    res = evaluate_run(run, env["data"], generators=["checker"],
                       runtime_options=RuntimeOptions(precision="fp32", num_workers=0, use_cache=False))
    assert res["data"]["jpeg_align"] == 70  # an aligned run is evaluated aligned by default
    assert calls == [70] * res["overall"]["n"]


def test_inspect_warns_when_class_formats_differ(env, tmp_path, capsys):
    from fakescope.data.inspect import inspect_index

    info = inspect_index(index_root(env["data"]), num_workers=0)
    assert info["formats"]["nature"] == {"JPEG": info["checked"] // 2} and "PNG" in info["formats"]["ai"]
    assert any("format shortcut" in w and "--jpeg-align" in w for w in info["warnings"])
    assert main(["data", "inspect", str(env["data"]), "--workers", "0"]) == 0
    assert "WARNING: format shortcut" in capsys.readouterr().out
    same = make_root(tmp_path / "png", generators=("checker",), train=4, val=2, nature_format="PNG")
    info = inspect_index(index_root(same), num_workers=0)
    assert not any("format shortcut" in w for w in info["warnings"])


# --- augmentation -----------------------------------------------------------------------------------

AUG = T.Augment(jpeg_prob=0.5, jpeg_quality=(30, 90), blur_prob=0.5, blur_sigma=(0.5, 2.0), crop=0.75, flip=True)


def test_augmentation_changes_inputs_deterministically(env):
    index = index_root(env["data"]).select(["checker"], "train")
    files = [index.abspath(i) for i in range(len(index))]
    plain = ImageDataset(files, T.Pipeline(32, 32), stage_only=True)
    a = ImageDataset(files, T.Pipeline(32, 32, augment=AUG), stage_only=True, seed=3)
    b = ImageDataset(files, T.Pipeline(32, 32, augment=AUG), stage_only=True, seed=3)
    first = [a[i]["image"] for i in range(len(files))]
    assert all(torch.equal(x, b[i]["image"]) for i, x in enumerate(first))  # same seed and epoch: same input
    changed = sum(not torch.equal(x, plain[i]["image"]) for i, x in enumerate(first))
    assert changed >= 0.9 * len(files)  # crop < 1 changes every image; flips, JPEG and blur on top
    a.epoch = 1
    assert sum(not torch.equal(a[i]["image"], x) for i, x in enumerate(first)) >= 0.9 * len(files)
    c = ImageDataset(files, T.Pipeline(32, 32, augment=AUG), stage_only=True, seed=4)
    assert any(not torch.equal(c[i]["image"], x) for i, x in enumerate(first))
    # the same draws with DataLoader workers as in the main process
    loader = make_loader(b, 8, num_workers=1)
    for batch in loader:
        for i, x in zip(batch.index.tolist(), batch.image, strict=True):
            assert torch.equal(x, first[i])
    # off by default
    assert not T.Augment().active and not T.Pipeline(32, 32).augment.active


def test_augmented_training_is_reproducible_and_different(env, tmp_path):
    from fakescope.engine.checkpoint import load_tensors

    def run(name, aug):
        out = tmp_path / name
        summary = train(TrainOptions(model="cnn32", data=str(env["data"]), generators=["checker"], epochs=1,
                                     num_workers=0, augment=aug, model_options={"filters": [8, 8, 8], "hidden": 8}),
                        out)
        return summary, load_tensors(out / "model.safetensors")

    s1, w1 = run("a1", AUG)
    _, w2 = run("a2", AUG)
    _, w0 = run("plain", T.Augment())
    assert s1["input_path"] == "stream"  # augmented inputs are made per epoch, never cached
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(not torch.equal(w1[k], w0[k]) for k in w1)
    cfg = json.loads((tmp_path / "a1" / "config.json").read_text())
    assert cfg["train"]["augment"]["flip"] is True and cfg["train"]["augment"]["crop"] == 0.75
