import json

import pytest
import torch

from fakescope.engine import checkpoint as ckpt
from fakescope.engine.evaluation import evaluate_run, predict_paths
from fakescope.engine.train import TrainOptions, train
from fakescope.errors import DataError
from fakescope.metrics import METRIC_KEYS
from fakescope.options import RuntimeOptions
from fakescope.report.artifacts import write_evaluation

from synth import make_dataset


def _weights(run):
    return ckpt.load_tensors(run / ckpt.WEIGHTS)


@pytest.fixture(scope="module")
def cifake_run(cifake_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cnn32"
    summary = train(TrainOptions(model="cnn32", data=str(cifake_small), epochs=6, patience=0, seed=42), out)
    return out, summary


def test_cnn32_learns_real_cifake_above_chance(cifake_run):
    out, summary = cifake_run
    assert summary["validation"]["accuracy"] > 0.7, summary["validation"]
    assert summary["input_path"] == "memory"
    log = [json.loads(line) for line in (out / ckpt.LOG).read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert set(log[0]) >= {"train_loss", "val_loss", "val_accuracy"}
    cfg = json.loads((out / ckpt.CONFIG).read_text())
    assert cfg["model"]["name"] == "cnn32" and cfg["seed"] == 42 and cfg["native_size"] == 32
    assert cfg["preprocess"]["input_size"] == 32 and "torch" in cfg["versions"]
    # the engine writes weights and JSON only: the model card is the train command's step (test_trust_cli)
    assert not {p.name for p in out.iterdir() if p.is_file() and p.suffix not in (".json", ".jsonl", ".safetensors")}


def test_same_seed_gives_identical_weights_and_metrics(cifake_small, cifake_run, tmp_path):
    out, summary = cifake_run
    again = train(TrainOptions(model="cnn32", data=str(cifake_small), epochs=6, patience=0, seed=42), tmp_path / "b")
    assert again["validation"] == summary["validation"]
    a, b = _weights(out), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", n_train=30, n_val=4)
    opts = dict(model="cnn32", data=str(data), epochs=4, patience=0, seed=7, batch_size=16)
    train(TrainOptions(**opts), tmp_path / "full")

    real_save = ckpt.save_train_state

    def crash_after_epoch_2(run_dir, model, optimizer, scheduler, state):
        real_save(run_dir, model, optimizer, scheduler, state)
        if state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_train_state", crash_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(TrainOptions(**opts), tmp_path / "cut")
    monkeypatch.setattr(ckpt, "save_train_state", real_save)
    assert json.loads((tmp_path / "cut" / ckpt.LAST_STATE).read_text())["epoch"] == 1
    train(TrainOptions(model="cnn32", data="ignored-on-resume"), tmp_path / "cut", resume=True)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # byte-identical files, metadata included (safetensors writes its metadata in hash-map order)
    full, cut = (tmp_path / "full" / ckpt.WEIGHTS).read_bytes(), (tmp_path / "cut" / ckpt.WEIGHTS).read_bytes()
    assert full == cut
    for blob in (full, cut):
        meta = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])["__metadata__"]
        assert list(meta) == sorted(meta)
    la = [json.loads(x) for x in (tmp_path / "full" / ckpt.LOG).read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "cut" / ckpt.LOG).read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(la) == strip(lb)


def test_resume_trains_with_the_native_size_in_config(tmp_path, monkeypatch):
    """The native size is part of the run: a resume uses (and config.json keeps) the value the first
    epochs were trained with, even when the data now suggest another one."""
    from fakescope.engine import train as train_module

    data = make_dataset(tmp_path / "data", generators=("g",), n_train=12, n_val=2, size=32)
    real_save = ckpt.save_train_state

    def crash_after_epoch_1(run_dir, model, optimizer, scheduler, state):
        real_save(run_dir, model, optimizer, scheduler, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_train_state", crash_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train(TrainOptions(model="cnn32", data=str(data), epochs=2, patience=0, batch_size=8), tmp_path / "run")
    monkeypatch.setattr(ckpt, "save_train_state", real_save)
    assert json.loads((tmp_path / "run" / ckpt.CONFIG).read_text())["native_size"] == 32
    make_dataset(tmp_path / "data", generators=("g",), n_train=12, n_val=2, size=48)  # same files, now 48 px
    natives = []
    real_pipeline = train_module.Pipeline
    monkeypatch.setattr(train_module, "Pipeline", lambda *a, **k: natives.append(a[1]) or real_pipeline(*a, **k))
    train(TrainOptions(model="cnn32", data="ignored-on-resume"), tmp_path / "run", resume=True)
    assert natives == [32]
    assert json.loads((tmp_path / "run" / ckpt.CONFIG).read_text())["native_size"] == 32


def test_early_stopping_stops_and_keeps_best(tmp_path, monkeypatch):
    """model.safetensors holds the weights of the epoch with the lowest validation loss, not the last."""
    data = make_dataset(tmp_path / "data", n_train=20, n_val=2)
    per_epoch = []  # the weights each epoch ended with (those its validation loss was measured on)
    real_save = ckpt.save_train_state

    def record(run_dir, model, optimizer, scheduler, state):
        per_epoch.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        real_save(run_dir, model, optimizer, scheduler, state)

    monkeypatch.setattr(ckpt, "save_train_state", record)
    s = train(TrainOptions(model="cnn32", data=str(data), epochs=30, patience=2, lr=0.05, batch_size=8),
              tmp_path / "run")
    log = [json.loads(x) for x in (tmp_path / "run" / ckpt.LOG).read_text().splitlines()]
    losses = [r["val_loss"] for r in log]
    best = losses.index(min(losses))
    assert s["epochs_run"] == len(log) == len(per_epoch) == best + 1 + 2 < 30  # stopped 2 epochs after the best
    assert s["best_epoch"] == best + 1 and [r["best"] for r in log].count(True) >= 1 and log[best]["best"]
    saved = _weights(tmp_path / "run")
    assert all(torch.equal(saved[k], per_epoch[best][k]) for k in saved)
    assert not all(torch.equal(saved[k], per_epoch[-1][k]) for k in saved)  # training went on after the best


def test_training_needs_both_classes(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=5, n_val=2)
    for f in (data / "alpha" / "train" / "ai").iterdir():
        f.unlink()
    for f in (data / "beta" / "train" / "ai").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="no 'ai' images"):
        train(TrainOptions(model="cnn32", data=str(data), epochs=1), tmp_path / "run")


def test_evaluate_json_shape_and_one_class_root(cifake_run, cifake_small, tmp_path):
    out, _ = cifake_run
    res = evaluate_run(out, cifake_small)
    write_evaluation(res, tmp_path / "figs", tmp_path / "e.json")
    blob = json.loads((tmp_path / "e.json").read_text())
    assert set(blob["overall"]) == set(METRIC_KEYS)
    assert set(blob["per_generator"]) == {"cifake_sdv14"}
    assert set(blob["per_generator"]["cifake_sdv14"]) == set(METRIC_KEYS)
    assert {"model", "data"} <= set(blob)
    assert blob["overall"]["n"] == 300 and res["overall"]["accuracy"] > 0.7
    assert (tmp_path / "figs" / "roc.png").stat().st_size > 1000
    assert (tmp_path / "figs" / "confusion.png").stat().st_size > 1000
    # a root of real photos only: the metrics that need both classes are null
    real_only = tmp_path / "real" / "val" / "nature"
    real_only.mkdir(parents=True)
    for f in sorted((cifake_small / "val" / "nature").iterdir())[:20]:
        (real_only / f.name).write_bytes(f.read_bytes())
    one = evaluate_run(out, tmp_path / "real")["overall"]
    assert one["n"] == 20 and one["roc_auc"] is None and one["real_accuracy"] is not None


def test_predict_scores_files_and_reports_bad_ones(cifake_run, cifake_small, tmp_path):
    out, _ = cifake_run
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"<html>not an image</html>")
    files = sorted((cifake_small / "val" / "ai").iterdir())[:3]
    rows = predict_paths(out, [str(f) for f in files] + [str(bad)], threshold=0.5)
    assert len(rows) == 4
    assert all(0 <= r["p_ai"] <= 1 and r["verdict"] in ("ai", "nature") for r in rows[:3])
    assert rows[3]["path"] == str(bad) and "not an image" in rows[3]["error"]


def test_frozen_backbone_path_with_real_imagenet_weights(cifake_small, lite0_weights, tmp_path):
    s = train(TrainOptions(model="timm:tf_efficientnet_lite0", data=str(cifake_small), epochs=8, patience=0,
                           limit=150, model_options={"pretrained_file": str(lite0_weights)}), tmp_path / "lite0")
    assert s["input_path"] == "features"
    assert s["validation"]["accuracy"] > 0.65, s["validation"]
    cfg = json.loads((tmp_path / "lite0" / ckpt.CONFIG).read_text())
    assert "pretrained_file" not in cfg["model"]["options"]
    res = evaluate_run(tmp_path / "lite0", cifake_small)
    assert res["overall"]["accuracy"] > 0.65


@pytest.mark.parametrize("seed", [2**31, 2**40])
def test_large_seeds_train_reproducibly_with_augmentation(tmp_path, seed):
    """Per-image augmentation seeds are (seed, epoch, index) arithmetic: reduced modulo 2**64, so no
    --seed overflows them, and seeds that always fitted keep their exact value."""
    from fakescope.data.dataset import ImageDataset
    from fakescope.data.io import read_image
    from fakescope.data.transforms import Augment, Pipeline

    data = make_dataset(tmp_path / "data", generators=("g",), n_train=8, n_val=2)
    files = sorted(str(p) for p in (data / "g" / "train").rglob("*.png"))
    aug = Pipeline(32, 32, augment=Augment(flip=True, crop=0.8))
    a, b = ImageDataset(files, aug, seed=seed), ImageDataset(files, aug, seed=seed + 1)
    a.epoch = b.epoch = 3
    assert all("image" in a[i] for i in range(len(files)))
    assert any(not torch.equal(a[i]["image"], b[i]["image"]) for i in range(len(files)))  # the seed matters
    small = ImageDataset(files, aug, seed=42)
    small.epoch = 1
    g = torch.Generator().manual_seed((42 * 1_000_003 + 1) * 10_000_019 + 5)  # the formula, unchanged below 2**64
    assert torch.equal(small[5]["image"], aug(read_image(files[5]), g))
    opts = dict(model="cnn32", data=str(data), epochs=2, patience=0, batch_size=4, seed=seed,
                augment=Augment(flip=True), adv_train="fgsm", adv_mix=0.5)
    s1 = train(TrainOptions(**opts), tmp_path / "a")
    s2 = train(TrainOptions(**opts), tmp_path / "b")
    assert s1["input_path"] == "stream" and s1["validation"] == s2["validation"]
    assert (tmp_path / "a" / ckpt.WEIGHTS).read_bytes() == (tmp_path / "b" / ckpt.WEIGHTS).read_bytes()


# --- train --resume from the command line -------------------------------------------------------------

def _cli(argv, capsys):
    from fakescope.cli import main

    code = main(argv)
    return code, capsys.readouterr().err


def test_resume_needs_only_the_run_folder_and_honours_epochs_and_patience(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", generators=("g",), n_train=12, n_val=2)
    run = tmp_path / "run"
    code, err = _cli(["train", "--model", "cnn32", "--data", str(data), "--out", str(run), "--epochs", "1",
                      "--patience", "0", "--batch-size", "8", "--no-cache"], capsys)
    assert code == 0, err
    code, err = _cli(["train", "--resume", "--out", str(run), "--epochs", "3", "--patience", "4"], capsys)
    assert code == 0, err
    assert [json.loads(x)["epoch"] for x in (run / ckpt.LOG).read_text().splitlines()] == [1, 2, 3]
    stored = json.loads((run / ckpt.CONFIG).read_text())["train"]
    assert (stored["epochs"], stored["patience"]) == (3, 4)  # what a later resume compares with
    # the same model, data and batch size given again agree with the run: accepted
    code, err = _cli(["train", "--model", "cnn32", "--data", str(data), "--batch-size", "8", "--resume",
                      "--out", str(run), "--epochs", "3"], capsys)
    assert code == 0, err


def test_resume_refuses_options_that_differ_from_the_run(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", generators=("g",), n_train=12, n_val=2)
    run, cos = tmp_path / "run", tmp_path / "cos"
    for out, extra in ((run, []), (cos, ["--lr-schedule", "cosine"])):
        code, err = _cli(["train", "--model", "cnn32", "--data", str(data), "--out", str(out), "--epochs", "2",
                          "--patience", "0", "--no-cache", *extra], capsys)
        assert code == 0, err
    before = (run / ckpt.WEIGHTS).read_bytes()
    for argv, flag in ((["--lr", "0.5"], "--lr:"), (["--seed", "1"], "--seed:"), (["--model", "resnet50"], "--model:"),
                       (["--data", str(tmp_path)], "--data:"), (["--epochs", "1"], "--epochs:")):
        code, err = _cli(["train", "--resume", "--out", str(run), *argv], capsys)
        assert code == 2 and err.startswith(f"fakescope: error: {flag}") and err.count("\n") == 1, err
    assert (run / ckpt.WEIGHTS).read_bytes() == before  # nothing trained
    code, err = _cli(["train", "--resume", "--out", str(cos), "--epochs", "4"], capsys)
    assert code == 2 and "cosine" in err, err
    code, err = _cli(["train", "--out", str(tmp_path / "new")], capsys)
    assert code == 2 and "expected --model and --data" in err, err
    code, err = _cli(["train", "--resume", "--out", str(tmp_path / "none")], capsys)
    assert code == 2 and "expected a run to resume" in err, err


def test_final_validation_runs_at_the_inference_precision(tmp_path, monkeypatch):
    """metrics.json's validation is scored as ``evaluate`` scores: at the inference precision (bf16
    where the processor has it; forced here), not the training one (fp32)."""
    from fakescope.engine import runtime
    from fakescope.engine import train as train_module

    monkeypatch.setattr(runtime, "bf16_supported", lambda device: True)  # CPU autocast runs bf16 anywhere
    dtypes = []
    real = train_module.forward_logits
    monkeypatch.setattr(train_module, "forward_logits",
                        lambda model, x, precision, device: dtypes.append(precision.name) or real(model, x, precision,
                                                                                                   device))
    data = make_dataset(tmp_path / "data", generators=("g",), n_train=12, n_val=2)
    train(TrainOptions(model="cnn32", data=str(data), epochs=1, patience=0, batch_size=8, use_cache=False),
          tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / ckpt.CONFIG).read_text())
    assert cfg["precision"]["train"] == "fp32" and cfg["precision"]["inference"] == "bf16"
    assert dtypes and set(dtypes) == {"bf16"}


def test_run_summary_and_evaluation_metrics_have_different_names_and_old_runs_still_read(tmp_path):
    """A run's training summary is train_metrics.json, an evaluation's results metrics.json; a run of an
    earlier version (summary in metrics.json) is still read by the model card, the server and the study."""
    from fakescope import runfiles as rf
    from fakescope.report.model_card import build_model_card

    assert rf.TRAIN_METRICS != rf.EVAL_METRICS and ckpt.METRICS == rf.TRAIN_METRICS
    data = make_dataset(tmp_path / "data", generators=("g",), n_train=12, n_val=2)
    run = tmp_path / "run"
    summary = train(TrainOptions(model="cnn32", data=str(data), epochs=1, patience=0, batch_size=8,
                                 use_cache=False), run)
    assert json.loads((run / "train_metrics.json").read_text())["epochs_run"] == 1
    assert not (run / "metrics.json").exists()
    card = build_model_card(run)
    (run / "train_metrics.json").rename(run / "metrics.json")  # a run as earlier versions wrote it
    assert rf.read_train_metrics(run) == json.loads(json.dumps(summary))
    assert build_model_card(run) == card


def test_write_evaluation_is_a_pure_writer(tmp_path, monkeypatch):
    """write_evaluation writes the files of one result: the result is left as it was and the run's
    model card is not touched (the command refreshes it)."""
    import copy

    from fakescope.report import model_card

    data = make_dataset(tmp_path / "data", generators=("g",), n_train=12, n_val=4)
    run = tmp_path / "run"
    train(TrainOptions(model="cnn32", data=str(data), epochs=1, patience=0, batch_size=8, use_cache=False), run)
    model_card.write_training_card(run)
    res = evaluate_run(run, data, runtime_options=RuntimeOptions(num_workers=0, use_cache=False))
    before = copy.deepcopy(res)
    card = (run / "MODEL_CARD.md").read_bytes()
    monkeypatch.setattr(model_card, "write_model_card", lambda *a, **k: pytest.fail("the writer wrote the card"))
    outputs = write_evaluation(res, run / "eval-x", figures=False)
    assert res.keys() == before.keys() and "outputs" not in res
    assert json.loads((run / "eval-x" / "metrics.json").read_text())["outputs"] == outputs
    assert (run / "MODEL_CARD.md").read_bytes() == card


def test_writing_calibration_files_reads_no_data(tmp_path, monkeypatch):
    """write_calibration_files writes calibration.json and nothing else: no re-indexing of the data root,
    no decoding for the card; refresh_model_card (the caller's step) reads only the run's files."""
    from fakescope.calibration import Calibration
    from fakescope.data import layout
    from fakescope.report import model_card
    from fakescope.report.artifacts import write_calibration_files

    data = make_dataset(tmp_path / "data", generators=("g",), n_train=12, n_val=4)
    run = tmp_path / "run"
    train(TrainOptions(model="cnn32", data=str(data), epochs=1, patience=0, batch_size=8, use_cache=False), run)
    model_card.write_training_card(run)
    card = (run / "MODEL_CARD.md").read_text()
    for module, name in ((layout, "index_root"), (model_card, "inspect_training_data"), (model_card, "index_root")):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("the data root was read"))
    cal = Calibration(temperature=1.5, threshold=0.4, threshold_logit=-0.27, target_fpr=0.05)
    before = sorted(p.name for p in run.iterdir())
    paths = write_calibration_files(run, cal)
    assert sorted(p.name for p in run.iterdir()) == sorted([*before, "calibration.json"])
    assert list(paths) == ["calibration"] and (run / "MODEL_CARD.md").read_text() == card
    assert model_card.refresh_model_card(run) == run / "MODEL_CARD.md"
    assert (run / "MODEL_CARD.md").read_text() != card  # the card now shows the calibration
