"""RuntimeOptions: one checked, frozen value for the runtime settings, built once by each command,
the server and the study, and resolved once by the engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fakescope import __version__
from fakescope.cli import main
from fakescope.commands import args as cli_args
from fakescope.data.io import DEFAULT_MAX_PIXELS
from fakescope.engine import runtime
from fakescope.errors import FakescopeError
from fakescope.options import PREDICT_MAX_FILE_SIZE, RuntimeOptions
from fakescope.serve.app import ServeOptions
from fakescope.study import runs as R
from fakescope.study.config import BenchmarkConfig


@pytest.mark.parametrize("field, value, needle", [
    ("device", "tpu", "expected --device to be one of auto, cpu, cuda (or cuda:N), got 'tpu'"),
    ("device", "cuda:x", "expected --device to be one of auto, cpu, cuda (or cuda:N), got 'cuda:x'"),
    ("precision", "int8", "expected --precision to be one of auto, fp32, bf16, fp16, got 'int8'"),
    ("batch_size", 0, "expected batch_size to be a positive integer or None, got 0"),
    ("batch_size", True, "expected batch_size to be a positive integer or None, got True"),
    ("batch_size", "8", "expected batch_size to be a positive integer or None, got '8'"),
    ("num_workers", -1, "expected num_workers to be an integer >= 0 or None, got -1"),
    ("use_cache", "yes", "expected use_cache to be true or false, got 'yes'"),
    ("cache_dir", 3, "expected cache_dir to be a folder path or None, got 3"),
    ("max_pixels", 0, "expected max_pixels to be a positive integer or None, got 0"),
    ("max_file_size", -5, "expected max_file_size to be a positive integer or None, got -5"),
    ("threads", 0, "expected threads to be a positive integer or None, got 0"),
    ("compile", 1, "expected compile to be true or false, got 1"),
])
def test_bad_values_are_refused_with_what_was_expected(field, value, needle):
    with pytest.raises(FakescopeError) as e:
        RuntimeOptions(**{field: value})
    assert str(e.value) == needle


def test_good_values_and_defaults():
    o = RuntimeOptions()
    assert (o.device, o.precision, o.batch_size, o.num_workers, o.use_cache, o.cache_dir, o.max_pixels,
            o.max_file_size, o.threads, o.compile) == ("auto", "auto", None, None, True, None, None, None, None, False)
    o = RuntimeOptions(device="cuda:1", precision="bf16", batch_size=8, num_workers=0, use_cache=False,
                       cache_dir=Path("/tmp/c"), max_pixels=10, max_file_size=20, threads=2, compile=True)
    assert o.device == "cuda:1" and o.cache_dir == Path("/tmp/c") and o.num_workers == 0


def test_frozen_assignment_raises():
    o = RuntimeOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.device = "cpu"
    assert dataclasses.replace(o, device="cpu").device == "cpu" and o.device == "auto"
    assert hash(o) == hash(RuntimeOptions())  # a value: equal options are interchangeable


def test_resolve_once_into_device_and_precision():
    rt = runtime.resolve(RuntimeOptions(device="cpu", precision="fp32", batch_size=4))
    assert rt.device == torch.device("cpu") and rt.precision == runtime.Precision("fp32", None, False)
    assert rt.batch_size == 4 and rt.max_pixels == DEFAULT_MAX_PIXELS and rt.options.max_pixels is None
    assert runtime.resolve(RuntimeOptions(device="cpu", precision="fp32"), inference=False).precision.channels_last
    again = rt.replace(num_workers=0)
    assert again.num_workers == 0 and again.precision is rt.precision and rt.num_workers is None
    if runtime.bf16_supported(torch.device("cpu")):
        assert rt.replace(precision="bf16").precision.name == "bf16"
    with pytest.raises(ValueError, match="cannot change the device"):
        rt.replace(device="cuda")
    fixed = runtime.fixed(torch.device("cpu"), rt.precision, batch_size=2)
    assert (fixed.options.device, fixed.options.precision, fixed.batch_size) == ("cpu", "fp32", 2)


RUNTIME_FLAGS = ["--device", "cpu", "--precision", "fp32", "--batch-size", "7", "--workers", "0", "--no-cache",
                 "--cache-dir", "/tmp/fs-cache", "--max-pixels", "1000"]
WANT = RuntimeOptions(device="cpu", precision="fp32", batch_size=7, num_workers=0, use_cache=False,
                      cache_dir="/tmp/fs-cache", max_pixels=1000)


@pytest.mark.parametrize("argv, target, want", [
    (["evaluate", "RUN", "--data", "DATA", *RUNTIME_FLAGS, "--compile"], "fakescope.engine.evaluation.evaluate_run",
     dataclasses.replace(WANT, compile=True)),
    (["calibrate", "RUN", "--data", "DATA", *RUNTIME_FLAGS], "fakescope.engine.calibrate.calibrate_run", WANT),
    (["attack", "RUN", "--data", "DATA", *RUNTIME_FLAGS], "fakescope.engine.attack.attack_run", WANT),
    (["predict", "RUN", "a.png", *RUNTIME_FLAGS], "fakescope.engine.evaluation.predict_paths",
     dataclasses.replace(WANT, max_file_size=PREDICT_MAX_FILE_SIZE)),
    (["predict", "RUN", "a.png", "--max-file-size", "1234"], "fakescope.engine.evaluation.predict_paths",
     RuntimeOptions(max_file_size=1234)),
    (["predict", "RUN", "a.png", "--out", "OUT", *RUNTIME_FLAGS], "fakescope.engine.bulk.predict_to_folder",
     dataclasses.replace(WANT, max_file_size=PREDICT_MAX_FILE_SIZE)),
    (["explain", "RUN", "a.png", "--out", "OUT"], "fakescope.explain.explain_files", RuntimeOptions(device="cpu")),
])
def test_a_command_builds_the_options_once_and_passes_them_down(monkeypatch, capsys, argv, target, want):
    built, got = [], []

    def counting(args):
        built.append(real(args))
        return built[-1]

    def engine(*a, **kw):
        got.append(kw["runtime_options"])
        raise FakescopeError("stopped here by the test")

    real = cli_args.runtime_from_args
    monkeypatch.setattr(cli_args, "runtime_from_args", counting)
    monkeypatch.setattr(target, engine)
    assert main(argv) == 2 and "stopped here by the test" in capsys.readouterr().err
    assert len(built) == 1 and got == [want] and got[0] is built[0]


def test_a_bad_device_on_the_command_line_is_one_line(capsys):
    assert main(["evaluate", "RUN", "--data", "DATA", "--device", "tpu"]) == 2
    assert "expected --device to be one of auto, cpu, cuda (or cuda:N), got 'tpu'" in capsys.readouterr().err


def test_the_server_and_the_study_build_theirs_from_their_own_settings():
    s = ServeOptions(device="cpu", precision="fp32", max_pixels=99, max_file_size=1000)
    assert s.runtime == RuntimeOptions(device="cpu", precision="fp32", max_pixels=99, max_file_size=1000)
    with pytest.raises(FakescopeError, match="expected --device"):
        ServeOptions(device="tpu")
    cfg = BenchmarkConfig(data="d", device="cpu", precision="fp32", eval_batch_size=16, workers=0,
                          cache_dir="/c", use_cache=False, max_pixels=1000)
    assert cfg.runtime == RuntimeOptions(device="cpu", precision="fp32", batch_size=16, num_workers=0,
                                         cache_dir="/c", use_cache=False, max_pixels=1000)


def test_result_keys_keep_their_values(tmp_path):
    """The study's cache keys hold the resolved device, precision and pixel limit as before."""
    cfg = BenchmarkConfig(data="d", device="cpu", precision="fp32")
    assert R.result_key(cfg, tmp_path, precision=None, data={"root": "r"}, threshold=None) == {
        "fakescope": __version__, "weights_sha256": None, "run_config_sha256": None, "calibration_sha256": None,
        "data": {"root": "r"}, "max_pixels": DEFAULT_MAX_PIXELS, "device": "cpu", "precision": "fp32",
        "threshold": None}
    key = R.result_key(dataclasses.replace(cfg, max_pixels=1000, precision="auto"), tmp_path, precision="fp32",
                       data=None)
    assert (key["max_pixels"], key["precision"]) == (1000, "fp32")
