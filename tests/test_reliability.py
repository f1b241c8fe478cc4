"""End to end through the command line: a data root full of awkward and broken files goes through
``data inspect``, ``train``, ``evaluate`` and ``predict``; bad files are skipped, counted and listed,
never fatal. And ``train --resume`` after ``kill -9`` ends bit-identical to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fakescope.cli import main
from fakescope.engine import checkpoint as ckpt

from badcorpus import build_corpus
from synth import assert_close, make_dataset

REAL_ACCESS = os.access


def _access(path, mode, *a, **k):
    """Root reads chmod-000 files; deny the corpus's unreadable file as a normal user would be denied."""
    if os.path.basename(str(path)) == "unreadable.png":
        return False
    return REAL_ACCESS(path, mode, *a, **k)


@pytest.fixture(autouse=True)
def _as_normal_user(monkeypatch):
    monkeypatch.setattr(os, "access", _access)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """A single-generator root of learnable 32x32 PNGs, with the whole corpus spread over
    train/{ai,nature} and again over val/{ai,nature}. Returns (root, {split: {path: case}})."""
    base = tmp_path_factory.mktemp("messy")
    root = make_dataset(base / "root", single=True, n_train=24, n_val=8)
    expected: dict[str, dict[str, object]] = {}
    for split in ("train", "val"):
        cases = build_corpus(base / f"corpus-{split}")
        expected[split] = {}
        for k, (name, case) in enumerate(sorted(cases.items())):
            dest = root / split / ("ai" if k % 2 else "nature") / name
            if case.path.is_symlink():
                os.symlink(os.readlink(case.path), dest)
                case.path.unlink()
            else:
                os.rename(case.path, dest)
            case.path = dest
            expected[split][str(dest)] = case
    return root, expected


@pytest.fixture(scope="module")
def flat_corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("flat"))


def _bad(cases: dict) -> dict:
    return {p: c for p, c in cases.items() if not c.ok}


def _run(argv, capsys):
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_inspect_lists_every_bad_file_with_its_reason(messy, capsys):
    root, expected = messy
    code, out, err = _run(["data", "inspect", root, "--json", "--workers", "0"], capsys)
    assert code == 0, err
    info = json.loads(out)
    bad = {**_bad(expected["train"]), **_bad(expected["val"])}
    assert set(info["unreadable"]) == set(bad)
    for path, reason in info["unreadable"].items():
        assert bad[path].reason.lower() in reason.lower(), (bad[path].kind, reason)
    assert info["checked"] == info["total"] == 2 * 24 + 2 * 8 + len(expected["train"]) + len(expected["val"])
    assert f"{len(bad)} unreadable files" in " ".join(info["warnings"])
    code, out, _ = _run(["data", "inspect", root, "--workers", "0"], capsys)  # the table form
    assert code == 0 and f"unreadable ({len(bad)}):" in out
    assert "decompression bomb: 40000x40000" in out and "permission denied" in out


def test_train_skips_counts_and_lists_bad_files(messy, tmp_path, capsys):
    root, expected = messy
    out_dir = tmp_path / "run"
    code, out, err = _run(["train", "--model", "cnn32", "--data", root, "--out", out_dir, "--epochs", "1",
                           "--workers", "0"], capsys)
    assert code == 0, err
    listed = json.loads((out_dir / ckpt.BAD_FILES).read_text())
    bad = _bad(expected["train"])
    assert set(listed) == set(bad)
    for path, reason in listed.items():
        assert bad[path].reason.lower() in reason.lower(), (bad[path].kind, reason)
    assert f"{len(bad)} unreadable files skipped" in out
    assert {p.name for p in out_dir.iterdir() if p.suffix not in (".json", ".jsonl", ".safetensors")} <= {
        "MODEL_CARD.md"}


def test_train_streamed_inputs_also_list_bad_files(messy, tmp_path, capsys):
    root, expected = messy
    out_dir = tmp_path / "run"
    code, out, err = _run(["train", "--model", "cnn32", "--data", root, "--out", out_dir, "--epochs", "1",
                           "--workers", "0", "--native-size", "off", "--aug-flip"], capsys)
    assert code == 0, err
    assert "stream inputs" in out
    assert set(json.loads((out_dir / ckpt.BAD_FILES).read_text())) == set(_bad(expected["train"]))


@pytest.mark.parametrize("native", ["auto", "off"])
def test_strict_fails_before_training(messy, tmp_path, capsys, native):
    root, expected = messy
    out_dir = tmp_path / "run"
    code, out, err = _run(["train", "--model", "cnn32", "--data", root, "--out", out_dir, "--epochs", "1",
                           "--workers", "0", "--strict", "--native-size", native], capsys)
    n_bad = len(_bad(expected["train"]))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--strict: {n_bad} unreadable files" in err and str(out_dir / ckpt.BAD_FILES) in err
    assert not (out_dir / ckpt.WEIGHTS).exists() and not (out_dir / ckpt.LAST_STATE).exists()
    assert set(json.loads((out_dir / ckpt.BAD_FILES).read_text())) == set(_bad(expected["train"]))


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("clean") / "root", single=True, n_train=24, n_val=8)
    out = tmp_path_factory.mktemp("runs") / "cnn32"
    assert main(["train", "--model", "cnn32", "--data", str(root), "--out", str(out), "--epochs", "2",
                 "--workers", "0"]) == 0
    return out


def test_evaluate_skips_and_lists_bad_files(messy, clean_run, tmp_path, capsys):
    root, expected = messy
    js = tmp_path / "eval.json"
    code, out, err = _run(["evaluate", clean_run, "--data", root, "--json", js, "--workers", "0"], capsys)
    assert code == 0, err
    blob = json.loads(js.read_text())
    bad = _bad(expected["val"])
    assert set(blob["bad_files"]) == set(bad)
    for path, reason in blob["bad_files"].items():
        assert bad[path].reason.lower() in reason.lower()
    n_ok = 2 * 8 + sum(c.ok for c in expected["val"].values())
    assert blob["overall"]["n"] == n_ok
    assert f"{len(bad)} unreadable files skipped" in out


def test_predict_scores_good_files_and_reports_bad_ones(flat_corpus, clean_run, capsys):
    folder = next(iter(flat_corpus.values())).path.parent
    code, out, err = _run(["predict", clean_run, folder, "--format", "json", "--workers", "0"], capsys)
    assert code == 0, err
    rows = {r["path"]: r for r in json.loads(out)}
    assert set(rows) == {str(c.path) for c in flat_corpus.values()}
    for case in flat_corpus.values():
        row = rows[str(case.path)]
        if case.ok:
            assert "error" not in row and 0 <= row["p_ai"] <= 1 and row["verdict"] in ("ai", "nature"), case.kind
        else:
            assert "p_ai" not in row and case.reason.lower() in row["error"].lower(), (case.kind, row)
    code, out, _ = _run(["predict", clean_run, folder, "--workers", "0"], capsys)  # the table form
    assert code == 0 and "error: decompression bomb: 40000x40000" in out and "error: empty file (0 bytes)" in out


def test_predict_exit_code_is_1_only_when_nothing_could_be_read(flat_corpus, clean_run, capsys):
    bad = [str(c.path) for c in flat_corpus.values() if not c.ok]
    code, out, err = _run(["predict", clean_run, *bad, "--format", "csv", "--workers", "0"], capsys)
    assert code == 1
    lines = out.strip().splitlines()
    assert lines[0] == "path,p_ai,verdict,generator_hint,error" and len(lines) == 1 + len(bad)
    good = str(flat_corpus["grey.png"].path)
    code, out, _ = _run(["predict", clean_run, good, "missing.png", "--format", "json", "--workers", "0"], capsys)
    rows = json.loads(out)
    assert code == 0 and rows[0] == {"path": "missing.png", "error": "file not found"} and "p_ai" in rows[1]


def test_predict_max_file_size(flat_corpus, clean_run, capsys):
    big = flat_corpus["large_6000x4000.jpg"].path
    small = flat_corpus["grey.png"].path
    limit = big.stat().st_size - 1
    code, out, _ = _run(["predict", clean_run, big, small, "--max-file-size", limit, "--format", "json",
                         "--workers", "0"], capsys)
    rows = {r["path"]: r for r in json.loads(out)}
    assert code == 0
    assert rows[str(big)]["error"].startswith(f"file too large ({limit + 1} bytes > limit {limit}")
    assert "p_ai" in rows[str(small)]


def test_predict_max_pixels(flat_corpus, clean_run, capsys):
    big = flat_corpus["large_6000x4000.jpg"].path
    code, out, _ = _run(["predict", clean_run, big, "--max-pixels", "1000000", "--format", "json",
                         "--workers", "0"], capsys)
    assert code == 1
    assert "6000x4000 = 24000000 pixels > limit 1000000" in json.loads(out)[0]["error"]


def test_a_class_with_no_readable_image_is_an_error(tmp_path, capsys):
    root = make_dataset(tmp_path / "root", single=True, n_train=12, n_val=2)
    for f in (root / "train" / "ai").iterdir():
        f.write_bytes(b"")  # every AI image is now empty
    code, out, err = _run(["train", "--model", "cnn32", "--data", root, "--out", tmp_path / "run", "--epochs", "1",
                           "--workers", "0"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no readable 'ai' images in the training split" in err and "empty file (0 bytes)" in err
    assert len(json.loads((tmp_path / "run" / ckpt.BAD_FILES).read_text())) == 12


def test_evaluate_with_nothing_readable_exits_1(clean_run, tmp_path, capsys):
    root = make_dataset(tmp_path / "root", single=True, n_train=0, n_val=3)
    for f in (root / "val").rglob("*.png"):
        f.write_bytes(b"<html></html>")
    code, out, err = _run(["evaluate", clean_run, "--data", root, "--workers", "0"], capsys)
    assert code == 1 and "none of the 6 images could be read" in err


# --- kill -9 and --resume ---------------------------------------------------------------------------

def _train_argv(data: Path, out: Path) -> list[str]:
    return ["train", "--model", "cnn32", "--data", str(data), "--out", str(out), "--epochs", "5", "--patience", "0",
            "--workers", "0", "--seed", "3", "--batch-size", "16", "--lr-schedule", "cosine", "--native-size", "32"]


_CHILD = """
import pathlib, sys, time
from fakescope.engine import train as T
from fakescope.cli import main

marker, where, epoch, argv = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]

def stop():  # announce the point, then wait to be killed: the run cannot finish first
    marker.touch()
    time.sleep(600)
    raise SystemExit("not killed")

if where == "after-checkpoint":  # epoch's state saved, its log line not yet written
    save = T.ckpt.save_train_state
    def save_then_stop(run_dir, model, optimizer, scheduler, state):
        save(run_dir, model, optimizer, scheduler, state)
        if state["epoch"] == epoch:
            stop()
    T.ckpt.save_train_state = save_then_stop
else:  # "mid-epoch": after two optimiser steps of that epoch
    bar = T.progress
    def bar_then_stop(it, desc="", **kw):
        for i, batch in enumerate(bar(it, desc=desc, **kw)):
            if desc.startswith(f"epoch {epoch + 1}/") and i == 2:
                stop()
            yield batch
    T.progress = bar_then_stop
raise SystemExit(main(argv))
"""


def _spawn(argv: list[str], env: dict, marker: Path, where: str, epoch: int) -> subprocess.Popen:
    """``fakescope argv`` in a child that stops at a chosen point of training (``where`` of ``epoch``) and
    touches ``marker`` there, so that the kill lands exactly there whatever the machine's speed."""
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(marker), where, str(epoch), *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before it could be killed: "
                                 f"{proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for a checkpoint")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _epoch(run: Path) -> int:
    try:
        return json.loads((run / ckpt.LAST_STATE).read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return -1


def _log(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / ckpt.LOG).read_text().splitlines()]


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", single=True, n_train=64, n_val=2)
    env = {**os.environ, "FAKESCOPE_PROGRESS": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "FAKESCOPE_CACHE_DIR": str(tmp_path / "cache")}
    monkeypatch.setenv("FAKESCOPE_CACHE_DIR", env["FAKESCOPE_CACHE_DIR"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic as the subprocesses (OMP_NUM_THREADS=1)
    try:
        # the uninterrupted reference, in this process
        assert main(_train_argv(data, tmp_path / "a")) == 0
        b = tmp_path / "b"
        # 1. killed right after the first checkpoint, before its log line is written
        m1 = tmp_path / "stopped-1"
        _kill_when(_spawn(_train_argv(data, b), env, m1, "after-checkpoint", 0), m1.exists)
        assert _epoch(b) == 0 and not (b / ckpt.METRICS).exists()
        assert not (b / ckpt.LOG).exists() or not (b / ckpt.LOG).read_text()
        # 2. resumed, then killed again in the middle of a later epoch (after two of its steps)
        m2 = tmp_path / "stopped-2"
        _kill_when(_spawn([*_train_argv(data, b), "--resume"], env, m2, "mid-epoch", 2), m2.exists)
        assert _epoch(b) == 1 and not (b / ckpt.METRICS).exists()
        # 3. resumed to the end, in this process
        assert main([*_train_argv(data, b), "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    wa, wb = ckpt.load_tensors(tmp_path / "a" / ckpt.WEIGHTS), ckpt.load_tensors(b / ckpt.WEIGHTS)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert _log(tmp_path / "a") == _log(b) and len(_log(b)) == 5
    ma, mb = (json.loads((r / ckpt.METRICS).read_text()) for r in (tmp_path / "a", b))
    assert_close(ma["validation"], mb["validation"])  # a forward pass: weights above are bit-identical
    assert ma["best_epoch"] == mb["best_epoch"]
    la, lb = ckpt.load_tensors(tmp_path / "a" / "last-0004.safetensors"), ckpt.load_tensors(b / "last-0004.safetensors")
    for k in la:
        assert torch.equal(la[k], lb[k]), k
    names = sorted(p.name for p in b.iterdir())
    assert not [n for n in names if n.startswith(".")], names  # no half-written temporary file survives
    assert {n for n in names if Path(n).suffix not in (".json", ".jsonl", ".safetensors")} <= {"MODEL_CARD.md"}


def test_resume_of_a_run_killed_before_its_config_starts_afresh(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", single=True, n_train=8, n_val=2)
    out = tmp_path / "run"
    out.mkdir()
    (out / ".config.json.x1y2.tmp").write_text('{"format": 1, "mod')  # died inside the first write
    code, _, err = _run(["train", "--model", "cnn32", "--data", data, "--out", out, "--epochs", "1", "--workers", "0",
                         "--resume"], capsys)
    assert code == 0, err
    assert (out / ckpt.WEIGHTS).exists() and not list(out.glob(".*.tmp"))


def test_train_refuses_to_overwrite_a_run_without_resume(clean_run, capsys):
    code, _, err = _run(["train", "--model", "cnn32", "--data", clean_run, "--out", clean_run, "--epochs", "1"],
                        capsys)
    assert code == 2 and "already holds a run: pass --resume" in err

