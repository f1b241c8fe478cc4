"""Aligned pairs: the manifest ``fakescope data align`` writes, and the reader that groups its files.

A root made by ``data align`` is ``ROOT/<autoencoder>/{train,val}/{nature,ai}/<name>`` plus
``ROOT/<autoencoder>/manifest.json``; the two members of a pair share ``<name>`` (a real image or crop, and
its reconstruction), and every crop of one source photo has the same ``source``. :func:`read_pairs` maps
each member's path to that source, so a validation carve or a batch sampler can keep a photo's pairs
together.
"""

from __future__ import annotations

import json
import os

from fakescope.errors import DataError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fakescope-aligned"
MANIFEST_VERSION = 1


def read_manifest(generator_dir: str | os.PathLike) -> dict | None:
    """The manifest of an aligned generator folder, or None when it has none (not made by ``data align``).
    A manifest that is there but unreadable or of another format is a :class:`DataError`."""
    path = os.path.join(str(generator_dir), MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({e}): expected the manifest.json written by fakescope data align; "
                        f"rerun data align to rewrite it") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("pairs"), list):
        raise DataError(f"{path}: expected a {MANIFEST_FORMAT!r} manifest with a 'pairs' list, got "
                        f"format {m.get('format') if isinstance(m, dict) else type(m).__name__!r}")
    if m.get("version") != MANIFEST_VERSION:
        raise DataError(f"{path}: expected manifest version {MANIFEST_VERSION}, got {m.get('version')!r}")
    return m


def pair_members(generator_dir: str | os.PathLike, pair: dict) -> tuple[str, str]:
    """The absolute paths of a pair's real and reconstructed members."""
    base = os.path.abspath(str(generator_dir))
    return (os.path.join(base, pair["split"], "nature", pair["name"]),
            os.path.join(base, pair["split"], "ai", pair["name"]))


def read_pairs(generator_dir: str | os.PathLike) -> dict[str, str]:
    """``{absolute member path: group key}`` for every pair of an aligned generator folder; the group key is
    the pair's source path, so both members of a pair and all crops of one photo share it. Empty when the
    folder has no manifest."""
    m = read_manifest(generator_dir)
    if m is None:
        return {}
    out: dict[str, str] = {}
    for p in m["pairs"]:
        for member in pair_members(generator_dir, p):
            out[member] = str(p["source"])
    return out
