"""Device and precision resolution, the loader plan, sharding, and the single-pass evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fakescope import ranks
from fakescope.data import dataset as D
from fakescope.data.layout import index_root
from fakescope.data.transforms import Augment, Pipeline
from fakescope.engine import runtime
from fakescope.engine.infer import default_batch_size, evaluate_index, score_files
from fakescope.errors import FakescopeError
from fakescope.models import create_model

from synth import assert_close, make_dataset

CPU = torch.device("cpu")


def test_resolve_device_and_precision():
    assert runtime.resolve_device("cpu") == CPU
    assert runtime.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(FakescopeError, match="expected --device"):
        runtime.resolve_device("tpu")
    with pytest.raises(FakescopeError, match="expected --precision"):
        runtime.resolve_precision("int8", CPU, inference=True)
    train = runtime.resolve_precision("auto", CPU, inference=False)
    assert train.name == "fp32" and train.dtype is None and train.channels_last  # reproducible training
    infer = runtime.resolve_precision("auto", CPU, inference=True)
    if runtime.bf16_supported(CPU):
        assert infer.name == "bf16" and infer.dtype == torch.bfloat16 and infer.channels_last
    else:
        assert infer.name == "fp32"
    if not torch.cuda.is_available():
        with pytest.raises(FakescopeError, match="fp16 needs a CUDA GPU"):
            runtime.resolve_precision("fp16", CPU, inference=True)
        with pytest.raises(FakescopeError, match="no CUDA GPU"):
            runtime.resolve_device("cuda")
    x = torch.zeros(2, 3, 8, 8)
    assert runtime.Precision("bf16", torch.bfloat16, True).prepare(x).is_contiguous(memory_format=torch.channels_last)
    assert runtime.Precision("fp32", None, False).prepare(x) is x
    assert runtime.resolve_precision("fp32", CPU, inference=True) == runtime.Precision("fp32", None, False)


def test_plan_loader_never_oversubscribes(tmp_path, monkeypatch):
    small = [str(p) for p in sorted(make_dataset(tmp_path / "s", n_train=4, n_val=0, single=True).rglob("*.png"))]
    pl = Pipeline(32, 32)
    monkeypatch.setattr(D, "available_cores", lambda: 2)
    plan = D.plan_loader(small, pl, CPU)
    assert plan.workers == 0 and plan.threads is None  # 2 cores: decode inline, every core runs the model
    plan = D.plan_loader(small, pl, CPU, num_workers=1)
    assert plan.workers == 1 and plan.threads == 1  # workers + threads = cores
    monkeypatch.setattr(D, "available_cores", lambda: 8)
    assert D.plan_loader(small, pl, CPU).workers == 0  # cheap images
    monkeypatch.setattr(D, "estimate_decode_ms", lambda files, stage=None, sample=16: 40.0)
    plan = D.plan_loader(small, pl, CPU)
    assert plan.workers == 2 and plan.threads == 6
    monkeypatch.setattr(D, "available_cores", lambda: 64)
    plan = D.plan_loader(small, pl, CPU)
    assert plan.workers == 8 and plan.threads == 56
    assert D.plan_loader(small, pl, "cuda").workers == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: the node's cores are split among its ranks
    plan = D.plan_loader(small, pl, CPU)
    assert plan.workers + plan.threads <= 16
    monkeypatch.setattr(D, "available_cores", lambda: 1)
    assert D.plan_loader(small, pl, CPU).workers == 0


def test_estimate_decode_ms_grows_with_pixels_and_jpeg_is_cheaper(tmp_path):
    from PIL import Image

    for name, shape in (("big", (2000, 3000, 3)), ("small", (64, 64, 3))):
        Image.fromarray(np.zeros(shape, np.uint8)).save(tmp_path / f"{name}.jpg")
        Image.fromarray(np.zeros(shape, np.uint8)).save(tmp_path / f"{name}.png")
    est = {f: D.estimate_decode_ms([str(tmp_path / f)], 224) for f in ("big.jpg", "big.png", "small.jpg")}
    # every format is decoded in full (no JPEG draft decoding): a 6 MP JPEG is not cheap any more
    assert D.CHEAP_DECODE_MS < est["big.jpg"] < est["big.png"]
    assert est["small.jpg"] < D.CHEAP_DECODE_MS
    assert D.estimate_decode_ms([]) == 0.0


def test_cpu_threads_restores():
    before = torch.get_num_threads()
    with D.cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with D.cpu_threads(None):
        assert torch.get_num_threads() == before


def test_should_preload_modes():
    small = Pipeline(32, 32)
    assert D.should_preload(small, 20_000)
    assert not D.should_preload(small, 20_000, mode="off")
    big = Pipeline(224, None)
    assert not D.should_preload(big, 100)
    assert D.should_preload(big, 100, mode="on")
    assert not D.should_preload(big, 10**7, mode="on")  # does not fit
    assert not D.should_preload(Pipeline(32, 32, augment=Augment(flip=True)), 10, mode="on")
    with pytest.raises(ValueError, match="expected preload"):
        D.should_preload(small, 1, mode="always")


def test_default_batch_size():
    assert default_batch_size(224) == 64
    assert default_batch_size(32) == 512
    assert default_batch_size(384) == 32


@pytest.mark.parametrize("n,bs,world", [(10, 3, 2), (7, 4, 3), (2, 4, 3), (0, 4, 2), (64, 64, 2)])
def test_shard_batches_cover_each_item_once(monkeypatch, n, bs, world):
    seen = []
    shapes = []
    for r in range(world):
        monkeypatch.setattr(ranks, "rank", lambda r=r: r)
        monkeypatch.setattr(ranks, "world_size", lambda: world)
        mine = runtime.shard_batches(n, bs)
        shapes += [len(b) for b in mine]
        seen += [i for b in mine for i in b]
    assert sorted(seen) == list(range(n))  # no padded duplicates
    single = [len(b) for b in [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]]
    assert sorted(shapes) == sorted(single)  # the same batches as one process


def test_variants_decode_once(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "d", n_train=3, n_val=0, single=True)
    files = [str(p) for p in sorted(root.rglob("*.png"))]
    base = Pipeline(32, 32)
    variants = [base, Pipeline(32, 32, degrade=("jpeg", 50.0)), Pipeline(32, 32, degrade=("blur", 1.0))]
    calls = []
    real = D.read_image
    monkeypatch.setattr(D, "read_image", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    ds = D.ImageDataset(files, base, stage_only=True, variants=variants)
    item = ds[0]
    assert item["image"].shape == (3, 3, 32, 32) and len(calls) == 1
    for j, v in enumerate(variants):
        assert torch.equal(item["image"][j], D.ImageDataset(files, v, stage_only=True)[0]["image"])
    batch = D.collate([ds[0], ds[1]])
    assert batch.image.shape == (2, 3, 3, 32, 32)


def test_single_pass_degradations_match_separate_passes(tmp_path):
    root = make_dataset(tmp_path / "d", n_train=0, n_val=12)
    (root / "alpha" / "val" / "ai" / "broken.png").write_bytes(b"not an image")
    index = index_root(root).select(None, "val")
    torch.manual_seed(0)
    model = create_model("cnn32").eval()
    prec = runtime.resolve_precision("fp32", CPU, inference=True)
    pl = Pipeline(32, 32)
    rt = runtime.fixed(CPU, prec, batch_size=8, num_workers=0)
    res = evaluate_index(model, index, pl, rt, degradations=[("jpeg", [50.0]), ("blur", [1.0, 2.0])])
    files = [index.abspath(i) for i in range(len(index))]
    for kind, rows in res["degradations"].items():
        for row in rows:
            p, _ = score_files(model, files, Pipeline(32, 32, degrade=(kind, row["level"])), rt)
            ok = ~np.isnan(p)
            from fakescope.metrics import DetectionMetrics

            m = DetectionMetrics(0.5)
            m.update(np.asarray(index.labels)[ok], p[ok], np.asarray(index.generators, dtype=object)[ok].tolist())
            assert_close(m.compute()["overall"], row["overall"])
    assert len(res["bad_files"]) == 1 and res["overall"]["n"] == len(index) - 1
    p0, errors = score_files(model, files, pl, rt.replace(num_workers=1))
    broken = np.array(["broken" in f for f in files])
    np.testing.assert_array_equal(np.isnan(p0), broken)  # a worker process gives the same result
    assert [files[i] for i in errors] == [f for f in files if "broken" in f]


def test_compile_runs_compiled_graphs_and_keeps_state_dict_names():
    """The compiled detector really runs dynamo graphs (aot_eager here: inductor needs a minute on
    2 cores), gives the eager outputs and keeps its checkpoint names."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = create_model("cnn32").eval()
    keys = list(model.state_dict())
    x = torch.rand(4, 3, 32, 32)
    eager = model(x)
    graphs = counters["stats"]["unique_graphs"]
    runtime.compile_model(model, backend="aot_eager")
    out = model(x)
    assert counters["stats"]["unique_graphs"] >= graphs + 2  # backbone and head each traced
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    assert list(model.state_dict()) == keys


def test_compile_failure_falls_back_to_eager_only_inside_the_model():
    """A compiler that fails leaves the detector running eagerly, without turning dynamo's
    suppress_errors on for the rest of the process: other compiled code still raises."""
    import torch._dynamo

    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    torch.manual_seed(0)
    model = create_model("cnn32").eval()
    x = torch.rand(2, 3, 32, 32)
    eager = model(x)
    runtime.compile_model(model, backend=broken)
    assert torch.equal(model(x), eager)
    assert torch._dynamo.config.suppress_errors is False
    with pytest.raises(Exception, match="no C\\+\\+ compiler here"):
        torch.compile(lambda a: a.sin() + 1, backend=broken)(x)
