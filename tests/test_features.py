"""The frozen-backbone feature cache: computed once, invalidated by what changes features,
memory-mapped, shared between commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fakescope.data.transforms import Pipeline
from fakescope.engine import feature_cache as FC
from fakescope.engine import features as F
from fakescope.engine import runtime
from fakescope.engine.infer import score_files
from fakescope.models import create_model

from synth import assert_close, make_dataset

CPU = torch.device("cpu")
FP32 = runtime.Precision("fp32", None, False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("feat"), n_train=10, n_val=0, single=True)
    return [str(p) for p in sorted(root.rglob("*.png"))]


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("timm:test_efficientnet", pretrained=False, freeze=True, input_size=64).eval()


def _count_forwards(model):
    calls = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    return calls


def _extract(model, files, root, pipeline=None, **kw):
    return F.extract_features(model, files, pipeline or Pipeline(64, 32),
                              runtime.fixed(CPU, FP32, batch_size=8, num_workers=0, cache_dir=root, **kw))


def test_feature_table_gathers_rows_across_sources():
    a = np.arange(12, dtype=np.float16).reshape(4, 3)
    b = -np.arange(6, dtype=np.float16).reshape(2, 3)
    src = np.array([1, 0, FC.FAILED, 0, 1, 0], np.int32)
    rows = np.array([1, 3, 0, 0, 0, 2], np.int64)
    t = FC.FeatureTable(6, 3, [a, b], src, rows)
    dense = np.stack([b[1], a[3], np.zeros(3), a[0], b[0], a[2]]).astype(np.float16)
    np.testing.assert_array_equal(t.numpy(), dense)
    np.testing.assert_array_equal(t[torch.tensor([5, 0, 2])].numpy(), dense[[5, 0, 2]])
    np.testing.assert_array_equal(t[1:3].numpy(), dense[1:3])
    assert t[torch.tensor([5])].dtype == torch.float16 and t.shape == (6, 3) and len(t) == 6
    m = t.materialize()
    assert m.in_memory and len(m.sources) == 1
    np.testing.assert_array_equal(m.numpy(), dense)
    assert t.materialize(limit_bytes=1) is t  # too large for the limit: stays as it is


def test_cache_computes_each_file_once_and_matches_in_memory(files, tmp_path):
    model = _model()
    calls = _count_forwards(model)
    t1, err1 = _extract(model, files, tmp_path)
    assert sum(calls) == len(files) and not err1
    assert not t1.in_memory  # read back from the memory-mapped shards
    calls.clear()
    t2, _ = _extract(model, files, tmp_path)
    assert sum(calls) == 0  # everything from the cache
    np.testing.assert_array_equal(t1.numpy(), t2.numpy())
    mem, err = _extract(model, files, tmp_path / "unused", use_cache=False)
    assert not (tmp_path / "unused").exists() and sum(calls) == len(files)
    np.testing.assert_array_equal(mem.numpy(), t1.numpy())
    assert t1.numpy().dtype == np.float16 and t1.shape[0] == len(files)
    # a subset and a different order read the same rows
    sub = files[::-3]
    calls.clear()
    t3, _ = _extract(model, sub, tmp_path)
    assert sum(calls) == 0
    np.testing.assert_array_equal(t3.numpy(), t1.numpy()[[files.index(f) for f in sub]])


def test_cache_is_invalidated_by_what_changes_features(files, tmp_path):
    model = _model()
    calls = _count_forwards(model)
    _extract(model, files, tmp_path)
    calls.clear()
    # an edited file (new size / mtime) is recomputed, and only it
    os.utime(files[3], ns=(os.stat(files[3]).st_atime_ns, os.stat(files[3]).st_mtime_ns + 10**9))
    _extract(model, files, tmp_path)
    assert sum(calls) == 1
    calls.clear()
    # preprocessing, weights and precision each get their own cache
    _extract(model, files, tmp_path, pipeline=Pipeline(64, 32, jpeg_align=90))
    assert sum(calls) == len(files)
    other = _model(seed=1)
    calls2 = _count_forwards(other)
    _extract(other, files, tmp_path)
    assert sum(calls2) == len(files)
    keys = {FC.extractor_key(model, Pipeline(64, 32), FP32),
            FC.extractor_key(model, Pipeline(64, 32), runtime.Precision("bf16", torch.bfloat16, True)),
            FC.extractor_key(model, Pipeline(64, None), FP32),
            FC.extractor_key(model, Pipeline(64, 32, degrade=("jpeg", 50.0)), FP32),
            FC.extractor_key(model, Pipeline(64, 32), FP32, max_pixels=1000),
            FC.extractor_key(other, Pipeline(64, 32), FP32)}
    assert len(keys) == 6
    assert len(list(tmp_path.iterdir())) == 3


@pytest.mark.parametrize("ingredient", ["fakescope.__version__", "timm.__version__", "torch.__version__",
                                        "PIL.__version__", "fakescope.data.io.READER_VERSION"])
def test_cache_is_invalidated_by_the_versions_that_produce_features(files, tmp_path, monkeypatch, ingredient):
    import importlib

    model = _model()
    calls = _count_forwards(model)
    _extract(model, files[:4], tmp_path)
    calls.clear()
    _extract(model, files[:4], tmp_path)
    assert sum(calls) == 0
    module, name = ingredient.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, "999.0" if "version" in name else 999)
    _extract(model, files[:4], tmp_path)
    assert sum(calls) == 4  # a new key: recomputed, never read from the other version's cache
    assert len(list(tmp_path.iterdir())) == 2


def test_unreadable_files_are_reported_and_retried_by_the_next_run(files, tmp_path, monkeypatch):
    """A read error is not cached: a file repaired in place (same size and modification time, so the
    same file key) is read again and gets its features."""
    from PIL import Image

    good = tmp_path / "good.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(good)
    png = good.read_bytes()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"x" * len(png))
    st = os.stat(bad)
    model = _model()
    calls = _count_forwards(model)
    t, errors = _extract(model, files[:3] + [str(bad)], tmp_path / "c")
    assert list(errors) == [3] and "not an image" in errors[3]
    assert not t.numpy()[3].any()  # zero row
    assert sum(calls) == 3
    bad.write_bytes(png)  # repaired: same size, and the same modification time
    os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns))
    calls.clear()
    t, errors = _extract(model, files[:3] + [str(bad)], tmp_path / "c")
    assert not errors and sum(calls) == 1 and t.numpy()[3].any()


def test_shards_are_written_incrementally(files, tmp_path, monkeypatch):
    monkeypatch.setattr(F, "SHARD_ROWS", 8)
    model = _model()
    t, _ = _extract(model, files, tmp_path)
    folder = next(tmp_path.iterdir())
    shards = sorted(folder.glob("shard-*.npy"))
    assert len(shards) == -(-len(files) // 8)  # one per SHARD_ROWS rows, not one big array in memory
    assert sum(len(json.loads(s.with_suffix(".json").read_text())["keys"]) for s in shards) == len(files)
    mem, _ = _extract(model, files, None, use_cache=False)
    np.testing.assert_array_equal(t.numpy(), mem.numpy())


def test_read_only_cache_falls_back_to_memory(files, tmp_path, monkeypatch):
    model = _model()

    def refuse(self, *a, **k):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(FC.FeatureCache, "add", refuse)
    with pytest.warns(UserWarning, match="cannot write the feature cache"):
        t, errors = _extract(model, files, tmp_path)
    assert t.shape == (len(files), t.dim) and not errors and t.numpy().any()


def test_cached_scores_equal_streamed_scores(files, tmp_path):
    """The frozen path rounds live features to float16 exactly like the cache does."""
    model = _model()
    pl = Pipeline(64, 32)
    cached, _ = score_files(model, files, pl, runtime.fixed(CPU, FP32, batch_size=8, num_workers=0, cache_dir=tmp_path))
    streamed, _ = score_files(model, files, pl, runtime.fixed(CPU, FP32, batch_size=8, num_workers=0, use_cache=False))
    np.testing.assert_allclose(cached, streamed, rtol=0, atol=1e-6)  # the head in another batch: no bit promise


def test_train_then_evaluate_reuse_the_cache(tmp_path):
    """CLI: a frozen run trains its head on cached features (each file once), evaluate adds the val
    split, and --no-cache gives the same metrics while writing nothing."""
    root = make_dataset(tmp_path / "data", n_train=12, n_val=6, single=True)
    cache = tmp_path / "cache"
    env = {**os.environ, "FAKESCOPE_PROGRESS": "0", "FAKESCOPE_CACHE_DIR": str(tmp_path / "user-cache")}

    def fakescope(*args):
        r = subprocess.run([sys.executable, "-m", "fakescope", *map(str, args)], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    model = ["--model", "timm:test_efficientnet", "--no-pretrained", "--freeze"]
    fakescope("train", *model, "--data", root, "--out", tmp_path / "run", "--epochs", 3, "--patience", 0,
              "--cache-dir", cache)
    assert json.loads((tmp_path / "run" / "train_metrics.json").read_text())["input_path"] == "features"
    folders = list(cache.iterdir())
    assert len(folders) == 1
    n_train = sum(len(json.loads(p.read_text())["keys"]) for p in folders[0].glob("shard-*.json"))
    assert n_train == 24  # train + validation carve, each file once
    fakescope("evaluate", tmp_path / "run", "--data", root, "--cache-dir", cache, "--out", tmp_path / "ev")
    shards = sorted(folders[0].glob("shard-*.json"))
    assert sum(len(json.loads(p.read_text())["keys"]) for p in shards) == 24 + 12  # the val split, added once
    fakescope("evaluate", tmp_path / "run", "--data", root, "--no-cache", "--cache-dir", tmp_path / "none",
              "--out", tmp_path / "ev3")
    assert not (tmp_path / "none").exists()
    a = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    b = json.loads((tmp_path / "ev3" / "metrics.json").read_text())
    assert_close(a["overall"], b["overall"])  # cached and live features: the same numbers, other kernels


def test_default_cache_location(files, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKESCOPE_CACHE_DIR", str(tmp_path / "user"))
    _extract(_model(), files[:2], None)
    assert len(list((tmp_path / "user" / "features").iterdir())) == 1


def test_extraction_survives_interruption(files, tmp_path, monkeypatch):
    """Shards written before an interruption are kept; the rerun computes only the rest."""
    monkeypatch.setattr(F, "SHARD_ROWS", 8)
    model = _model()
    real = F.iter_features
    state = {"n": 0}

    def interrupted(*a, **k):
        for item in real(*a, **k):
            state["n"] += 1
            if state["n"] > 2:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(F, "iter_features", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _extract(model, files, tmp_path)
    monkeypatch.setattr(F, "iter_features", real)
    calls = _count_forwards(model)
    _extract(model, files, tmp_path)
    assert sum(calls) == len(files) - 16


def _resident_kb(paths: set[str]) -> int:
    """This process's resident kB of the mappings of ``paths`` (from /proc/self/smaps)."""
    total, mine = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
            mine = len(head) >= 6 and head[5] in paths
        elif mine and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs /proc/self/smaps (Linux)")
def test_feature_table_release_drops_resident_pages_and_keeps_the_values(files, tmp_path):
    """release() gives the table's memory-mapped pages back (resident set of its shard files drops to
    nothing) and the values read afterwards are unchanged."""
    t, _ = _extract(_model(), files, tmp_path)
    before = t.numpy().copy()
    shards = {str(Path(s.filename).resolve()) for s in t.sources if isinstance(s, np.memmap)}
    assert shards, "the table reads the cache through memory maps"
    for s in t.sources:
        np.asarray(s).sum()  # touch every page
    assert _resident_kb(shards) > 0
    t.release()
    assert _resident_kb(shards) == 0
    np.testing.assert_array_equal(t.numpy(), before)
