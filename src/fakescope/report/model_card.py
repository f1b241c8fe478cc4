"""``MODEL_CARD.md`` for a run: Hugging Face model-card style (YAML header + Markdown), built only from
what the run directory already holds.

Sources: ``config.json`` (model, data, options, versions), ``train_metrics.json`` (training's validation
carve), ``calibration.json``, every ``eval-*/metrics.json`` that ``evaluate`` wrote into the run
(overall, per generator, degradations), ``attack-*/attack.json`` and, when given, the ``data inspect``
summary of the training root (format and size shortcut warnings). Nothing is measured here; a figure the
run has not measured is absent, never guessed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from fakescope import runfiles as rf
from fakescope.data.inspect import inspect_index
from fakescope.data.layout import index_root
from fakescope.errors import FakescopeError
from fakescope.report.tables import fmt, markdown_table
from fakescope.utils import atomic_write_text, write_json

CARD = rf.MODEL_CARD
_KEYS = ("accuracy", "f1", "roc_auc", "real_accuracy", "fake_accuracy", "ece", "brier", "tpr_at_fpr_1pct", "eer", "n")


def _load(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def _table(rows: dict[str, dict], keys=_KEYS, first: str = "") -> list[str]:
    """The package's one table writer, over the columns these rows have."""
    rows = {name: r for name, r in rows.items() if isinstance(r, dict)}
    keys = [k for k in keys if any(k in r for r in rows.values())]
    return markdown_table(rows, keys, first=first).splitlines()


def _results(run: Path, pattern: str, key: str, kind: type) -> dict[str, dict]:
    """``folder name -> JSON`` of the run's result files matching ``pattern`` whose ``key`` is a ``kind``."""
    out = {}
    for p in sorted(run.glob(pattern)):
        d = _load(p)
        if d and isinstance(d.get(key), kind):
            out[p.parent.name] = d
    return out


@dataclass(frozen=True)
class _Run:
    """What the card's sections read: the run's files, loaded once."""

    path: Path
    cfg: dict
    metrics: dict
    cal: dict | None
    evals: dict[str, dict]
    attacks: dict[str, dict]
    inspect: dict | None

    @property
    def model(self) -> dict:
        return self.cfg.get("model", {})

    @property
    def data(self) -> dict:
        return self.cfg.get("data", {})

    @property
    def train(self) -> dict:
        return self.cfg.get("train", {})

    @property
    def val(self) -> dict:
        return self.metrics.get("validation") or {}

    @property
    def opts(self) -> dict:
        return self.model.get("options") or {}


def build_model_card(run_dir: str | os.PathLike, inspect: dict | None = None) -> str:
    """The card's text (YAML header + Markdown) for ``run_dir``."""
    run = Path(run_dir)
    r = _Run(path=run, cfg=_load(run / rf.CONFIG) or {}, metrics=rf.read_train_metrics(run) or {},
             cal=_load(run / rf.CALIBRATION), evals=_results(run, f"eval-*/{rf.EVAL_METRICS}", "overall", dict),
             attacks=_results(run, "attack-*/attack.json", "results", list), inspect=inspect)
    L: list[str] = []
    for section in (_front_matter, _title, _model, _training_data, _training_options, _validation, _calibration,
                    _intended_use, _limitations, _reproduce):
        L += section(r)
    return "\n".join(L)


def _front_matter(r: _Run) -> list[str]:
    """The YAML header Hugging Face reads."""
    model, data, val, cal = r.model, r.data, r.val, r.cal
    header = {
        "library_name": "fakescope",
        "pipeline_tag": "image-classification",
        "tags": ["ai-generated-image-detection", "fakescope"],
        "model_name": model.get("name"),
        "base_model": str(model.get("name", "")).removeprefix("timm:"),
        "datasets": data.get("roots") or ([data.get("root")] if data.get("root") else []),
        "metrics": [{"name": k, "value": val[k], "split": "validation carve of train"}
                    for k in ("accuracy", "roc_auc", "f1") if val.get(k) is not None],
        "label_map": {"nature": 0, "ai": 1},
        "input_size": _input_size(r),
        "native_size": r.cfg.get("native_size"),
        "max_side": r.cfg.get("max_side"),
        "test_geometry": r.cfg.get("test_geometry") or "resize",
        "calibrated": cal is not None,
        "threshold": cal.get("threshold") if cal else 0.5,
        "false_positive_promise": ((cal or {}).get("guarantee") or {}).get("promise"),
        "fakescope_version": r.cfg.get("fakescope_version"),
    }
    return ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]


def _input_size(r: _Run):
    return (r.cfg.get("preprocess") or {}).get("input_size")


def _title(r: _Run) -> list[str]:
    """Title, and what the model takes and returns."""
    return [f"# {r.model.get('name', 'detector')} — AI-generated image detector (fakescope run `{r.path.name}`)", "",
            "Outputs `p_ai` = P(image is AI-generated); label map nature = 0, ai = 1. Input: an RGB image; "
            f"{_geometry_text(r)}; normalisation is inside the model.", ""]


def _geometry_text(r: _Run) -> str:
    """How an input image becomes the model's input (max side, then the test geometry)."""
    size, cap = _input_size(r), r.cfg.get("max_side")
    first = f"an image whose longer side exceeds {cap} px is first down-scaled to {cap} px; " if cap else ""
    geometry = r.cfg.get("test_geometry") or "resize"
    if geometry == "crops":
        return first + (f"its score is the mean over a 3 x 3 grid of {size}-px crops at the image's own pixel scale "
                        f"(never a whole-image resize)")
    if geometry == "center_crop":
        return first + f"the model reads its centre {size}-px square at the image's own pixel scale"
    return first + (f"it is brought to the training data's typical size ({r.cfg.get('native_size') or 'not set'} "
                    f"px), then to the model's input size ({size} px, centre square)")


def _model(r: _Run) -> list[str]:
    """Architecture, parameter count, pretrained weights and preprocessing."""
    model, cfg, opts = r.model, r.cfg, r.opts
    weights = model.get("pretrained_file") or ("none" if not opts.get("pretrained", True) else "timm / HF hub")
    if model.get("name") == "cnn32":
        weights = "none (trained from scratch)"
    return ["## Model", "",
            f"- architecture: `{model.get('name')}`, options `{json.dumps(opts)}`",
            f"- parameters: {cfg.get('params', '–'):,} ({cfg.get('trainable_params', '–'):,} trainable)"
            if isinstance(cfg.get("params"), int) and isinstance(cfg.get("trainable_params"), int)
            else f"- parameters: {cfg.get('params', '–')}",
            f"- pretrained backbone weights: {weights}",
            f"- preprocessing: {json.dumps(cfg.get('preprocess'))}", ""]


def _training_data(r: _Run) -> list[str]:
    """The training root, its images and, when inspected, their formats and sizes."""
    data, train, inspect = r.data, r.train, r.inspect
    L = ["## Training data", "",
         f"- root: `{data.get('root')}`", f"- generators: {', '.join(data.get('generators') or []) or '–'}",
         f"- images: {data.get('train_images', '–')} for training, {data.get('val_images', '–')} in the "
         f"validation carve (fraction {train.get('val_fraction')} of train, for early stopping)",
         f"- native size: {r.cfg.get('native_size')}; JPEG alignment: {train.get('jpeg_align')}"]
    if inspect:
        fm = inspect.get("formats") or {}
        L += [f"- formats: nature {fm.get('nature')}, ai {fm.get('ai')} (a sample of {inspect.get('checked')} "
              f"decoded files)", f"- sizes: {(inspect.get('sizes') or {}).get('most_common')}"]
    return L + [""]


def _training_options(r: _Run) -> list[str]:
    """The options training ran with, and how it ended."""
    train, metrics = r.train, r.metrics
    keep = ("epochs", "batch_size", "lr", "lr_schedule", "patience", "seed", "limit", "augment", "adv_train",
            "adv_eps", "precision")
    return (["## Training options", ""] + [f"- {k}: `{json.dumps(train.get(k))}`" for k in keep if k in train]
            + [f"- best epoch {metrics.get('best_epoch')} of {metrics.get('epochs_run')}, "
               f"{fmt(metrics.get('train_seconds'))} s" if metrics else "- (training summary missing)", ""])


def _validation(r: _Run) -> list[str]:
    """Training's validation carve and every evaluation written into the run."""
    L = ["## Validation", ""]
    if r.val:
        L += ["Validation carve of the training split (threshold 0.5, raw scores):", ""]
        L += _table({"overall": r.val}, first="split") + [""]
    for name, ev in r.evals.items():
        d = ev.get("data") or {}
        thr = ev.get("threshold")
        cal_ev = ev.get("calibration")
        scores = f"calibrated scores, T = {cal_ev['temperature']:.4f}" if cal_ev else "raw scores"
        thr_s = f"{fmt(thr)} ({ev.get('threshold_source', 'given')}, {scores})"
        L += [f"`fakescope evaluate` on `{d.get('root')}` split `{d.get('split')}` ({name}; threshold {thr_s}):", ""]
        L += _table({"overall": ev["overall"], **(ev.get("per_generator") or {})}, first="generator") + [""]
    if not r.val and not r.evals:
        L += ["No validation figures in this run yet.", ""]
    return L


def _calibration(r: _Run) -> list[str]:
    """Temperature, threshold and, where the calibration gave one, its false-positive promise."""
    L = ["## Calibration and threshold", ""]
    cal = r.cal
    if not cal:
        return L + ["Not calibrated: scores are the model's raw `p_ai` and the threshold is 0.5. "
                    "Run `fakescope calibrate` on held-out data.", ""]
    fit = cal.get("fit") or {}
    src = cal.get("data") or {}
    L += [f"- method: temperature scaling, T = {cal['temperature']:.4f} (fitted on `{src.get('root')}` split "
          f"`{src.get('split')}`, {fit.get('n_real')} real + {fit.get('n_ai')} AI images)",
          f"- ECE (15 equal-mass bins) on that set: {fmt(fit.get('ece_before'))} before, "
          f"{fmt(fit.get('ece_after'))} after; Brier {fmt(fit.get('brier_before'))} -> "
          f"{fmt(fit.get('brier_after'))}",
          f"- threshold {cal['threshold']:.6g} on calibrated `p_ai`, chosen for a false-positive rate of "
          f"{cal['target_fpr']:.2%} on that set's real images (there: FPR {fmt(fit.get('fpr_at_threshold'))}, "
          f"TPR {fmt(fit.get('tpr_at_threshold'))})"]
    return L + _guarantee(cal.get("guarantee") or {}) + [""]


def _guarantee(g: dict) -> list[str]:
    """The calibration's false-positive rule and what it promises (nothing without a guarantee)."""
    if not g:
        return []
    rule = (f"Clopper–Pearson order-statistic rule at {g['confidence']:.0%} confidence (at most "
            f"{g['allowed_false_positives']} of the {g['n_real']} real images above the threshold; the rule "
            f"needs at least {g['min_n_real']})" if g["confidence"] > 0 else
            "empirical quantile of the calibration set (`--confidence 0`): no promise")
    tpr_iv = g.get("tpr_interval")
    return [f"- rule: {rule}",
            f"- false-positive rate on the calibration set: {fmt(g['fpr_empirical'])} ({g['false_positives']} of "
            f"{g['n_real']} real images); upper bound {fmt(g['fpr_upper_bound'])} at "
            f"{g['bound_confidence']:.0%} confidence (one-sided Clopper–Pearson)",
            f"- true-positive rate there: {fmt(g.get('tpr'))}"
            + (f", 95 % interval [{fmt(tpr_iv[0])}, {fmt(tpr_iv[1])}] ({g['n_ai']} AI images)" if tpr_iv else ""),
            f"- **{'Promise' if g.get('promise') else 'No promise'}:** {g['statement']}. It holds for real "
            f"images exchangeable with the calibration set's (same source, processing and content mix); "
            f"`fakescope evaluate` warns when real images break it."]


def _intended_use(r: _Run) -> list[str]:
    return ["## Intended use", "",
            "Screening images for signs of AI generation, as one piece of evidence among others (provenance "
            "metadata, source, context). Not for deciding alone about a person or their work: at any threshold "
            "some real photos are called AI (see the false-positive rate above) and some AI images pass.", ""]


def _limitations(r: _Run) -> list[str]:
    """Every limitation this run's files show: data warnings, evaluations, attacks, training size."""
    lim: list[str] = [f"data inspect: {w}" for w in (r.inspect or {}).get("warnings") or []]
    for name, ev in r.evals.items():
        lim += _evaluation_limits(name, ev)
    for name, at in r.attacks.items():
        pts = ", ".join(f"eps {x['eps'] * 255:g}/255: {fmt(x.get('robust_accuracy'))}" for x in at["results"])
        lim.append(f"{at.get('attack')} attack ({name}): robust accuracy {pts}")
    cfg = r.cfg
    if cfg.get("native_size") and cfg["native_size"] <= 64:
        lim.append(f"trained on {cfg['native_size']}-px images: larger inputs are downscaled to that size first, "
                   f"so detail above that scale is never seen")
    lim.append("images from generators, formats or post-processing absent from the training data are out of "
               "distribution; expect lower accuracy there")
    return ["## Known limitations (from this run's measurements)", ""] + [f"- {x}" for x in lim] + [""]


def _evaluation_limits(name: str, ev: dict) -> list[str]:
    """One evaluation's limitations: degradations, a broken false-positive target, false alarms on a real-only
    root, the spread of accuracy over generators."""
    lim: list[str] = []
    for kind, rows in (ev.get("degradations") or {}).items():
        pts = ", ".join(f"{x['level']:g}: {fmt((x.get('overall') or {}).get('accuracy'))}" for x in rows)
        lim.append(f"accuracy under {kind} ({name}): {pts} (clean {fmt(ev['overall'].get('accuracy'))})")
    check = ev.get("guarantee_check") or {}
    if check.get("broken"):
        lim.append(f"false-positive target broken on `{(ev.get('data') or {}).get('root')}` ({name}): "
                   + "; ".join(w for w in ev.get("warnings") or [] if "lies entirely above" in w))
    o = ev["overall"]
    if o.get("fake_accuracy") is None and o.get("real_accuracy") is not None:
        fp = o["confusion"][0][1]
        lim.append(f"real images only, {(ev.get('data') or {}).get('root')} ({name}): {fp} of {o['n']} called AI "
                   f"(false-positive rate {1 - o['real_accuracy']:.3f} at threshold {fmt(ev.get('threshold'))}, "
                   f"{ev.get('threshold_source', 'given')})")
    gens = ev.get("per_generator") or {}
    accs = {g: m.get("accuracy") for g, m in gens.items() if m.get("accuracy") is not None}
    if len(accs) > 1:
        lo = min(accs, key=accs.get)
        hi = max(accs, key=accs.get)
        lim.append(f"accuracy varies by generator ({name}): {lo} {accs[lo]:.3f} to {hi} {accs[hi]:.3f}")
    return lim


def _reproduce(r: _Run) -> list[str]:
    """The train (and calibrate) command lines that rebuild this run, and the versions it ran with."""
    model, data, train, cal, run = r.model, r.data, r.train, r.cal, r.path
    args = [f"fakescope train --model {model.get('name')} --data {data.get('root')} --out {run}"]
    for k, flag in (("epochs", "--epochs"), ("batch_size", "--batch-size"), ("lr", "--lr"), ("seed", "--seed"),
                    ("limit", "--limit"), ("patience", "--patience"), ("val_fraction", "--val-fraction")):
        if train.get(k) is not None:
            args.append(f"{flag} {train[k]}")
    if data.get("generators"):
        args.append(f"--generators {','.join(data['generators'])}")
    if model.get("pretrained_file"):
        args.append(f"--pretrained-file {model['pretrained_file']}")
    if r.opts.get("freeze") is not None:
        args.append("--freeze" if r.opts["freeze"] else "--finetune")
    L = ["## How to reproduce", "", "```bash", " \\\n    ".join(args)]
    if cal:
        src = cal.get("data") or {}
        data_arg = "" if src.get("split") == "holdout" else f" --data {src.get('root')}"
        L += [f"fakescope calibrate {run}{data_arg} --split {src.get('split')} "
              f"--target-fpr {cal['target_fpr']} --confidence {cal.get('confidence', 0)}"
              + (f" --limit {src['limit']}" if src.get("limit") else "")]
    return L + ["```", "", f"Versions: {json.dumps(r.cfg.get('versions'))}", ""]


INSPECT = "data_inspect.json"


def write_model_card(run_dir: str | os.PathLike, inspect: dict | None = None) -> Path:
    """Write ``RUN/MODEL_CARD.md`` atomically; returns its path. A given ``inspect`` summary is kept in
    ``RUN/data_inspect.json`` for later rewrites of the card (e.g. after ``evaluate``)."""
    run_dir = Path(run_dir)
    if inspect is not None:
        write_json(run_dir / INSPECT, {k: v for k, v in inspect.items() if k != "unreadable"})
    else:
        inspect = _load(run_dir / INSPECT)
    path = run_dir / CARD
    atomic_write_text(path, build_model_card(run_dir, inspect))
    return path


def write_training_card(run_dir: str | os.PathLike) -> Path:
    """Write the card of a run that training just finished: inspects the training root named in the run's
    ``config.json`` (kept in ``data_inspect.json``) and writes ``MODEL_CARD.md``. The train command and the
    study call it after :func:`fakescope.engine.train.train` (the engine writes weights and JSON only)."""
    return write_model_card(run_dir, inspect_training_data(rf.read_config(run_dir)))


def refresh_model_card(run_dir: str | os.PathLike) -> Path | None:
    """Rewrite the run's model card from its files when it has one (after an evaluation or a calibration
    was added to the run); None when the run has no card. Reads only the run's own files."""
    if not (Path(run_dir) / CARD).is_file():
        return None
    return write_model_card(run_dir)


def inspect_training_data(config: dict, sample: int = 16) -> dict | None:
    """The ``data inspect`` summary of a run's training root (``sample`` decoded files per group), or None
    when the root is gone."""
    data = config.get("data") or {}
    roots = data.get("roots") or [data.get("root")]
    if not all(r and Path(r).is_dir() for r in roots):
        return None
    try:
        index = index_root(roots).select((config.get("data") or {}).get("generators"), "train")
        return inspect_index(index, sample=sample, num_workers=0)
    except (FakescopeError, OSError):
        return None
