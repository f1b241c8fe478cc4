"""The HTTP API of ``fakescope serve`` (FastAPI's TestClient, in process): every endpoint, every
error status, P(ai) equal to ``predict_paths``, the API key, dynamic batching and the queue bound."""

import asyncio
import io
import json
import os
import shutil
import tempfile
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fakescope.cli import main
from fakescope.engine.evaluation import predict_paths
from fakescope.errors import FakescopeError
from fakescope.options import RuntimeOptions
from fakescope.serve import ServeOptions, create_app
from fakescope.serve.batcher import Batcher, QueueFull

from synth import assert_close, make_dataset, synthetic_image


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = make_dataset(tmp_path_factory.mktemp("data") / "root", n_train=24, n_val=8)
    base = tmp_path_factory.mktemp("runs")
    out = base / "cnn32"
    assert main(["train", "--model", "cnn32", "--data", str(data), "--epochs", "2", "--out", str(out)]) == 0
    shutil.copytree(out, base / "other")
    return out, base / "other"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A PNG at the run's size, a larger JPEG (resized by the native-size step) and a greyscale PNG."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(3)
    Image.fromarray(synthetic_image(1, rng, 32)).save(d / "a.png")
    Image.fromarray(synthetic_image(0, rng, 120)[:, :90]).save(d / "b.jpg", quality=90)
    Image.fromarray(synthetic_image(0, rng, 40)[:, :, 0]).save(d / "c.png")
    return [d / "a.png", d / "b.jpg", d / "c.png"]


def _ready(client: TestClient) -> TestClient:
    for _ in range(400):
        if client.get("/ready").status_code == 200:
            return client
        time.sleep(0.025)
    raise AssertionError("the server never became ready")


@pytest.fixture(scope="module")
def client(runs):
    with TestClient(create_app([runs[0], runs[1]], ServeOptions(max_wait_ms=2))) as c:
        yield _ready(c)


def _multipart(paths, names=None):
    return [("file", ((names or {}).get(p, p.name), p.read_bytes(), "application/octet-stream")) for p in paths]


def _png_bytes(size=32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_image(1, np.random.default_rng(0), size)).save(buf, format="PNG")
    return buf.getvalue()


def test_health_ready_and_models(runs, client):
    cold = TestClient(create_app([runs[0]]))  # no lifespan: models loaded, warm-up not run
    assert cold.get("/health").json()["status"] == "ok"
    r = cold.get("/ready")
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "not_ready"
    r = cold.post("/v1/predict", content=_png_bytes(), headers={"content-type": "image/png"})
    assert r.status_code == 503 and "retry-after" in r.headers

    assert client.get("/ready").json() == {"status": "ready", "models": ["cnn32", "other"]}
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["cnn32", "other"] and [m["default"] for m in models] == [True, False]
    m = models[0]
    assert m["model"] == "cnn32" and m["input_size"] == 32 and m["native_size"] == 32 and m["threshold"] == 0.5
    assert m["data"]["generators"] == ["alpha", "beta"] and "root" not in m["data"]  # no server paths
    assert 0 <= m["validation"]["accuracy"] <= 1 and m["best_epoch"] in (1, 2)


def test_p_ai_equals_predict_paths(runs, client, images):
    ref = predict_paths(runs[0], [str(p) for p in images])
    r = client.post("/v1/predict", files=_multipart(images))
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "cnn32" and body["threshold"] == 0.5
    assert [row["filename"] for row in body["results"]] == ["a.png", "b.jpg", "c.png"]
    assert_close([row["p_ai"] for row in body["results"]], [row["p_ai"] for row in ref])  # the server pads batches
    assert [row["verdict"] for row in body["results"]] == [row["verdict"] for row in ref]
    assert [(row["format"], row["width"], row["height"]) for row in body["results"]] == [
        ("PNG", 32, 32), ("JPEG", 90, 120), ("PNG", 40, 40)]
    assert all(row["error"] is None for row in body["results"])
    # one raw body, another model, another threshold
    raw = client.post("/v1/predict?model=other&threshold=0", content=images[1].read_bytes(),
                      headers={"content-type": "image/jpeg", "content-disposition": 'inline; filename="b.jpg"'})
    assert raw.status_code == 200
    row = raw.json()["results"][0]
    assert raw.json()["model"] == "other" and row["filename"] == "b.jpg"
    assert_close(row["p_ai"], ref[1]["p_ai"])
    assert row["verdict"] == "ai"  # threshold 0: everything is "ai"


def test_a_batch_mixing_good_and_bad_files_scores_the_good_ones(client, images):
    good = images[0].read_bytes()
    files = [("file", ("good.png", good, "image/png")),
             ("file", ("notes.txt", b"just some text, not an image\n", "image/png")),
             ("file", ("cut.png", good[: len(good) // 2], "image/png")),
             ("file", ("empty.jpg", b"", "image/jpeg")),
             ("file", ("page.jpg", b"<!doctype html><html><body>404</body></html>", "image/jpeg"))]
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 200
    rows = r.json()["results"]
    assert rows[0]["error"] is None and 0 <= rows[0]["p_ai"] <= 1
    codes = [row["error"]["code"] if row["error"] else None for row in rows]
    assert codes == [None, "unsupported_media_type", "unreadable_image", "unreadable_image", "unsupported_media_type"]
    assert "text file" in rows[1]["error"]["message"] and "truncated" in rows[2]["error"]["message"]
    assert "empty" in rows[3]["error"]["message"] and "HTML" in rows[4]["error"]["message"]
    assert all(row["p_ai"] is None for row in rows[1:])


def test_not_an_image_is_415_and_a_rejected_image_is_422(client, images):
    r = client.post("/v1/predict", files=[("file", ("x.png", b"GIF? no: plain text", "image/png"))])
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert r.json()["results"][0]["filename"] == "x.png"
    r = client.post("/v1/predict", content=b'{"a": 1}', headers={"content-type": "application/json"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]["message"]
    r = client.post("/v1/predict", content=b"\x89PNG")  # no content type at all
    assert r.status_code == 415
    good = images[0].read_bytes()
    r = client.post("/v1/predict", content=good[:-40], headers={"content-type": "image/png"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unreadable_image"
    r = client.post("/v1/predict", files=[("file", ("a", good[:60], "image/png")), ("file", ("b", b"text", "x/y"))])
    assert r.status_code == 422 and "none of the 2 files" in r.json()["error"]["message"]


def test_decompression_bomb_and_size_limits(runs, images):
    opts = ServeOptions(max_file_size=4000, max_files=2, max_pixels=1500, max_batch=2, max_queue=4)
    with TestClient(create_app([runs[0]], opts)) as c:
        _ready(c)
        r = c.post("/v1/predict", content=_png_bytes(40), headers={"content-type": "image/png"})  # 1600 px > 1500
        assert r.status_code == 422 and "decompression bomb" in r.json()["error"]["message"]
        big = os.urandom(5000)
        r = c.post("/v1/predict", content=big, headers={"content-type": "image/png"})  # Content-Length says so
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        r = c.post("/v1/predict", files=[("file", ("big.png", big, "image/png"))])
        assert r.status_code == 413 and "big.png" in r.json()["error"]["message"]
        r = c.post("/v1/predict", files=[("file", (f"{i}.png", _png_bytes(), "image/png")) for i in range(3)])
        assert r.status_code == 413 and "too many files" in r.json()["error"]["message"]



@pytest.mark.parametrize("content_type", ["image/png", "multipart/form-data; boundary=B"])
def test_the_size_limit_stops_reading_while_the_body_streams(content_type):
    """No Content-Length (chunked): the read stops at the first chunk over the limit, so an endless
    body never ends up in memory. (TestClient buffers bodies, so this drives the reader directly.)"""
    from fakescope.serve.errors import ApiError
    from fakescope.serve.uploads import read_uploads

    sent = []

    async def body():
        if content_type.startswith("multipart"):
            yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        for _ in range(10_000):
            sent.append(1)
            yield b"\x89PNG\r\n\x1a\n" + bytes(1016)

    async def go():
        await read_uploads({"content-type": content_type}, body(), max_file_size=4096, max_files=2)

    with pytest.raises(ApiError) as e:
        asyncio.run(go())
    assert e.value.status == 413 and len(sent) == 5  # 5 KiB read for a 4 KiB limit

def test_malformed_requests_are_400(client):
    png = _png_bytes()
    r = client.post("/v1/predict", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and "boundary" in r.json()["error"]["message"]
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + png)  # no closing boundary
    r = client.post("/v1/predict", content=body, headers={"content-type": "multipart/form-data; boundary=XyZ"})
    assert r.status_code == 400 and "incomplete" in r.json()["error"]["message"]
    r = client.post("/v1/predict", files=[("image", ("a.png", png, "image/png"))])
    assert r.status_code == 400 and "'file'" in r.json()["error"]["message"]
    r = client.post("/v1/predict?threshold=2", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    r = client.post("/v1/predict", content=png, headers={"content-type": "image/png", "content-length": "x"})
    assert r.status_code == 400


def test_unknown_model_path_and_method(client):
    r = client.post("/v1/predict?model=nope", content=_png_bytes(), headers={"content-type": "image/png"})
    assert r.status_code == 404 and "cnn32, other" in r.json()["error"]["message"]
    assert client.get("/v2/anything").json()["error"]["code"] == "not_found"
    r = client.get("/v1/predict")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_hostile_bytes_never_give_500(client):
    rng = np.random.default_rng(0)
    png = _png_bytes()
    bodies = [rng.bytes(int(n)) for n in rng.integers(1, 3000, 12)]
    bodies += [png[:k] + rng.bytes(50) for k in (8, 16, 33, 60, 100)] + [b"\xff\xd8\xff" + rng.bytes(500)]
    for b in bodies:
        r = client.post("/v1/predict", content=b, headers={"content-type": "image/png"})
        assert r.status_code in (200, 415, 422), (r.status_code, r.text)
        assert "Traceback" not in r.text


def test_api_key(runs, monkeypatch):
    with TestClient(create_app([runs[0]], ServeOptions(api_key="s3cret"))) as c:
        _ready(c)
        png = {"content": _png_bytes(), "headers": {"content-type": "image/png"}}
        r = c.post("/v1/predict", **png)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "unauthorized"
        assert c.get("/v1/models").status_code == 401
        wrong = c.post("/v1/predict", content=png["content"],
                       headers={**png["headers"], "authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "wrong API key"
        assert c.post("/v1/predict", content=png["content"],
                      headers={**png["headers"], "authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/models", headers={"x-api-key": "s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200  # probes stay open
        assert c.get("/").status_code == 200


def test_max_queue_counts_requests_not_images(runs):
    """--max-queue N: N requests in progress, whatever their number of images (one meaning)."""
    opts = ServeOptions(max_batch=32, max_queue=1, max_files=4, max_wait_ms=0)  # fewer requests than a batch: fine
    with TestClient(create_app([runs[0]], opts)) as c:
        _ready(c)
        files = [("file", (f"{i}.png", _png_bytes(), "image/png")) for i in range(3)]
        r = c.post("/v1/predict", files=files)  # 3 images > max_queue: one request, accepted
        assert r.status_code == 200 and len(r.json()["results"]) == 3


def test_full_queue_is_429_with_retry_after(runs):
    with TestClient(create_app([runs[0]], ServeOptions(max_batch=1, max_queue=1, max_wait_ms=0))) as c:
        _ready(c)
        served = c.app.state.fakescope.models["cnn32"]
        gate = threading.Event()
        score = served.batcher.fn

        def slow(stages):
            gate.wait(10)
            return score(stages)

        served.batcher.fn = slow
        png = {"content": _png_bytes(), "headers": {"content-type": "image/png"}}
        first: list = []
        t = threading.Thread(target=lambda: first.append(c.post("/v1/predict", **png)))
        t.start()
        for _ in range(400):
            if served.batcher.pending:
                break
            time.sleep(0.01)
        r = c.post("/v1/predict", **png)
        gate.set()
        t.join(10)
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
        assert first[0].status_code == 200


def test_batcher_gathers_concurrent_items_and_runs_off_the_event_loop():
    calls = []

    def fn(values):
        calls.append((list(values), threading.current_thread()))
        time.sleep(0.02)
        return [v * 10 for v in values]

    async def go():
        from concurrent.futures import ThreadPoolExecutor

        b = Batcher(fn, ThreadPoolExecutor(1), max_batch=4, max_wait_ms=50, max_queue=8)
        b.start()
        out = await asyncio.gather(*(b.submit([i]) for i in range(6)), b.submit([6, 7]))
        with pytest.raises(QueueFull):
            await asyncio.gather(b.submit(list(range(5))), b.submit(list(range(5))))
        await b.stop()
        return out, b.stats

    out, stats = asyncio.run(go())
    assert out == [[0], [10], [20], [30], [40], [50], [60, 70]]
    assert sorted(len(v) for v, _ in calls[:2]) == [4, 4] and stats.largest == 4  # 8 items: two full batches
    assert all(t is not threading.main_thread() for _, t in calls)


def test_uploads_are_never_written_to_disk(runs, images, tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    before = sorted(p.name for p in runs[0].rglob("*"))
    with TestClient(create_app([runs[0]], ServeOptions(max_wait_ms=1))) as c:
        _ready(c)
        assert c.post("/v1/predict", files=_multipart(images * 3)).status_code == 200
        r = c.post("/v1/predict", content=images[0].read_bytes(), headers={"content-type": "image/png"})
        assert r.status_code == 200
    assert sorted(p.name for p in runs[0].rglob("*")) == before
    assert list(work.iterdir()) == [] and list(tmp.iterdir()) == []


def test_openapi_docs_and_page_load_nothing_from_elsewhere(client):
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/models", "/health", "/ready"} <= set(schema["paths"])
    predict = schema["paths"]["/v1/predict"]["post"]
    assert {"multipart/form-data", "image/*"} <= set(predict["requestBody"]["content"])
    assert {"400", "401", "404", "413", "415", "422", "429", "503"} <= set(predict["responses"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "default-src 'self'" in docs.headers["content-security-policy"]
    assert "http://" not in docs.text and "https://" not in docs.text
    for asset in ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"):
        r = client.get(asset)
        assert r.status_code == 200 and len(r.content) > 100_000
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    assert "http://" not in html and "https://" not in html and "@import" not in html
    assert '<label class="drop" id="drop" for="files">' in html and 'type="file"' in html and "multiple" in html
    assert 'name="viewport"' in html and '<label for="model">' in html


def test_serve_command_errors_are_one_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run directory not found" in err
    with pytest.raises(SystemExit) as e:
        main(["serve", str(tmp_path), "--max-file-size", "lots"])
    assert e.value.code == 2 and "expected a size like 20MB" in capsys.readouterr().err
    from fakescope.commands.serve import size

    assert size("20MB") == 20_000_000 and size("512KiB") == 524_288 and size("123") == 123


def test_batcher_waits_only_while_announced_requests_are_on_their_way():
    from concurrent.futures import ThreadPoolExecutor

    calls = []

    def fn(values):
        calls.append(list(values))
        return values

    async def go():
        b = Batcher(fn, ThreadPoolExecutor(1), max_batch=8, max_wait_ms=3000, max_queue=8)
        b.start()
        t = time.perf_counter()
        assert await b.submit([1]) == [1]  # nobody else announced: no wait for company
        lone = time.perf_counter() - t
        with b.expect() as late:  # a request still being read: the forward pass waits for it
            first = asyncio.ensure_future(b.submit([2]))
            await asyncio.sleep(0.1)
            assert not first.done()
            assert await b.submit([3], late) == [3]
        assert await first == [2]
        await b.stop()
        return lone

    assert asyncio.run(go()) < 1.0
    assert calls == [[1], [2, 3]]


def test_a_non_finite_score_is_an_error_row_never_nan_in_json(runs, images):
    """A model that returns NaN for one image: that row gets an error, the others are scored, and the
    body is strict JSON (a 500 before: JSONResponse refuses NaN)."""
    with TestClient(create_app([runs[0]], ServeOptions(max_wait_ms=0))) as c:
        _ready(c)
        predictor = c.app.state.fakescope.models["cnn32"].predictor
        scores = predictor.scores

        def nan_for_first(stages):
            s = scores(stages).copy()
            s[0] = np.nan
            return s

        predictor.scores = nan_for_first
        r = c.post("/v1/predict", files=_multipart(images[:2]))
        assert r.status_code == 200, r.text
        json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON body"))
        rows = r.json()["results"]
        assert rows[0]["p_ai"] is None and rows[0]["error"]["code"] == "nonfinite_score"
        assert rows[1]["error"] is None and 0 <= rows[1]["p_ai"] <= 1
        r = c.post("/v1/predict", content=images[0].read_bytes(), headers={"content-type": "image/png"})
        assert r.status_code == 422 and r.json()["results"][0]["error"]["code"] == "nonfinite_score"


def test_calibrated_run_and_provenance(runs, images, tmp_path):
    """A calibrated run serves calibrated p_ai (equal to `predict`) at its calibrated threshold, and every
    row carries the upload's provenance metadata; ?threshold and --uncalibrated still work."""
    from PIL import PngImagePlugin

    from fakescope.calibration import fit_calibration, write_calibration

    run = tmp_path / "calibrated"
    shutil.copytree(runs[0], run)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    cal = fit_calibration(y, 1 / (1 + np.exp(-(3 * rng.normal(size=400) + 2 * y))), 0.05)
    write_calibration(run, cal)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20")
    sd = tmp_path / "sd.png"
    Image.open(images[0]).save(sd, pnginfo=info)
    ref = predict_paths(run, [str(images[0]), str(sd)], provenance=False,
                        runtime_options=RuntimeOptions(precision="fp32"))
    with TestClient(create_app([run], ServeOptions(max_wait_ms=2, precision="fp32"))) as c:
        _ready(c)
        m = c.get("/v1/models").json()["models"][0]
        assert m["threshold"] == pytest.approx(cal.threshold) and m["threshold_source"] == "calibration.json"
        g = m["guarantee"]  # the promise at the calibrated threshold, as predict reports it
        assert g == ref[0]["guarantee"] and g["promise"] == cal.promise and g["n_real"] == int((y == 0).sum())
        assert g["promise"].startswith("at most 5 % of real images like those in the calibration set are called AI")
        assert g["fpr_upper_bound"] <= 0.05 and g["tpr_interval"][0] <= g["tpr"] <= g["tpr_interval"][1]
        page = c.get("/").text  # the page shows /v1/models' guarantee under the model line
        assert '<p class="info" id="model-promise" hidden></p>' in page and '"Promise: " + g.promise' in page
        body = c.post("/v1/predict", files=_multipart([images[0], sd])).json()
        assert body["calibrated"] and body["threshold_source"] == "calibration.json"
        for row, r in zip(body["results"], ref):
            assert row["p_ai"] == pytest.approx(r["p_ai"], abs=1e-6) and row["verdict"] == r["verdict"]
        assert body["results"][0]["provenance"]["generator_hint"] is None
        assert body["results"][1]["provenance"]["generator_hint"] == "stable-diffusion (PNG parameters chunk)"
        q = c.post("/v1/predict?threshold=0", files=_multipart([images[0]])).json()
        assert q["threshold_source"] == "?threshold" and q["results"][0]["verdict"] == "ai"
    with TestClient(create_app([run], ServeOptions(max_wait_ms=2, precision="fp32", uncalibrated=True,
                                                   provenance=False))) as c:
        _ready(c)
        body = c.post("/v1/predict", files=_multipart([images[0]])).json()
        raw = predict_paths(run, [str(images[0])], uncalibrated=True, provenance=False,
                            runtime_options=RuntimeOptions(precision="fp32"))
        assert not body["calibrated"] and body["threshold"] == 0.5 and "provenance" not in body["results"][0]
        assert body["results"][0]["p_ai"] == pytest.approx(raw[0]["p_ai"], abs=1e-6)


def test_onnxruntime_backend_serves_the_export(runs, images, tmp_path):
    """`serve --backend onnxruntime`: the run's ONNX export answers, with predict's onnxruntime p_ai
    (and the PyTorch p_ai within export tolerance)."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'fakescope[onnx]')")
    from fakescope.export import export_onnx

    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    export_onnx(run)
    ref_onnx = predict_paths(run, [str(p) for p in images], backend="onnxruntime", provenance=False)
    ref_torch = predict_paths(run, [str(p) for p in images], provenance=False,
                              runtime_options=RuntimeOptions(precision="fp32"))
    with TestClient(create_app([run], ServeOptions(max_wait_ms=0, backend="onnxruntime"))) as c:
        _ready(c)
        assert c.get("/v1/models").json()["models"][0]["backend"] == "onnxruntime"
        rows = c.post("/v1/predict", files=_multipart(images)).json()["results"]
    for row, o, t in zip(rows, ref_onnx, ref_torch):
        assert_close(row["p_ai"], o["p_ai"])  # padded batches of the server
        assert abs(row["p_ai"] - t["p_ai"]) <= 1e-4
    (run / "model.onnx").unlink()
    with pytest.raises(FakescopeError, match="ONNX model not found"):
        create_app([run], ServeOptions(backend="onnxruntime"))
