"""Run directories: safetensors + JSON only, never unpickled, tampering and mismatches refused with
one clear line, atomic writes, and a training state that survives a crash between its writes."""

import json
import os
import pickle
import stat

import pytest
import torch

from fakescope import __version__
from fakescope.engine import checkpoint as ckpt
from fakescope.errors import CheckpointError
from fakescope.models import create_model
from fakescope.utils import atomic_write_bytes, write_json

MARKER = "fakescope-test-unpickled-marker"


class _Evil:
    """Unpickling this creates a marker file: proof that something was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg, msg
    return msg


@pytest.fixture()
def run(tmp_path):
    """A minimal valid run directory: cnn32 config + its weights."""
    torch.manual_seed(0)
    model = create_model("cnn32")
    d = tmp_path / "run"
    ckpt.write_config(d, {"model": {"name": "cnn32", "options": {}}, "native_size": 32})
    ckpt.save_tensors(d / ckpt.WEIGHTS, model.state_dict(), {"epoch": 0})
    return d, model


def test_roundtrip_and_only_safetensors_and_json(run):
    d, model = run
    loaded, cfg = ckpt.load_run(d)
    assert cfg["model"]["name"] == "cnn32" and cfg["format"] == ckpt.RUN_FORMAT
    assert cfg["fakescope_version"] == __version__
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert not loaded.training
    assert {p.suffix for p in d.iterdir()} == {".json", ".safetensors"}
    umask = os.umask(0o022)
    os.umask(umask)
    for p in d.iterdir():  # the usual permissions, not the 0600 of a temporary file
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_pickle_renamed_safetensors_is_refused_and_never_unpickled(run, tmp_path, protocol):
    d, _ = run
    marker = tmp_path / MARKER
    (d / ckpt.WEIGHTS).write_bytes(pickle.dumps({"w": _Evil(str(marker))}, protocol=protocol))
    with pytest.raises(CheckpointError) as e:
        ckpt.load_run(d)
    msg = _one_line(e)
    assert "pickle" in msg and "never unpickles" in msg and str(d / ckpt.WEIGHTS) in msg
    assert not marker.exists()


def test_torch_save_file_renamed_safetensors_is_refused(run, tmp_path):
    d, model = run
    marker = tmp_path / MARKER
    torch.save({"state": model.state_dict(), "evil": _Evil(str(marker))}, d / ckpt.WEIGHTS)
    with pytest.raises(CheckpointError, match="pickle / torch.save file") as e:
        ckpt.load_run(d)
    _one_line(e)
    assert not marker.exists()
    torch.save(model.state_dict(), d / ckpt.WEIGHTS, _use_new_zipfile_serialization=False)  # legacy format
    with pytest.raises(CheckpointError, match="pickle"):
        ckpt.load_run(d)


@pytest.mark.parametrize("keep", [0, 4, 7, 100, 0.5, 0.999])
def test_truncated_weights_are_refused(run, keep):
    d, _ = run
    data = (d / ckpt.WEIGHTS).read_bytes()
    n = int(keep * len(data)) if isinstance(keep, float) else keep
    (d / ckpt.WEIGHTS).write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="not a valid safetensors file") as e:
        ckpt.load_run(d)
    _one_line(e)


def test_random_bytes_and_missing_weights(run):
    d, _ = run
    (d / ckpt.WEIGHTS).write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        ckpt.load_run(d)
    (d / ckpt.WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="weights file not found"):
        ckpt.load_run(d)


def test_valid_file_whose_header_length_starts_with_0x80_loads(tmp_path):
    """A safetensors header length of 128 + 256k starts with byte 0x80: not a pickle."""
    for pad in range(0, 300):
        t = {"x" * (1 + pad): torch.zeros(1)}
        ckpt.save_tensors(tmp_path / "a.safetensors", t)
        data = (tmp_path / "a.safetensors").read_bytes()
        if data[0] == 0x80:
            assert torch.equal(ckpt.load_tensors(tmp_path / "a.safetensors")["x" * (1 + pad)], torch.zeros(1))
            return
    pytest.fail("no header of length 0x80 mod 256 produced")


def test_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    """safetensors orders metadata by a per-call hash; save_tensors sorts it (8 keys: 8! orders)."""
    from safetensors import safe_open

    meta = {f"k{i}": i for i in range(6)}
    t = {"b": torch.arange(5.0), "a": torch.zeros(3, dtype=torch.int64), "é": torch.ones(2, 2)}
    blobs = set()
    for _ in range(5):
        ckpt.save_tensors(tmp_path / "a.safetensors", t, meta)
        blobs.add((tmp_path / "a.safetensors").read_bytes())
    assert len(blobs) == 1
    blob = blobs.pop()
    n = int.from_bytes(blob[:8], "little")
    assert n % 8 == 0 and list(json.loads(blob[8:8 + n])["__metadata__"]) == sorted(["format", "fakescope_version",
                                                                                      *meta])
    back = ckpt.load_tensors(tmp_path / "a.safetensors")
    assert all(torch.equal(back[k], v) for k, v in t.items())
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        assert f.metadata() == {"format": "fakescope", "fakescope_version": __version__,
                                **{k: str(v) for k, v in meta.items()}}


def test_shape_mismatch_from_edited_config(run):
    d, _ = run
    cfg = json.loads((d / ckpt.CONFIG).read_text())
    cfg["model"]["options"] = {"filters": [16, 64, 128]}
    (d / ckpt.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        ckpt.load_run(d)
    msg = _one_line(e)
    assert "does not match the model in config.json" in msg and "shape mismatch" in msg
    assert "backbone.0.weight: (32, 3, 3, 3) in the file, (16, 3, 3, 3) in the model" in msg


def test_missing_and_unexpected_tensors(run):
    d, model = run
    sd = model.state_dict()
    sd.pop("head_net.3.bias")
    sd["extra.weight"] = torch.zeros(2)
    ckpt.save_tensors(d / ckpt.WEIGHTS, sd)
    with pytest.raises(CheckpointError) as e:
        ckpt.load_run(d)
    msg = _one_line(e)
    assert "1 missing tensors (e.g. head_net.3.bias)" in msg and "1 unexpected tensors (e.g. extra.weight)" in msg


def test_run_format_and_version_mismatch(run):
    d, _ = run
    cfg = json.loads((d / ckpt.CONFIG).read_text())
    cfg.update(format=99, fakescope_version="9.9.9")
    (d / ckpt.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        ckpt.load_run(d)
    msg = _one_line(e)
    assert "fakescope 9.9.9 (run format 99)" in msg and f"this fakescope {__version__} reads run format 1" in msg
    cfg.pop("format")
    (d / ckpt.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="run format None"):
        ckpt.load_run(d)


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "not a fakescope run config"),
    ('{"format": 1, "model": "cnn32"}', "not a fakescope run config"),
    ('{"format": 1, "model": {"name": "nope"}}', "describes a model this fakescope cannot build: unknown model 'nope'"),
    ('{"format": 1, "model": {"name": "cnn32", "options": {"filters": "abc"}}}', "cannot be built"),
    ('{"format": 1, "model": {"name": "cnn32", "options": {"hidden": -5}}}', "cannot be built"),
])
def test_bad_config_json(run, content, fragment):
    d, _ = run
    (d / ckpt.CONFIG).write_text(content)
    with pytest.raises(CheckpointError) as e:
        ckpt.load_run(d)
    assert fragment in _one_line(e)


def test_not_a_run(tmp_path):
    with pytest.raises(CheckpointError, match="run directory not found"):
        ckpt.load_run(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="has no config.json"):
        ckpt.load_run(tmp_path)


# --- atomic writes ---------------------------------------------------------------------------------

def test_atomic_write_uses_temp_fsync_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", os.path.basename(str(a)))),
                                                     real_replace(a, b))[1])
    write_json(tmp_path / "config.json", {"a": 1})
    assert calls[0] == "fsync" and calls[1][0] == "replace" and calls[1][1].startswith(".config.json.")
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1}


@pytest.mark.parametrize("fail_in", ["write", "fsync", "replace"])
def test_crash_during_write_leaves_previous_file_intact(tmp_path, monkeypatch, fail_in):
    target = tmp_path / ckpt.WEIGHTS
    ckpt.save_tensors(target, {"w": torch.ones(3)})
    before = target.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt  # as abrupt as Python lets us be in-process

    if fail_in == "write":  # dies half-way through writing the data
        real_fdopen = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda fd, mode: _Failing(real_fdopen(fd, mode)))
    else:
        monkeypatch.setattr(os, fail_in, boom)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_tensors(target, {"w": torch.zeros(1000)})
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.WEIGHTS]  # no temporary file left


class _Failing:
    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        raise KeyboardInterrupt


def test_atomic_write_bytes_makes_parent(tmp_path):
    atomic_write_bytes(tmp_path / "a" / "b" / "c.json", b"{}")
    assert (tmp_path / "a" / "b" / "c.json").read_bytes() == b"{}"


# --- training state ----------------------------------------------------------------------------------

def _trained(steps: int, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("cnn32")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    for _ in range(steps):
        x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
        loss = model.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _state(epoch):
    return {"epoch": epoch, "best_val_loss": 0.5, "bad_epochs": 0, "best_epoch": epoch, "history": [],
            "stopped": False}


def test_train_state_roundtrip_is_exact(tmp_path):
    model, opt, sched = _trained(2)
    ckpt.save_train_state(tmp_path, model, opt, sched, _state(2))
    m2, o2, s2 = _trained(0, seed=1)
    state = ckpt.load_train_state(tmp_path, m2, o2, s2)
    assert state["epoch"] == 2
    for k, v in model.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v)
    a, b = opt.state_dict(), o2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid, st in a["state"].items():
        for k, v in st.items():
            assert torch.equal(b["state"][pid][k], v) if torch.is_tensor(v) else b["state"][pid][k] == v
    assert sched.state_dict() == s2.state_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last-0002.safetensors", "last.json"]


def test_crash_between_tensors_and_last_json_keeps_previous_state(tmp_path):
    model, opt, sched = _trained(1)
    ckpt.save_train_state(tmp_path, model, opt, sched, _state(0))
    # epoch 1's tensors reach the disk, then the process dies before last.json is replaced
    newer, _, _ = _trained(2)
    ckpt.save_tensors(tmp_path / "last-0001.safetensors", {f"model/{k}": v for k, v in newer.state_dict().items()})
    (tmp_path / ".last.json.abc123.tmp").write_text('{"half": ')  # an interrupted atomic write
    m2, o2, s2 = _trained(0, seed=3)
    state = ckpt.load_train_state(tmp_path, m2, o2, s2)
    assert state["epoch"] == 0
    for k, v in model.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last-0000.safetensors", "last.json"]


def test_no_state_and_corrupt_state(tmp_path):
    m, o, s = _trained(0)
    assert ckpt.load_train_state(tmp_path, m, o, s) is None
    ckpt.save_train_state(tmp_path, m, o, s, _state(0))
    state = json.loads((tmp_path / ckpt.LAST_STATE).read_text())
    del state["optimizer"]
    (tmp_path / ckpt.LAST_STATE).write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="corrupt or from another fakescope version") as e:
        ckpt.load_train_state(tmp_path, m, o, s)
    _one_line(e)
    (tmp_path / ckpt.LAST_STATE).write_text(json.dumps({**state, "tensors": "last-0009.safetensors"}))
    with pytest.raises(CheckpointError, match="weights file not found"):
        ckpt.load_train_state(tmp_path, m, o, s)
