"""The study's configuration checks (the command line's rules, one-line errors naming the key) and
its reuse keys (every ingredient of a number, changed alone, forces a recompute)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from fakescope.cli import main
from fakescope.engine import checkpoint as ckpt
from fakescope.engine import runtime
from fakescope.errors import FakescopeError
from fakescope.study import load_config_file, make_config, normalise_model_options
from fakescope.study.config import resolve_data
from fakescope.study.runs import ensure_run, evaluate_cached, robustness_cached, train_options

from synth import make_dataset, quiet_single_thread

TINY = {"filters": [4, 8, 8], "hidden": 8}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    with quiet_single_thread(tmp):
        data = make_dataset(tmp / "a" / "data", generators=("g", "h"), n_train=12, n_val=6)
        yield {"tmp": tmp, "data": data}


# --- configuration values -------------------------------------------------------------------------

def test_yaml_numbers_written_as_strings_are_numbers(env, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(f"data: {env['data']}\nmodels: {{cnn32: {{lr: 5e-4}}}}\nlr: 1e-3\nthreshold: 0.4\n"
                 "calibrate: 0.01\ncalibrate_confidence: '0.9'\n"
                 f"attack: {{name: pgd, steps: '3'}}\nseeds: '1,2'\naugment: {{flip: 'yes', jpeg_quality: '50,90'}}\n")
    raw = load_config_file(f)
    assert raw["lr"] == "1e-3"  # what YAML 1.1 makes of it
    cfg = make_config(raw)
    assert cfg.lr == 0.001 and cfg.threshold == 0.4 and cfg.seeds == [1, 2] and cfg.attack["steps"] == 3
    assert cfg.calibrate == 0.01 and cfg.calibrate_confidence == 0.9
    assert make_config({"data": str(env["data"]), "models": ["cnn32"]}).calibrate_confidence == 0.95
    assert cfg.augment == {"flip": True, "jpeg_quality": (50, 90)}
    assert cfg.model("cnn32").train["lr"] == 0.0005
    opts = train_options(cfg, cfg.model("cnn32"), 1, resolve_data(cfg).generators)
    assert opts.lr == 0.0005 and opts.augment.jpeg_quality == (50, 90) and opts.augment.flip is True


@pytest.mark.parametrize("extra, needle", [
    ("threshold: 1.5", "threshold: expected a threshold in [0, 1], got 1.5"),
    ("lr: fast", "lr: expected a number or fraction like 2/255, got 'fast'"),
    ("lr: 0", "lr: expected a number > 0, got 0"),
    ("epochs: ten", "epochs: expected a positive integer, got 'ten'"),
    ("epochs: 0", "epochs: expected a positive integer, got 0"),
    ("seeds: [1, x]", "seeds: expected integer seeds like [42, 43]"),
    ("seeds: [1, 1]", "seeds: expected distinct seeds"),
    ("jpeg_align: 101", "jpeg_align: expected a JPEG quality in [1, 100], got 101"),
    ("workers: -1", "workers: expected an integer >= 0, got -1"),
    ("precision: fp64", "precision: expected one of auto, fp32, bf16, fp16, got 'fp64'"),
    ("val_fraction: 2", "val_fraction: expected a number in [0, 1], got 2"),
    ("force: perhaps", "force: expected true or false, got 'perhaps'"),
    ("augment: {flip: maybe}", "augment.flip: expected true or false, got 'maybe'"),
    ("augment: {blur_prob: 1.5}", "augment.blur_prob: expected a number in [0, 1], got 1.5"),
    ("models: {cnn32: {lr: x}}", "models.cnn32.lr: expected a number"),
    ("models: {cnn32: {filters: [8, 0]}}", "models.cnn32.filters: expected a positive integer, got 0"),
    ("models: {cnn32: {adv_train: cw}}", "models.cnn32.adv_train: expected one of pgd, fgsm, got 'cw'"),
    ("models: {cnn32: {freeze: true}}", "models.cnn32: model 'cnn32' takes no option 'freeze'"),
    ("model_options: {freeze: perhaps}", "model_options.freeze: expected true or false, got 'perhaps'"),
    ("attack: {name: pgd, steps: 0}", "attack.steps: expected a positive integer, got 0"),
    ("attack: {name: cw}", "attack.name: expected one of fgsm, pgd, pgd-l2, square, got 'cw'"),
    ("calibrate_confidence: 1", "calibrate_confidence: expected a confidence in [0, 1) like 0.95, got 1"),
    ("calibrate_confidence: sure", "calibrate_confidence: expected a confidence in [0, 1) like 0.95, got 'sure'"),
])
def test_bad_config_values_are_one_line_errors_naming_the_key(env, tmp_path, capsys, extra, needle):
    f = tmp_path / "c.yaml"
    f.write_text(f"data: {env['data']}\nmodels: [cnn32]\n{extra}\n")
    with pytest.raises(FakescopeError) as e:
        make_config(load_config_file(f))
    assert needle in str(e.value) and str(e.value).startswith("benchmark config: ")
    assert main(["benchmark", "--config", str(f), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_one_model_options_helper_resolves_paths_alike(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    want = str((tmp_path / "w.safetensors").resolve())
    assert normalise_model_options(pretrained_file="w.safetensors") == {"pretrained_file": want}  # the command line
    assert normalise_model_options({"pretrained_file": "w.safetensors"}) == {"pretrained_file": want}  # a config file
    assert normalise_model_options({"pretrained_file": "~/w.safetensors"})["pretrained_file"] == str(tmp_path / "home" /
                                                                                            "w.safetensors")
    assert normalise_model_options(freeze=None, filters="8,16") == {"filters": [8, 16]}
    with pytest.raises(FakescopeError, match="command line: --filters: expected a positive integer, got 'x'"):
        normalise_model_options(filters=["8", "x"], key=None)
    with pytest.raises(FakescopeError, match="unknown model option 'colour'"):
        normalise_model_options({"colour": 1})
    from argparse import Namespace

    from fakescope.commands.args import model_options_from_args as from_args
    ns = Namespace(no_pretrained=False, pretrained_file="w.safetensors", freeze=True, filters=None)
    assert from_args(ns) == {"pretrained_file": want, "freeze": True}


# --- reuse keys -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(env):
    cfg = resolve_data(make_config({"data": str(env["data"]), "out": str(env["tmp"] / "out"), "models": {"cnn32": TINY},
                                    "epochs": 1, "workers": 0, "precision": "fp32", "eval_batch_size": 8,
                                    "attack": {"name": "fgsm", "eps": "0,2/255", "limit": 2, "precision": "fp32"}}))
    spec = cfg.model("cnn32")
    run = Path(cfg.out) / "runs" / "cnn32-seed42"
    ensure_run(train_options(cfg, spec, 42, cfg.generators), run)
    return cfg, run


def _counting(monkeypatch, target: str) -> list:
    import importlib

    module, name = target.rsplit(".", 1)
    mod = importlib.import_module(module)
    real = getattr(mod, name)
    calls = []

    def wrapper(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(mod, name, wrapper)
    return calls


def _copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("eval-*", "attack-*", "precision-check.json"))
    return dest


def test_evaluation_reuse_key_covers_every_ingredient(env, trained, tmp_path, monkeypatch):
    from dataclasses import replace

    cfg, run = trained
    run = _copy_run(run, tmp_path / "run")
    calls = _counting(monkeypatch, "fakescope.study.runs.evaluate_run")  # where the study calls it

    def ev(c=cfg, r=run, **kw):
        before = len(calls)
        res = evaluate_cached(c, r, generators=kw.pop("generators", c.generators), **kw)
        return res, len(calls) > before

    first, computed = ev()
    assert computed and Path(first["outputs"]["folder"]).name == "eval-data-val"
    again, computed = ev()
    assert not computed and again == first  # same key: reused
    assert ev(force=True)[1]
    # each ingredient alone
    assert ev(replace(cfg, threshold=0.3))[1]
    assert ev(replace(cfg, max_pixels=10**6))[1]
    assert ev(replace(cfg, eval_batch_size=4))[1]
    assert ev(generators=["g"])[1]
    assert ev(degrade=["blur:1"])[1]
    assert ev(jpeg_align=80)[1]
    if runtime.bf16_supported(torch.device("cpu")):
        assert ev(replace(cfg, precision="bf16"))[1]
    # another data root with the same folder name (same evaluation folder): its own key
    other = tmp_path / "b" / "data"
    shutil.copytree(env["data"], other)
    res, computed = ev(replace(cfg, data=str(other)))
    assert computed and res["data"]["root"] == str(other)
    # the same root with one file fewer
    (other / "g" / "val" / "ai" / "0000.png").unlink()
    res, computed = ev(replace(cfg, data=str(other)))
    assert computed and res["data"]["n_files"] == 2 * 2 * 6 - 1
    # new weights (the same shapes, one value changed) in the same run directory
    ev()
    assert not ev()[1]
    tensors = ckpt.load_tensors(run / ckpt.WEIGHTS)
    k = next(iter(tensors))
    tensors[k] = tensors[k] + 1e-3
    ckpt.save_tensors(run / ckpt.WEIGHTS, tensors)
    assert ev()[1]
    assert not ev()[1]


def test_attack_reuse_key_covers_every_ingredient(env, trained, tmp_path, monkeypatch):
    from dataclasses import replace

    cfg, run = trained
    run = _copy_run(run, tmp_path / "run")
    calls = _counting(monkeypatch, "fakescope.study.runs.attack_run")  # where the study calls it

    def atk(c=cfg):
        before = len(calls)
        res = robustness_cached(c, run, what="t")
        return res, len(calls) > before

    first, computed = atk()
    assert computed and first["n"] == 2 * 2 * 2  # 2 per class and generator
    assert not atk()[1]
    assert atk(replace(cfg, attack={**cfg.attack, "limit": 1}))[1]
    assert atk(replace(cfg, attack={**cfg.attack, "eps": "0,4/255"}))[1]
    assert atk(replace(cfg, threshold=0.3))[1]
    assert atk(replace(cfg, max_pixels=10**6))[1]
    other = tmp_path / "b" / "data"
    shutil.copytree(env["data"], other)
    assert atk(replace(cfg, data=str(other)))[1]
    atk()
    tensors = ckpt.load_tensors(run / ckpt.WEIGHTS)
    k = next(iter(tensors))
    tensors[k] = tensors[k] * 0.5
    ckpt.save_tensors(run / ckpt.WEIGHTS, tensors)
    assert atk()[1]
    assert not atk()[1]


def test_one_key_builder_resolves_precision_and_training_reuse_follows_the_data(tmp_path, monkeypatch):
    """Every cached result's key comes from result_key (precision as resolved, never 'auto'); a finished
    training run is reused only for the same options, the same training files and the same fakescope."""
    from fakescope.study import runs as R

    from synth import make_dataset

    monkeypatch.setenv("FAKESCOPE_CACHE_DIR", str(tmp_path / "cache"))
    data = make_dataset(tmp_path / "data", generators=("g",), n_train=8, n_val=2)
    cfg = resolve_data(make_config({"data": str(data), "out": str(tmp_path / "out"), "epochs": 1,
                                    "models": {"cnn32": {"filters": [4, 8, 8], "hidden": 8}}}))
    spec = cfg.model("cnn32")
    opts = R.train_options(cfg, spec, 42, cfg.generators)
    run = R.run_dir_for(cfg, spec, 42)
    assert R.ensure_run(opts, run)[1] is True
    assert R.ensure_run(opts, run)[1] is False  # reused
    for key in (R.evaluation_key(cfg, run, generators=cfg.generators), R.result_key(cfg, run, precision="auto",
                                                                                    data=None)):
        assert key["precision"] in ("fp32", "bf16") and key["fakescope"] and key["weights_sha256"]
    extra = data / "g" / "train" / "ai" / "extra.png"
    shutil.copy(next((data / "g" / "train" / "ai").iterdir()), extra)  # the training data changed
    assert R.ensure_run(opts, run)[1] is True
    monkeypatch.setattr(R, "__version__", "0.0.0-other")  # another fakescope version
    assert R.ensure_run(opts, run)[1] is True
