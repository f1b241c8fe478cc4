"""The benchmark's configuration: a mapping (from YAML, TOML or JSON, or built by the CLI) checked
into a :class:`BenchmarkConfig`.

Every value is checked with the command line's own rules (:mod:`fakescope.parsing`): ``lr: 1e-3``,
which YAML reads as a string, is the number 0.001; ``threshold: 1.5`` is a one-line error naming the
key (``benchmark config: threshold: expected a threshold in [0, 1], got 1.5``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from fakescope import parsing
from fakescope.attacks import ATTACKS, parse_eps
from fakescope.choices import ATTACK_DIRECTIONS, GEOMETRIES, LR_SCHEDULES, PRECISIONS, TASKS
from fakescope.data.io import list_images
from fakescope.data.layout import index_root
from fakescope.data.transforms import Augment, parse_degradations
from fakescope.errors import FakescopeError
from fakescope.models import accepted_options, list_models
from fakescope.options import RuntimeOptions
from fakescope.utils import slug

DEFAULT_MODELS = ("cnn32", "resnet50", "convnext_small")
MODEL_KEYS = ("pretrained", "pretrained_file", "freeze", "filters", "hidden", "dropout", "input_size", "tiny",
              "backbone", "stem_stride")
TRAIN_KEYS = ("epochs", "batch_size", "lr", "lr_schedule", "patience", "val_fraction", "limit", "native_size",
              "augment", "precision", "adv_train", "adv_eps", "adv_steps", "adv_mix", "task", "test_geometry",
              "paired")
ATTACK_KEYS = ("name", "eps", "steps", "limit", "direction", "precision")
SOURCE = "benchmark config"


@dataclass
class ModelSpec:
    """One row of the results table: a ``label`` (unique), the registry name and its options."""

    label: str
    model: str
    options: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return slug(self.label, default="model")


@dataclass
class BenchmarkConfig:
    """Every option of a benchmark (see :mod:`fakescope.study`); :meth:`resolved` is what gets saved."""

    data: str | list[str]
    """One data root, or a list of roots (their generators together)."""
    out: str = "runs/benchmark"
    models: list[ModelSpec] = field(default_factory=list)
    generators: list[str] | None = None
    seeds: list[int] = field(default_factory=lambda: [42])
    epochs: int = 10
    batch_size: int | None = None
    lr: float | None = None
    lr_schedule: str | None = None
    patience: int = 3
    val_fraction: float = 0.1
    limit: int | None = None
    native_size: str | int = "auto"
    augment: dict | None = None
    task: str = "binary"
    test_geometry: str | None = None
    paired: bool | None = None       # None: each model's recipe (aligned pairs batched together or not)
    split: str = "val"
    threshold: float | None = None   # None: each run's calibrated threshold, else 0.5
    calibrate: float | None = None   # target FPR: calibrate every run on its own held-out training images
    calibrate_confidence: float = parsing.DEFAULT_CONFIDENCE  # of that FPR promise (0: empirical quantile, no promise)
    gallery: bool = True             # Grad-CAM overlays of a few right and wrong examples (first seed)
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
    real_photos: str | None = None   # a folder of real photos only: each model's false alarms on them

    @property
    def runtime(self) -> RuntimeOptions:
        """The one place the configuration's runtime keys become :class:`~fakescope.options.RuntimeOptions`
        (``eval_batch_size`` is the batch size of its evaluations, attacks and checks)."""
        return RuntimeOptions(device=self.device, precision=self.precision, batch_size=self.eval_batch_size,
                              num_workers=self.workers, use_cache=self.use_cache, cache_dir=self.cache_dir,
                              max_pixels=self.max_pixels)

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


FIELDS = {f.name for f in fields(BenchmarkConfig)}


# --- value checks (the command line's rules, from fakescope.parsing) --------------------------------

def _optional(check: Callable) -> Callable:
    return lambda v: None if v is None else check(v)


def _choice(*choices) -> Callable:
    def check(v):
        if v not in choices:
            raise ValueError(f"expected one of {', '.join(str(c) for c in choices)}, got {v!r}")
        return v
    return check


def _string(v) -> str:
    if not isinstance(v, (str, os.PathLike)) or not str(v):
        raise ValueError(f"expected a non-empty string, got {v!r}")
    return str(v)


def _positive_number(v) -> float:
    x = parsing.number(v)
    if not x > 0:
        raise ValueError(f"expected a number > 0, got {v!r}")
    return x


def _target_fpr(v) -> float:
    x = parsing.fraction(v)
    if x >= 1.0:
        raise ValueError(f"expected a target false-positive rate in [0, 1), got {v}")
    return x


def _native_size(v) -> str:
    if v in ("auto", "off"):
        return v
    try:
        return str(parsing.positive_int(v))
    except ValueError:
        raise ValueError(f"expected auto, off or a positive integer, got {v!r}") from None


def _eps(v) -> float:
    x = parsing.number(v)
    if not 0 <= x <= 1:
        raise ValueError(f"expected a number in [0, 1], got {v!r}")
    return x


def _positive_ints(v) -> list[int]:
    items = parsing.csv(v) if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"expected a list of positive integers like [32, 64, 128], got {v!r}")
    return [parsing.positive_int(x) for x in items]


def _seeds(v) -> list[int]:
    items = [v] if isinstance(v, int) and not isinstance(v, bool) else parsing.csv(v) if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"expected integer seeds like [42, 43], got {v!r}")
    try:
        seeds = [parsing.integer(s) for s in items]
    except ValueError:
        raise ValueError(f"expected integer seeds like [42, 43], got {v!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"expected distinct seeds, got {seeds}")
    return seeds


def _data(v) -> str | list[str]:
    """``data: ROOT`` or ``data: [A, B]`` (several roots); each made absolute."""
    if isinstance(v, (list, tuple)):
        if not v:
            raise ValueError("expected a data root or a non-empty list of roots, got []")
        roots = [str(Path(_string(r)).expanduser().resolve()) for r in v]
        if len(set(roots)) != len(roots):
            raise ValueError(f"expected distinct data roots, got {list(v)}")
        return roots[0] if len(roots) == 1 else roots
    return str(Path(_string(v)).expanduser().resolve())


def _names(v) -> list[str]:
    if isinstance(v, (list, tuple)):
        v = [str(x) for x in v]
    return parsing.csv(v)


_AUGMENT = {"jpeg_prob": parsing.fraction, "jpeg_quality": lambda v: parsing.value_range(v, parsing.quality),
            "blur_prob": parsing.fraction, "blur_sigma": lambda v: parsing.value_range(v, parsing.number),
            "crop": parsing.fraction, "flip": parsing.boolean, "native_crop": parsing.boolean,
            "scale": lambda v: _scale_range(parsing.value_range(v, parsing.number)),
            "color_prob": parsing.fraction, "color_strength": parsing.fraction, "gray_prob": parsing.fraction,
            "nature_blur_prob": parsing.fraction,
            "nature_blur_sigma": lambda v: parsing.value_range(v, parsing.number)}


def _scale_range(r: tuple) -> tuple:
    if not 0 < r[0] <= r[1] <= 1:
        raise ValueError(f"expected down-scaling factors in (0, 1] like [0.5, 1], got {list(r)}")
    return r

TOP_LEVEL: dict[str, Callable] = {
    "data": _data, "out": _string, "seeds": _seeds, "epochs": parsing.positive_int,
    "batch_size": _optional(parsing.positive_int), "lr": _optional(_positive_number),
    "lr_schedule": _optional(_choice(*LR_SCHEDULES)),
    "task": _choice(*TASKS), "test_geometry": _optional(_choice(*GEOMETRIES)),
    "patience": parsing.nonneg_int, "val_fraction": parsing.fraction, "limit": _optional(parsing.positive_int),
    "native_size": _native_size, "split": _choice("train", "val"), "threshold": _optional(parsing.threshold),
    "calibrate": _optional(_target_fpr), "calibrate_confidence": parsing.confidence, "gallery": parsing.boolean,
    "jpeg_align": _optional(parsing.quality), "jpeg_align_train": parsing.boolean,
    "precision_check": parsing.boolean, "leave_one_out": parsing.boolean, "device": _string,
    "precision": _choice(*PRECISIONS), "eval_batch_size": parsing.positive_int,
    "workers": _optional(parsing.nonneg_int), "cache_dir": _optional(_string), "use_cache": parsing.boolean,
    "max_pixels": _optional(parsing.positive_int), "sample_per_class": parsing.nonneg_int,
    "force": parsing.boolean, "report": parsing.boolean, "real_photos": _optional(_string),
    "paired": _optional(parsing.boolean),
}
TRAINING: dict[str, Callable] = {
    **{k: TOP_LEVEL[k] for k in ("epochs", "batch_size", "lr", "lr_schedule", "patience", "val_fraction", "limit",
                                 "native_size", "precision", "task", "test_geometry", "paired")},
    "adv_train": _optional(_choice("pgd", "fgsm")), "adv_eps": _eps, "adv_steps": parsing.positive_int,
    "adv_mix": parsing.fraction,
}
MODEL_OPTIONS: dict[str, Callable] = {
    "pretrained": parsing.boolean, "pretrained_file": _optional(_string), "freeze": _optional(parsing.boolean),
    "filters": _positive_ints, "hidden": parsing.positive_int, "dropout": parsing.fraction,
    "input_size": parsing.positive_int, "tiny": parsing.boolean, "backbone": _string,
    "stem_stride": lambda v: _choice(1, 2)(parsing.positive_int(v)),
}


def _check(key: str, value, check: Callable):
    return parsing.checked(key, value, check, source=SOURCE)


def check_augment(aug, key: str = "augment") -> dict | None:
    """None: the model's recipe decides."""
    if aug is None:
        return None
    if not isinstance(aug, dict):
        raise FakescopeError(f"{SOURCE}: {key}: expected a mapping of augmentation options, got {aug!r}")
    bad = sorted(set(aug) - set(_AUGMENT))
    if bad:
        raise FakescopeError(f"unknown augmentation option {bad[0]!r}: expected one of {', '.join(_AUGMENT)}")
    return {k: _check(f"{key}.{k}", v, _AUGMENT[k]) for k, v in aug.items()}


def normalise_model_options(options: dict | None = None, key: str | None = "model_options", **given) -> dict:
    """Model options, checked, with ``None`` values dropped and ``pretrained_file`` resolved to an
    absolute path (``~`` expanded) the same way for ``train``, ``cross``, ``benchmark`` and
    configuration files: the one place where model options from a user are normalised. Errors name
    ``key.option`` of the configuration, or ``--option`` of the command line when ``key`` is None."""
    opts = {**(options or {}), **{k: v for k, v in given.items() if v is not None}}
    bad = sorted(set(opts) - set(MODEL_OPTIONS))
    if bad:
        raise FakescopeError(f"unknown model option {bad[0]!r}: expected one of {', '.join(MODEL_KEYS)}")
    out = {}
    for k, v in opts.items():
        v = (_check(f"{key}.{k}", v, MODEL_OPTIONS[k]) if key is not None else
             parsing.checked("--" + k.replace("_", "-"), v, MODEL_OPTIONS[k], source="command line"))
        if v is not None:
            out[k] = v
    if out.get("pretrained_file"):
        out["pretrained_file"] = str(Path(out["pretrained_file"]).expanduser().resolve())
    return out


def is_timm(name: str) -> bool:
    return name.startswith("timm:") or name in ("resnet50", "convnext_small")


def _model_specs(models, global_options: dict) -> list[ModelSpec]:
    entries: list[tuple[str, dict]] = []
    if models is None:
        models = list(DEFAULT_MODELS)
    if isinstance(models, dict):
        for k, v in models.items():
            if v is not None and not isinstance(v, dict):
                raise FakescopeError(f"{SOURCE}: models.{k}: expected a mapping of options, got {v!r}")
            entries.append((str(k), dict(v or {})))
    else:
        if not isinstance(models, (str, list, tuple)):
            raise FakescopeError(f"{SOURCE}: models: expected a list of names or a mapping, got {models!r}")
        for m in parsing.csv(models) if isinstance(models, str) else models:
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
        given = {k: opts[k] for k in MODEL_KEYS if k in opts}
        if is_timm(name):
            given = {**global_options, **given}
        options = normalise_model_options(given, key=f"models.{label}")
        train = {k: _check(f"models.{label}.{k}", opts[k], TRAINING[k]) for k in TRAINING if k in opts}
        if "augment" in opts:
            train["augment"] = check_augment(opts["augment"], key=f"models.{label}.augment")
        specs.append(ModelSpec(label, name, options, train))

    known = set(list_models())
    for s in specs:
        if not s.model.startswith("timm:") and (s.model not in known or s.model == "timm"):
            raise FakescopeError(f"unknown model {s.model!r}: expected one of "
                                 f"{', '.join(sorted(known - {'timm'}))} or timm:<name>")
        accepted = accepted_options(s.model)
        wrong = sorted(set(s.options) - set(accepted))
        if wrong:  # refused now, not when this model's turn to train comes
            raise FakescopeError(f"{SOURCE}: models.{s.label}: model {s.model!r} takes no option {wrong[0]!r}: "
                                 f"expected options among {', '.join(accepted)}")
    return specs


def check_attack(attack) -> dict:
    """``attack: pgd`` or ``attack: {name, eps, steps, limit, direction, precision}`` (empty: no attack)."""
    if not attack:
        return {}
    if not isinstance(attack, (str, dict)):
        raise FakescopeError(f"{SOURCE}: attack: expected an attack name or a mapping, got {attack!r}")
    a = {"name": attack} if isinstance(attack, str) else dict(attack)
    bad = sorted(set(a) - set(ATTACK_KEYS))
    if bad:
        raise FakescopeError(f"unknown attack option {bad[0]!r}: expected one of {', '.join(ATTACK_KEYS)}")

    a["name"] = _check("attack.name", a.get("name", "pgd"), _choice(*ATTACKS))  # the attack registry's names
    eps = a.get("eps", "0,1/255,2/255,4/255,8/255")
    a["eps"] = ",".join(str(e) for e in eps) if isinstance(eps, (list, tuple)) else str(eps)
    parse_eps(a["eps"], norm="l2" if a["name"] == "pgd-l2" else "linf")
    a["steps"] = _check("attack.steps", a.get("steps", 10), parsing.positive_int)
    a["limit"] = _check("attack.limit", a.get("limit"), _optional(parsing.positive_int))
    a["direction"] = _check("attack.direction", a.get("direction", "both"), _choice(*ATTACK_DIRECTIONS))
    if "precision" in a:
        a["precision"] = _check("attack.precision", a["precision"], _choice(*PRECISIONS))
    return a


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
            except ImportError:  # Python 3.10: the same parser, as the `tomli` dependency
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except FakescopeError:
        raise
    except Exception as e:  # noqa: BLE001 - any parser error is the user's file
        raise FakescopeError(f"{path} is not valid {path.suffix.lstrip('.').upper() or 'YAML'}: "
                             f"{str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FakescopeError(f"expected {path} to hold a mapping of options, got {type(data).__name__}")
    return data


def make_config(options: dict | BenchmarkConfig | None = None, **overrides) -> BenchmarkConfig:
    """A validated :class:`BenchmarkConfig` from a mapping (a config file's content) and overrides.

    It checks values only and reads no data: the data root need not exist yet (paths are made
    absolute, nothing is listed, indexed or written). Its ``generators`` stay as given (None: all);
    :func:`resolve_data`, the first step of ``run_benchmark`` and ``run_cross``, reads the data."""
    if isinstance(options, BenchmarkConfig):
        options = options.resolved()
    d = {**(options or {}), **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(d) - FIELDS)
    if unknown:
        raise FakescopeError(f"unknown benchmark option {unknown[0]!r}: expected one of {', '.join(sorted(FIELDS))}")
    if not d.get("data"):
        raise FakescopeError("expected a data root: pass --data ROOT or set 'data' in the configuration file")
    for k, check in TOP_LEVEL.items():
        if k in d:
            d[k] = _check(k, d[k], check)
    d["out"] = str(d.get("out") or "runs/benchmark")
    if d.get("real_photos") is not None:
        d["real_photos"] = str(Path(d["real_photos"]).expanduser().resolve())
    gopts = d.pop("model_options", None) or {}
    if not isinstance(gopts, dict):
        raise FakescopeError(f"{SOURCE}: model_options: expected a mapping, got {gopts!r}")
    gopts = normalise_model_options(gopts)
    d["models"] = _model_specs(d.get("models"), gopts)
    d["model_options"] = gopts
    d.setdefault("seeds", [42])
    if d.get("generators") is not None:
        d["generators"] = _check("generators", d["generators"], _names) or None
    d["degrade"] = _check("degrade", d.get("degrade") or [], _names)
    try:
        parse_degradations(d["degrade"])
    except ValueError as e:
        raise FakescopeError(f"{SOURCE}: degrade: {e}") from None
    d["augment"] = check_augment(d.get("augment"))
    if "cross" in d and not isinstance(d["cross"], bool):
        d["cross"] = _check("cross", d["cross"], lambda v: parsing.boolean(v) if isinstance(v, str) and v.lower()
                            in ("true", "false", "yes", "no", "on", "off") else _names(v))
    d["attack"] = check_attack(d.get("attack"))
    cfg = BenchmarkConfig(**d)
    if cfg.jpeg_align_train and cfg.jpeg_align is None:
        raise FakescopeError("jpeg_align_train needs jpeg_align: Q (the JPEG quality of the aligned runs)")
    if isinstance(cfg.cross, list):
        for label in cfg.cross:
            cfg.model(label)
    return cfg


def resolve_data(cfg: BenchmarkConfig) -> BenchmarkConfig:
    """``cfg`` checked against its data: the data root indexed (which writes or refreshes the index
    cache), the generators resolved (None: every generator of the train split; an unknown one is an
    error), the evaluation split checked, and ``real_photos`` required to hold images. The one step
    of a benchmark that reads the data, and its first: a :class:`BenchmarkConfig` from
    :func:`make_config` or built directly (``generators`` None) goes through it. Returns a new object."""
    index = index_root(cfg.data)
    generators = index.select(cfg.generators, "train").generator_names
    index.select(generators, cfg.split)  # the evaluation split must exist too
    if cfg.real_photos is not None and not list_images([cfg.real_photos]):
        raise FakescopeError(f"{SOURCE}: real_photos: expected a folder (or file) holding real photos, "
                             f"got {cfg.real_photos} with no image in it")
    return replace(cfg, generators=generators)


def run_config(config: dict | BenchmarkConfig, **overrides) -> BenchmarkConfig:
    """The configuration ``run_benchmark`` and ``run_cross`` run: ``config`` checked by
    :func:`make_config` (a :class:`BenchmarkConfig` without overrides is taken as it is), then
    :func:`resolve_data`."""
    if not isinstance(config, BenchmarkConfig) or overrides:
        config = make_config(config, **overrides)
    return resolve_data(config)


def train_augment(aug: dict | None) -> Augment | None:
    """The augmentation of a run: None (the model's recipe) when the configuration sets none."""
    if aug is None:
        return None
    return Augment(**{k: tuple(v) if isinstance(v, list) else v for k, v in aug.items()})
