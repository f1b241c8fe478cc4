"""The names of the files in a run directory and in an evaluation folder: defined once, here, in the
base layer (the engine writes them; the report, the server and the study read them).

A run's training summary is ``train_metrics.json``; an evaluation folder's results are
``metrics.json`` (two different files, two names). Runs trained before the split hold their training
summary as ``metrics.json``: :func:`train_metrics_path` and :func:`read_train_metrics` still read it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fakescope import __version__
from fakescope.errors import CheckpointError, FakescopeError
from fakescope.utils import write_json

RUN_FORMAT = 1
"""The version of the run-directory layout this fakescope writes and reads (``config.json``'s ``format``)."""
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
LAST_STATE = "last.json"
LOG = "log.jsonl"
TRAIN_METRICS = "train_metrics.json"
"""A run's training summary: final validation metrics (best weights), epochs, timings, input path."""
LEGACY_TRAIN_METRICS = "metrics.json"
"""Where runs of earlier versions kept their training summary (read, never written)."""
BAD_FILES = "bad_files.json"
CALIBRATION = "calibration.json"
MODEL_CARD = "MODEL_CARD.md"
EVAL_METRICS = "metrics.json"
"""An evaluation folder's results (``evaluate --out``; ``RUN/eval-*/metrics.json`` inside a run)."""


def train_metrics_path(run_dir: str | os.PathLike) -> Path | None:
    """The run's training summary file (the current name, else the legacy one), or None when it has none."""
    for name in (TRAIN_METRICS, LEGACY_TRAIN_METRICS):
        path = Path(run_dir) / name
        if path.is_file():
            return path
    return None


def read_train_metrics(run_dir: str | os.PathLike) -> dict | None:
    """The run's training summary, or None when it has none (or it is not readable JSON)."""
    path = train_metrics_path(run_dir)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_config(run_dir: str | os.PathLike, config: dict) -> None:
    write_json(Path(run_dir) / CONFIG, {"format": RUN_FORMAT, "fakescope_version": __version__, **config})


def read_config(run_dir: str | os.PathLike) -> dict:
    """The run's config.json, checked: a fakescope run, of the run format this version reads."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a fakescope run: it has no {CONFIG}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror or e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict) or not isinstance(
            cfg["model"].get("name"), str):
        raise CheckpointError(f"{path} is not a fakescope run config (no 'model' entry with a 'name')")
    if cfg.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{run_dir} was written by fakescope {cfg.get('fakescope_version', '?')} "
                              f"(run format {cfg.get('format')}); this fakescope {__version__} reads run format "
                              f"{RUN_FORMAT}: retrain, or use the fakescope version that wrote it")
    return cfg


def calibration_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CALIBRATION


def write_calibration_json(run_dir: str | os.PathLike, calibration: dict) -> Path:
    """Write ``RUN/calibration.json`` atomically (``calibration``: ``Calibration.to_dict()``)."""
    path = calibration_path(run_dir)
    write_json(path, calibration)
    return path


def read_calibration_json(run_dir: str | os.PathLike) -> dict | None:
    """``RUN/calibration.json`` as a dict, or None when the run has not been calibrated; a file that is not
    a JSON object is a :class:`FakescopeError` saying how to fix it."""
    path = calibration_path(run_dir)
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FakescopeError(f"{path} is not valid JSON ({e}); run `fakescope calibrate` again or delete it") from None
    if not isinstance(d, dict):
        raise FakescopeError(f"{path} is not a fakescope calibration; run `fakescope calibrate` again or delete it")
    return d
