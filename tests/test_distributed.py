"""torchrun with 2 CPU ranks (gloo): training works, evaluation and feature extraction give exactly
the single-process result, and only rank 0 writes and prints."""

from __future__ import annotations

import json
import os
import signal
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
from fakescope.options import RuntimeOptions

from synth import assert_close, make_dataset

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
    """Run torchrun with 2 ranks; a run that hangs (e.g. ranks waiting on each other) is killed with
    its ranks and fails the test."""
    cmd = [str(a) for a in (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            *args)]
    p = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=tmp_path, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s (ranks hung?):\n{out[-2000:]}\n{err[-2000:]}")
    assert p.returncode == 0, f"torchrun failed:\n{out[-3000:]}\n{err[-3000:]}"
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in TIMING}


def test_two_ranks_train_and_evaluate_like_one_process(data, tmp_path, monkeypatch):
    r = _torchrun(tmp_path, "-m", "fakescope", "train", "--model", "cnn32", "--data", data, "--out", tmp_path / "run",
                  "--epochs", 2, "--batch-size", 8)
    assert r.stdout.count("run directory:") == 1  # only rank 0 prints
    model, config = load_run(tmp_path / "run")  # a loadable run
    assert config["model"]["name"] == "cnn32" and len(json.loads((tmp_path / "run" / "log.jsonl").read_text()
                                                                  .splitlines()[0])) > 0
    metrics = json.loads((tmp_path / "run" / "train_metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["validation"]["n"] > 0

    monkeypatch.setenv("FAKESCOPE_CACHE_DIR", str(tmp_path / "cache1"))
    with cpu_threads(1):  # torchrun's ranks run one thread each (OMP_NUM_THREADS=1); results are bit-identical
        one = evaluate_run(tmp_path / "run", data, degrade=["jpeg:50", "blur:1"],
                           runtime_options=RuntimeOptions(batch_size=4))  # at equal threads
    r = _torchrun(tmp_path, "-m", "fakescope", "evaluate", tmp_path / "run", "--data", data, "--degrade", "jpeg:50",
                  "--degrade", "blur:1", "--batch-size", 4, "--json", tmp_path / "two.json", "--out", tmp_path / "ev2")
    assert r.stdout.count("results:") == 1
    two = json.loads((tmp_path / "two.json").read_text())
    one = json.loads(json.dumps(one, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    assert_close(_strip(two), _strip(one))  # two ranks: other batches, other reductions
    assert two["overall"]["n"] == 2 * 2 * 9 == two["data"]["n_files"] - 1  # each readable image once, no padding
    assert len(two["bad_files"]) == 1
    assert sorted(p.name for p in (tmp_path / "ev2").iterdir()) == ["confusion.png", "degrade-blur.png",
                                                                  "degrade-jpeg.png", "reliability.png", "roc.png",
                                                                  "scores.npz"]


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
        t, errors = F.extract_features(model, files, Pipeline(64, 32),
                                       runtime.fixed("cpu", prec, batch_size=4, num_workers=0, cache_dir=root,
                                                     use_cache=root is not None))
        res[mode] = (t.numpy(), sorted(errors), sum(calls))
    calls.clear()
    t, _ = F.extract_features(model, files, Pipeline(64, 32),
                              runtime.fixed("cpu", prec, batch_size=4, num_workers=0, cache_dir=out / f"rank{r}"))
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
        single, errors = F.extract_features(model, files, Pipeline(64, 32),
                                            runtime.fixed("cpu", runtime.Precision("fp32", None, False),
                                                          batch_size=4, num_workers=0, use_cache=False))
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    for mode in ("shared", "per-rank", "memory"):
        for z in ranks:  # every rank holds every row, bit-identical to one process
            np.testing.assert_allclose(z[mode], single.numpy(), rtol=0, atol=1e-3)  # float16 rows, other batches
            assert z[mode + "_errors"].tolist() == sorted(errors)
        assert sum(int(z[mode + "_computed"]) for z in ranks) == len(files) - len(errors)  # each file once
    shared = list((tmp_path / "shared").iterdir())[0]
    assert sum(len(json.loads(p.read_text())["keys"]) for p in shared.glob("shard-*.json")) == len(files) - 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {"input_path": "features", "epochs_run": 2}
    model, _ = load_run(tmp_path / "frozen-run")
    assert model.frozen


BAD_FILES_SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    from fakescope.engine import runtime, sources
    from fakescope.engine.train import TrainOptions, train

    out, data = Path(sys.argv[1]), sys.argv[2]
    runtime.init_distributed("cpu")
    seen = []
    real = sources.StreamSource.batches

    def spy(self, order, batch_size, epoch=0):
        seen.append({"n": len(self.labels), "epoch": epoch, "order": order.tolist(), "errors": sorted(self.errors)})
        yield from real(self, order, batch_size, epoch)

    sources.StreamSource.batches = spy
    summary = train(TrainOptions(model="cnn32", data=data, epochs=3, patience=0, batch_size=4, preload="off",
                                 val_fraction=0.25, device="cpu"), out / "run")
    (out / f"seen{runtime.rank()}.json").write_text(json.dumps({"seen": seen, "summary": summary}))
''')


def test_two_ranks_streaming_with_bad_files_agree_on_one_list(tmp_path):
    """Each rank reads only its shard of the streamed files; the readability check runs under DDP
    too and the ranks unite their findings, so from the first epoch on both leave out the same files,
    deal disjoint shards of the same size and finish (a rank with fewer batches would hang DDP)."""
    data = make_dataset(tmp_path / "data", generators=("g",), n_train=14, n_val=0)
    bad = [data / "g" / "train" / cls / f"zz-bad{i}.png" for cls in ("ai", "nature") for i in range(3)]
    for i, f in enumerate(bad):
        f.write_bytes(b"not an image " * (i + 1))
    (tmp_path / "script.py").write_text(BAD_FILES_SCRIPT)
    _torchrun(tmp_path, tmp_path / "script.py", tmp_path, data, timeout=150)
    ranks = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in range(2)]
    listed = json.loads((tmp_path / "run" / "bad_files.json").read_text())
    assert sorted(listed) == sorted(str(f) for f in bad)
    assert ranks[0]["summary"]["bad_files"] == len(bad) and ranks[0]["summary"]["input_path"] == "stream"
    n_train = max(c["n"] for c in ranks[0]["seen"])
    calls = [[c for c in r["seen"] if c["n"] == n_train] for r in ranks]
    assert [c["epoch"] for c in calls[0]] == [c["epoch"] for c in calls[1]] == [0, 1, 2]
    bad_train = set(calls[0][0]["errors"])
    for a, b in zip(*calls, strict=True):
        assert a["errors"] == b["errors"] == sorted(bad_train)  # one list, known before the first epoch
        assert len(a["order"]) == len(b["order"])  # the same number of batches on both ranks
        usable = set(range(n_train)) - bad_train
        assert set(a["order"]) | set(b["order"]) == usable and not (set(a["order"]) | set(b["order"])) & bad_train
        assert len(a["order"]) + len(b["order"]) - len(usable) <= 1  # disjoint shards (at most one padded repeat)
    assert 0 < len(bad_train) <= len(bad)
