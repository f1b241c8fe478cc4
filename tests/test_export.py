import numpy as np
import pytest
import torch

from fakescope.calibration import fit_calibration, sigmoid, write_calibration
from fakescope.engine.checkpoint import load_run
from fakescope.errors import FakescopeError

from synth import make_run

pytest.importorskip("onnx", reason="onnx is not installed (pip install 'fakescope[onnx]')")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'fakescope[onnx]')")

from fakescope.export import OnnxDetector, export_onnx  # noqa: E402


def _torch_p_ai(model, x):
    """fakescope's own scoring in fp32 (what `predict` computes)."""
    from fakescope.engine import runtime
    from fakescope.engine.infer import forward_p_ai

    dev = torch.device("cpu")
    return forward_p_ai(model, x, runtime.resolve_precision("fp32", dev, inference=True), dev).numpy()


@pytest.mark.parametrize("name,options", [
    ("cnn32", {}),
    ("timm:mobilenetv3_small_050", {"input_size": 64, "freeze": True}),
    ("timm:resnet10t", {"input_size": 48, "freeze": False}),
])
def test_onnxruntime_equals_pytorch(tmp_path, name, options):
    run = make_run(tmp_path / "run", name, options)
    res = export_onnx(run, tmp_path / "m.onnx")
    det = OnnxDetector(res["path"])
    model, _ = load_run(run)
    s = model.preprocess.input_size
    assert det.input_size == s and not det.calibrated and det.threshold == 0.5 and det.threshold_source == "default"
    for n in (1, 5):  # dynamic batch axis
        x = torch.rand(n, 3, s, s, generator=torch.Generator().manual_seed(n))
        p_onnx, p_torch = det.p_ai(x), _torch_p_ai(model, x)
        assert p_onnx.shape == (n,)
        assert np.abs(p_onnx - p_torch).max() <= 1e-4
    assert model.training is False and det.metadata["label_map"] == '{"nature": 0, "ai": 1}'


def test_calibration_goes_inside_the_graph(tmp_path):
    run = make_run(tmp_path / "run", "cnn32")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    cal = fit_calibration(y, sigmoid(3 * rng.normal(size=400) + 2 * y), 0.05)
    write_calibration(run, cal)
    det = OnnxDetector(export_onnx(run, tmp_path / "m.onnx", opset=13)["path"])
    assert det.calibrated and det.temperature == pytest.approx(cal.temperature)
    assert det.threshold == pytest.approx(cal.threshold) and det.threshold_source == "calibration.json"
    model, _ = load_run(run)
    x = torch.rand(4, 3, 32, 32)
    raw = _torch_p_ai(model, x)
    assert np.abs(det.p_ai(x) - cal.p_ai(raw)).max() <= 1e-4
    assert np.abs(det.raw_p_ai(x) - raw).max() <= 1e-4
    plain = OnnxDetector(export_onnx(run, tmp_path / "raw.onnx", uncalibrated=True)["path"])
    assert not plain.calibrated and np.abs(plain.p_ai(x) - raw).max() <= 1e-4


def test_export_errors(tmp_path):
    run = make_run(tmp_path / "run", "cnn32")
    with pytest.raises(FakescopeError, match="opset"):
        export_onnx(run, opset=3)
    with pytest.raises(FakescopeError, match="not found"):
        OnnxDetector(tmp_path / "none.onnx")
    det = OnnxDetector(export_onnx(run)["path"])
    assert det.path.endswith("run/model.onnx")
    with pytest.raises(FakescopeError, match=r"expected images \[N, 3, 32, 32\]"):
        det.p_ai(np.zeros((1, 3, 16, 16), np.float32))
