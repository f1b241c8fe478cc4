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
from pathlib import Path

import yaml

from fakescope import runfiles as rf
from fakescope.report.tables import fmt, markdown_table
from fakescope.utils import atomic_write_text

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


def build_model_card(run_dir: str | os.PathLike, inspect: dict | None = None) -> str:
    """The card's text (YAML header + Markdown) for ``run_dir``."""
    run = Path(run_dir)
    cfg = _load(run / rf.CONFIG) or {}
    metrics = rf.read_train_metrics(run) or {}
    cal = _load(run / rf.CALIBRATION)
    evals = _results(run, f"eval-*/{rf.EVAL_METRICS}", "overall", dict)
    attacks = _results(run, "attack-*/attack.json", "results", list)
    model = cfg.get("model", {})
    data = cfg.get("data", {})
    train = cfg.get("train", {})
    val = metrics.get("validation") or {}

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
        "input_size": (cfg.get("preprocess") or {}).get("input_size"),
        "native_size": cfg.get("native_size"),
        "calibrated": cal is not None,
        "threshold": cal.get("threshold") if cal else 0.5,
        "false_positive_promise": ((cal or {}).get("guarantee") or {}).get("promise"),
        "fakescope_version": cfg.get("fakescope_version"),
    }
    L: list[str] = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    L += [f"# {model.get('name', 'detector')} — AI-generated image detector (fakescope run `{run.name}`)", ""]
    L += ["Outputs `p_ai` = P(image is AI-generated); label map nature = 0, ai = 1. Input: an RGB image; it is "
          f"brought to the training data's typical size ({cfg.get('native_size') or 'not set'} px), then to the "
          f"model's input size ({header['input_size']} px, centre square); normalisation is inside the model.", ""]

    L += ["## Model", ""]
    opts = model.get("options") or {}
    weights = model.get("pretrained_file") or ("none" if not opts.get("pretrained", True) else "timm / HF hub")
    if model.get("name") == "cnn32":
        weights = "none (trained from scratch)"
    L += [f"- architecture: `{model.get('name')}`, options `{json.dumps(opts)}`",
          f"- parameters: {cfg.get('params', '–'):,} ({cfg.get('trainable_params', '–'):,} trainable)"
          if isinstance(cfg.get("params"), int) and isinstance(cfg.get("trainable_params"), int)
          else f"- parameters: {cfg.get('params', '–')}",
          f"- pretrained backbone weights: {weights}",
          f"- preprocessing: {json.dumps(cfg.get('preprocess'))}", ""]

    L += ["## Training data", ""]
    L += [f"- root: `{data.get('root')}`", f"- generators: {', '.join(data.get('generators') or []) or '–'}",
          f"- images: {data.get('train_images', '–')} for training, {data.get('val_images', '–')} in the "
          f"validation carve (fraction {train.get('val_fraction')} of train, for early stopping)",
          f"- native size: {cfg.get('native_size')}; JPEG alignment: {train.get('jpeg_align')}"]
    if inspect:
        fm = inspect.get("formats") or {}
        L += [f"- formats: nature {fm.get('nature')}, ai {fm.get('ai')} (a sample of {inspect.get('checked')} "
              f"decoded files)", f"- sizes: {(inspect.get('sizes') or {}).get('most_common')}"]
    L += [""]

    L += ["## Training options", ""]
    keep = ("epochs", "batch_size", "lr", "lr_schedule", "patience", "seed", "limit", "augment", "adv_train",
            "adv_eps", "precision")
    L += [f"- {k}: `{json.dumps(train.get(k))}`" for k in keep if k in train]
    L += [f"- best epoch {metrics.get('best_epoch')} of {metrics.get('epochs_run')}, "
          f"{fmt(metrics.get('train_seconds'))} s" if metrics else "- (training summary missing)", ""]

    L += ["## Validation", ""]
    if val:
        L += ["Validation carve of the training split (threshold 0.5, raw scores):", ""]
        L += _table({"overall": val}, first="split") + [""]
    for name, ev in evals.items():
        d = ev.get("data") or {}
        thr = ev.get("threshold")
        cal_ev = ev.get("calibration")
        scores = f"calibrated scores, T = {cal_ev['temperature']:.4f}" if cal_ev else "raw scores"
        thr_s = f"{fmt(thr)} ({ev.get('threshold_source', 'given')}, {scores})"
        L += [f"`fakescope evaluate` on `{d.get('root')}` split `{d.get('split')}` ({name}; threshold {thr_s}):", ""]
        L += _table({"overall": ev["overall"], **(ev.get("per_generator") or {})}, first="generator") + [""]
    if not val and not evals:
        L += ["No validation figures in this run yet.", ""]

    L += ["## Calibration and threshold", ""]
    if cal:
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
        g = cal.get("guarantee") or {}
        if g:
            rule = (f"Clopper–Pearson order-statistic rule at {g['confidence']:.0%} confidence (at most "
                    f"{g['allowed_false_positives']} of the {g['n_real']} real images above the threshold; the rule "
                    f"needs at least {g['min_n_real']})" if g["confidence"] > 0 else
                    "empirical quantile of the calibration set (`--confidence 0`): no promise")
            tpr_iv = g.get("tpr_interval")
            L += [f"- rule: {rule}",
                  f"- false-positive rate on the calibration set: {fmt(g['fpr_empirical'])} ({g['false_positives']} of "
                  f"{g['n_real']} real images); upper bound {fmt(g['fpr_upper_bound'])} at "
                  f"{g['bound_confidence']:.0%} confidence (one-sided Clopper–Pearson)",
                  f"- true-positive rate there: {fmt(g.get('tpr'))}"
                  + (f", 95 % interval [{fmt(tpr_iv[0])}, {fmt(tpr_iv[1])}] ({g['n_ai']} AI images)" if tpr_iv else ""),
                  f"- **{'Promise' if g.get('promise') else 'No promise'}:** {g['statement']}. It holds for real "
                  f"images exchangeable with the calibration set's (same source, processing and content mix); "
                  f"`fakescope evaluate` warns when real images break it."]
        L += [""]
    else:
        L += ["Not calibrated: scores are the model's raw `p_ai` and the threshold is 0.5. "
              "Run `fakescope calibrate` on held-out data.", ""]

    L += ["## Intended use", "",
          "Screening images for signs of AI generation, as one piece of evidence among others (provenance "
          "metadata, source, context). Not for deciding alone about a person or their work: at any threshold "
          "some real photos are called AI (see the false-positive rate above) and some AI images pass.", ""]

    L += ["## Known limitations (from this run's measurements)", ""]
    lim: list[str] = []
    for w in (inspect or {}).get("warnings") or []:
        lim.append(f"data inspect: {w}")
    for name, ev in evals.items():
        for kind, rows in (ev.get("degradations") or {}).items():
            pts = ", ".join(f"{r['level']:g}: {fmt((r.get('overall') or {}).get('accuracy'))}" for r in rows)
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
    for name, at in attacks.items():
        res = at["results"]
        pts = ", ".join(f"eps {r['eps'] * 255:g}/255: {fmt(r.get('robust_accuracy'))}" for r in res)
        lim.append(f"{at.get('attack')} attack ({name}): robust accuracy {pts}")
    if cfg.get("native_size") and cfg["native_size"] <= 64:
        lim.append(f"trained on {cfg['native_size']}-px images: larger inputs are downscaled to that size first, "
                   f"so detail above that scale is never seen")
    lim.append("images from generators, formats or post-processing absent from the training data are out of "
               "distribution; expect lower accuracy there")
    L += [f"- {x}" for x in lim] + [""]

    L += ["## How to reproduce", "", "```bash"]
    args = [f"fakescope train --model {model.get('name')} --data {data.get('root')} --out {run}"]
    for k, flag in (("epochs", "--epochs"), ("batch_size", "--batch-size"), ("lr", "--lr"), ("seed", "--seed"),
                    ("limit", "--limit"), ("patience", "--patience"), ("val_fraction", "--val-fraction")):
        if train.get(k) is not None:
            args.append(f"{flag} {train[k]}")
    if data.get("generators"):
        args.append(f"--generators {','.join(data['generators'])}")
    if model.get("pretrained_file"):
        args.append(f"--pretrained-file {model['pretrained_file']}")
    if opts.get("freeze") is not None:
        args.append("--freeze" if opts["freeze"] else "--finetune")
    L += [" \\\n    ".join(args)]
    if cal:
        src = cal.get("data") or {}
        data_arg = "" if src.get("split") == "holdout" else f" --data {src.get('root')}"
        L += [f"fakescope calibrate {run}{data_arg} --split {src.get('split')} "
              f"--target-fpr {cal['target_fpr']} --confidence {cal.get('confidence', 0)}"
              + (f" --limit {src['limit']}" if src.get("limit") else "")]
    L += ["```", "", f"Versions: {json.dumps(cfg.get('versions'))}", ""]
    return "\n".join(L)


INSPECT = "data_inspect.json"


def write_model_card(run_dir: str | os.PathLike, inspect: dict | None = None) -> Path:
    """Write ``RUN/MODEL_CARD.md`` atomically; returns its path. A given ``inspect`` summary is kept in
    ``RUN/data_inspect.json`` for later rewrites of the card (e.g. after ``evaluate``)."""
    from fakescope.utils import write_json

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
    from fakescope.data.inspect import inspect_index
    from fakescope.data.layout import index_root
    from fakescope.errors import FakescopeError

    data = config.get("data") or {}
    roots = data.get("roots") or [data.get("root")]
    if not all(r and Path(r).is_dir() for r in roots):
        return None
    try:
        index = index_root(roots).select((config.get("data") or {}).get("generators"), "train")
        return inspect_index(index, sample=sample, num_workers=0)
    except (FakescopeError, OSError):
        return None
