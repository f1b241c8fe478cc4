"""Data roots: layout detection, generator names, the file index and the validation carve.

Two layouts are recognised (``ai`` and ``nature`` are the class folders, any case):

1. GenImage / tiny-GenImage: ``ROOT/<generator>/{train,val}/{ai,nature}/*``, where the
   generator folder may be GenImage's README name (``Stable Diffusion V1.4``), an archive's inner
   name (``imagenet_ai_0419_biggan``), both nested (``BigGAN/imagenet_ai_0419_biggan/train/...``)
   or any plain name.
2. A single generator: ``ROOT/{train,val}/{ai,nature}/*`` (the generator is named after ROOT).

Indexing lists directories only (``os.scandir``); it never opens an image. The index is cached
under the user's cache directory and rebuilt when the set of files may have changed: see
:func:`index_root`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from fakescope import LABELS
from fakescope.data.io import is_image_path
from fakescope.data.pairs import read_pairs
from fakescope.errors import DataError
from fakescope.utils import atomic_write_text, cache_dir

SPLITS = ("train", "val")
INDEX_FORMAT = 2
RACY_NS = 2_000_000_000
"""A folder changed less than this before (or after) its listing was read may have changed again within
the file system's timestamp granularity without its times showing it (FAT: 2 s): such a folder's
listing is compared by name on the next use (git's "racily clean" rule)."""
SAMPLE_EXISTS = 64
"""Files of a cached index whose existence is checked on every use (evenly spread, a few stat calls)."""

_ALIASES = {
    "midjourney": ["midjourney", "imagenet_midjourney", "mj"],
    "sd14": ["Stable Diffusion V1.4", "stable_diffusion_v_1_4", "imagenet_ai_0419_sdv4", "sdv14", "sd14"],
    "sd15": ["Stable Diffusion V1.5", "stable_diffusion_v_1_5", "imagenet_ai_0424_sdv5", "sdv15", "sd15"],
    "adm": ["ADM", "imagenet_ai_0508_adm"],
    "glide": ["GLIDE", "imagenet_glide"],
    "wukong": ["Wukong", "imagenet_ai_0424_wukong"],
    "vqdm": ["VQDM", "imagenet_ai_0419_vqdm"],
    "biggan": ["BigGAN", "imagenet_ai_0419_biggan"],
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", name.lower())


GENERATOR_ALIASES: dict[str, str] = {_key(a): canon for canon, names in _ALIASES.items() for a in names}
"""Normalised folder name -> canonical generator name (GenImage's eight generators)."""

EXPECTED_LAYOUTS = (
    "expected one of these layouts:\n"
    "  ROOT/<generator>/{train,val}/{ai,nature}/*   (GenImage, tiny-GenImage)\n"
    "  ROOT/{train,val}/{ai,nature}/*               (a single generator)"
)


def canonical_generator(folder: str) -> str | None:
    """GenImage folder name -> canonical name (``sd14``, ``biggan``...), or None if unknown."""
    return GENERATOR_ALIASES.get(_key(folder))


def _subdirs(path: str) -> dict[str, str]:
    try:
        with os.scandir(path) as it:
            return {e.name: e.path for e in it if e.is_dir(follow_symlinks=True) and not e.name.startswith(".")}
    except OSError:
        return {}


def _split_dirs(path: str) -> dict[str, dict[str, str]]:
    """``{split: {class: dir}}`` for the splits under ``path`` that have at least one class folder."""
    splits = _one_per_name(path, {n: p for n, p in _subdirs(path).items() if n.lower() in SPLITS})
    out: dict[str, dict[str, str]] = {}
    for split, p in splits.items():
        classes = _one_per_name(p, {c: cp for c, cp in _subdirs(p).items() if c.lower() in LABELS})
        if classes:
            out[split] = classes
    return out


def _one_per_name(parent: str, folders: dict[str, str]) -> dict[str, str]:
    """``{lower-case name: path}``; two folders that differ only in case (a case-sensitive file system
    keeps both) would hide one of them, so they are an error."""
    out: dict[str, str] = {}
    for name, p in sorted(folders.items()):
        if name.lower() in out:
            other = os.path.basename(out[name.lower()])
            raise DataError(f"{parent} has two folders '{other}' and '{name}' for one {name.lower()!r}: "
                            f"expected one; merge them")
        out[name.lower()] = p
    return out


@dataclass
class Index:
    """The files of a data root, as parallel columns. ``paths`` are relative to ``root``."""

    root: str
    layout: str
    paths: list[str]
    labels: list[int]
    generators: list[str]
    splits: list[str]
    origins: dict[str, str] | None = None
    """For an index of several roots (:func:`index_root` given a list): generator -> the root it comes
    from (``root`` is then the roots' common folder). None for one root."""

    def __len__(self) -> int:
        return len(self.paths)

    def abspath(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def subset(self, keep: list[int]) -> Index:
        return Index(
            self.root, self.layout,
            [self.paths[i] for i in keep], [self.labels[i] for i in keep],
            [self.generators[i] for i in keep], [self.splits[i] for i in keep], self.origins,
        )

    @property
    def generator_names(self) -> list[str]:
        return sorted(set(self.generators))

    def select(self, generators: list[str] | None = None, split: str | None = None) -> Index:
        """Keep the given generators (canonical or folder names) and split; errors name the choices."""
        keep = list(range(len(self)))
        if split is not None:
            if split not in SPLITS:
                raise DataError(f"expected --split to be one of {', '.join(SPLITS)}, got {split!r}")
            have = sorted(set(self.splits))
            if split not in have:
                raise DataError(f"{self.root} has no '{split}' split (it has: {', '.join(have) or 'none'})")
            keep = [i for i in keep if self.splits[i] == split]
        if generators:
            valid = self.generator_names
            wanted = []
            for g in generators:
                canon = g if g in valid else canonical_generator(g)
                if canon not in valid:
                    raise DataError(f"unknown generator {g!r}: expected one of {', '.join(valid)}")
                wanted.append(canon)
            keep = [i for i in keep if self.generators[i] in set(wanted)]
        return self.subset(keep)

    def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """``{generator: {split: {"ai": n, "nature": n}}}``."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        names = {v: k for k, v in LABELS.items()}
        for g, s, y in zip(self.generators, self.splits, self.labels):
            d = out.setdefault(g, {}).setdefault(s, {"nature": 0, "ai": 0})
            d[names[y]] += 1
        return out

    def to_json(self) -> dict:
        d = {"root": self.root, "layout": self.layout, "paths": self.paths, "labels": self.labels,
             "generators": self.generators, "splits": self.splits}
        if self.origins is not None:
            d["origins"] = self.origins
        return d

    @property
    def roots(self) -> list[str]:
        """The data roots this index lists (one, or several in the order given)."""
        return list(dict.fromkeys(self.origins.values())) if self.origins is not None else [self.root]

    def carve_key(self, i: int) -> str:
        """File ``i``'s path relative to its own data root (what the validation carve hashes), so that
        a root carves the same alone or next to other roots."""
        if self.origins is None:
            return self.paths[i]
        return os.path.relpath(self.abspath(i), self.origins[self.generators[i]]).replace(os.sep, "/")


def _find_generators(root: str) -> tuple[str, list[tuple[str, dict[str, dict[str, str]]]]]:
    splits = _split_dirs(root)
    if splits:
        name = os.path.basename(os.path.normpath(root))
        return "single", [(canonical_generator(name) or name, splits)]
    found = []
    for outer, p in sorted(_subdirs(root).items()):
        splits = _split_dirs(p)
        name = canonical_generator(outer)
        if not splits:  # GenImage archives: BigGAN/imagenet_ai_0419_biggan/train/...
            for inner, ip in sorted(_subdirs(p).items()):
                splits = _split_dirs(ip)
                if splits:
                    name = name or canonical_generator(inner)
                    break
        if splits:
            found.append((name or outer, splits))
    return "genimage", found


def _now_ns() -> int:
    return time.time_ns()


def _list(path: str) -> list[str]:
    return os.listdir(path)


def _listing_digest(names: list[str]) -> str:
    return hashlib.sha1("\0".join(sorted(names)).encode("utf-8", "surrogateescape")).hexdigest()


def _dir_key(path: str) -> list[int]:
    """What must stay equal for a folder's listing to be trusted: ``[device, inode, ctime, mtime]``.

    ``tar x``, ``rsync -a`` and ``cp -a`` restore the modification time, but a re-created or
    re-extracted folder has a new inode change time (ctime cannot be set from user space) and
    usually a new inode."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_ctime_ns, st.st_mtime_ns]


def _scan(root: str) -> tuple[Index, dict[str, list]]:
    """The index and, for every folder it depends on, ``[*_dir_key, entry count, listing digest]``."""
    layout, gens = _find_generators(root)
    if not gens:
        raise DataError(f"no dataset found under {root}: {EXPECTED_LAYOUTS}")
    names = [g for g, _ in gens]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise DataError(f"{root}: several folders map to the same generator {sorted(dupes)}; rename one")
    paths, labels, generators, splits = [], [], [], []
    dirs: dict[str, list] = {}

    def record(path: str, entries: list[str]) -> None:
        dirs[path] = _dir_key(path) + [len(entries), _listing_digest(entries)]

    for gen, split_dirs in gens:
        for split in SPLITS:
            for cls in ("nature", "ai"):
                d = split_dirs.get(split, {}).get(cls)
                if d is None:
                    continue
                for dirpath, dirnames, files in os.walk(d, followlinks=True):
                    record(dirpath, dirnames + files)  # os.walk lists every entry in one of the two
                    dirnames.sort()
                    for f in sorted(files):
                        if is_image_path(f):
                            paths.append(os.path.relpath(os.path.join(dirpath, f), root))
                            labels.append(LABELS[cls])
                            generators.append(gen)
                            splits.append(split)
    # every folder between the root and a class folder too, so that a new generator or split is seen
    parents = {root}
    for _, split_dirs in gens:
        for classes in split_dirs.values():
            for d in classes.values():
                p = os.path.dirname(d)
                while p.startswith(root + os.sep):
                    parents.add(p)
                    p = os.path.dirname(p)
    for p in sorted(parents - set(dirs)):
        record(p, _list(p))
    return Index(root, layout, paths, labels, generators, splits), dirs


def _cache_file(root: str) -> Path:
    return cache_dir() / "index" / (hashlib.sha1(root.encode()).hexdigest()[:20] + ".json")


def _still_valid(blob: dict) -> tuple[bool, bool]:
    """``(valid, verified_now)``: whether a cached index still describes its root, and whether racy
    folders had to be listed to tell (then the cache's ``checked_ns`` can move forward)."""
    checked = int(blob["checked_ns"])
    listed = False
    try:
        for d, (dev, ino, ctime, mtime, count, digest) in blob["dirs"].items():
            if _dir_key(d) != [dev, ino, ctime, mtime]:
                return False, listed
            if max(ctime, mtime) >= checked - RACY_NS:
                entries = _list(d)
                listed = True
                if len(entries) != count or _listing_digest(entries) != digest:
                    return False, listed
        index = blob["index"]
        root, paths = index["root"], index["paths"]
        for rel in paths[:: max(1, len(paths) // max(1, SAMPLE_EXISTS))][:SAMPLE_EXISTS]:
            if not os.path.lexists(os.path.join(root, rel)):
                return False, listed
    except OSError:
        return False, listed
    return True, listed


def data_roots(data) -> list[str]:
    """``data`` (one root, or a list of roots) as a list of absolute paths."""
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not items:
        raise DataError("expected at least one data root, got none")
    return [os.path.abspath(os.path.expanduser(str(r))) for r in items]


def _index_roots(roots: list[str], use_cache: bool) -> Index:
    """Several roots as one index: their generators together (a name two roots define is an error)."""
    parts = [index_root(r, use_cache=use_cache) for r in roots]
    origins: dict[str, str] = {}
    for part in parts:
        for g in part.generator_names:
            if g in origins:
                raise DataError(f"generator {g!r} is defined by two data roots, {origins[g]} and {part.root}: "
                                f"expected each generator name in one root only; rename one folder")
            origins[g] = part.root
    common = os.path.commonpath(roots)
    paths, labels, generators, splits = [], [], [], []
    for part in parts:
        paths += [os.path.relpath(os.path.join(part.root, p), common) for p in part.paths]
        labels += part.labels
        generators += part.generators
        splits += part.splits
    layout = parts[0].layout if len({p.layout for p in parts}) == 1 else "mixed"
    return Index(common, layout, paths, labels, generators, splits, origins)


def index_root(root, *, use_cache: bool = True) -> Index:
    """Index a data root (or a list of roots: see below), using the cached index when it still describes the root.

    The cache is trusted only while every folder it depends on keeps its device, inode, inode
    change time (ctime) and modification time, and while a sample of its files still exists; a
    folder changed within :data:`RACY_NS` of its last check is also compared by listing. So a root
    deleted and re-extracted with the same folder times (``tar x``, ``rsync -a``, ``cp -a``) is
    indexed again, and an index that lists files that no longer exist is rebuilt, never used.

    A list of several roots gives one index of all their generators (``origins`` records which root
    each comes from; two roots that define the same generator name are an error); a list of one root
    is that root."""
    if not isinstance(root, (str, os.PathLike)):
        roots = data_roots(root)
        if len(roots) > 1:
            return _index_roots(roots, use_cache)
        root = roots[0]
    root = os.path.abspath(str(root))
    if not os.path.isdir(root):
        raise DataError(f"data root not found: {root} (expected a folder with ai/ and nature/ images)")
    cf = _cache_file(root)
    if use_cache and cf.is_file():
        try:
            blob = json.loads(cf.read_text())
            if blob.get("format") == INDEX_FORMAT and blob["index"]["root"] == root:
                started = _now_ns()
                valid, listed = _still_valid(blob)
                if valid:
                    if listed:  # the racy folders were just compared: later uses need not list them again
                        blob["checked_ns"] = started
                        _write_cache(cf, blob)
                    return Index(**blob["index"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    started = _now_ns()
    index, dirs = _scan(root)
    if use_cache:
        _write_cache(cf, {"format": INDEX_FORMAT, "checked_ns": started, "dirs": dirs, "index": index.to_json()})
    return index


def _write_cache(cf: Path, blob: dict) -> None:
    try:
        atomic_write_text(cf, json.dumps(blob))
    except OSError:
        pass  # a read-only cache directory only costs speed


def _generator_dir(index: Index, i: int) -> str | None:
    """The folder of file ``i``'s generator (the one holding its ``<split>/<class>`` folders)."""
    parts = index.paths[i].replace(os.sep, "/").split("/")
    for j in range(len(parts) - 2):
        if parts[j].lower() in SPLITS and parts[j + 1].lower() in LABELS:
            return os.path.normpath(os.path.join(index.root, *parts[:j]))
    return None


def pair_groups(index: Index) -> dict[int, str]:
    """``{position: group}`` for the files that belong to an aligned pair (a generator folder whose
    ``manifest.json`` was written by ``fakescope data align``, :func:`fakescope.data.pairs.read_pairs`).
    Both members of a pair, and every crop of one source image, share a group; files outside any
    pair are absent."""
    manifests: dict[str, dict[str, str]] = {}
    out: dict[int, str] = {}
    for i in range(len(index)):
        gdir = _generator_dir(index, i)
        if gdir is None:
            continue
        if gdir not in manifests:
            manifests[gdir] = {os.path.normpath(k): v for k, v in read_pairs(gdir).items()}
        pairs = manifests[gdir]
        if pairs:
            key = pairs.get(os.path.normpath(index.abspath(i)))
            if key is not None:
                out[i] = f"{index.generators[i]}\0{key}"
    return out


def _digest(s: str) -> str:
    return hashlib.sha1(s.encode("utf-8", "surrogateescape")).hexdigest()


def carve_validation(index: Index, fraction: float = 0.1) -> tuple[Index, Index]:
    """Split a training index into (train, validation), deterministically and disjointly.

    Within each (generator, class) stratum, files are ordered by a hash of their relative path
    and the first ``round(fraction * n)`` go to validation, so the carve does not depend on the
    seed, on listing order, or on files added to other strata.

    Files of aligned pairs (:func:`pair_groups`) are carved by group instead: within each generator,
    groups are ordered by a hash of their key and the first ``round(fraction * n_groups)`` go to
    validation, so both members of a pair and all crops of one source image fall on the same side
    (a model must not meet the twin of a validation image in training). Files outside any pair keep
    the rule above, so a root without a manifest carves exactly as before.
    """
    if not 0 <= fraction < 1:
        raise DataError(f"expected a validation fraction in [0, 1), got {fraction}")
    groups = pair_groups(index)
    strata: dict[tuple[str, int], list[int]] = {}
    paired: dict[str, dict[str, list[int]]] = {}
    for i, (g, y) in enumerate(zip(index.generators, index.labels)):
        if i in groups:
            paired.setdefault(g, {}).setdefault(groups[i], []).append(i)
        else:
            strata.setdefault((g, y), []).append(i)
    val: set[int] = set()
    for members in strata.values():
        members.sort(key=lambda i: _digest(index.carve_key(i)))
        val.update(members[: round(fraction * len(members))])
    for by_group in paired.values():
        keys = sorted(by_group, key=_digest)
        for k in keys[: round(fraction * len(keys))]:
            val.update(by_group[k])
    train_ids = [i for i in range(len(index)) if i not in val]
    val_ids = [i for i in range(len(index)) if i in val]
    return index.subset(train_ids), index.subset(val_ids)


def limit_per_class(index: Index, n: int) -> Index:
    """Keep at most ``n`` files per (generator, split, class), chosen by path hash (deterministic)."""
    if n <= 0:
        raise DataError(f"expected a positive --limit, got {n}")
    groups = pair_groups(index)
    strata: dict[tuple[str, str, int], list[int]] = {}
    for i, key in enumerate(zip(index.generators, index.splits, index.labels)):
        strata.setdefault(key, []).append(i)

    def order(i: int) -> str:  # a pair's two members sort alike, so both classes keep the same pairs
        if i in groups:
            return _digest(groups[i] + "\0" + os.path.basename(index.paths[i]))
        return _digest(index.carve_key(i))

    keep: list[int] = []
    for members in strata.values():
        members.sort(key=order)
        keep.extend(members[:n])
    return index.subset(sorted(keep))
