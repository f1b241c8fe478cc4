"""Aligned pairs: the manifest that ``fakescope data align`` writes next to a generator's folders.

``GEN/manifest.json`` (``{"format": "fakescope-aligned", "version": 1, "pairs": [{"name", "split", "source",
"crop", "inpaint_box", "psnr"}, ...], ...}``) names, for every pair, its two members
``GEN/<split>/nature/<name>`` (the real image or crop) and ``GEN/<split>/ai/<name>`` (its reconstruction).
Several crops of one source photo share ``source``: it is the pair's group, the unit that must never be
split between training and validation.
"""

from __future__ import annotations

import json
import os

from fakescope.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "fakescope-aligned"
MANIFEST_FORMAT = FORMAT
MANIFEST_VERSION = 1


def _load(path: str) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}; expected the manifest `fakescope data align` writes") from None


def read_manifest(generator_dir: str | os.PathLike) -> dict | None:
    """The whole manifest of an aligned generator folder, or None when it has none. A manifest that is there
    but unreadable, of another format or of another version is a :class:`DataError`."""
    path = os.path.join(os.path.abspath(str(generator_dir)), MANIFEST)
    if not os.path.isfile(path):
        return None
    m = _load(path)
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("pairs"), list):
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise DataError(f"{path}: expected a {FORMAT!r} manifest with a 'pairs' list, got format {got!r}")
    if m.get("version") != MANIFEST_VERSION:
        raise DataError(f"{path}: expected manifest version {MANIFEST_VERSION}, got {m.get('version')!r}")
    return m


def pair_members(generator_dir: str | os.PathLike, pair: dict) -> tuple[str, str]:
    """The absolute paths of a pair's real and reconstructed members."""
    gen = os.path.abspath(str(generator_dir))
    return (os.path.join(gen, pair["split"], "nature", pair["name"]),
            os.path.join(gen, pair["split"], "ai", pair["name"]))


def read_pairs(generator_dir: str | os.PathLike) -> dict[str, str]:
    """``{absolute member path: group key (the pair's source)}`` for the pairs of ``generator_dir``'s
    manifest; empty when it has none."""
    gen = os.path.abspath(str(generator_dir))
    path = os.path.join(gen, MANIFEST)
    if not os.path.isfile(path):
        return {}
    blob = _load(path)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        return {}  # someone else's manifest.json: not a pair list
    out: dict[str, str] = {}
    for p in blob.get("pairs") or []:
        try:
            name, split, source = str(p["name"]), str(p["split"]), str(p["source"])
        except (KeyError, TypeError):
            raise DataError(f"{path}: expected every pair to have name, split and source, got {p!r}") from None
        for cls in ("nature", "ai"):
            out[os.path.join(gen, split, cls, name)] = source
    return out
