"""torchrun with 2 CPU ranks (gloo): training works, evaluation and feature extraction give exactly
the single-process result, and only rank 0 writes and prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist

from fakescope.data.dataset import cpu_threads
from fakescope.data.transforms import Pipeline
from fakescope.engine import features as F
from fakescope.engine import runtime
from fakescope.engine.checkpoint import load_run
from fakescope.engine.evaluation import evaluate_run
from fakescope.models import create_model

from synth import make_dataset

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
TIMING = ("seconds", "images_per_second", "outputs", "scores")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("dist") / "data", n_train=16, n_val=9)
    (root / "alpha" / "val" / "ai" / "zz-broken.png").write_bytes(b"not an image")
    return root


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    return {**env, "FAKESCOPE_PROGRESS": "0", "FAKESCOPE_CACHE_DIR": str(tmp_path / "cache"),
            "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])}


def _torchrun(tmp_path, *args, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    r = subprocess.run([str(a) for a in cmd], env=_env(tmp_path), capture_output=True, text=True, timeout=timeout,
                       cwd=tmp_path)
    assert r.returncode == 0, f"torchrun failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in TIMING}


def test_two_ranks_train_and_evaluate_like_one_process(data, tmp_path, monkeypatch):
    r = _torchrun(tmp_path, "-m", "fakescope", "train", "--model", "cnn32", "--data", data, "--out", tmp_path / "run",
                  "--epochs", 2, "--batch-size", 8)
    assert r.stdout.count("run directory:") == 1  # only rank 0 prints
    model, config = load_run(tmp_path / "run")  # a loadable run
    assert config["model"]["name"] == "cnn32" and len(json.loads((tmp_path / "run" / "log.jsonl").read_text()
                                                                  .splitlines()[0])) > 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["validation"]["n"] > 0

    monkeypatch.setenv("FAKESCOPE_CACHE_DIR", str(tmp_path / "cache1"))
    with cpu_threads(1):  # torchrun's ranks run one thread each (OMP_NUM_THREADS=1); results are bit-identical
        one = evaluate_run(tmp_path / "run", data, degrade=["jpeg:50", "blur:1"], batch_size=4)  # at equal threads
    r = _torchrun(tmp_path, "-m", "fakescope", "evaluate", tmp_path / "run", "--data", data, "--degrade", "jpeg:50",
                  "--degrade", "blur:1", "--batch-size", 4, "--json", tmp_path / "two.json", "--out", tmp_path / "ev2")
    assert r.stdout.count("results:") == 1
    two = json.loads((tmp_path / "two.json").read_text())
    one = json.loads(json.dumps(one, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    assert _strip(two) == _strip(one)
    assert two["overall"]["n"] == 2 * 2 * 9 == two["data"]["n_files"] - 1  # each readable image once, no padding
    assert len(two["bad_files"]) == 1
    assert sorted(p.name for p in (tmp_path / "ev2").iterdir()) == ["confusion.png", "degrade-blur.png",
                                                                  "degrade-jpeg.png", "roc.png", "scores.npz"]


SCRIPT = textwrap.dedent('''
    import json, os, sys
    import numpy as np, torch
    from pathlib import Path
    from fakescope.data.layout import index_root
    from fakescope.data.transforms import Pipeline
    from fakescope.engine import features as F, runtime
    from fakescope.engine.train import TrainOptions, train
    from fakescope.models import create_model

    out = Path(sys.argv[1]); data = sys.argv[2]
    runtime.init_distributed("cpu")
    r = runtime.rank()
    F.SHARD_ROWS = 16
    torch.manual_seed(0)
    model = create_model("timm:test_efficientnet", pretrained=False, freeze=True, input_size=64).eval()
    index = index_root(data).select(None, "val")
    files = [index.abspath(i) for i in range(len(index))]
    prec = runtime.Precision("fp32", None, False)
    calls = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    res = {}
    for mode, root in (("shared", out / "shared"), ("per-rank", out / f"rank{r}"), ("memory", None)):
        calls.clear()
        t, errors = F.extract_features(model, files, Pipeline(64, 32), device=torch.device("cpu"), precision=prec,
                                       batch_size=4, num_workers=0, cache_root=root, use_cache=root is not None)
        res[mode] = (t.numpy(), sorted(errors), sum(calls))
    calls.clear()
    t, _ = F.extract_features(model, files, Pipeline(64, 32), device=torch.device("cpu"), precision=prec,
                              batch_size=4, num_workers=0, cache_root=out / f"rank{r}")
    assert sum(calls) == 0, "the per-rank caches were completed after the exchange"
    np.savez(out / f"rank{r}.npz", **{m: v[0] for m, v in res.items()},
             **{m + "_errors": np.array(v[1]) for m, v in res.items()},
             **{m + "_computed": np.array(v[2]) for m, v in res.items()})
    summary = train(TrainOptions(model="timm:test_efficientnet", data=data, epochs=2, patience=0, batch_size=8,
                                 model_options={"pretrained": False, "freeze": True}, device="cpu",
                                 cache_dir=str(out / "train-cache")), out / "frozen-run")
    if runtime.is_main():
        (out / "summary.json").write_text(json.dumps({"input_path": summary["input_path"],
                                                      "epochs_run": summary["epochs_run"]}))
''')


def test_two_ranks_extract_features_like_one_process(data, tmp_path):
    (tmp_path / "script.py").write_text(SCRIPT)
    _torchrun(tmp_path, tmp_path / "script.py", tmp_path, data)
    from fakescope.data.layout import index_root

    torch.manual_seed(0)
    model = create_model("timm:test_efficientnet", pretrained=False, freeze=True, input_size=64).eval()
    index = index_root(data).select(None, "val")
    files = [index.abspath(i) for i in range(len(index))]
    with cpu_threads(1):
        single, errors = F.extract_features(model, files, Pipeline(64, 32), device=torch.device("cpu"),
                                            precision=runtime.Precision("fp32", None, False), batch_size=4,
                                            num_workers=0, use_cache=False)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    for mode in ("shared", "per-rank", "memory"):
        for z in ranks:  # every rank holds every row, bit-identical to one process
            np.testing.assert_array_equal(z[mode], single.numpy())
            assert z[mode + "_errors"].tolist() == sorted(errors)
        assert sum(int(z[mode + "_computed"]) for z in ranks) == len(files) - len(errors)  # each file once
    shared = list((tmp_path / "shared").iterdir())[0]
    assert sum(len(json.loads(p.read_text())["keys"]) for p in shared.glob("shard-*.json")) == len(files) - 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {"input_path": "features", "epochs_run": 2}
    model, _ = load_run(tmp_path / "frozen-run")
    assert model.frozen
