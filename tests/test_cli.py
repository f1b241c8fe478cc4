import json
import subprocess
import sys

import pytest

from fakescope.cli import main
from fakescope.data.layout import index_root

from synth import accuracy_on, make_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "root", n_train=24, n_val=8)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cnn32"
    assert main(["train", "--model", "cnn32", "--data", str(data), "--epochs", "2", "--out", str(out)]) == 0
    return out


def test_python_dash_m_and_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "cnn32" in out and "resnet50" in out and "convnext_small" in out and "timm:<name>" in out
    r = subprocess.run([sys.executable, "-m", "fakescope", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("fakescope ")


def test_data_inspect_json_and_show(data, tmp_path, capsys):
    assert main(["data", "inspect", str(data), "--json", "--workers", "0"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["counts"]["alpha"]["train"] == {"nature": 24, "ai": 24}
    assert info["formats"] == {"nature": {"PNG": 64}, "ai": {"PNG": 64}}
    assert info["sizes"]["shorter_side"]["median"] == 32 and info["unreadable"] == {}
    assert main(["data", "show", str(data), "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 5000


def test_inspect_warns_about_the_format_shortcut(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", generators=("g",), n_train=6, n_val=0)
    for f in (root / "g" / "train" / "nature").iterdir():  # real photos as JPEG, AI images as PNG
        from PIL import Image

        Image.open(f).save(f.with_suffix(".jpg"), quality=90)
        f.unlink()
    assert main(["data", "inspect", str(root), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "format shortcut" in out and "--jpeg-align" in out


def test_train_evaluate_predict_from_the_command_line(run, data, tmp_path, capsys):
    capsys.readouterr()
    js = tmp_path / "eval.json"
    assert main(["evaluate", str(run), "--data", str(data), "--json", str(js), "--generators", "alpha"]) == 0
    printed = capsys.readouterr().out
    assert "| overall |" in printed and "alpha" in printed
    blob = json.loads(js.read_text())
    assert list(blob["per_generator"]) == ["alpha"] and blob["overall"]["n"] == 16
    files = [str(p) for p in sorted((data / "beta" / "val" / "ai").iterdir())[:2]]
    assert main(["predict", str(run), *files, str(tmp_path / "missing.png"), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in rows[1:]] == files and rows[0]["error"] == "file not found"
    assert main(["predict", str(run), str(data / "beta" / "val"), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "path,p_ai,verdict,generator_hint,error" and len(lines) == 1 + 16


@pytest.mark.parametrize("argv,needle", [
    (["train", "--model", "nope", "--data", "X", "--out", "Y"], "unknown model 'nope': expected one of"),
    (["evaluate", "RUN", "--data", "X", "--threshold", "1.5"], "expected a threshold in [0, 1], got 1.5"),
    (["train", "--model", "cnn32", "--data", "/nonexistent/root", "--out", "Y"], "data root not found"),
])
def test_user_errors_are_one_line_exit_2(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        code = main(argv)
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_unknown_generator_names_the_choices(run, data, capsys):
    assert main(["evaluate", str(run), "--data", str(data), "--generators", "biggan"]) == 2
    assert "unknown generator 'biggan': expected one of alpha, beta" in capsys.readouterr().err


def test_demo_dataset_is_in_genimage_layout(tmp_path, capsys):
    assert main(["data", "demo", str(tmp_path / "demo"), "--train-per-class", "4", "--val-per-class", "2"]) == 0
    idx = index_root(tmp_path / "demo", use_cache=False)
    assert idx.generator_names == ["demo_shuffle", "demo_upconv"]
    assert idx.counts()["demo_upconv"] == {"train": {"nature": 4, "ai": 4}, "val": {"nature": 2, "ai": 2}}


def test_attack_command_json_table_and_plot(run, data, tmp_path, capsys):
    js = tmp_path / "atk.json"
    assert main(["attack", str(run), "--data", str(data), "--attack", "pgd", "--eps", "0,4/255,16/255",
                 "--steps", "3", "--limit", "4", "--json", str(js), "--out", str(tmp_path / "atk"),
                 "--save-examples", str(tmp_path / "ex")]) == 0
    assert "robust_accuracy" in capsys.readouterr().out
    blob = json.loads(js.read_text())
    assert blob["attack"] == "pgd" and [r["eps"] for r in blob["results"]] == [0, 4 / 255, 16 / 255]
    r0 = blob["results"][0]
    acc, n = accuracy_on(run, data, limit=4)  # predict's verdicts on the same images
    assert blob["n"] == n and abs(blob["clean_accuracy"] - acc) <= 1 / n + 1e-12  # one image may sit at 0.5
    assert r0["robust_accuracy"] == blob["clean_accuracy"] and r0["success_rate"] == 0.0  # eps 0 changes nothing
    assert set(r0) >= {"eps", "robust_accuracy", "success_rate", "mean_linf", "mean_l2", "psnr", "per_generator",
                       "per_direction"}
    assert blob["results"][2]["robust_accuracy"] <= blob["results"][1]["robust_accuracy"] <= r0["robust_accuracy"]
    assert blob["results"][2]["mean_linf"] <= 16 / 255 + 1e-6
    assert (tmp_path / "atk" / "robust_accuracy.png").exists()
    assert any(p.name.endswith("_adv.png") for p in (tmp_path / "ex").iterdir())


def test_attack_rejects_eps_out_of_range(run, data, capsys):
    assert main(["attack", str(run), "--data", str(data), "--eps", "0,2"]) == 2
    err = capsys.readouterr().err
    assert "eps" in err and len(err.strip().splitlines()) == 1
