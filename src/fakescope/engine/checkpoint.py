"""Run directories: safetensors weights + JSON, written atomically, loaded without unpickling.

A run directory holds ``config.json`` (everything needed to rebuild the model and its
preprocessing), ``model.safetensors`` (best weights), ``last-NNNN.safetensors`` + ``last.json`` (the
last complete epoch, named by ``last.json``: model, optimizer, scheduler and RNG state, for ``--resume``),
``log.jsonl``, ``train_metrics.json`` (the training summary; ``metrics.json`` in runs of earlier versions)
and ``bad_files.json``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fakescope import __version__
from fakescope.errors import CheckpointError, FakescopeError
from fakescope.models import accepted_options, create_model, set_num_outputs
from fakescope.runfiles import (  # noqa: F401  (run-file names and config I/O live in the base layer)
    BAD_FILES,
    CONFIG,
    LAST_STATE,
    LOG,
    RUN_FORMAT,
    TRAIN_METRICS,
    WEIGHTS,
    read_config,
    write_config,
)
from fakescope.utils import atomic_write_bytes, write_json

METRICS = TRAIN_METRICS  # the run's training summary (fakescope.runfiles names every run file)


def _sorted_metadata(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its ``__metadata__`` keys in sorted order.

    safetensors writes the metadata from a hash map whose order changes from call to call, so the
    same tensors and metadata gave different bytes; the header is rewritten in one canonical form
    (tensor entries and data untouched, the header padded with spaces to 8 bytes as safetensors does)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    canonical = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | header
    text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write ``tensors`` as safetensors with fakescope's metadata; the same inputs give the same bytes."""
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": "fakescope", "fakescope_version": __version__, **(metadata or {})}
    atomic_write_bytes(path, _sorted_metadata(st_save(data, metadata={k: str(v) for k, v in meta.items()})))


_PICKLE_HINT = ("fakescope never unpickles weights (convert it with safetensors.torch.save_file on a machine "
                "where you trust the file)")


def _looks_like_pickle(data: bytes) -> bool:
    """``torch.save`` zip archives and pickles of any protocol (protocol 2+ starts with 0x80)."""
    if data[:4] == b"PK\x03\x04":
        return True
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return True
    return data[:1] in (b"(", b"}", b"]", b"c") and data.rstrip()[-1:] == b"."


def _header_problem(data: bytes) -> str | None:
    """Why ``data`` cannot be a safetensors file (8-byte little-endian header length, JSON header), or None."""
    if len(data) < 8:
        return f"{len(data)} bytes, shorter than a safetensors header"
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        return f"the header claims {n} bytes but the file has {len(data) - 8} after it (truncated?)"
    if data[8:9] != b"{":
        return "no JSON header"
    return None


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file; anything else (a pickle, a torch.save zip, a truncated file) is refused.

    Only the safetensors parser ever sees the bytes: nothing is unpickled, whatever the file holds."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror or e})") from None
    problem = _header_problem(data)
    if problem is not None and _looks_like_pickle(data):
        raise CheckpointError(f"{path} is a pickle / torch.save file, not safetensors: {_PICKLE_HINT}")
    if problem is not None:
        raise CheckpointError(f"{path} is not a valid safetensors file ({problem})")
    try:
        return st_load(data)
    except Exception as e:  # the parser's own errors on corrupt data (SafetensorError, ValueError...)
        msg = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupt: {msg})") from None


def load_state_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load ``tensors`` into ``model``; mismatches become one clear error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: {tuple(tensors[k].shape)} in the file, {tuple(v.shape)} in the model" for k, v in expected.items()
             if k in tensors and tensors[k].shape != v.shape]
    kinds = [f"{k}: {tensors[k].dtype} in the file, {v.dtype} in the model" for k, v in expected.items()
             if k in tensors and tensors[k].is_floating_point() != v.is_floating_point()]
    if missing or unexpected or wrong or kinds:
        parts = []
        if wrong:
            parts.append(f"shape mismatch ({'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''})")
        if kinds:
            parts.append(f"dtype mismatch ({'; '.join(kinds[:3])}{' ...' if len(kinds) > 3 else ''})")
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        raise CheckpointError(f"{source} does not match the model in config.json: {', '.join(parts)}")
    model.load_state_dict(tensors, strict=True)


def build_model(config: dict):
    """Rebuild the model described by a run config (an attribution run's head with one output per
    class), without downloading pretrained weights."""
    m = config["model"]
    options = dict(m.get("options") or {})
    options.pop("pretrained_file", None)
    try:
        if "pretrained" in accepted_options(m["name"]):
            options["pretrained"] = False  # the weights come from the run
        else:
            options.pop("pretrained", None)  # fakescope 0.1.0's train command recorded it for every model
        model = create_model(m["name"], **options)
        if config.get("classes"):  # an attribution run: one output per class

            set_num_outputs(model, len(config["classes"]))
        return model
    except FakescopeError as e:
        raise CheckpointError(f"the run's {CONFIG} describes a model this fakescope cannot build: {e}") from None
    except Exception as e:  # e.g. an edited config with options the model does not take
        raise CheckpointError(f"the run's {CONFIG} describes a model that cannot be built "
                              f"({m['name']} with options {options}: {type(e).__name__}: {e})") from None


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


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict, optimizer=None) -> dict:
    state = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                           for k, v in entry.items()}
    groups = [dict(g) for g in meta["param_groups"]]
    if optimizer is not None:  # JSON turned tuples (Adam's betas) into lists: restore the exact types
        for g, cur in zip(groups, optimizer.param_groups, strict=False):
            for k, v in g.items():
                if isinstance(v, list) and isinstance(cur.get(k), tuple):
                    g[k] = tuple(v)
    return {"state": state, "param_groups": groups}


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


_OWN_TMP = tuple(f".{n}." for n in (CONFIG, WEIGHTS, LAST_STATE, LOG, METRICS, BAD_FILES))


def remove_partial_files(run_dir: str | os.PathLike) -> list[str]:
    """Delete what a crash can leave behind: temporary files of interrupted atomic writes and
    training-state tensors that ``last.json`` does not name. Returns the names removed."""
    run_dir = Path(run_dir)
    keep = None
    try:
        keep = json.loads((run_dir / LAST_STATE).read_text()).get("tensors")
    except (OSError, ValueError, AttributeError):
        pass
    removed = []
    for p in run_dir.iterdir() if run_dir.is_dir() else []:
        stale_tmp = p.name.endswith(".tmp") and (p.name.startswith(_OWN_TMP) or p.name.startswith(".last-"))
        stale_state = re.fullmatch(r"last-\d+\.safetensors", p.name) is not None and p.name != keep
        if p.is_file() and (stale_tmp or stale_state):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def load_train_state(run_dir: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler) -> dict | None:
    """Restore the last complete epoch into model/optimizer/scheduler; None when there is none.

    Leftovers of a crash (half-written temporary files, tensors of an epoch whose ``last.json``
    was never written) are removed first: the state in force is always the last complete one."""
    run_dir = Path(run_dir)
    path = run_dir / LAST_STATE
    remove_partial_files(run_dir)
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        tensors = load_tensors(run_dir / state["tensors"])
        load_state_into(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}, str(path))
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"], optimizer))
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(tensors["rng/torch"])
        absent = [k for k in ("epoch", "best_val_loss", "bad_epochs", "history") if k not in state]
        if absent:
            raise KeyError(absent[0])
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{path} is corrupt or from another fakescope version ({type(e).__name__}: {e}); "
                              f"delete it to restart the run from scratch") from None
    return state
