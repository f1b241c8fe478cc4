"""The study's benchmark and the cross-generator protocol, as library functions.

:func:`run_benchmark` trains every model of a configuration on the train split of all selected
generators (one run directory per model and seed, each a normal run that ``fakescope evaluate``
and ``predict`` accept), evaluates each run on the val split, overall and per generator, and
returns (and writes) the results table with the report. :func:`run_cross` is GenImage's
cross-generator protocol: train on each generator alone and test on every generator (an N x N
accuracy matrix), or train on all generators but one and test on the one left out.

A configuration is a mapping (from YAML, TOML or JSON, or built by the CLI)::

    data: /data/genimage            # required
    out: runs/benchmark
    models:                         # a list of names, or label -> options
      cnn32: {}
      cnn32-small: {model: cnn32, filters: [8, 16, 32]}
      timm:tf_efficientnet_lite0: {pretrained_file: weights.safetensors, freeze: true}
    seeds: [42, 43, 44]
    epochs: 10
    degrade: ["jpeg:95,75,50,30", "blur:1,2,3", "resize:0.5,0.25"]
    jpeg_align: 75                  # shortcut control (see below)
    augment: {jpeg_prob: 0.1, blur_prob: 0.1, flip: true}
    cross: true                     # also the cross-generator matrix of every model

Per-model entries accept model options (``model``, ``pretrained``, ``pretrained_file``, ``freeze``,
``filters``, ``hidden``, ``dropout``, ``input_size``) and training overrides (``epochs``,
``batch_size``, ``lr``, ``lr_schedule``, ``patience``, ``val_fraction``, ``limit``,
``native_size``, ``augment``, ``precision``). Top-level ``model_options`` apply to every
timm-backed model (``timm:<name>``, ``resnet50``, ``convnext_small``) that does not set them itself.
Relative paths (``data``, ``out``, ``pretrained_file``) are taken from the current directory.

Statistics over seeds: with several seeds, every figure becomes ``{"mean", "std", "ci95",
"values"}``; ``std`` is the sample standard deviation (ddof=1) of the per-seed figures and
``ci95`` is a percentile bootstrap interval of their mean (the per-seed figures are resampled with
replacement 10,000 times, fixed RNG seed). With one seed the figures are the plain numbers of the
evaluate JSON.

Shortcut control (``jpeg_align: Q``): every run is evaluated a second time with every image of
both classes re-encoded as JPEG at quality Q (``shortcut.eval_aligned``: did the detector learn the
compression?). With ``jpeg_align_train: true`` aligned runs are trained as well (run directories
``<model>-jpegQ-seedS``) and evaluated aligned (``shortcut.train_aligned``).

Precision check (``precision_check: true``, the default): where the device supports bf16, the first
seed's run scores the val images in fp32 and in bf16 and the model's entry records
``precision_check: {"agreement", "max_abs_diff", "n"}`` (share of identical verdicts, largest
``|p_fp32 - p_bf16|``, images compared).

Rerunning a configuration reuses every finished run whose training configuration is unchanged
(and every evaluation whose request is unchanged); ``force: true`` retrains everything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from fakescope.data.layout import index_root
from fakescope.data.transforms import Augment, parse_degradations
from fakescope.engine import checkpoint as ckpt
from fakescope.engine import runtime
from fakescope.errors import FakescopeError
from fakescope.utils import dumps, write_json

DEFAULT_MODELS = ("cnn32", "resnet50", "convnext_small")
MODEL_KEYS = ("pretrained", "pretrained_file", "freeze", "filters", "hidden", "dropout", "input_size")
TRAIN_KEYS = ("epochs", "batch_size", "lr", "lr_schedule", "patience", "val_fraction", "limit", "native_size",
              "augment", "precision", "adv_train", "adv_eps", "adv_steps", "adv_mix")
ATTACK_KEYS = ("name", "eps", "steps", "limit", "direction", "precision")
RESULTS = "results.json"
CONFIG_FILE = "benchmark-config.json"
N_BOOT = 10_000
# TrainOptions fields that do not change what a run learns (ignored when deciding to reuse a run)
_RUNTIME_KEYS = ("device", "num_workers", "use_cache", "cache_dir", "strict")


def log(msg: str) -> None:
    """Progress of the benchmark, one line per step, on stderr (rank 0 only)."""
    if runtime.is_main():
        print(f"fakescope benchmark: {msg}", file=sys.stderr, flush=True)


# --- configuration --------------------------------------------------------------------------------

@dataclass
class ModelSpec:
    """One row of the results table: a ``label`` (unique), the registry name and its options."""

    label: str
    model: str
    options: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.label).strip("-") or "model"


@dataclass
class BenchmarkConfig:
    """Every option of a benchmark (see the module docstring); :meth:`resolved` is what gets saved."""

    data: str
    out: str = "runs/benchmark"
    models: list[ModelSpec] = field(default_factory=list)
    generators: list[str] | None = None
    seeds: list[int] = field(default_factory=lambda: [42])
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: str = "constant"
    patience: int = 3
    val_fraction: float = 0.1
    limit: int | None = None
    native_size: str | int = "auto"
    augment: dict = field(default_factory=dict)
    split: str = "val"
    threshold: float = 0.5
    degrade: list[str] = field(default_factory=list)
    jpeg_align: int | None = None
    jpeg_align_train: bool = False
    precision_check: bool = True
    cross: bool | list[str] = False
    leave_one_out: bool = False
    model_options: dict = field(default_factory=dict)
    device: str = "auto"
    precision: str = "auto"
    eval_batch_size: int = 64
    workers: int | None = None
    cache_dir: str | None = None
    use_cache: bool = True
    max_pixels: int | None = None
    sample_per_class: int = 6
    force: bool = False
    report: bool = True
    attack: dict = field(default_factory=dict)

    def resolved(self) -> dict:
        d = asdict(self)
        d["models"] = {m.label: {"model": m.model, **m.options, **m.train} for m in self.models}
        return d

    def model(self, label: str) -> ModelSpec:
        for m in self.models:
            if m.label == label or m.model == label:
                return m
        raise FakescopeError(f"unknown model {label!r} in this benchmark: expected one of "
                             f"{', '.join(m.label for m in self.models)}")


_FIELDS = {f.name for f in fields(BenchmarkConfig)}


def _is_timm(name: str) -> bool:
    return name.startswith("timm:") or name in ("resnet50", "convnext_small")


def _as_list(v, what: str) -> list:
    if v is None:
        return []
    if isinstance(v, str):
        return [x.strip() for x in v.split(",") if x.strip()]
    if isinstance(v, (list, tuple)):
        return list(v)
    raise FakescopeError(f"expected {what} as a list or a comma-separated string, got {v!r}")


def _check_augment(aug) -> dict:
    aug = dict(aug or {})
    known = [f.name for f in fields(Augment)]
    bad = sorted(set(aug) - set(known))
    if bad:
        raise FakescopeError(f"unknown augmentation option {bad[0]!r}: expected one of {', '.join(known)}")
    return aug


def _model_specs(models, global_options: dict) -> list[ModelSpec]:
    entries: list[tuple[str, dict]] = []
    if models is None:
        models = list(DEFAULT_MODELS)
    if isinstance(models, dict):
        entries = [(str(k), dict(v or {})) for k, v in models.items()]
    else:
        for m in _as_list(models, "models"):
            if isinstance(m, str):
                entries.append((m, {}))
            elif isinstance(m, dict) and "name" in m:
                m = dict(m)
                entries.append((str(m.pop("name")), m))
            elif isinstance(m, dict) and len(m) == 1:
                (k, v), = m.items()
                entries.append((str(k), dict(v or {})))
            else:
                raise FakescopeError(f"expected a model as a name or {{name: options}}, got {m!r}")
    if not entries:
        raise FakescopeError("expected at least one model, e.g. models: [cnn32]")
    specs, seen = [], set()
    for label, opts in entries:
        if label in seen:
            raise FakescopeError(f"model {label!r} is listed twice: give the second one another label and "
                                 f"'model: {label}'")
        seen.add(label)
        name = str(opts.pop("model", label))
        unknown = sorted(set(opts) - set(MODEL_KEYS) - set(TRAIN_KEYS))
        if unknown:
            raise FakescopeError(f"unknown option {unknown[0]!r} for model {label!r}: expected model options "
                                 f"{', '.join(MODEL_KEYS)} or training options {', '.join(TRAIN_KEYS)}")
        options = {k: opts[k] for k in MODEL_KEYS if k in opts}
        if _is_timm(name):
            for k, v in global_options.items():
                options.setdefault(k, v)
        if options.get("pretrained_file"):
            options["pretrained_file"] = str(Path(options["pretrained_file"]).expanduser().resolve())
        if "filters" in options:
            options["filters"] = [int(f) for f in _as_list(options["filters"], "filters")]
        train = {k: opts[k] for k in TRAIN_KEYS if k in opts}
        if "augment" in train:
            train["augment"] = _check_augment(train["augment"])
        specs.append(ModelSpec(label, name, options, train))
    from fakescope.models import list_models

    known = set(list_models())
    for s in specs:
        if not s.model.startswith("timm:") and (s.model not in known or s.model == "timm"):
            raise FakescopeError(f"unknown model {s.model!r}: expected one of "
                                 f"{', '.join(sorted(known - {'timm'}))} or timm:<name>")
    return specs


def _check_attack(attack) -> dict:
    """``attack: pgd`` or ``attack: {name, eps, steps, limit, direction, precision}`` (empty: no attack)."""
    if not attack:
        return {}
    a = {"name": attack} if isinstance(attack, str) else dict(attack)
    bad = sorted(set(a) - set(ATTACK_KEYS))
    if bad:
        raise FakescopeError(f"unknown attack option {bad[0]!r}: expected one of {', '.join(ATTACK_KEYS)}")
    from fakescope.attacks import attack_class, parse_eps

    a.setdefault("name", "pgd")
    attack_class(a["name"])
    a["eps"] = ",".join(str(e) for e in a["eps"]) if isinstance(a.get("eps"), list) else a.get("eps",
                                                                                                "0,1/255,2/255,4/255,8/255")
    parse_eps(a["eps"], norm="l2" if a["name"] == "pgd-l2" else "linf")
    a.setdefault("steps", 10)
    a.setdefault("limit", None)
    a.setdefault("direction", "both")
    a.setdefault("precision", "fp32")
    return a


def robustness_cached(cfg: BenchmarkConfig, run_dir: str | os.PathLike, what: str) -> dict:
    """Robust accuracy of one run under ``cfg.attack`` (reused when the same request was already run)."""
    from fakescope.attacks import parse_eps
    from fakescope.engine.robust import attack_run

    a = cfg.attack
    folder = Path(run_dir) / f"attack-{a['name']}"
    request = {**a, "generators": cfg.generators, "split": cfg.split, "threshold": cfg.threshold}
    cached = folder / "attack.json"
    if cached.is_file() and not cfg.force:
        try:
            blob = json.loads(cached.read_text())
            if blob.get("request") == json.loads(dumps(request)):
                return blob
        except ValueError:
            pass
    log(f"{what}: {a['name']} attack at eps {a['eps']}")
    res = attack_run(run_dir, cfg.data, attack=a["name"], eps_list=parse_eps(a["eps"], norm="l2" if a["name"] ==
                                                                             "pgd-l2" else "linf"),
                     steps=int(a["steps"]), direction=a["direction"], split=cfg.split, generators=cfg.generators,
                     limit=a["limit"], threshold=cfg.threshold, device=cfg.device, precision=a["precision"],
                     num_workers=cfg.workers, out_dir=str(folder))
    res["request"] = json.loads(dumps(request))
    if runtime.is_main():
        write_json(cached, res)
    return res


def load_config_file(path: str | os.PathLike) -> dict:
    """A configuration file as a dict: YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON."""
    path = Path(path)
    if not path.is_file():
        raise FakescopeError(f"configuration file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise FakescopeError("TOML configuration files need Python >= 3.11: use YAML instead") from None
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parser error is the user's file
        raise FakescopeError(f"{path} is not valid {path.suffix.lstrip('.').upper() or 'YAML'}: "
                             f"{str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FakescopeError(f"expected {path} to hold a mapping of options, got {type(data).__name__}")
    return data


def make_config(options: dict | BenchmarkConfig | None = None, **overrides) -> BenchmarkConfig:
    """A validated :class:`BenchmarkConfig` from a mapping (a config file's content) and overrides."""
    if isinstance(options, BenchmarkConfig):
        options = options.resolved()
    d = {**(options or {}), **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(d) - _FIELDS)
    if unknown:
        raise FakescopeError(f"unknown benchmark option {unknown[0]!r}: expected one of {', '.join(sorted(_FIELDS))}")
    if not d.get("data"):
        raise FakescopeError("expected a data root: pass --data ROOT or set 'data' in the configuration file")
    d["data"] = str(Path(d["data"]).expanduser().resolve())
    d["out"] = str(d.get("out") or "runs/benchmark")
    gopts = dict(d.pop("model_options", None) or {})
    bad = sorted(set(gopts) - set(MODEL_KEYS))
    if bad:
        raise FakescopeError(f"unknown model option {bad[0]!r}: expected one of {', '.join(MODEL_KEYS)}")
    d["models"] = _model_specs(d.get("models"), gopts)
    d["model_options"] = gopts
    try:
        seeds = d.get("seeds", [42])
        d["seeds"] = [seeds] if isinstance(seeds, int) else [int(s) for s in _as_list(seeds, "seeds")]
    except (TypeError, ValueError):
        raise FakescopeError(f"expected integer seeds like [42, 43], got {d.get('seeds')!r}") from None
    if not d["seeds"] or len(set(d["seeds"])) != len(d["seeds"]):
        raise FakescopeError(f"expected distinct seeds, got {d['seeds']}")
    if d.get("generators") is not None:
        d["generators"] = [str(g) for g in _as_list(d["generators"], "generators")] or None
    d["degrade"] = [str(s) for s in _as_list(d.get("degrade"), "degrade")]
    try:
        parse_degradations(d["degrade"])
    except ValueError as e:
        raise FakescopeError(str(e)) from None
    d["augment"] = _check_augment(d.get("augment"))
    if d.get("jpeg_align") is not None and not 1 <= int(d["jpeg_align"]) <= 100:
        raise FakescopeError(f"expected jpeg_align to be a JPEG quality in [1, 100], got {d['jpeg_align']}")
    if isinstance(d.get("cross"), str):
        d["cross"] = _as_list(d["cross"], "cross")
    d["attack"] = _check_attack(d.get("attack"))
    cfg = BenchmarkConfig(**d)
    from fakescope.metrics import check_threshold

    check_threshold(cfg.threshold)
    if cfg.split not in ("train", "val"):
        raise FakescopeError(f"expected split train or val, got {cfg.split!r}")
    if cfg.jpeg_align_train and cfg.jpeg_align is None:
        raise FakescopeError("jpeg_align_train needs jpeg_align: Q (the JPEG quality of the aligned runs)")
    index = index_root(cfg.data)
    cfg.generators = index.select(cfg.generators, "train").generator_names
    index.select(cfg.generators, cfg.split)  # the evaluation split must exist too
    if isinstance(cfg.cross, list):
        for label in cfg.cross:
            cfg.model(label)
    return cfg


# --- runs -----------------------------------------------------------------------------------------

def _comparable(train_dict: dict) -> dict:
    d = json.loads(dumps(train_dict))
    for k in _RUNTIME_KEYS:
        d.pop(k, None)
    return d


def train_options(cfg: BenchmarkConfig, spec: ModelSpec, seed: int, generators: list[str],
                  jpeg_align: int | None = None):
    from fakescope.engine.train import TrainOptions

    t = {k: getattr(cfg, k) for k in TRAIN_KEYS if hasattr(cfg, k)}  # adversarial training is per model
    t.update(spec.train)
    aug = {k: tuple(v) if isinstance(v, list) else v for k, v in (t.pop("augment") or {}).items()}
    return TrainOptions(
        model=spec.model, data=cfg.data, generators=list(generators), seed=seed, jpeg_align=jpeg_align,
        augment=Augment(**aug), model_options=dict(spec.options), device=cfg.device, use_cache=cfg.use_cache,
        cache_dir=cfg.cache_dir, num_workers=cfg.workers, max_pixels=cfg.max_pixels,
        native_size=str(t.pop("native_size")), **t)


def ensure_run(opts, run_dir: Path, *, force: bool = False, what: str = "") -> tuple[dict, bool]:
    """Train ``opts`` into ``run_dir`` unless a finished run with the same configuration is there.

    Returns ``(training summary, trained)``. An interrupted run with the same configuration is
    resumed; a run with another configuration (or any run, with ``force``) is replaced."""
    from fakescope.engine.train import train

    run_dir = Path(run_dir)
    resume = False
    if (run_dir / ckpt.CONFIG).is_file():
        try:
            stored = ckpt.read_config(run_dir)
            same = _comparable(stored.get("train", {})) == _comparable(opts.to_dict())
        except FakescopeError:
            same = False
        finished = (run_dir / ckpt.METRICS).is_file() and (run_dir / ckpt.WEIGHTS).is_file()
        if same and finished and not force:
            log(f"{what}: reusing the finished run {run_dir}")
            return json.loads((run_dir / ckpt.METRICS).read_text()), False
        if same and not force and (run_dir / ckpt.LAST_STATE).is_file():
            resume = True
            log(f"{what}: resuming the interrupted run {run_dir}")
        else:
            why = "--force" if force else "its configuration changed"
            log(f"{what}: replacing {run_dir} ({why})")
            if runtime.is_main():
                shutil.rmtree(run_dir)
            runtime.barrier()
    elif run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / ckpt.CONFIG).exists():
        raise FakescopeError(f"{run_dir} exists and is not a fakescope run: move it away or choose another --out")
    if not resume:
        log(f"{what}: training into {run_dir}")
    t0 = time.perf_counter()
    summary = train(opts, run_dir, resume=resume)
    v = summary["validation"]
    log(f"{what}: trained in {time.perf_counter() - t0:.1f} s (best epoch {summary['best_epoch']} of "
        f"{summary['epochs_run']}, validation accuracy {v['accuracy']:.4f})")
    return summary, True


def evaluate_cached(cfg: BenchmarkConfig, run_dir: Path, *, folder: str, generators: list[str],
                    jpeg_align: int | None = None, degrade: list[str] | None = None, precision: str | None = None,
                    force: bool = False, what: str = "") -> dict:
    """``evaluate_run`` into ``run_dir/folder``, reusing an identical earlier evaluation."""
    from fakescope.engine.evaluate import evaluate_run

    out = Path(run_dir) / folder
    weights = Path(run_dir) / ckpt.WEIGHTS
    request = json.loads(dumps({
        "data": cfg.data, "split": cfg.split, "generators": generators, "threshold": cfg.threshold,
        "jpeg_align": jpeg_align, "degrade": degrade or [], "precision": precision or cfg.precision,
        "device": cfg.device, "weights_mtime_ns": weights.stat().st_mtime_ns if weights.is_file() else None}))
    req_file, json_file = out / "request.json", out / "metrics.json"
    if not force and req_file.is_file() and json_file.is_file():
        try:
            if json.loads(req_file.read_text()) == request:
                log(f"{what}: reusing the evaluation {json_file}")
                return json.loads(json_file.read_text())
        except ValueError:
            pass
    log(f"{what}: evaluating on {cfg.split}" + (f" (JPEG-aligned at {jpeg_align})" if jpeg_align else "")
        + (f" with degradations {', '.join(degrade)}" if degrade else ""))
    result = evaluate_run(run_dir, cfg.data, split=cfg.split, generators=generators, threshold=cfg.threshold,
                          jpeg_align=jpeg_align, degrade=degrade or None, device=cfg.device,
                          precision=precision or cfg.precision, batch_size=cfg.eval_batch_size,
                          num_workers=cfg.workers, use_cache=cfg.use_cache, cache_dir=cfg.cache_dir,
                          out_dir=out, max_pixels=cfg.max_pixels)
    if runtime.is_main():
        write_json(req_file, request)
    return json.loads(dumps(result))


def precision_agreement(run_dir, cfg: BenchmarkConfig, generators: list[str], what: str = "") -> dict:
    """fp32 vs bf16 predictions of a run on the evaluation split: ``{"agreement", "max_abs_diff", "n"}``
    (``{"skipped": reason}`` where the device has no bf16). Saved in ``run_dir/precision-check.json``
    and reused while the weights and the evaluation data are unchanged."""
    dev = runtime.resolve_device(cfg.device)
    if not runtime.bf16_supported(dev):
        return {"skipped": f"bf16 is not supported on this {dev.type} device"}
    weights = Path(run_dir) / ckpt.WEIGHTS
    request = json.loads(dumps({"data": cfg.data, "split": cfg.split, "generators": generators,
                                "threshold": cfg.threshold, "device": dev.type,
                                "weights_mtime_ns": weights.stat().st_mtime_ns if weights.is_file() else None}))
    saved = Path(run_dir) / "precision-check.json"
    if not cfg.force and saved.is_file():
        try:
            blob = json.loads(saved.read_text())
            if blob.get("request") == request:
                log(f"{what}: reusing the fp32-vs-bf16 comparison {saved}")
                return blob["result"]
        except (ValueError, KeyError):
            pass
    log(f"{what}: comparing fp32 and bf16 predictions")
    result = _agreement(run_dir, cfg, generators)
    if runtime.is_main():
        write_json(saved, {"request": request, "result": result})
    return result


def _agreement(run_dir, cfg: BenchmarkConfig, generators: list[str]) -> dict:
    from fakescope.data.io import DEFAULT_MAX_PIXELS
    from fakescope.engine.evaluate import prepare
    from fakescope.engine.infer import score_files

    index = index_root(cfg.data).select(generators, cfg.split)
    files = [index.abspath(i) for i in range(len(index))]
    scores = {}
    for name in ("fp32", "bf16"):
        model, _, pipeline, dev, prec = prepare(run_dir, device=cfg.device, precision=name)
        scores[name], _ = score_files(model, files, pipeline, device=dev, precision=prec,
                                      batch_size=cfg.eval_batch_size, num_workers=cfg.workers,
                                      use_cache=cfg.use_cache, cache_root=cfg.cache_dir,
                                      max_pixels=cfg.max_pixels or DEFAULT_MAX_PIXELS, desc=f"scoring in {name}")
    a, b = scores["fp32"], scores["bf16"]
    ok = ~np.isnan(a) & ~np.isnan(b)
    if not ok.any():
        return {"agreement": None, "max_abs_diff": None, "n": 0}
    t = cfg.threshold
    return {"agreement": float(np.mean((a[ok] >= t) == (b[ok] >= t))),
            "max_abs_diff": float(np.max(np.abs(a[ok] - b[ok]))),
            "mean_abs_diff": float(np.mean(np.abs(a[ok] - b[ok]))), "n": int(ok.sum())}


# --- statistics -----------------------------------------------------------------------------------

def summarize(values: list, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Mean, sample std and a 95 % percentile-bootstrap interval of the mean of per-seed ``values``."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return {"mean": None, "std": None, "ci95": None, "values": list(values)}
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))], "values": list(values)}


def aggregate(dicts: list[dict]) -> dict:
    """Per-seed metric dicts -> one dict: the dict itself for one seed, else a summary per figure."""
    if len(dicts) == 1:
        return dicts[0]
    out: dict = {}
    for k in dicts[0]:
        vals = [d.get(k) for d in dicts]
        if isinstance(vals[0], dict):
            out[k] = aggregate(vals)
        elif k == "confusion":
            arr = np.asarray(vals, dtype=np.float64)
            out[k] = {"mean": arr.mean(0).tolist(), "std": arr.std(0, ddof=1).tolist(), "sum": arr.sum(0).tolist(),
                      "values": vals}
        elif k == "n" and len(set(vals)) == 1:
            out[k] = vals[0]
        elif all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[k] = summarize(vals)
        else:
            out[k] = vals
    return out


def mean_of(v):
    """A figure's value: the number itself, or the mean of a multi-seed summary."""
    return v["mean"] if isinstance(v, dict) and "mean" in v else v


def _aggregate_eval(evals: list[dict]) -> dict:
    out = {"overall": aggregate([e["overall"] for e in evals]),
           "per_generator": {g: aggregate([e["per_generator"][g] for e in evals]) for g in evals[0]["per_generator"]}}
    if evals[0].get("degradations"):
        out["degradations"] = {
            kind: [{"level": row["level"], "overall": aggregate([e["degradations"][kind][i]["overall"] for e in evals]),
                    "per_generator": {g: aggregate([e["degradations"][kind][i]["per_generator"][g] for e in evals])
                                      for g in row["per_generator"]}}
                   for i, row in enumerate(rows)]
            for kind, rows in evals[0]["degradations"].items()}
    return out


# --- the benchmark --------------------------------------------------------------------------------

def run_dir_for(cfg: BenchmarkConfig, spec: ModelSpec, seed: int, jpeg_align: int | None = None) -> Path:
    tag = f"-jpeg{jpeg_align}" if jpeg_align is not None else ""
    return Path(cfg.out) / "runs" / f"{spec.slug}{tag}-seed{seed}"


def run_benchmark(config: dict | BenchmarkConfig, **overrides) -> dict:
    """Train and evaluate every model of ``config`` (a mapping or :class:`BenchmarkConfig`) for every
    seed; write ``out/results.json``, the resolved configuration and the report; return the results::

        {"models": {label: {"overall", "per_generator", "seeds", "params", "train_seconds",
                            "images_per_second", "runs", ...}}, "config": {...}}
    """
    cfg = config if isinstance(config, BenchmarkConfig) and not overrides else make_config(config, **overrides)
    out = Path(cfg.out)
    if runtime.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG_FILE, cfg.resolved())
    dev = runtime.resolve_device(cfg.device)
    log(f"{len(cfg.models)} model(s) x {len(cfg.seeds)} seed(s) on {cfg.data} "
        f"(generators: {', '.join(cfg.generators)}; device {dev.type}); writing to {out}")
    results: dict = {"models": {}, "config": cfg.resolved(), "data": {"root": cfg.data, "generators": cfg.generators,
                                                                      "split": cfg.split}}
    total = len(cfg.models) * len(cfg.seeds)
    k = 0
    t_start = time.perf_counter()
    for spec in cfg.models:
        evals, summaries, runs = [], [], []
        for seed in cfg.seeds:
            k += 1
            what = f"[{k}/{total}] {spec.label} seed {seed}"
            rd = run_dir_for(cfg, spec, seed)
            summary, _ = ensure_run(train_options(cfg, spec, seed, cfg.generators), rd, force=cfg.force, what=what)
            ev = evaluate_cached(cfg, rd, folder=f"eval-{cfg.split}", generators=cfg.generators, degrade=cfg.degrade,
                                 force=cfg.force, what=what)
            log(f"{what}: {cfg.split} accuracy {ev['overall']['accuracy']:.4f}, F1 {_f(ev['overall']['f1'])}, "
                f"ROC-AUC {_f(ev['overall']['roc_auc'])}")
            evals.append(ev)
            summaries.append(summary)
            runs.append({"seed": seed, "dir": str(rd), "eval": ev["outputs"]["json"],
                         "figures": ev["outputs"]["folder"]})
        run_cfg = ckpt.read_config(run_dir_for(cfg, spec, cfg.seeds[0]))
        entry = {**_aggregate_eval(evals), "seeds": list(cfg.seeds), "model": spec.model,
                 "options": {k: v for k, v in spec.options.items() if k != "pretrained_file"},
                 "params": run_cfg.get("params"), "trainable_params": run_cfg.get("trainable_params"),
                 "input_size": run_cfg.get("preprocess", {}).get("input_size"),
                 "native_size": run_cfg.get("native_size"),
                 "eval_precision": evals[0].get("precision"),
                 **_timing(summaries, evals), "runs": runs}
        if cfg.jpeg_align is not None:
            entry["shortcut"] = _shortcut(cfg, spec, runs)
        if cfg.attack:
            atk = robustness_cached(cfg, runs[0]["dir"], what=f"{spec.label} seed {cfg.seeds[0]}")
            entry["robustness"] = {
                "attack": atk["attack"], "eps": [r["eps"] for r in atk["results"]], "n": atk["n"],
                "clean_accuracy": atk["clean_accuracy"],
                "robust_accuracy": [r["robust_accuracy"] for r in atk["results"]],
                "per_direction": {d: [r.get("per_direction", {}).get(d, {}).get("robust_accuracy")
                                      for r in atk["results"]] for d in ("ai-to-real", "real-to-ai")},
                "json": atk["outputs"]["json"]}
        if cfg.precision_check:
            entry["precision_check"] = precision_agreement(runs[0]["dir"], cfg, cfg.generators,
                                                           what=f"{spec.label} seed {cfg.seeds[0]}")
        results["models"][spec.label] = entry
        if runtime.is_main():
            write_json(out / RESULTS, results)  # partial results survive an interruption
    crossed = cfg.cross if isinstance(cfg.cross, list) else ([m.label for m in cfg.models] if cfg.cross else [])
    if crossed:
        results["cross"] = {}
        for label in crossed:
            results["cross"][label] = run_cross(cfg, label, leave_one_out=cfg.leave_one_out, report=False)
    results["seconds"] = time.perf_counter() - t_start
    if runtime.is_main():
        write_json(out / RESULTS, results)
        if cfg.report:
            from fakescope.report.html import write_report

            paths = write_report(out, results)
            results["outputs"] = paths
            write_json(out / RESULTS, results)
            log(f"report: {paths['html']}")
    return results


def _f(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def _timing(summaries: list[dict], evals: list[dict]) -> dict:
    """Training seconds and throughput (training images/s; ``eval_images_per_second``: inference).

    ``data_seconds`` is the time spent preparing the inputs before the first epoch (decoding, or the
    frozen backbone's feature extraction); ``train_seconds`` and ``images_per_second`` cover the
    epochs only (for a frozen backbone: the head on cached features, see ``input_path``)."""
    def agg(vals):
        return vals[0] if len(vals) == 1 else summarize(vals)

    return {"train_seconds": agg([s.get("train_seconds") for s in summaries]),
            "data_seconds": agg([s.get("data_seconds") for s in summaries]),
            "images_per_second": agg([s.get("train_images_per_second") for s in summaries]),
            "eval_images_per_second": agg([e.get("images_per_second") for e in evals]),
            "epochs_run": agg([s.get("epochs_run") for s in summaries]),
            "input_path": summaries[0].get("input_path")}


def _shortcut(cfg: BenchmarkConfig, spec: ModelSpec, runs: list[dict]) -> dict:
    q = cfg.jpeg_align
    evals = []
    for r in runs:
        what = f"{spec.label} seed {r['seed']}"
        evals.append(evaluate_cached(cfg, Path(r["dir"]), folder=f"eval-{cfg.split}-jpeg{q}",
                                     generators=cfg.generators, jpeg_align=q, force=cfg.force, what=what))
    out = {"jpeg_align": q, "eval_aligned": _aggregate_eval(evals),
           "eval_aligned_runs": [e["outputs"]["json"] for e in evals]}
    if cfg.jpeg_align_train:
        evals, dirs = [], []
        for seed in cfg.seeds:
            what = f"{spec.label} (JPEG-aligned {q}) seed {seed}"
            rd = run_dir_for(cfg, spec, seed, q)
            ensure_run(train_options(cfg, spec, seed, cfg.generators, jpeg_align=q), rd, force=cfg.force, what=what)
            evals.append(evaluate_cached(cfg, rd, folder=f"eval-{cfg.split}", generators=cfg.generators,
                                         force=cfg.force, what=what))
            dirs.append(str(rd))
        out["train_aligned"] = _aggregate_eval(evals)
        out["train_aligned_runs"] = dirs
    return out


# --- cross-generator ------------------------------------------------------------------------------

def run_cross(config: dict | BenchmarkConfig, model: str | None = None, *, leave_one_out: bool = False,
              report: bool = True, **overrides) -> dict:
    """GenImage's cross-generator protocol for one model of ``config``.

    Default: one run per generator, trained on that generator's train split alone, tested on the
    val split of every generator: ``matrix[i][j]`` is the accuracy of the model trained on
    ``train[i]`` on ``test[j]`` (mean over seeds), ``row_average[i]`` its mean over the test
    generators. ``leave_one_out``: run ``i`` trains on every generator but ``train[i]``;
    ``held_out[g]`` is its accuracy on the generator left out. Writes ``out/cross/<model>[-loo]``
    ``.json``, ``.md`` and ``.png`` (heatmap); the runs live in ``out/cross/<model>-.../``."""
    cfg = config if isinstance(config, BenchmarkConfig) and not overrides else make_config(config, **overrides)
    if model is None:
        if len(cfg.models) != 1:
            raise FakescopeError(f"expected one model for the cross-generator protocol, got "
                                 f"{', '.join(m.label for m in cfg.models)}: name one")
        spec = cfg.models[0]
    else:
        spec = cfg.model(model)
    gens = cfg.generators
    if leave_one_out and len(gens) < 2:
        raise FakescopeError(f"expected at least 2 generators for --leave-one-out (train on the others, test on the "
                             f"one left out), got {len(gens)}: {', '.join(gens)}")
    if len(gens) < 2:
        log(f"only one generator ({gens[0]}): the cross-generator matrix is 1 x 1")
    folder = Path(cfg.out) / "cross"
    kind = "leave-one-out" if leave_one_out else "one-vs-all"
    log(f"cross-generator ({kind}) for {spec.label}: {len(gens)} runs x {len(cfg.seeds)} seed(s)")
    rows, per_gen, runs = [], {}, {}
    total, k = len(gens) * len(cfg.seeds), 0
    for g in gens:
        train_gens = [x for x in gens if x != g] if leave_one_out else [g]
        name = f"without-{g}" if leave_one_out else f"train-{g}"
        evals, dirs = [], []
        for seed in cfg.seeds:
            k += 1
            what = f"cross [{k}/{total}] {spec.label} {name} seed {seed}"
            rd = folder / f"{spec.slug}-{name}-seed{seed}"
            ensure_run(train_options(cfg, spec, seed, train_gens), rd, force=cfg.force, what=what)
            evals.append(evaluate_cached(cfg, rd, folder=f"eval-{cfg.split}", generators=gens, force=cfg.force,
                                         what=what))
            dirs.append(str(rd))
        per_gen[g] = {t: aggregate([e["per_generator"][t] for e in evals]) for t in gens}
        rows.append([mean_of(per_gen[g][t]["accuracy"]) for t in gens])
        runs[g] = dirs
    matrix = np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=np.float64)
    result = {
        "model": spec.label, "protocol": kind, "metric": "accuracy", "split": cfg.split,
        "train": [f"all but {g}" if leave_one_out else g for g in gens], "test": list(gens),
        "matrix": matrix.tolist(), "row_average": np.nanmean(matrix, axis=1).tolist(),
        "column_average": np.nanmean(matrix, axis=0).tolist(), "seeds": list(cfg.seeds),
        "per_generator": per_gen, "runs": runs,
    }
    if leave_one_out:
        result["held_out"] = {g: matrix[i, i] for i, g in enumerate(gens)}
        result["mean_held_out"] = float(np.nanmean(np.diag(matrix)))
    else:
        off = matrix[~np.eye(len(gens), dtype=bool)]
        result["mean_in_distribution"] = float(np.nanmean(np.diag(matrix)))
        result["mean_cross"] = float(np.nanmean(off)) if off.size else None
    if runtime.is_main():
        from fakescope.report.html import write_cross

        stem = folder / (spec.slug + ("-loo" if leave_one_out else ""))
        result["outputs"] = write_cross(result, stem)
        write_json(stem.with_suffix(".json"), result)
        log(f"cross-generator matrix: {stem.with_suffix('.md')}")
        if report and (Path(cfg.out) / RESULTS).is_file():
            from fakescope.report.html import write_report

            write_report(cfg.out)
    return json.loads(dumps(result))
