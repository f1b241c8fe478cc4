"""calibrate -> evaluate / predict / attack / export / explain / provenance, through the command line."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image, PngImagePlugin

from fakescope.calibration import read_calibration
from fakescope.cli import main

from synth import make_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "root", n_train=40, n_val=16, strength=0.05)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cnn32"
    assert main(["train", "--model", "cnn32", "--data", str(data), "--epochs", "2", "--out", str(out),
                 "--val-fraction", "0.25"]) == 0
    return out


def test_train_writes_a_model_card(run):
    card = (run / "MODEL_CARD.md").read_text()
    assert card.startswith("---\n") and "model_name: cnn32" in card
    assert "## Training data" in card and "## Known limitations" in card and "fakescope train --model cnn32" in card
    assert "Not calibrated" in card


def test_calibrate_then_evaluate_predict_attack(run, data, tmp_path, capsys):
    assert main(["evaluate", str(run), "--data", str(data), "--json", str(tmp_path / "raw.json")]) == 0
    raw = json.loads((tmp_path / "raw.json").read_text())
    assert raw["threshold"] == 0.5 and raw["threshold_source"] == "default" and raw["calibration"] is None
    for key in ("ece", "brier", "tpr_at_fpr_1pct", "tpr_at_fpr_5pct", "eer"):
        assert raw["overall"][key] is not None and raw["per_generator"]["alpha"][key] is not None
    capsys.readouterr()

    # 20 real held-out images cannot promise 5 % at 95 % confidence (59 can): one line, exit 2, nothing written
    assert main(["calibrate", str(run), "--split", "holdout", "--target-fpr", "0.05"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected at least 59 real calibration images" in err and "got 20" in err
    assert read_calibration(run) is None
    assert main(["calibrate", str(run), "--split", "holdout", "--target-fpr", "0.2"]) == 0  # 14 are enough
    out = capsys.readouterr()
    assert "temperature" in out.out and "WARNING" not in out.err
    promise = ("at most 20 % of real images like those in root (the training images the run did not train on) "
               "are called AI, with 95 % confidence")
    assert f"promise: {promise}" in out.out
    cal = read_calibration(run)
    assert cal.data["split"] == "holdout" and cal.fit["fpr_at_threshold"] <= 0.2 and cal.confidence == 0.95
    assert cal.fit["n_real"] == cal.fit["n_ai"] == 20  # the 25 % early-stopping carve of 2 x 40 per class
    g = json.loads((run / "calibration.json").read_text())["guarantee"]
    assert g["promise"] == promise and g["n_real"] == 20 and g["target_fpr"] == 0.2 and g["confidence"] == 0.95
    assert g["allowed_false_positives"] == 0 and g["fpr_upper_bound"] <= 0.2  # 1 - 0.05 ** (1 / 20) = 0.139
    assert g["fpr_upper_bound"] == pytest.approx(1 - 0.05 ** (1 / 20))
    assert g["tpr_interval"][0] <= g["tpr"] <= g["tpr_interval"][1]
    card = (run / "MODEL_CARD.md").read_text()
    assert "temperature scaling, T =" in card and f"**Promise:** {promise}" in card
    assert yaml.safe_load(card.split("---\n")[1])["false_positive_promise"] == promise
    assert "--target-fpr 0.2 --confidence 0.95" in card

    js = tmp_path / "cal.json"
    assert main(["evaluate", str(run), "--data", str(data), "--json", str(js), "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads(js.read_text())
    assert ev["threshold"] == pytest.approx(cal.threshold) and ev["threshold_source"] == "calibration.json"
    assert ev["calibrated"] and ev["calibration"]["temperature"] == pytest.approx(cal.temperature)
    assert ev["overall"]["roc_auc"] == pytest.approx(raw["overall"]["roc_auc"])  # same ranking
    assert ev["calibration"]["uncalibrated"]["ece"] == pytest.approx(raw["overall"]["ece"])
    assert (tmp_path / "ev" / "reliability.png").stat().st_size > 5000 and ev["warnings"] == []
    (tn, fp), (fn, tp) = ev["overall"]["confusion"]
    assert ev["rates"]["overall"]["fpr"]["value"] == fp / (fp + tn) and ev["rates"]["overall"]["fpr"]["n"] == 32
    assert ev["rates"]["per_generator"]["alpha"]["tpr"]["n"] == 16
    assert ev["guarantee_check"]["promise"] == promise and ev["guarantee_check"]["broken"] is False
    assert main(["evaluate", str(run), "--data", str(data)]) == 0  # into RUN/eval-val: the card lists it
    card = (run / "MODEL_CARD.md").read_text()
    assert "`fakescope evaluate` on" in card and "-val; threshold" in card and "calibration.json" in card
    z = np.load(tmp_path / "ev" / "scores.npz")
    np.testing.assert_allclose(z["p_ai"], cal.p_ai(z["p_ai_raw"]))
    assert (ev["overall"]["confusion"][0][1] == int((z["p_ai"][z["labels"] == 0] >= cal.threshold).sum()))

    assert main(["evaluate", str(run), "--data", str(data), "--uncalibrated", "--json", str(tmp_path / "u.json")]) == 0
    assert json.loads((tmp_path / "u.json").read_text())["overall"] == raw["overall"]
    assert main(["evaluate", str(run), "--data", str(data), "--threshold", "0.3",
                 "--json", str(tmp_path / "t.json")]) == 0
    t = json.loads((tmp_path / "t.json").read_text())
    assert t["threshold"] == 0.3 and t["threshold_source"] == "--threshold" and t["calibrated"]
    capsys.readouterr()

    files = sorted(str(p) for p in (data / "alpha" / "val" / "ai").iterdir())[:3]
    assert main(["predict", str(run), *files, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(r["threshold_source"] == "calibration.json" and r["calibrated"] for r in rows)
    assert all(r["guarantee"]["promise"] == promise and r["guarantee"]["n_real"] == 20 for r in rows)
    assert main(["predict", str(run), files[0]]) == 0
    assert f"promise: {promise}" in capsys.readouterr().out
    assert main(["predict", str(run), files[0], "--format", "json", "--threshold", "0.4"]) == 0
    assert "guarantee" not in json.loads(capsys.readouterr().out)[0]  # the promise is about its own threshold
    assert all(r["verdict"] == ("ai" if r["p_ai"] >= cal.threshold else "nature") for r in rows)
    assert all(r["provenance"]["generator_hint"] is None for r in rows)
    js = tmp_path / "atk.json"
    assert main(["attack", str(run), "--data", str(data), "--eps", "0", "--limit", "4", "--json", str(js),
                 "--out", str(tmp_path / "atk")]) == 0
    atk = json.loads(js.read_text())
    assert atk["threshold_source"] == "calibration.json"
    assert atk["raw_threshold"] == pytest.approx(cal.raw_threshold())


def test_calibrating_on_val_warns(run, data, tmp_path, capsys):
    import shutil

    r2 = tmp_path / "r2"
    shutil.copytree(run, r2)
    assert main(["calibrate", str(r2), "--data", str(data), "--split", "val", "--confidence", "0"]) == 0
    captured = capsys.readouterr()
    assert "WARNING: calibrating on" in captured.err and "promise: no guarantee (--confidence 0)" in captured.out
    assert read_calibration(r2).promise is None and read_calibration(r2).confidence == 0
    assert main(["evaluate", str(r2), "--data", str(data), "--json", str(tmp_path / "e.json")]) == 0
    assert "calibration set itself" in json.loads((tmp_path / "e.json").read_text())["warnings"][0]
    assert main(["calibrate", str(r2), "--split", "val"]) == 2  # no --data
    assert "expected --data ROOT" in capsys.readouterr().err


def test_evaluate_flags_real_images_unlike_the_calibration_set(run, data, tmp_path, capsys):
    """A calibration whose real images all scored far lower than these: the FPR interval on these real
    images lies entirely above the promise, and evaluate says so (JSON warning + stderr + model card)."""
    import shutil

    from fakescope.calibration import fit_calibration, sigmoid, write_calibration

    r3 = tmp_path / "r3"
    shutil.copytree(run, r3)
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(300, int), np.ones(300, int)]
    cal = fit_calibration(y, sigmoid(np.r_[rng.normal(-8, 1, 300), rng.normal(2, 1, 300)]), 0.01,
                          data={"root": "/elsewhere/studio_photos", "split": "val"})
    write_calibration(r3, cal)
    assert main(["evaluate", str(r3), "--data", str(data), "--json", str(tmp_path / "e.json")]) == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    check = ev["guarantee_check"]
    assert check["broken"] and check["overall"]["broken"] and check["overall"]["fpr"]["interval"][0] > 0.01
    assert check["promise"] == ("at most 1 % of real images like those in studio_photos (split val) are called "
                                "AI, with 95 % confidence")
    flagged = [w for w in ev["warnings"] if "lies entirely above the calibration's promise" in w]
    assert flagged and "not like the calibration set" in flagged[0]
    captured = capsys.readouterr()
    assert "WARNING: false-positive rate" in captured.err and "BROKEN on this data" in captured.out
    assert main(["evaluate", str(r3), "--data", str(data)]) == 0  # into the run: the card lists it
    assert "false-positive target broken" in (r3 / "MODEL_CARD.md").read_text()


def test_export_predict_onnxruntime_and_explain(run, data, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'fakescope[onnx]')")
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(run), "--out", str(onnx_path)]) == 0
    assert "output p_ai" in capsys.readouterr().out
    files = [str(p) for p in sorted((data / "beta" / "val").rglob("*.png"))[:6]]
    assert main(["predict", str(run), *files, "--format", "json", "--precision", "fp32", "--no-provenance"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert main(["predict", str(run), *files, "--format", "json", "--backend", "onnxruntime", "--onnx",
                 str(onnx_path), "--no-provenance"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert max(abs(x["p_ai"] - y["p_ai"]) for x, y in zip(a, b)) <= 1e-4
    assert [x["verdict"] for x in a] == [y["verdict"] for y in b] and "provenance" not in a[0]
    assert main(["explain", str(run), files[0], "--out", str(tmp_path / "ex")]) == 0
    res = json.loads((tmp_path / "ex" / "explain.json").read_text())
    assert res["layer"] == "backbone.7" and Image.open(res["images"][0]["overlay"]).size == (32, 32)


def test_provenance_command(tmp_path, capsys):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a photo of a cat\nSteps: 30")
    f = tmp_path / "sd.png"
    Image.new("RGB", (8, 8)).save(f, pnginfo=info)
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert main(["provenance", str(f), str(plain)]) == 0
    out = capsys.readouterr().out
    assert "stable-diffusion (PNG parameters chunk)" in out and "no generator named" in out
    assert "absence says nothing" in out
    assert main(["provenance", str(f), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["png_text"]["parameters"].startswith("a photo")
