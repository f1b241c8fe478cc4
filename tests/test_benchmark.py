"""The benchmark (results table, report, reuse of runs) and the cross-generator matrix, end to end on
CPU with tiny generated data: two generators, 48 + 16 images per class each, two small models."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fakescope import study as B
from fakescope.calibration import resolve_decision
from fakescope.cli import main
from fakescope.engine import runtime
from fakescope.engine.evaluation import evaluate_run
from fakescope.errors import FakescopeError
from fakescope.metrics import METRIC_KEYS
from fakescope.options import RuntimeOptions
from fakescope.study.config import resolve_data
from fakescope.study.runs import train_options

from synth import make_pattern_root

TRAIN, VAL = 48, 16


def make_root(root: Path, generators=("checker", "stripes"), train=TRAIN, val=VAL, size=32, seed=0) -> Path:
    return make_pattern_root(root, generators, train, val, size, seed)


MODELS = {
    "cnn32": {"filters": [8, 16, 32], "hidden": 32},
    "vit-tiny": {"model": "timm:test_vit", "pretrained": False, "input_size": 32},  # frozen: trains on features
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is much faster on a shared, busy machine
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FAKESCOPE_CACHE_DIR", str(tmp / "cache"))
            mp.setenv("FAKESCOPE_PROGRESS", "0")
            yield {"tmp": tmp, "data": make_root(tmp / "data")}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench(env):
    cfg = {"data": str(env["data"]), "out": str(env["tmp"] / "out"), "models": MODELS, "seeds": [1, 2],
           "epochs": 2, "workers": 0, "precision": "fp32", "jpeg_align": 75, "degrade": ["jpeg:50", "blur:1"],
           "sample_per_class": 3, "calibrate": 0.1, "calibrate_confidence": 0.5}  # ~10 held-out reals: 7 needed
    return cfg, B.run_benchmark(cfg)


def _equal(a, b):
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], float):
            assert a[k] == pytest.approx(b[k], abs=1e-12), k
        else:
            assert a[k] == b[k], k


T975_DF1 = 12.706204736174707  # Student t, 97.5 % quantile, 1 degree of freedom (statistical tables)
T975_DF2 = 4.302652729749464  # ... 2 degrees of freedom


def test_results_structure(bench, env):
    cfg, res = bench
    assert set(res["models"]) == set(MODELS)
    assert res["config"]["generators"] == ["checker", "stripes"]
    for label, m in res["models"].items():
        assert set(m["overall"]) == set(METRIC_KEYS)
        assert set(m["per_generator"]) == {"checker", "stripes"}
        assert m["seeds"] == [1, 2]
        assert isinstance(m["params"], int) and m["params"] > 0
        for key in ("train_seconds", "images_per_second"):
            assert set(m[key]) >= {"mean", "std", "ci95"}
        acc = m["overall"]["accuracy"]
        assert set(acc) == {"mean", "std", "ci95", "n", "values", "note"} and acc["n"] == len(acc["values"]) == 2
        a, b = acc["values"]  # two seeds: mean ± t(0.975, 1) * |a - b| / 2 (std = |a - b| / sqrt(2))
        half = T975_DF1 * abs(a - b) / 2
        assert acc["ci95"] == pytest.approx([(a + b) / 2 - half, (a + b) / 2 + half], abs=1e-12)
        assert "small" in acc["note"]
        assert m["overall"]["n"] == 2 * 2 * VAL
        assert [r["seed"] for r in m["runs"]] == [1, 2]
        for r in m["runs"]:
            assert B.ModelSpec(label, "").slug in Path(r["dir"]).name
        pc = m["precision_check"]
        if not runtime.bf16_supported(torch.device("cpu")):
            assert set(pc) == {"skipped"} and "bf16 is not supported" in pc["skipped"]
        else:  # the same comparison by hand, from the evaluations in fp32 and bf16 of the first seed's run
            # (raw scores at the raw equivalent of the run's calibrated threshold: the same decisions)
            p32, p16 = (evaluate_run(m["runs"][0]["dir"], cfg["data"],
                                     runtime_options=RuntimeOptions(precision=name, num_workers=0, use_cache=False))
                        ["scores"]["p_ai_raw"] for name in ("fp32", "bf16"))
            t = resolve_decision(m["runs"][0]["dir"]).raw_threshold()
            assert pc["n"] == 2 * 2 * VAL == len(p32) == len(p16)
            assert pc["agreement"] == pytest.approx(np.mean((p32 >= t) == (p16 >= t)), abs=1e-12)
            assert pc["max_abs_diff"] == pytest.approx(np.max(np.abs(p32 - p16)), abs=1e-12)
        # degradations: one row per level, aggregated over seeds
        assert [r["level"] for r in m["degradations"]["jpeg"]] == [50.0]
        assert [r["level"] for r in m["degradations"]["blur"]] == [1.0]
        # shortcut control: every run evaluated again with both classes JPEG-aligned
        s = m["shortcut"]
        assert s["jpeg_align"] == 75 and "accuracy" in s["eval_aligned"]["overall"]
        for f in s["eval_aligned_runs"]:
            assert json.loads(Path(f).read_text())["data"]["jpeg_align"] == 75
    saved = json.loads((Path(cfg["out"]) / "results.json").read_text())
    assert set(saved["models"]) == set(MODELS)
    resolved = json.loads((Path(cfg["out"]) / B.CONFIG_FILE).read_text())
    assert resolved["models"]["vit-tiny"]["model"] == "timm:test_vit" and resolved["epochs"] == 2


def test_numbers_equal_evaluate_json_of_the_runs(bench, env, tmp_path):
    cfg, res = bench
    for m in res["models"].values():
        fresh = [evaluate_run(r["dir"], cfg["data"],
                              runtime_options=RuntimeOptions(precision="fp32", num_workers=0)) for r in m["runs"]]
        for key in ("accuracy", "precision", "recall", "f1", "roc_auc"):
            vals = [f["overall"][key] for f in fresh]
            assert m["overall"][key]["values"] == pytest.approx(vals, abs=1e-12)
            known = [v for v in vals if v is not None]  # precision is undefined when nothing is called AI
            assert m["overall"][key]["mean"] == (pytest.approx(np.mean(known), abs=1e-12) if known else None)
            for g in ("checker", "stripes"):
                assert m["per_generator"][g][key]["values"] == pytest.approx(
                    [f["per_generator"][g][key] for f in fresh], abs=1e-12)
        # and the evaluate JSON the benchmark wrote beside each run is the same evaluation
        for r, f in zip(m["runs"], fresh, strict=True):
            stored = json.loads(Path(r["eval"]).read_text())
            _equal(stored["overall"], json.loads(json.dumps(f["overall"])))


def test_run_dirs_are_normal_runs(bench, env, capsys):
    _, res = bench
    run = res["models"]["cnn32"]["runs"][0]["dir"]
    img = next((env["data"] / "checker" / "val" / "ai").iterdir())
    assert main(["predict", run, str(img), "--format", "json", "--workers", "0"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["verdict"] in ("ai", "nature")


def test_report_md_and_self_contained_html(bench):
    cfg, res = bench
    out = Path(cfg["out"])
    md = (out / "report.md").read_text()
    assert "| model | accuracy | precision | recall | F1 | ROC-AUC | TPR at FPR 5 % |" in md
    for label in MODELS:
        assert re.search(rf"^\| {re.escape(label)} \| \d\.\d{{4}} ± ", md, re.M)
        results_row = next(r for r in md.split("## Results")[1].splitlines() if r.startswith(f"| {label} |"))
        tpr = res["models"][label]["overall"]["tpr_at_fpr_5pct"]["mean"]  # the operating point, last column
        assert results_row.rstrip(" |").split(" | ")[-1].startswith(f"{tpr:.4f} ± ")
    for section in ("Per generator", "ROC curves", "Sample images", "Shortcut control", "Degradations",
                    "fp32 vs bf16", "What the model looks at", "| model | ECE | Brier | TPR at FPR 1 % |"):
        assert section in md
    assert "calibrated one (temperature scaling" in md
    # every run calibrated on its own held-out training images; the gallery for the CNN, none for the ViT
    for label in MODELS:
        for r in res["models"][label]["runs"]:
            cal = json.loads((Path(r["dir"]) / "calibration.json").read_text())
            assert cal["data"]["split"] == "holdout" and cal["target_fpr"] == 0.1
            assert cal["confidence"] == 0.5 and cal["guarantee"]["rule"] == "clopper-pearson"
            assert cal["guarantee"]["fpr_upper_bound"] <= 0.1 and "with 50 % confidence" in cal["guarantee"]["promise"]
            assert json.loads(Path(r["eval"]).read_text())["threshold_source"] == "calibration.json"
    assert Path(res["models"]["cnn32"]["gallery"]).is_file() and res["models"]["vit-tiny"]["gallery"] is None
    for ref in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / ref).is_file(), ref
    page = (out / "report.html").read_text()
    assert "figures/" not in page and "http" not in page.split("<body>")[1]
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 6  # ROC, 2 confusion matrices, samples, 2 degradation curves
    for b64 in images:
        Image.open(io.BytesIO(base64.b64decode(b64))).verify()


def test_rerun_reuses_finished_runs(bench, monkeypatch):
    cfg, res = bench

    def boom(*a, **k):
        raise AssertionError("a finished run was retrained or re-evaluated")

    for name in ("train", "evaluate_run", "_agreement", "calibrate_run", "gallery", "attack_run"):
        monkeypatch.setattr(f"fakescope.study.runs.{name}", boom)  # the names the study calls
    again = B.run_benchmark(cfg)
    for label, m in res["models"].items():
        assert again["models"][label]["overall"] == m["overall"]
        assert again["models"][label]["precision_check"] == m["precision_check"]


def test_cli_reuse_force_and_errors(env, tmp_path, capsys):
    out = tmp_path / "b"
    args = ["benchmark", "--data", str(env["data"]), "--models", "cnn32", "--epochs", "1", "--out", str(out),
            "--workers", "0", "--no-precision-check", "--generators", "checker"]
    assert main(args) == 0
    cap = capsys.readouterr()
    assert "| cnn32 |" in cap.out and "[1/1] cnn32 seed 42: training" in cap.err
    weights = out / "runs" / "cnn32-seed42" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert main(args) == 0
    assert "reusing the finished run" in capsys.readouterr().err and weights.stat().st_mtime_ns == mtime
    assert main([*args, "--force"]) == 0
    assert "replacing" in capsys.readouterr().err
    # a configuration file holds the same options; command-line flags win
    (tmp_path / "c.yaml").write_text(f"data: {env['data']}\nmodels: [cnn32]\nepochs: 3\nbogus: 1\n")
    assert main(["benchmark", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "unknown benchmark option 'bogus'" in capsys.readouterr().err
    assert main(["benchmark", "--models", "cnn32"]) == 2
    assert "expected a data root" in capsys.readouterr().err


def test_config_files_yaml_toml_and_model_options(env, tmp_path):
    (tmp_path / "c.yaml").write_text(
        f"data: {env['data']}\nseeds: [1, 2]\nepochs: 3\naugment: {{flip: true, blur_prob: 0.5}}\n"
        "models:\n  cnn32: {filters: [8, 16, 32]}\n  small: {model: cnn32, filters: [4, 8, 8], lr: 0.01}\n")
    (tmp_path / "c.toml").write_text(
        f'data = "{env["data"]}"\nseeds = [1, 2]\nepochs = 3\n[augment]\nflip = true\nblur_prob = 0.5\n'
        '[models.cnn32]\nfilters = [8, 16, 32]\n[models.small]\nmodel = "cnn32"\nfilters = [4, 8, 8]\nlr = 0.01\n')
    a = B.make_config(B.load_config_file(tmp_path / "c.yaml"))
    b = B.make_config(B.load_config_file(tmp_path / "c.toml"))
    assert a.resolved() == b.resolved()
    small = a.model("small")
    assert a.generators is None and resolve_data(a).generators == ["checker", "stripes"]  # make_config reads no data
    opts = train_options(a, small, 1, resolve_data(a).generators)
    assert (opts.model, opts.model_options, opts.lr, opts.epochs) == ("cnn32", {"filters": [4, 8, 8]}, 0.01, 3)
    assert opts.augment.flip and opts.augment.blur_prob == 0.5 and opts.augment.active
    g = B.make_config({"data": str(env["data"]), "models": ["cnn32", "timm:resnet10t"],
                       "model_options": {"pretrained_file": str(tmp_path / "w.safetensors"), "freeze": True}})
    assert g.model("cnn32").options == {} and g.model("timm:resnet10t").options["freeze"] is True
    with pytest.raises(FakescopeError, match="unknown option 'colour'"):
        B.make_config({"data": str(env["data"]), "models": {"cnn32": {"colour": 1}}})
    with pytest.raises(FakescopeError, match="augmentation option 'rotate'"):
        B.make_config({"data": str(env["data"]), "augment": {"rotate": 1}})
    with pytest.raises(FakescopeError, match="augmentation option 'rotate'"):
        B.make_config({"data": str(env["data"]), "models": {"cnn32": {"augment": {"rotate": 1}}}})
    nope = B.make_config({"data": str(env["data"]), "generators": ["nope"]})  # checked against the data when run
    with pytest.raises(FakescopeError, match="unknown generator"):
        resolve_data(nope)


def test_aligned_training_and_cross_inside_the_benchmark(env):
    cfg = {"data": str(env["data"]), "out": str(env["tmp"] / "aligned"), "models": {"cnn32": MODELS["cnn32"]},
           "seeds": [5], "epochs": 1, "workers": 0, "precision": "fp32", "precision_check": False,
           "jpeg_align": 75, "jpeg_align_train": True, "cross": True, "sample_per_class": 0}
    res = B.run_benchmark(cfg)
    s = res["models"]["cnn32"]["shortcut"]
    (run,) = s["train_aligned_runs"]
    assert "jpeg75" in Path(run).name and "cnn32" in Path(run).name
    assert json.loads((Path(run) / "config.json").read_text())["train"]["jpeg_align"] == 75
    assert json.loads((Path(run) / "eval-data-val" / "metrics.json").read_text())["data"]["jpeg_align"] == 75
    assert set(s["train_aligned"]["overall"]) == set(METRIC_KEYS)
    assert np.asarray(res["cross"]["cnn32"]["matrix"]).shape == (2, 2)
    md = (Path(cfg["out"]) / "report.md").read_text()
    assert "trained + evaluated aligned (Q=75)" in md and "## Cross-generator generalisation" in md
    assert "## Sample images" not in md


def test_summary_is_a_student_t_interval():
    s = B.summarize([0.8, 0.9, 1.0])  # mean 0.9, sample std 0.1; half-width t(0.975, 2) * 0.1 / sqrt(3)
    assert s["mean"] == pytest.approx(0.9) and s["std"] == pytest.approx(0.1) and s["n"] == 3
    assert s["ci95"] == pytest.approx([0.9 - T975_DF2 * 0.1 / 3 ** 0.5, 0.9 + T975_DF2 * 0.1 / 3 ** 0.5], abs=1e-9)
    assert s["ci95"][0] == pytest.approx(0.651586, abs=1e-6)  # wider than [min, max]: 3 seeds say little
    assert "small" in s["note"]
    two = B.summarize([0.5, 0.7, None])  # None (an undefined figure) is left out of n
    assert two["n"] == 2 and two["ci95"] == pytest.approx([0.6 - T975_DF1 * 0.1, 0.6 + T975_DF1 * 0.1], abs=1e-9)
    five = B.summarize([1.0, 2.0, 3.0, 4.0, 5.0])  # std sqrt(2.5); t(0.975, 4) = 2.776445
    assert five["ci95"] == pytest.approx([3 - 2.776445 * 2.5 ** 0.5 / 5 ** 0.5, 3 + 2.776445 * 2.5 ** 0.5 / 5 ** 0.5],
                                         abs=1e-5)
    assert "note" not in five
    one = B.summarize([0.7])
    assert one == {"mean": 0.7, "std": None, "ci95": None, "n": 1, "values": [0.7]}  # one seed: no interval
    assert B.summarize([None])["mean"] is None
    agg = B.aggregate([{"accuracy": 0.5, "n": 10, "confusion": [[1, 2], [3, 4]]},
                       {"accuracy": 0.7, "n": 10, "confusion": [[3, 2], [1, 4]]}])
    assert agg["n"] == 10 and agg["accuracy"]["mean"] == pytest.approx(0.6)
    assert agg["confusion"]["sum"] == [[4, 4], [4, 8]]


def test_cross_diagonal_equals_in_distribution(env, capsys):
    cfg = {"data": str(env["data"]), "out": str(env["tmp"] / "xout"), "models": {"cnn32": MODELS["cnn32"]},
           "seeds": [7], "epochs": 2, "workers": 0, "precision": "fp32"}
    res = B.run_cross(cfg, "cnn32")
    gens = ["checker", "stripes"]
    assert res["train"] == gens and res["test"] == gens and np.asarray(res["matrix"]).shape == (2, 2)
    for i, g in enumerate(gens):
        (run,) = res["runs"][g]
        assert "cnn32" in Path(run).name and g in Path(run).name
        cfg_run = json.loads((Path(run) / "config.json").read_text())
        assert cfg_run["data"]["generators"] == [g]  # trained on that generator alone
        ind = evaluate_run(run, cfg["data"], generators=[g],
                           runtime_options=RuntimeOptions(precision="fp32", num_workers=0))
        assert res["matrix"][i][i] == pytest.approx(ind["overall"]["accuracy"], abs=1e-12)
        assert res["row_average"][i] == pytest.approx(np.mean(res["matrix"][i]))
    for suffix in (".json", ".md", ".png"):
        assert (Path(cfg["out"]) / "cross" / f"cnn32{suffix}").is_file()

    # leave-one-out: the diagonal is the accuracy on the generator left out
    loo = B.run_cross(cfg, "cnn32", leave_one_out=True)
    assert loo["protocol"] == "leave-one-out" and set(loo["held_out"]) == set(gens)
    for i, g in enumerate(gens):
        (run,) = loo["runs"][g]
        assert json.loads((Path(run) / "config.json").read_text())["data"]["generators"] == [x for x in gens if x != g]
        assert loo["held_out"][g] == loo["matrix"][i][i]

    # the CLI (model options from a configuration file) reuses the same runs and prints the matrix
    conf = env["tmp"] / "cross.yaml"
    conf.write_text("models:\n  cnn32: {filters: [8, 16, 32], hidden: 32}\nseeds: [7]\nepochs: 2\n")
    assert main(["cross", "--config", str(conf), "--model", "cnn32", "--data", cfg["data"], "--out", cfg["out"],
                 "--workers", "0", "--precision", "fp32"]) == 0
    cap = capsys.readouterr()
    assert "| trained on \\ tested on | checker | stripes | average |" in cap.out
    assert "reusing the finished run" in cap.err


@pytest.mark.slow
def test_benchmark_on_cifake_with_frozen_lite0(cifake_small, lite0_weights, tmp_path, monkeypatch):
    """The done-when check, scaled down: cnn32 and a frozen ImageNet tf_efficientnet_lite0 (shared
    weights from a model option) on real CIFAKE images; the report renders."""
    monkeypatch.setenv("FAKESCOPE_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = B.run_benchmark({
            "data": str(cifake_small), "out": str(tmp_path / "out"), "epochs": 4, "limit": 100, "workers": 0,
            "precision_check": False, "sample_per_class": 4,
            "models": {"cnn32": {}, "timm:tf_efficientnet_lite0": {"pretrained_file": str(lite0_weights),
                                                                  "freeze": True}}})
    finally:
        torch.set_num_threads(threads)
    lite0 = res["models"]["timm:tf_efficientnet_lite0"]
    assert lite0["trainable_params"] < lite0["params"] and lite0["input_path"] == "features"
    assert lite0["overall"]["roc_auc"] > 0.6  # ImageNet features separate CIFAKE's classes even from 200 images
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| timm:tf_efficientnet_lite0 | " in md and (tmp_path / "out" / "figures" / "roc.png").is_file()


def test_benchmark_compares_normal_and_adversarially_trained_robustness(tmp_path, monkeypatch):
    import json as _json

    from fakescope.study import run_benchmark

    from synth import accuracy_on, make_dataset

    monkeypatch.setenv("FAKESCOPE_CACHE_DIR", str(tmp_path / "cache"))
    data = make_dataset(tmp_path / "data", generators=("g",), n_train=24, n_val=8)
    res = run_benchmark({"data": str(data), "out": str(tmp_path / "out"), "epochs": 2, "precision_check": False,
                         "models": {"cnn32": {}, "cnn32-adv": {"model": "cnn32", "adv_train": "pgd",
                                                               "adv_eps": 4 / 255, "adv_steps": 2}},
                         "attack": {"name": "pgd", "eps": "0,4/255", "steps": 3, "limit": 4}})
    for label in ("cnn32", "cnn32-adv"):
        r = res["models"][label]["robustness"]
        assert r["eps"] == [0, 4 / 255] and r["n"] == 8
        acc, n = accuracy_on(res["models"][label]["runs"][0]["dir"], data, limit=4)  # predict on the same images
        assert n == 8 and abs(r["clean_accuracy"] - acc) <= 1 / n + 1e-12  # one image may sit at 0.5
        assert r["robust_accuracy"][0] == r["clean_accuracy"] and r["robust_accuracy"][1] <= r["clean_accuracy"]
    cfg = _json.loads((tmp_path / "out" / "runs" / "cnn32-adv-seed42" / "config.json").read_text())
    assert cfg["train"]["adv_train"] == "pgd"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Adversarial robustness" in md and "cnn32-adv" in md
    _assert_timings_have_3_significant_figures(md)
    assert (tmp_path / "out" / "figures" / "robustness.png").exists()


def _assert_timings_have_3_significant_figures(md: str) -> None:
    lines = md.splitlines()
    at = next(i for i, line in enumerate(lines) if "train img/s" in line)
    header = [c.strip() for c in lines[at].strip("|").split("|")]
    rows = []
    for line in lines[at + 2:]:
        if not line.startswith("|"):
            break  # the end of this table
        rows.append([c.strip() for c in line.strip("|").split("|")])
    assert rows
    for row in rows:
        for col in ("data s", "train s", "train img/s", "eval img/s"):
            cell = row[header.index(col)].split(" ± ")[0]
            if cell != "—":
                assert len("".join(ch for ch in cell if ch.isdigit()).strip("0")) <= 3, (col, cell)


def test_timings_are_rounded_to_what_the_noise_allows():
    from fakescope.report.tables import measured, significant

    assert significant(3905.2469) == "3910" and significant(0.012345) == "0.0123" and significant(12.345) == "12.3"
    assert significant(0.0) == "0" and measured(None) == "—" and measured(7) == "7" and measured(7.0) == "7.00"
    assert measured({"mean": 3905.2469, "std": 41.27, "ci95": [3800.0, 4000.0]}) == "3910 ± 41.3"


def test_a_directly_built_benchmark_config_runs(tmp_path, monkeypatch):
    """BenchmarkConfig is exported: one built directly (generators None) runs like make_config's, its
    generators resolved against the data root by run_benchmark."""
    from fakescope.study import BenchmarkConfig, ModelSpec, run_benchmark

    from synth import make_dataset

    monkeypatch.setenv("FAKESCOPE_CACHE_DIR", str(tmp_path / "cache"))
    data = make_dataset(tmp_path / "data", generators=("g", "h"), n_train=8, n_val=4)
    cfg = BenchmarkConfig(data=str(data), out=str(tmp_path / "out"), epochs=1, precision_check=False, gallery=False,
                          models=[ModelSpec("cnn32", "cnn32", {"filters": [4, 8, 8], "hidden": 8})])
    assert cfg.generators is None
    res = run_benchmark(cfg)
    assert res["data"]["generators"] == ["g", "h"] and res["models"]["cnn32"]["overall"]["n"] == 16
    assert cfg.generators is None  # the caller's object is left as it was


def test_make_config_reads_no_data_the_run_reads_it_first(tmp_path, monkeypatch):
    """make_config only checks values: a data root that does not exist yet (and a real_photos folder
    with no image yet) is accepted, nothing is listed, indexed or written. run_benchmark reads the
    data first (resolve_data), before it writes anything: the same configuration fails there until
    the data exists, then runs, writing the index cache."""
    from dataclasses import replace

    from fakescope.errors import DataError
    from fakescope.study import config as C

    from synth import make_dataset

    cache, data, photos, out = tmp_path / "cache", tmp_path / "later" / "data", tmp_path / "photos", tmp_path / "out"
    monkeypatch.setenv("FAKESCOPE_CACHE_DIR", str(cache))
    photos.mkdir()
    options = {"data": str(data), "out": str(out), "epochs": 1, "precision_check": False, "gallery": False,
               "report": False, "models": {"cnn32": {"filters": [4, 8, 8], "hidden": 8}}}
    with monkeypatch.context() as m:
        for name in ("index_root", "list_images"):  # make_config must not reach the data readers
            m.setattr(C, name, lambda *a, **k: pytest.fail("make_config read the data"))
        cfg = B.make_config(options)
        with_photos = B.make_config({**options, "real_photos": str(photos)})
    assert cfg.data == str(data) and cfg.generators is None and with_photos.real_photos == str(photos)
    assert not (tmp_path / "later").exists() and not cache.exists() and not out.exists()
    with pytest.raises(DataError, match="data root not found"):
        B.run_benchmark(cfg)
    assert not out.exists() and not cache.exists()  # the data is read before anything is written
    make_dataset(data, generators=("g",), n_train=8, n_val=4)
    with pytest.raises(FakescopeError, match="real_photos: expected a folder .* holding real photos"):
        B.run_benchmark(with_photos)
    assert not out.exists()
    res = B.run_benchmark(cfg)
    assert res["data"]["generators"] == ["g"] and res["models"]["cnn32"]["overall"]["n"] == 8
    assert any((cache / "index").iterdir())  # the run indexed the root
    assert C.resolve_data(replace(cfg, generators=["g"])).generators == ["g"]
