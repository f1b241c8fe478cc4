"""Command-line input errors: one line on stderr that names the valid choices, exit code 2, never a
Python traceback."""

import subprocess
import sys

import pytest

from fakescope.cli import build_parser, main

from synth import make_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "root", n_train=6, n_val=2)


@pytest.fixture(scope="module")
def broken_roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("broken")
    empty_ai = make_dataset(base / "empty_ai", single=True, n_train=6, n_val=2)
    for f in (empty_ai / "train" / "ai").iterdir():
        f.unlink()
    one_class = make_dataset(base / "one_class", single=True, n_train=6, n_val=2)
    for f in (one_class / "train" / "nature").iterdir():
        f.unlink()
    (one_class / "train" / "nature").rmdir()
    no_layout = base / "no_layout"
    (no_layout / "pictures").mkdir(parents=True)
    (base / "a_file").write_text("x")
    return {"empty_ai": empty_ai, "one_class": one_class, "no_layout": no_layout, "file": base / "a_file"}


def _run(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err.strip()
    return code, err


def _one_line_error(code, err, needle, exit_code=2):
    assert code == exit_code, (code, err)
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fakescope") and "error:" in err, err
    for n in [needle] if isinstance(needle, str) else needle:
        assert n in err, err


def _train(data, out, *extra):
    return ["train", "--model", "cnn32", "--data", data, "--out", out, "--epochs", "1", "--workers", "0", *extra]


def test_unknown_model_names_the_choices(data, tmp_path, capsys):
    code, err = _run(["train", "--model", "resnet5", "--data", data, "--out", tmp_path / "r"], capsys)
    _one_line_error(code, err, ["unknown model 'resnet5'", "cnn32", "resnet50", "convnext_small", "timm:<name>"])
    code, err = _run(["train", "--model", "timm:not_a_real_net", "--data", data, "--out", tmp_path / "r"], capsys)
    _one_line_error(code, err, "unknown timm model 'not_a_real_net'")
    code, err = _run(["train", "--model", "timm:", "--data", data, "--out", tmp_path / "r"], capsys)
    _one_line_error(code, err, ["timm", "e.g."])


def test_unknown_generator_names_the_choices(data, tmp_path, capsys):
    code, err = _run(_train(data, tmp_path / "r", "--generators", "alpha,midjourney"), capsys)
    _one_line_error(code, err, "unknown generator 'midjourney': expected one of alpha, beta")


@pytest.mark.parametrize("cmd", ["train", "evaluate", "inspect"])
def test_missing_data_root(cmd, tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "root"
    argv = {"train": _train(missing, tmp_path / "r"),
            "evaluate": ["evaluate", tmp_path / "run", "--data", missing],
            "inspect": ["data", "inspect", missing]}[cmd]
    code, err = _run(argv, capsys)
    if cmd == "evaluate":  # the run is checked first
        _one_line_error(code, err, "run directory not found")
    else:
        _one_line_error(code, err, ["data root not found", str(missing)])


def test_data_root_that_is_a_file_or_has_no_layout(broken_roots, tmp_path, capsys):
    code, err = _run(_train(broken_roots["file"], tmp_path / "r"), capsys)
    _one_line_error(code, err, "data root not found")
    code, err = _run(["data", "inspect", broken_roots["no_layout"]], capsys)
    assert code == 2 and "no dataset found" in err and "Traceback" not in err  # the message shows both layouts


def test_training_split_with_an_empty_class(broken_roots, tmp_path, capsys):
    code, err = _run(_train(broken_roots["empty_ai"], tmp_path / "r"), capsys)
    _one_line_error(code, err, ["training split has no 'ai' images", "'ai' and 'nature'"])


def test_training_split_with_only_one_class(broken_roots, tmp_path, capsys):
    code, err = _run(_train(broken_roots["one_class"], tmp_path / "r"), capsys)
    _one_line_error(code, err, "training split has no 'nature' images")


@pytest.mark.parametrize("value", ["1.5", "-0.1", "abc", "nan"])
@pytest.mark.parametrize("cmd", ["evaluate", "predict", "attack"])
def test_threshold_out_of_range(cmd, value, tmp_path, capsys):
    argv = {"evaluate": ["evaluate", tmp_path, "--data", tmp_path], "predict": ["predict", tmp_path, tmp_path],
            "attack": ["attack", tmp_path, "--data", tmp_path]}[cmd]
    code, err = _run([*argv, f"--threshold={value}"], capsys)
    _one_line_error(code, err, ["expected a threshold in [0, 1]", value])


@pytest.mark.parametrize("eps, needle", [("2", "<= 1"), ("-1/255", ">= 0"), ("x", "number or a fraction")])
def test_attack_eps_out_of_range(eps, needle, data, tmp_path, capsys):
    code, err = _run(["attack", tmp_path / "run", "--data", data, f"--eps={eps}"], capsys)
    _one_line_error(code, err, ["eps", needle])


@pytest.mark.parametrize("argv, needle", [
    (["evaluate", "RUN", "--data", "D", "--precision", "fp64"], ["invalid choice: 'fp64'", "auto", "fp32", "bf16"]),
    (["evaluate", "RUN", "--data", "D", "--split", "test"], ["invalid choice: 'test'", "train", "val"]),
    (["predict", "RUN", "x.png", "--format", "xml"], ["invalid choice: 'xml'", "table", "csv", "json"]),
    (["train", "--model", "cnn32", "--data", "D", "--out", "O", "--epochs", "0"], "expected a positive integer, got 0"),
    (["train", "--model", "cnn32", "--data", "D", "--out", "O", "--lr", "x"], "expected a number or fraction"),
    (["train", "--model", "cnn32", "--data", "D", "--out", "O", "--jpeg-align", "101"], "JPEG quality in [1, 100]"),
    (["train", "--model", "cnn32", "--data", "D", "--out", "O", "--adv-train", "cw"],
     ["invalid choice: 'cw'", "pgd", "fgsm"]),
    (["predict", "RUN", "x.png", "--max-file-size", "-3"], "expected a positive integer"),
    (["evaluate", "RUN", "--data", "D", "--max-pixels", "0"], "expected a positive integer"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["data", "inspect"], "the following arguments are required: root"),
])
def test_argument_errors(argv, needle, capsys):
    code, err = _run(argv, capsys)
    _one_line_error(code, err, needle)


def test_values_checked_after_parsing(data, tmp_path, capsys):
    for extra, needle in ((["--val-fraction", "1.5"], "validation fraction in [0, 1), got 1.5"),
                          (["--native-size", "big"], "expected --native-size auto, off or a positive integer"),
                          (["--lr", "-1"], "--lr > 0")):
        code, err = _run(_train(data, tmp_path / "r", *extra), capsys)
        _one_line_error(code, err, needle)
    code, err = _run(["evaluate", tmp_path / "none", "--data", data], capsys)
    _one_line_error(code, err, "run directory not found")
    code, err = _run(["predict", tmp_path, tmp_path / "x.png"], capsys)
    _one_line_error(code, err, "is not a fakescope run: it has no config.json")


def test_unwritable_output_is_one_line(data, tmp_path, capsys):
    (tmp_path / "plain_file").write_text("x")
    code, err = _run(_train(data, tmp_path / "plain_file" / "run"), capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err  # a user error: exit 2
    assert err.startswith("fakescope: error: --out: expected a run folder that can be created"), err
    assert "plain_file" in err


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    """The real entry point: exit status 2 and one stderr line for a user error."""
    argv = ["train", "--model", "nope", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    r = subprocess.run([sys.executable, "-m", "fakescope", *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "unknown model 'nope'" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_threshold_bounds_are_the_same_everywhere():
    """One rule, [0, 1], on the command line and in the library (attack used to refuse 0 after parsing)."""
    from fakescope.attacks import create_attack
    from fakescope.metrics import binary_metrics
    from fakescope.models import create_model

    for cmd in (["evaluate", "R", "--data", "D"], ["predict", "R", "x.png"], ["attack", "R", "--data", "D"]):
        for t in ("0", "1"):
            assert build_parser().parse_args([*cmd, "--threshold", t]).threshold == float(t)
    model = create_model("cnn32")
    for t in (0.0, 1.0):
        assert create_attack("square", model, eps=0.01, threshold=t).threshold == t
    assert binary_metrics([0, 1], [0.0, 1.0], threshold=0.0)["confusion"] == [[0, 1], [0, 1]]


def test_unexpected_error_is_one_line_with_a_debug_hint(monkeypatch, capsys):
    from fakescope.commands import models

    def boom(args):
        raise RuntimeError("something nobody foresaw")

    monkeypatch.setattr(models, "run", boom)
    code, err = _run(["models"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "RuntimeError: something nobody foresaw" in err and "--debug" in err
    with pytest.raises(RuntimeError, match="nobody foresaw"):
        main(["--debug", "models"])
