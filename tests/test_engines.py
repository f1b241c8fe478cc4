"""The evaluation and attack engines return data and the callers write files: matplotlib's backend is
left alone, non-finite scores are listed errors, one folder per data root, one precision policy for
evaluate and attack, a transfer attack through the source run's own preprocessing, rank 0 writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from fakescope.cli import main
from fakescope.data.io import read_image
from fakescope.data.layout import index_root
from fakescope.engine import runtime
from fakescope.engine.attack import attack_run
from fakescope.engine.evaluation import evaluate_run, predict_paths, prepare
from fakescope.engine.train import TrainOptions, train
from fakescope.options import RuntimeOptions
from fakescope.report.artifacts import write_evaluation

from synth import make_dataset, quiet_single_thread

TINY = {"filters": [4, 8, 8], "hidden": 8}


def _no_nan(text: str):
    def bad(c):
        raise AssertionError(f"{c} in JSON")
    return json.loads(text, parse_constant=bad)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engines")
    with quiet_single_thread(tmp):
        data = make_dataset(tmp / "data", generators=("g",), n_train=16, n_val=8)
        run = tmp / "run"
        train(TrainOptions(model="cnn32", data=str(data), epochs=1, num_workers=0, model_options=TINY), run)
        yield {"tmp": tmp, "data": data, "run": run}


def test_evaluating_and_writing_figures_leave_matplotlibs_backend_alone(env, tmp_path):
    code = f"""
        import sys, matplotlib
        before = dict.__getitem__(matplotlib.rcParams, "backend")
        import fakescope.cli, fakescope.report.html, fakescope.report.plots, fakescope.study
        from fakescope.engine.evaluation import evaluate_run
        from fakescope.report.artifacts import write_evaluation
        from fakescope.options import RuntimeOptions
        r = evaluate_run({str(env['run'])!r}, {str(env['data'])!r}, degrade=["blur:1"],
                         runtime_options=RuntimeOptions(num_workers=0))
        write_evaluation(r, {str(tmp_path / 'a')!r})
        # nobody imported pyplot: nothing selected a backend
        assert "matplotlib.pyplot" not in sys.modules
        assert dict.__getitem__(matplotlib.rcParams, "backend") == before
        # a notebook user's choice of backend and open figures survive writing figures
        matplotlib.use("svg")
        import matplotlib.pyplot as plt
        fig = plt.figure()
        write_evaluation(r, {str(tmp_path / 'b')!r})
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        assert plt.get_fignums() == [fig.number]
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("roc.png", "confusion.png", "degrade-blur.png", "scores.npz", "metrics.json"):
        for folder in ("a", "b"):
            assert (tmp_path / folder / name).stat().st_size > 100, (folder, name)


def test_nonfinite_scores_are_listed_errors_and_never_json_nan(env, tmp_path, monkeypatch, capsys):
    """A model that returns NaN logits for pure white and pure black inputs."""
    import fakescope.engine.infer as infer

    root = tmp_path / "nan-data"
    shutil.copytree(env["data"], root)
    white, black = root / "g" / "val" / "ai" / "white.png", root / "g" / "val" / "nature" / "black.png"
    Image.new("RGB", (32, 32), (255, 255, 255)).save(white)
    Image.new("RGB", (32, 32), (0, 0, 0)).save(black)
    real = infer.forward_logits

    def broken(model, x, precision, device):
        logits = real(model, x, precision, device).clone()
        logits[x.flatten(1).amin(1) >= 1] = float("nan")
        logits[x.flatten(1).amax(1) <= 0] = float("-inf")  # softmax of -inf logits: NaN too
        return logits

    monkeypatch.setattr(infer, "forward_logits", broken)
    res = evaluate_run(env["run"], root, degrade=["jpeg:50"],
                       runtime_options=RuntimeOptions(precision="fp32", num_workers=0, use_cache=False))
    assert sorted(res["bad_files"]) == sorted([str(black), str(white)])
    for f in (white, black):
        assert res["bad_files"][str(f)] == "the model returned a non-finite score (nan) under clean, jpeg 50"
    assert res["overall"]["n"] == res["data"]["n_files"] - 2 == 16
    assert res["degradations"]["jpeg"][0]["overall"]["n"] == 16  # the same images at every level
    assert np.isfinite(res["scores"]["p_ai"]).all() and len(res["scores"]["p_ai"]) == 16
    write_evaluation(res, tmp_path / "ev", figures=False)
    assert _no_nan((tmp_path / "ev" / "metrics.json").read_text())["overall"]["n"] == 16

    other = sorted((root / "g" / "val" / "ai").glob("0*.png"))[0]
    rows = predict_paths(env["run"], [str(white), str(other), str(black)],
                         runtime_options=RuntimeOptions(precision="fp32", num_workers=0))
    assert [("error" in r) for r in rows] == [True, False, True] and np.isfinite(rows[1]["p_ai"])
    assert main(["predict", str(env["run"]), str(white), str(other), str(black), "--format", "json",
                 "--precision", "fp32", "--workers", "0"]) == 0
    printed = _no_nan(capsys.readouterr().out)
    assert [r.get("error", "")[:31] for r in printed] == ["the model returned a non-finite", "",
                                                          "the model returned a non-finite"]


def test_each_data_root_gets_its_own_evaluation_folder(env, tmp_path, capsys):
    other = tmp_path / "other-root"
    shutil.copytree(env["data"], other)
    for root in (env["data"], other):
        assert main(["evaluate", str(env["run"]), "--data", str(root), "--workers", "0"]) == 0
    capsys.readouterr()
    for root, name in ((env["data"], "eval-data-val"), (other, "eval-other-root-val")):
        folder = env["run"] / name
        assert json.loads((folder / "metrics.json").read_text())["data"]["root"] == str(root)
        with np.load(folder / "scores.npz", allow_pickle=False) as z:
            assert str(z["data_root"]) == str(root) and len(z["files"]) == 16
            assert all(f.startswith(str(root) + os.sep) for f in z["files"].tolist())
        assert (folder / "roc.png").is_file()


def test_attack_judges_like_evaluate(env):
    """Default precision: the attack's clean accuracy is evaluate's accuracy on the same images."""
    ev = evaluate_run(env["run"], env["data"], runtime_options=RuntimeOptions(num_workers=0, use_cache=False))
    res = attack_run(env["run"], env["data"], attack="fgsm", eps_list=[0, 2 / 255],
                     runtime_options=RuntimeOptions(num_workers=0))
    bf16 = runtime.bf16_supported(torch.device("cpu"))
    assert res["precision"] == ev["precision"] == ("bf16" if bf16 else "fp32")
    assert res["attack_precision"] == "fp32"  # gradients in full precision unless asked otherwise
    # accuracies of two forward paths (attack batches vs evaluate's): a score within rounding of 0.5 may
    # fall either side, so they agree within one image, not bit for bit
    one = 1 / res["n"] + 1e-12
    assert res["n"] == ev["overall"]["n"] and abs(res["clean_accuracy"] - ev["overall"]["accuracy"]) <= one
    assert abs(res["results"][0]["robust_accuracy"] - ev["overall"]["accuracy"]) <= one
    if bf16:
        ex = attack_run(env["run"], env["data"], attack="fgsm", eps_list=[0],
                        runtime_options=RuntimeOptions(num_workers=0, precision="bf16"))
        assert (ex["precision"], ex["attack_precision"]) == ("bf16", "bf16")


def test_transfer_attack_crafts_on_the_source_runs_own_view(env, tmp_path, monkeypatch):
    src = tmp_path / "src16"
    train(TrainOptions(model="cnn32", data=str(env["data"]), epochs=1, num_workers=0, native_size="16",
                       model_options=TINY), src)
    import fakescope.engine.attack as A

    src_model, _, src_pipe, _ = prepare(src, RuntimeOptions(precision="fp32"))
    _, _, tgt_pipe, _ = prepare(env["run"], RuntimeOptions(precision="fp32"))
    assert src_pipe.native_size == 16 and tgt_pipe != src_pipe
    index = index_root(env["data"]).select(None, "val")
    raw = [read_image(index.abspath(i)) for i in range(len(index))]
    seen_by_source = []
    real = A.forward_logits

    src_weight = next(src_model.parameters())

    def spy(model, x, precision, device):
        if next(model.parameters()).equal(src_weight):  # the source run's model (the target's weights differ)
            seen_by_source.append(x.detach().clone())
        return real(model, x, precision, device)

    monkeypatch.setattr(A, "forward_logits", spy)
    res = attack_run(env["run"], env["data"], attack="fgsm", eps_list=[0, 8 / 255], source=str(src),
                     runtime_options=RuntimeOptions(num_workers=0, precision="fp32"))
    assert res["transfer"] is True and res["data"]["source_native_size"] == 16
    first = seen_by_source[0]  # FGSM's one gradient: at the clean images as the source run sees them
    want = torch.stack([src_pipe(img) for img in raw]).float() / 255
    assert first.shape == want.shape and torch.allclose(first, want, atol=1e-6)
    assert not torch.allclose(first, torch.stack([tgt_pipe(img) for img in raw]).float() / 255, atol=1e-3)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_attack_under_torchrun_prints_and_writes_once(env, tmp_path):
    env_vars = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                 "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env_vars.update(FAKESCOPE_PROGRESS="0", FAKESCOPE_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fakescope",
           "attack", str(env["run"]), "--data", str(env["data"]), "--attack", "fgsm", "--eps", "0,2/255",
           "--workers", "0", "--device", "cpu", "--save-examples", str(tmp_path / "ex"), "--json",
           str(tmp_path / "a.json"), "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, env=env_vars, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("clean accuracy") == 1
    blob = json.loads((tmp_path / "a.json").read_text())
    assert blob["n"] == 16 and "examples" not in blob
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["robust_accuracy.png"]
    assert len(list((tmp_path / "ex").iterdir())) == 16 * 2  # 16 examples, clean + adversarial, at eps 2/255
