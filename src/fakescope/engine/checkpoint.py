"""Run directories: safetensors weights + JSON, written atomically, loaded without unpickling.

A run directory holds ``config.json`` (everything needed to rebuild the model and its
preprocessing), ``model.safetensors`` (best weights), ``last.safetensors`` + ``last.json`` (the
last complete epoch: model, optimizer, scheduler and RNG state, for ``--resume``),
``log.jsonl``, ``metrics.json`` and ``bad_files.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fakescope import __version__
from fakescope.errors import CheckpointError
from fakescope.utils import atomic_write_bytes, write_json

RUN_FORMAT = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
LAST = "last.safetensors"
LAST_STATE = "last.json"
LOG = "log.jsonl"
METRICS = "metrics.json"
BAD_FILES = "bad_files.json"


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": "fakescope", "fakescope_version": __version__, **(metadata or {})}
    atomic_write_bytes(path, st_save(data, metadata={k: str(v) for k, v in meta.items()}))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file; anything else (a pickle, a torch.save zip, a truncated file) is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    data = path.read_bytes()
    if data[:1] == b"\x80" or data[:2] == b"PK":
        raise CheckpointError(f"{path} is a pickle / torch.save file, not safetensors: fakescope never unpickles "
                              f"weights (convert it with safetensors.torch.save_file)")
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupt: {e})") from None


def write_config(run_dir: str | os.PathLike, config: dict) -> None:
    write_json(Path(run_dir) / CONFIG, {"format": RUN_FORMAT, "fakescope_version": __version__, **config})


def read_config(run_dir: str | os.PathLike) -> dict:
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a fakescope run: it has no {CONFIG}")
    try:
        cfg = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise CheckpointError(f"{path} is not a fakescope run config (no 'model' entry)")
    if cfg.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{run_dir} was written by fakescope {cfg.get('fakescope_version', '?')} "
                              f"(run format {cfg.get('format')}); this fakescope {__version__} reads run format "
                              f"{RUN_FORMAT}: retrain, or use the fakescope version that wrote it")
    return cfg


def load_state_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load ``tensors`` into ``model``; mismatches become one clear error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"shape mismatch ({'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''})")
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        raise CheckpointError(f"{source} does not match the model in config.json: {', '.join(parts)}")
    model.load_state_dict(tensors, strict=True)


def build_model(config: dict):
    """Rebuild the model described by a run config, without downloading pretrained weights."""
    from fakescope.models import create_model

    m = config["model"]
    options = dict(m.get("options", {}))
    options["pretrained"] = False
    options.pop("pretrained_file", None)
    return create_model(m["name"], **options)


def load_run(run_dir: str | os.PathLike):
    """``(model, config)`` for a run directory, weights checked against the config."""
    config = read_config(run_dir)
    model = build_model(config)
    load_state_into(model, load_tensors(Path(run_dir) / WEIGHTS), str(Path(run_dir) / WEIGHTS))
    model.eval()
    return model, config


# --- training state for --resume ----------------------------------------------------------------

def _flatten_optimizer(prefix: str, sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    meta = {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        entry = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}/{pid}/{k}"] = v
                entry[k] = {"tensor": f"{prefix}/{pid}/{k}"}
            else:
                entry[k] = v
        meta["state"][str(pid)] = entry
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                           for k, v in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_train_state(run_dir: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler, state: dict) -> None:
    """The last complete epoch. The tensors are written first, then ``last.json`` names them by
    digest, so a crash between the two writes leaves the previous complete checkpoint in force."""
    run_dir = Path(run_dir)
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _flatten_optimizer("optim", optimizer.state_dict())
    tensors.update(opt_tensors)
    tensors["rng/torch"] = torch.get_rng_state()
    epoch = state["epoch"]
    name = f"last-{epoch:04d}.safetensors"
    save_tensors(run_dir / name, tensors)
    write_json(run_dir / LAST_STATE, {**state, "tensors": name, "optimizer": opt_meta,
                                      "scheduler": scheduler.state_dict() if scheduler is not None else None})
    for old in run_dir.glob("last-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_train_state(run_dir: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler) -> dict | None:
    """Restore the last complete epoch into model/optimizer/scheduler; None when there is none."""
    run_dir = Path(run_dir)
    path = run_dir / LAST_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is corrupt ({e})") from None
    tensors = load_tensors(run_dir / state["tensors"])
    load_state_into(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}, str(path))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng/torch"])
    return state
