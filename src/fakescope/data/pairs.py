"""Aligned pairs: the manifest that ``fakescope data align`` writes next to a generator's folders.

``GEN/manifest.json`` (``{"format": "fakescope-aligned", "pairs": [{"name", "split", "source", ...}]}``)
names, for every pair, its two members ``GEN/<split>/nature/<name>`` (the real image or crop) and
``GEN/<split>/ai/<name>`` (its reconstruction). Several crops of one source photo share ``source``:
it is the pair's group, the unit that must never be split between training and validation.
"""

from __future__ import annotations

import json
import os

from fakescope.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "fakescope-aligned"


def read_pairs(generator_dir: str | os.PathLike) -> dict[str, str]:
    """``{absolute member path: group key (the pair's source)}`` for the pairs of ``generator_dir``'s
    manifest; empty when it has none."""
    gen = os.path.abspath(str(generator_dir))
    path = os.path.join(gen, MANIFEST)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            blob = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}; expected the manifest `fakescope data align` writes") from None
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
