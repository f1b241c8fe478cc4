"""The benchmark's report: ``out/results.json`` (:data:`RESULTS`) rendered by
:func:`fakescope.report.html.write_report` with the study's sample grid. Below both the benchmark and the
cross-generator protocol, which (re)write it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fakescope.data.inspect import sample_images
from fakescope.data.layout import index_root
from fakescope.errors import FakescopeError
from fakescope.report.html import write_report

RESULTS = "results.json"


def write_benchmark_report(out: str | os.PathLike, results: dict | None = None) -> dict:
    """The report of the benchmark in ``out`` (``results``: its results, else ``out/results.json``),
    with the sample grid of its data (rank 0 only; see :func:`fakescope.report.html.write_report`)."""
    out = Path(out)
    if results is None:
        results = json.loads((out / RESULTS).read_text())
    return write_report(out, results, samples=_samples(results))


def _samples(results: dict) -> list | None:
    """The study's Fig. 1: sample images per generator and class of the evaluation split."""
    cfg = results.get("config", {})
    n = int(cfg.get("sample_per_class", 6) or 0)
    if not cfg.get("data") or not n:
        return None
    data = results.get("data", {})
    try:
        index = index_root(cfg["data"]).select(data.get("generators") or cfg.get("generators") or None,
                                               data.get("split", cfg.get("split", "val")))
    except FakescopeError:
        return None
    return sample_images(index, n) or None
