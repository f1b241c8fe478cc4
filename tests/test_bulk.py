"""``predict --out DIR``: Parquet shards equal ``predict --format json`` row for row, survive kill -9,
refuse to mix jobs, read --files-from lists, split across torchrun ranks, and run on Ray Data."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from fakescope.cli import main
from fakescope.engine.bulk import JOB_FILE, KILL_AFTER_ENV, SUMMARY_FILE, read_shard_meta

from synth import make_dataset, make_run

pq = pytest.importorskip("pyarrow.parquet")


def _attribution_run(run_dir: Path) -> Path:
    import torch

    from fakescope.engine import checkpoint as ckpt
    from fakescope.models import create_model, set_num_outputs

    torch.manual_seed(3)
    model = set_num_outputs(create_model("cnn32"), 3)
    ckpt.write_config(run_dir, {"model": {"name": "cnn32", "options": {}}, "task": "attribution",
                                "classes": ["nature", "checker", "stripes"]})
    ckpt.save_tensors(run_dir / ckpt.WEIGHTS, model.state_dict())
    return run_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """41 files: 38 images (one with a Stable Diffusion 'parameters' chunk, one 48x40 JPEG) and three bad
    files; two runs with random weights (binary and attribution)."""
    tmp = tmp_path_factory.mktemp("bulk")
    data = make_dataset(tmp / "data", generators=("alpha",), n_train=0, n_val=18)
    bad = data / "alpha" / "val" / "ai"
    (bad / "zz-text.png").write_bytes(b"hello, not an image\n")
    (bad / "zz-empty.png").write_bytes(b"")
    good = (data / "alpha" / "val" / "nature" / "0000.png").read_bytes()
    (bad / "zz-truncated.png").write_bytes(good[: len(good) // 2])
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat, Steps: 20, Sampler: Euler")
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(bad / "zz-sd.png", pnginfo=info)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
        data / "alpha" / "val" / "nature" / "zz-wide.jpg", quality=90)
    return {"tmp": tmp, "data": data, "missing": str(tmp / "nowhere.png"),
            "binary": make_run(tmp / "binary"), "attr": _attribution_run(tmp / "attr")}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{x}\n" for x in lines))
    return path


def _json_rows(capsys, *args) -> list[dict]:
    capsys.readouterr()
    assert main(["predict", *map(str, args), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def _bulk(out: Path, *args, expect: int = 0) -> None:
    assert main(["predict", *map(str, args), "--out", str(out)]) == expect


def _table(out: Path) -> dict[str, dict]:
    rows = pq.read_table(out / "shards").to_pylist()
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "a row was written twice"
    return {r["path"]: r for r in rows}


def _same_as_predict(bulk: dict[str, dict], ref: list[dict], attribution: bool = False, tol: float = 1e-6) -> None:
    assert sorted(bulk) == sorted(r["path"] for r in ref)
    for r in ref:
        b = bulk[r["path"]]
        if "error" in r:
            assert b["error"] == r["error"] and b["p_ai"] is None and b["verdict"] is None, r["path"]
        else:
            assert b["error"] is None, (r["path"], b["error"])
            assert abs(b["p_ai"] - r["p_ai"]) <= tol, r["path"]
            assert (b["verdict"], b["threshold"], b["threshold_source"], b["calibrated"]) == \
                (r["verdict"], r["threshold"], r["threshold_source"], r["calibrated"])
            with Image.open(r["path"]) as im:
                assert (b["width"], b["height"], b["format"]) == (*im.size, im.format)
            assert b["bytes"] == os.path.getsize(r["path"])
            if attribution:
                assert b["generator"] == r["generator"] and abs(b["generator_p"] - r["generator_p"]) <= tol
        prov = r.get("provenance") or {}
        assert b["metadata_says_ai"] == prov.get("metadata_says_ai")
        assert b["generator_hint"] == prov.get("generator_hint")


@pytest.mark.parametrize("kind", ["binary", "attr"])
def test_parquet_equals_predict_json_row_for_row(world, tmp_path, capsys, kind):
    run, data = world[kind], world["data"]
    ref = _json_rows(capsys, run, data, world["missing"])
    assert any("error" in r for r in ref) and sum("error" not in r for r in ref) == 38
    threshold = float(np.median([r["p_ai"] for r in ref if "p_ai" in r]))  # both verdicts occur
    ref = _json_rows(capsys, run, data, world["missing"], "--threshold", threshold)
    _bulk(tmp_path / "out", run, data, world["missing"], "--threshold", threshold, "--shard-size", 16)
    got = _table(tmp_path / "out")
    _same_as_predict(got, ref, attribution=kind == "attr")
    assert {r["verdict"] for r in got.values() if r["verdict"]} == {"ai", "nature"}
    assert got[str(data / "alpha" / "val" / "ai" / "zz-sd.png")]["generator_hint"].startswith("stable-diffusion")
    # the file metadata: run name, weights' SHA-256, the manifest of the inputs; generator columns only for attribution
    import hashlib

    f = tmp_path / "out" / "shards" / "part-00000.parquet"
    meta = read_shard_meta(f)
    assert meta["run_name"] == run.name
    assert meta["weights_sha256"] == hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    assert meta["manifest"]["n"] == 16 and meta["manifest"]["start"] == 0
    assert ("generator" in pq.read_schema(f).names) == (kind == "attr")
    s = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert (s["files"], s["scored"], s["errors"], s["shards"]) == (42, 38, 4, 3)
    assert s["errors_by_reason"]["file not found"] == 1 and s["errors_by_reason"]["empty file"] == 1
    assert s["called_ai"] == sum(r["verdict"] == "ai" for r in ref if "verdict" in r)
    assert s["this_run"]["files"] == 42 and s["images_per_second"] > 0


def _cli(*args, env=None, timeout=180) -> subprocess.CompletedProcess:
    e = {**os.environ, "FAKESCOPE_PROGRESS": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fakescope", *map(str, args)], env=e, capture_output=True,
                          text=True, timeout=timeout)


def test_kill_9_after_the_first_shard_then_rerun_scores_every_input_once(world, tmp_path):
    out = tmp_path / "out"
    args = ["predict", world["binary"], world["data"], world["missing"], "--out", out, "--shard-size", 10]
    r = _cli(*args, env={KILL_AFTER_ENV: "1"})
    assert r.returncode == -9, r.stderr[-2000:]  # SIGKILLed itself right after committing shard 0
    assert sorted(p.name for p in (out / "shards").glob("part-*")) == ["part-00000.parquet"]
    first = (out / "shards" / "part-00000.parquet").stat().st_mtime_ns
    assert not (out / SUMMARY_FILE).exists()
    _bulk(out, world["binary"], world["data"], world["missing"], "--shard-size", 10)
    rows = _table(out)  # asserts no duplicates
    inputs = [str(p) for p in sorted((world["data"] / "alpha" / "val").rglob("*")) if p.is_file()]
    assert sorted(rows) == sorted([*inputs, world["missing"]])
    s = json.loads((out / SUMMARY_FILE).read_text())
    assert (s["files"], s["this_run"]["shards_written"], s["this_run"]["shards_skipped"]) == (42, 4, 1)
    assert (out / "shards" / "part-00000.parquet").stat().st_mtime_ns == first  # the finished shard was kept
    assert not list((out / "shards").glob(".*tmp"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    _bulk(out, world["binary"], world["data"], world["missing"], "--shard-size", 10)  # finished: does nothing
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == mtimes
    s = json.loads((out / SUMMARY_FILE).read_text())
    assert (s["files"], s["this_run"]["files"], s["this_run"]["shards_written"]) == (42, 0, 0)


def test_a_different_job_is_refused_unless_overwrite(world, tmp_path, capsys):
    out = tmp_path / "out"
    _bulk(out, world["binary"], world["data"], "--shard-size", 16)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    for extra in (["--threshold", "0.2"], ["--shard-size", "8"], ["--no-provenance"], ["--precision", "fp32"]):
        capsys.readouterr()
        _bulk(out, world["binary"], world["data"], "--shard-size", 16, *extra, expect=2)
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--overwrite" in err and "same job" in err, err
    capsys.readouterr()
    _bulk(out, world["attr"], world["data"], "--shard-size", 16, expect=2)  # another run
    assert "weights_sha256" in capsys.readouterr().err
    # the same job with other inputs: the finished shards no longer cover them
    _bulk(out, world["binary"], world["data"] / "alpha" / "val" / "nature", "--shard-size", 16, expect=2)
    assert "input list changed" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before
    _bulk(out, world["binary"], world["data"], "--shard-size", 8, "--threshold", "0.2", "--overwrite")
    assert json.loads((out / JOB_FILE).read_text())["decision"]["value"] == 0.2
    assert len(list((out / "shards").glob("part-*.parquet"))) == 6 and len(_table(out)) == 41
    assert all(r["threshold"] == 0.2 for r in _table(out).values() if r["error"] is None)


def test_files_from_text_csv_and_parquet(world, tmp_path):
    import pyarrow as pa

    inputs = [str(p) for p in sorted((world["data"] / "alpha" / "val").rglob("*.png"))][:20] + [world["missing"]]
    _bulk(tmp_path / "ref", world["binary"], *inputs, "--shard-size", 8)  # the same batches: the same floats
    ref = _table(tmp_path / "ref")
    (tmp_path / "list.txt").write_text("\n".join(inputs) + "\n\n")
    with open(tmp_path / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path"])
        w.writerows([i, p] for i, p in enumerate(inputs))
    pq.write_table(pa.table({"path": inputs, "other": list(range(len(inputs)))}), tmp_path / "list.parquet")
    for name in ("list.txt", "list.csv", "list.parquet"):
        out = tmp_path / name.replace(".", "-")
        _bulk(out, world["binary"], "--files-from", tmp_path / name, "--shard-size", 8)
        got = pq.read_table(out / "shards").to_pylist()
        assert [r["path"] for r in got] == inputs  # in list order, each once
        assert got == [ref[p] for p in inputs], name
    # URIs are read through pyarrow's filesystems and decoded from memory by the same reader
    uris = ["file://" + p for p in inputs]
    _bulk(tmp_path / "uri", world["binary"], "--files-from", write_lines(tmp_path / "uris.txt", uris),
          "--shard-size", 8)
    got = pq.read_table(tmp_path / "uri" / "shards").to_pylist()
    assert [r["path"] for r in got] == uris
    for r, p in zip(got, inputs, strict=True):
        assert {**r, "path": p} == ref[p], p
    (tmp_path / "bad.csv").write_text("file\nx.png\n")
    assert main(["predict", str(world["binary"]), "--files-from", str(tmp_path / "bad.csv"), "--out",
                 str(tmp_path / "bad")]) == 2


def test_two_torchrun_ranks_write_disjoint_shards_with_the_single_process_scores(world, tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from test_distributed import _torchrun

    _bulk(tmp_path / "one", world["binary"], world["data"], world["missing"], "--shard-size", 6)
    one = _table(tmp_path / "one")
    out = tmp_path / "two"
    r = _torchrun(tmp_path, "-m", "fakescope", "predict", world["binary"], world["data"], world["missing"],
                  "--out", out, "--shard-size", 6, "--device", "cpu", timeout=200)
    assert r.stdout.count("42 files in 7 shards, 38 scored") == 1  # rank 0 alone prints the summary
    shards = sorted((out / "shards").glob("part-*.parquet"))
    assert len(shards) == 7
    for i, f in enumerate(shards):
        meta = read_shard_meta(f)
        assert (meta["rank"], meta["world_size"], meta["manifest"]["shard"]) == (i % 2, 2, i)
    two = _table(out)  # every input exactly once
    assert sorted(two) == sorted(one)
    for p, row in one.items():
        if row["error"] is None:
            assert abs(two[p]["p_ai"] - row["p_ai"]) <= 1e-6 and two[p]["verdict"] == row["verdict"]
        else:
            assert two[p]["error"] == row["error"]
    s = json.loads((out / SUMMARY_FILE).read_text())
    assert (s["files"], s["this_run"]["files"], s["this_run"]["shards_written"]) == (42, 42, 7)


RAY_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    try:
        import ray
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as e:
        print("RAY-CANNOT-START:", type(e).__name__, e)
        sys.exit(77)
    from fakescope.engine.bulk import predict_to_folder
    from fakescope.engine.ray_bulk import Scorer
    from fakescope.options import PREDICT_MAX_FILE_SIZE, RuntimeOptions
    run, out, data, missing = sys.argv[1:5]
    cpu = RuntimeOptions(device="cpu", max_file_size=PREDICT_MAX_FILE_SIZE)
    s = predict_to_folder(run, out, [data, missing], shard_size=40, engine="ray", runtime_options=cpu)
    # the library entry point on images Ray decodes itself
    ds = ray.data.read_images(data + "/alpha/val/nature", mode="RGB", include_paths=True, file_extensions=["png"])
    rows = ds.map_batches(Scorer, fn_constructor_kwargs={"run_dir": run, "runtime_options": cpu}, batch_size=16,
                          compute=ray.data.ActorPoolStrategy(size=1)).select_columns(["path", "p_ai", "verdict"])
    json.dump({"summary": s, "scorer": rows.to_pandas().to_dict("records")}, open(out + ".json", "w"))
""")


def test_ray_engine_on_a_local_instance_equals_predict(world, tmp_path, capsys):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'fakescope[ray]')")
    data = make_dataset(tmp_path / "data", generators=("alpha",), n_train=0, n_val=48, seed=5)
    (data / "alpha" / "val" / "ai" / "zz-text.png").write_bytes(b"not an image")
    (data / "alpha" / "val" / "ai" / "zz-empty.png").write_bytes(b"")
    missing = str(tmp_path / "nowhere.png")
    ref = _json_rows(capsys, world["attr"], data, missing, "--device", "cpu")
    (tmp_path / "script.py").write_text(RAY_SCRIPT)
    env = {**os.environ, "FAKESCOPE_PROGRESS": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(world["attr"]), str(tmp_path / "out"),
                        str(data), missing], env=env, capture_output=True, text=True, timeout=400)
    if r.returncode == 77:
        pytest.skip(f"Ray cannot start here: {r.stdout.strip()[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    got = _table(tmp_path / "out")
    assert len(got) == 99
    _same_as_predict(got, ref, attribution=True, tol=2e-6)
    res = json.loads((tmp_path / "out.json").read_text())
    assert (res["summary"]["files"], res["summary"]["errors"], res["summary"]["shards"]) == (99, 3, 3)
    by_path = {r["path"]: r for r in ref}
    assert len(res["scorer"]) == 48
    for row in res["scorer"]:
        want = by_path[row["path"]]
        assert abs(row["p_ai"] - want["p_ai"]) <= 2e-6 and row["verdict"] == want["verdict"]
