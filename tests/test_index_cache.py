"""The cached dataset index must never outlive the files it lists: a root deleted and re-extracted
with the same folder times (``tar x``, ``rsync -a``, ``cp -a`` restore them) is indexed again."""

import json
import os
import shutil

from fakescope.data import layout
from fakescope.data.layout import index_root
from fakescope.engine import checkpoint as ckpt
from fakescope.engine.train import TrainOptions, train

from synth import make_dataset


def _folder_times(root):
    out = {}
    for dirpath, _, _ in os.walk(root):
        st = os.stat(dirpath)
        out[dirpath] = (st.st_atime_ns, st.st_mtime_ns)
    return out


def _replace_keeping_folder_times(root, **make):
    """Delete ``root`` and create a different dataset at the same path, then give every folder its
    old access and modification times back (what ``tar x`` of a newer archive does)."""
    times = _folder_times(root)
    shutil.rmtree(root)
    make_dataset(root, **make)
    for d in sorted(times, key=len, reverse=True):  # children first: utime of a child leaves the parent alone
        if os.path.isdir(d):
            os.utime(d, ns=times[d])
    assert all(os.stat(d).st_mtime_ns == t[1] for d, t in times.items())


def _new_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_replaced_root_with_identical_folder_times_is_indexed_again(tmp_path):
    root = tmp_path / "data"
    make_dataset(root, n_train=3, n_val=2, fmt="png")
    old = index_root(root)
    assert all(p.endswith(".png") for p in old.paths)
    _replace_keeping_folder_times(root, n_train=4, n_val=2, fmt="jpg", seed=1)
    new = index_root(root)
    assert sorted(new.paths) == _new_files(root) and len(new) == 2 * 2 * (4 + 2)


def test_inode_and_ctime_alone_catch_the_replacement(tmp_path, monkeypatch):
    """Without the listing comparison and the existence sample, the folder key must still change."""
    monkeypatch.setattr(layout, "RACY_NS", -(10**20))  # never compare listings
    monkeypatch.setattr(layout, "SAMPLE_EXISTS", 0)
    root = tmp_path / "data"
    make_dataset(root, n_train=3, n_val=2, fmt="png")
    index_root(root)
    assert layout._still_valid(json.loads(layout._cache_file(str(root)).read_text()))[0]
    _replace_keeping_folder_times(root, n_train=4, n_val=2, fmt="jpg", seed=1)
    assert sorted(index_root(root).paths) == _new_files(root)


def test_listing_comparison_alone_catches_the_replacement(tmp_path, monkeypatch):
    """A folder changed within the timestamp granularity keeps its times: such 'racy' folders are
    compared by listing (here every folder is treated as racy and the folder key is blinded)."""
    monkeypatch.setattr(layout, "_dir_key", lambda path: [0, 0, 0, 0])
    monkeypatch.setattr(layout, "RACY_NS", 10**20)
    monkeypatch.setattr(layout, "SAMPLE_EXISTS", 0)
    root = tmp_path / "data"
    make_dataset(root, n_train=3, n_val=2, fmt="png")
    first = index_root(root)
    monkeypatch.setattr(layout, "_scan", lambda r: (_ for _ in ()).throw(AssertionError("rescanned")))
    assert index_root(root).paths == first.paths  # same listings: the cache is used
    monkeypatch.undo()
    monkeypatch.setattr(layout, "_dir_key", lambda path: [0, 0, 0, 0])
    monkeypatch.setattr(layout, "RACY_NS", 10**20)
    monkeypatch.setattr(layout, "SAMPLE_EXISTS", 0)
    _replace_keeping_folder_times(root, n_train=4, n_val=2, fmt="jpg", seed=1)
    assert sorted(index_root(root).paths) == _new_files(root)


def test_index_listing_missing_files_is_rebuilt_not_used(tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "_dir_key", lambda path: [0, 0, 0, 0])  # folder keys blinded
    monkeypatch.setattr(layout, "RACY_NS", -(10**20))  # and no listing comparison: only the sample is left
    root = tmp_path / "data"
    make_dataset(root, n_train=3, n_val=2)
    assert len(index_root(root)) == 20
    os.remove(root / "alpha" / "train" / "ai" / "0001.png")
    again = index_root(root)
    assert len(again) == 19 and os.path.join("alpha", "train", "ai", "0001.png") not in again.paths


def test_racy_folders_are_listed_once_then_trusted(tmp_path, monkeypatch):
    root = tmp_path / "data"
    make_dataset(root, n_train=2, n_val=1)
    index_root(root)  # just created: every folder changed within RACY_NS of the scan
    listed = []
    real_list = layout._list
    monkeypatch.setattr(layout, "_list", lambda p: listed.append(p) or real_list(p))
    later = layout._now_ns() + 10 * layout.RACY_NS
    monkeypatch.setattr(layout, "_now_ns", lambda: later)
    monkeypatch.setattr(layout, "_scan", lambda r: (_ for _ in ()).throw(AssertionError("rescanned")))
    index_root(root)
    n_dirs = len(json.loads(layout._cache_file(str(root)).read_text())["dirs"])
    assert len(listed) == n_dirs  # racy: every folder compared by listing, no rescan
    listed.clear()
    index_root(root)
    assert listed == []  # checked long after the last change: the folder keys suffice


def test_training_after_replacement_sees_every_new_file(tmp_path):
    root = tmp_path / "data"
    make_dataset(root, n_train=6, n_val=1, fmt="png")
    index_root(root)
    _replace_keeping_folder_times(root, n_train=10, n_val=1, fmt="jpg", seed=1)
    summary = train(TrainOptions(model="cnn32", data=str(root), epochs=1, patience=0, batch_size=16), tmp_path / "r")
    cfg = json.loads((tmp_path / "r" / ckpt.CONFIG).read_text())
    assert cfg["data"]["train_images"] + cfg["data"]["val_images"] == 2 * 2 * 10
    assert summary["bad_files"] == 0
    assert json.loads((tmp_path / "r" / ckpt.BAD_FILES).read_text()) == {}
