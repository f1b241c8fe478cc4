"""The benchmark report: ``report.md`` (figures as files beside it) and a self-contained
``report.html`` (the same content, every PNG embedded as base64, no external resources).

Both are rendered from one list of blocks (headings, paragraphs, tables, figures) built from a
benchmark's ``results.json``, the evaluation files of its run directories and any
cross-generator results under ``<out>/cross``.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from fakescope.data.transforms import IDENTITY_LEVEL
from fakescope.report import plots
from fakescope.report.artifacts import read_scores
from fakescope.report.plots import heatmap
from fakescope.report.tables import fmt, markdown, measured
from fakescope.utils import atomic_write_text, slug

STUDY_COLUMNS = ("accuracy", "precision", "recall", "f1", "roc_auc", "tpr_at_fpr_5pct")
_TITLES = {"accuracy": "accuracy", "precision": "precision", "recall": "recall", "f1": "F1", "roc_auc": "ROC-AUC",
           "tpr_at_fpr_5pct": "TPR at FPR 5 %",
           "average_precision": "AP", "real_accuracy": "real acc.", "fake_accuracy": "fake acc.", "n": "n"}
_KIND_LABEL = {"jpeg": "JPEG quality", "blur": "blur sigma", "resize": "scale factor"}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{border-bottom:2px solid #ddd;padding-bottom:.3em}
h2{border-bottom:1px solid #eee;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}figcaption{font-size:.85em;color:#555}
img{max-width:100%}code{background:#f4f4f4;padding:0 .2em}.note{color:#555;font-size:.9em}
"""


class Doc:
    """Blocks rendered to Markdown (figures referenced by relative path) and to self-contained HTML."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.blocks: list[tuple] = []

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def para(self, text: str, note: bool = False) -> None:
        self.blocks.append(("p", text, note))

    def table(self, header: list[str], rows: list[list]) -> None:
        self.blocks.append(("table", header, [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]))

    def figures(self, items: list[tuple[str | None, str]]) -> None:
        items = [(p, c) for p, c in items if p and Path(p).is_file()]
        if items:
            self.blocks.append(("fig", items))

    # -- renderers --
    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.folder).replace(os.sep, "/")

    def markdown(self) -> str:
        out: list[str] = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(("_" + b[1] + "_") if b[2] else b[1])
            elif b[0] == "table":
                out.append(markdown(b[1], b[2]))
            else:
                out.append("\n".join(f"![{c}]({self._rel(p)})" for p, c in b[1]))
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        out = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
               f"<style>{_CSS}</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(b[1]))
                out.append(f"<p class=\"note\">{text}</p>" if b[2] else f"<p>{text}</p>")
            elif b[0] == "table":
                head = "".join(f"<th>{html.escape(h)}</th>" for h in b[1])
                body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b[2])
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            else:
                figs = []
                for p, c in b[1]:
                    data = base64.b64encode(Path(p).read_bytes()).decode("ascii")
                    figs.append(f"<figure><img alt=\"{html.escape(c)}\" src=\"data:image/png;base64,{data}\">"
                                f"<figcaption>{html.escape(c)}</figcaption></figure>")
                out.append("<div>" + "".join(figs) + "</div>")
        out.append("</body></html>\n")
        return "\n".join(out)


def _mean(v):
    return v["mean"] if isinstance(v, dict) and "mean" in v else v


def _confusion(c):
    """A confusion matrix, or the per-seed sum of a multi-seed summary."""
    return c["sum"] if isinstance(c, dict) else c


# --- cross-generator ------------------------------------------------------------------------------

def cross_tables(result: dict) -> tuple[list[str], list[list]]:
    header = ["trained on \\ tested on", *result["test"], "average"]
    rows = [[tr, *row, avg] for tr, row, avg in zip(result["train"], result["matrix"],
                                                               result["row_average"], strict=True)]
    return header, rows


def write_cross(result: dict, stem: str | os.PathLike) -> dict:
    """``stem.md`` (the matrix with row averages) and ``stem.png`` (its heatmap); returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    m = np.array([[np.nan if v is None else v for v in row] for row in result["matrix"]], dtype=float)
    full = np.concatenate([m, np.asarray(result["row_average"], dtype=float)[:, None]], axis=1)
    png = heatmap(full, result["train"], [*result["test"], "average"], stem.with_suffix(".png"),
                  title=f"{result['model']}: {result['metric']} ({result['protocol']})", xlabel="tested on",
                  ylabel="trained on")
    lines = [f"# Cross-generator {result['metric']}: {result['model']} ({result['protocol']}, {result['split']} split)",
             "", markdown(*cross_tables(result))]
    if "mean_held_out" in result:
        lines += ["", f"mean accuracy on the generator left out: {fmt(result['mean_held_out'])}"]
    else:
        lines += ["", f"mean in-distribution (diagonal): {fmt(result.get('mean_in_distribution'))}; "
                      f"mean cross-generator (off-diagonal): {fmt(result.get('mean_cross'))}"]
    lines += ["", f"![heatmap]({Path(png).name})", ""]
    md = stem.with_suffix(".md")
    atomic_write_text(md, "\n".join(lines))
    return {"json": str(stem.with_suffix(".json")), "markdown": str(md), "png": str(png)}


def _cross_results(out: Path, results: dict) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for f in sorted((out / "cross").glob("*.json")):
        try:
            r = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(r, dict) and "matrix" in r and "protocol" in r:
            found[f.stem] = r
    for label, r in [*(results.get("cross") or {}).items(), *(results.get("leave_one_out") or {}).items()]:
        key = slug(label, default="model") + ("-loo" if r.get("protocol") == "leave-one-out" else "")
        found.setdefault(key, r)
    return found


def unseen_generators_table(cross: dict[str, dict]) -> tuple[list[str], list[list]] | None:
    """The "Unseen generators" table from the leave-one-out results: one row per model, its accuracy
    (and ROC-AUC) on each generator when trained on all the others, and the mean over the N runs."""
    loo = [r for r in cross.values() if r.get("protocol") == "leave-one-out"]
    if not loo:
        return None
    gens = list(loo[0]["test"])
    rows = []
    for r in loo:
        acc = r.get("held_out", {})
        auc = r.get("held_out_roc_auc", {})
        rows.append([r["model"], *(f"{fmt(acc.get(g))} / {fmt(auc.get(g))}" for g in gens),
                     f"{fmt(r.get('mean_held_out'))} / {fmt(r.get('mean_held_out_roc_auc'))}"])
    return ["model (accuracy / ROC-AUC)", *gens, "mean"], rows


# --- the report -----------------------------------------------------------------------------------

def _threshold_text(cfg: dict) -> str:
    if cfg.get("calibrate") is not None:
        c = cfg.get("calibrate_confidence", 0.0)
        rule = (f"at most {cfg['calibrate']:g} on new images like the run's held-out training images, with {c:g} "
                f"confidence (Clopper–Pearson rule)" if c else
                f"{cfg['calibrate']:g} on the run's held-out training images (empirical quantile, no promise)")
        return f"each run's calibrated one (temperature scaling and a threshold for a false-positive rate of {rule})"
    return "each run's calibrated one where it has a calibration.json, else 0.5"


@dataclass(frozen=True)
class _Report:
    """What every section of the report reads: the document it adds to and the benchmark's results."""

    doc: Doc
    out: Path
    figs: Path
    results: dict
    models: dict
    cfg: dict
    gens: list
    split: str
    multi: bool
    plots: ModuleType


def write_report(out: str | os.PathLike, results: dict | None = None,
                 samples: list[tuple[str, list[np.ndarray]]] | None = None) -> dict:
    """Write ``out/report.md`` and ``out/report.html`` (and ``out/figures/*.png``); return their paths.

    ``samples``: the sample grid's rows ``(label, [HxWx3 uint8 images])``, handed over by the study
    (the report reads no dataset itself)."""
    out = Path(out)
    if results is None:
        results = json.loads((out / "results.json").read_text())
    r = _report(out, results)
    _header(r)
    if r.models:
        _results_tables(r)
        _real_photos(r)
        _costs(r)
        _per_generator(r)
        _curves(r)
    _samples(r, samples)
    _galleries(r)
    _shortcut(r)
    _degradations(r)
    cross = _cross_results(out, results)
    _cross(r, cross)
    _unseen(r, cross)
    _robustness(r)
    _precision_check(r)
    if r.models:
        _run_dirs(r)
    md, page = out / "report.md", out / "report.html"
    atomic_write_text(md, r.doc.markdown())
    atomic_write_text(page, r.doc.html("fakescope benchmark"))
    return {"markdown": str(md), "html": str(page), "figures": str(r.figs)}


def _report(out: Path, results: dict) -> _Report:

    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    cfg = results.get("config", {})
    return _Report(doc=Doc(out), out=out, figs=figs, results=results, models=results.get("models", {}), cfg=cfg,
                   gens=results.get("data", {}).get("generators") or cfg.get("generators") or [],
                   split=results.get("data", {}).get("split", cfg.get("split", "val")),
                   multi=len(cfg.get("seeds", [0])) > 1, plots=plots)


def _header(r: _Report) -> None:
    """Title, data, seeds, epochs and threshold; with several seeds, how to read the intervals."""
    cfg, doc = r.cfg, r.doc
    doc.heading(1, "fakescope benchmark")
    seeds = ", ".join(map(str, cfg.get("seeds", [])))
    roots = cfg.get("data")
    roots = " + ".join(f"`{x}`" for x in roots) if isinstance(roots, list) else f"`{roots}`"
    doc.para(f"Data: {roots} — generators: {', '.join(r.gens)}; trained on the train split of all "
             f"selected generators, evaluated on the {r.split} split. Seeds: {seeds}; "
             f"epochs: {cfg.get('epochs')}; threshold "
             f"{cfg.get('threshold') if cfg.get('threshold') is not None else _threshold_text(cfg)}.")
    if r.multi:
        n = len(cfg.get("seeds", []))
        doc.para(f"With several seeds each figure is mean ± sample std [95 % Student t-interval of the mean over "
                 f"the {n} seeds]" + (f"; with n = {n} < 5 seeds the interval is wide and assumes normally "
                                      f"distributed per-seed figures" if n < 5 else "") + ".", note=True)


def _results_tables(r: _Report) -> None:
    """The headline metrics, then calibration and operating points, one row per model."""
    doc, models = r.doc, r.models
    doc.heading(2, "Results")
    doc.table(["model", *(_TITLES[c] for c in STUDY_COLUMNS)],
              [[label, *(m["overall"].get(c) for c in STUDY_COLUMNS)] for label, m in models.items()])
    doc.table(["model", "ECE", "Brier", "TPR at FPR 1 %", "TPR at FPR 5 %", "EER"],
              [[label, *(m["overall"].get(c) for c in ("ece", "brier", "tpr_at_fpr_1pct", "tpr_at_fpr_5pct",
                                                       "eer"))] for label, m in models.items()])
    doc.para("Calibration (ECE over 15 equal-mass bins, Brier score) and operating points: the share of AI "
             "images caught when at most 1 % / 5 % of real images may be called AI, and the equal error rate.",
             note=True)


def _real_photos(r: _Report) -> None:
    """False alarms on the real-photo folder, where the benchmark scored one."""
    photos = {label: m["real_photos"] for label, m in r.models.items() if m.get("real_photos")}
    if not photos:
        return
    doc = r.doc
    folder = next(iter(photos.values()))["folder"]
    doc.heading(3, "False alarms on real photos")
    doc.para(f"Every image of `{folder}` (real photos only, any size) scored as `predict` scores it: the "
             f"run's test geometry and its own threshold (first seed). A detector that learned a shortcut "
             f"of its training data (image size, subject) calls many of them AI however well it scores "
             f"above.")
    doc.table(["model", "test geometry", "threshold", "called AI", "n", "false-positive rate", "unreadable"],
              [[label, p["test_geometry"], p["threshold"], p["called_ai"], p["n"], p["fpr"],
                len(p["errors"])] for label, p in photos.items()])


def _costs(r: _Report) -> None:
    """Model sizes, timings and throughput."""
    r.doc.table(["model", "params", "trainable", "input", "epochs run", "data s", "train s", "train img/s",
                 "trained on", "eval img/s", "eval precision"],
                [[label, m.get("params"), m.get("trainable_params"), m.get("input_size"), m.get("epochs_run"),
                  measured(m.get("data_seconds")), measured(m.get("train_seconds")),
                  measured(m.get("images_per_second")), str(m.get("input_path")),
                  measured(m.get("eval_images_per_second")), str(m.get("eval_precision"))]
                 for label, m in r.models.items()])
    r.doc.para("data s: decoding the images or extracting a frozen backbone's features before the first epoch; "
               "train s and train img/s: the epochs (on cached features for a frozen backbone).", note=True)


def _per_generator(r: _Report) -> None:
    """One table per metric: models by generator."""
    r.doc.heading(2, "Per generator")
    for metric in ("accuracy", "roc_auc", "real_accuracy", "fake_accuracy"):
        r.doc.para(f"{_TITLES[metric]} per generator:")
        r.doc.table(["model", *r.gens], [[label, *(m["per_generator"].get(g, {}).get(metric) for g in r.gens)]
                                         for label, m in r.models.items()])


def _curves(r: _Report) -> None:
    """The ROC curves of all models (first seed's scores) and each model's confusion matrix."""
    P, figs, multi = r.plots, r.figs, r.multi
    curves = {}
    for label, m in r.models.items():
        s = read_scores(m["runs"][0].get("figures", "")) if m.get("runs") else None
        if s is not None:
            curves[label] = s
    roc = P.roc_plot(curves, figs / "roc.png", title=f"ROC on {r.split}") if curves else None
    conf = [(P.confusion_plot(_confusion(m["overall"]["confusion"]), figs / f"confusion-{slug(label)}.png",
                              title=label + (" (seeds summed)" if multi else "")), f"confusion matrix: {label}")
            for label, m in r.models.items()]
    r.doc.heading(2, "ROC curves and confusion matrices")
    r.doc.figures([(roc, "ROC curves of all models" + (" (first seed)" if multi else ""))])
    r.doc.figures(conf)


def _samples(r: _Report, samples: list[tuple[str, list[np.ndarray]]] | None) -> None:
    """The sample grid the study handed over."""
    sample = r.plots.image_grid(samples, r.figs / "samples.png", title="samples") if samples else None
    if sample:
        r.doc.heading(2, "Sample images")
        r.doc.figures([(sample, f"samples of the {r.split} split per generator and class")])


def _galleries(r: _Report) -> None:
    """Each model's Grad-CAM gallery of right and wrong calls."""
    galleries = [(m.get("gallery"), f"{label}: correct and wrong examples per class, Grad-CAM overlay")
                 for label, m in r.models.items() if m.get("gallery")]
    if galleries:
        r.doc.heading(2, "What the model looks at")
        r.doc.para("Grad-CAM on each model's last convolutional stage (first seed): red regions pushed the score "
                   "toward AI. A few of the most confident right and wrong calls per class, at the threshold used "
                   "for the results above.")
        r.doc.figures(galleries)


def _shortcut(r: _Report) -> None:
    """Accuracy with every image JPEG-aligned: evaluated aligned and, where run, trained aligned too."""
    models = r.models
    shortcut = {label: m["shortcut"] for label, m in models.items() if m.get("shortcut")}
    if not shortcut:
        return
    q = next(iter(shortcut.values()))["jpeg_align"]
    r.doc.heading(2, "Shortcut control: JPEG alignment")
    r.doc.para(f"Every image of both classes re-encoded as JPEG at quality {q} before the model sees it. A large "
               f"drop from the first column to the second means the detector relied on the file format "
               f"(e.g. GenImage's JPEG real vs PNG AI images) rather than on the generator's traces.")
    trained = any("train_aligned" in s for s in shortcut.values())
    header = ["model", "accuracy", f"accuracy, evaluated aligned (Q={q})", "difference"]
    if trained:
        header += [f"accuracy, trained + evaluated aligned (Q={q})"]
    rows = []
    for label, s in shortcut.items():
        a, b = _mean(models[label]["overall"]["accuracy"]), _mean(s["eval_aligned"]["overall"]["accuracy"])
        row = [label, models[label]["overall"]["accuracy"], s["eval_aligned"]["overall"]["accuracy"],
               None if a is None or b is None else b - a]
        if trained:
            row.append(s.get("train_aligned", {}).get("overall", {}).get("accuracy"))
        rows.append(row)
    r.doc.table(header, rows)


def _degradations(r: _Report) -> None:
    """Accuracy under each degradation kind: a table and a curve per kind."""
    kinds: dict[str, dict] = {}
    for label, m in r.models.items():
        for kind, rows in (m.get("degradations") or {}).items():
            kinds.setdefault(kind, {})[label] = rows
    if not kinds:
        return
    r.doc.heading(2, "Degradations")
    r.doc.para("Accuracy under each degradation of the evaluation images (JPEG re-compression, Gaussian blur, "
               "down-scaling); the per-run figures also show ROC-AUC.")
    r.doc.figures([_degradation(r, kind, per_model) for kind, per_model in kinds.items()])


def _degradation(r: _Report, kind: str, per_model: dict[str, list]) -> tuple[str, str]:
    """One degradation kind's table (added to the report) and its curve (returned as a figure)."""
    models = r.models
    levels = [row["level"] for row in next(iter(per_model.values()))]
    r.doc.para(f"{_KIND_LABEL.get(kind, kind)}:")
    r.doc.table(["model", "clean", *(f"{kind} {lv:g}" for lv in levels)],
                [[label, models[label]["overall"]["accuracy"], *(row["overall"]["accuracy"] for row in rows)]
                 for label, rows in per_model.items()])
    xs, series = list(levels), {label: [_mean(row["overall"]["accuracy"]) for row in rows]
                                for label, rows in per_model.items()}
    clean = IDENTITY_LEVEL.get(kind)
    if clean is not None and clean not in xs:  # the clean images as the identity level
        xs = [clean, *xs]
        series = {label: [_mean(models[label]["overall"]["accuracy"]), *ys] for label, ys in series.items()}
    path = r.plots.curve_plot(xs, series, r.figs / f"degrade-{kind}.png",
                              xlabel=_KIND_LABEL.get(kind, kind), ylabel="accuracy", title=f"accuracy under {kind}",
                              invert_x=kind in ("jpeg", "resize"))
    return path, f"accuracy under {kind}"


def _cross(r: _Report, cross: dict[str, dict]) -> None:
    """Each cross-generator or leave-one-out matrix: table, summary line and heatmap."""
    if not cross:
        return
    doc = r.doc
    doc.heading(2, "Cross-generator generalisation")
    doc.para("GenImage's protocol: train on each generator alone and test on every generator (rows: training "
             "generator, columns: test generator, last column: row average); leave-one-out: train on all "
             "generators but one, test on every generator (the diagonal is the generator left out).")
    for key, c in cross.items():
        doc.heading(3, f"{c['model']} ({c['protocol']})")
        header, rows = cross_tables(c)
        doc.table(header, rows)
        if "mean_held_out" in c:
            doc.para(f"mean accuracy on the generator left out: {fmt(c['mean_held_out'])}")
        else:
            doc.para(f"mean in-distribution (diagonal): {fmt(c.get('mean_in_distribution'))}; mean "
                     f"cross-generator (off-diagonal): {fmt(c.get('mean_cross'))}")
        doc.figures([(c.get("outputs", {}).get("png") or str(r.out / "cross" / f"{key}.png"),
                      f"cross-generator accuracy: {c['model']}")])


def _unseen(r: _Report, cross: dict[str, dict]) -> None:
    """The leave-one-out summary: accuracy on the generator each model never saw."""
    unseen = unseen_generators_table(cross) if cross else None
    if unseen:
        r.doc.heading(2, "Unseen generators")
        r.doc.para("Leave one generator out: each model is trained on every generator but one and tested on the one "
                   "left out (accuracy / ROC-AUC on that generator's images; mean over the N runs). This is what to "
                   "expect against a generator the detector has never seen.")
        r.doc.table(*unseen)


def _robustness(r: _Report) -> None:
    """Robust accuracy per eps, overall and for evasion (AI images pushed to look real), and its curve."""
    robust = {label: m["robustness"] for label, m in r.models.items() if m.get("robustness")}
    if not robust:
        return
    doc = r.doc
    first = next(iter(robust.values()))
    doc.heading(2, "Adversarial robustness")
    doc.para(f"Robust accuracy under {first['attack']} (white-box unless Square; every image counts, a clean "
             f"mistake stays wrong; first seed, {first['n']} images). Compare normally and adversarially "
             f"trained models (models with `adv_train: pgd`).")
    eps_labels = [f"{e * 255:g}/255" for e in first["eps"]]
    doc.table(["model", *(f"ε {e}" for e in eps_labels)],
              [[label, *a["robust_accuracy"]] for label, a in robust.items()])
    doc.para("AI images pushed to look real (evasion), robust accuracy:")
    doc.table(["model", *(f"ε {e}" for e in eps_labels)],
              [[label, *a["per_direction"]["ai-to-real"]] for label, a in robust.items()])
    path = r.plots.curve_plot([e * 255 for e in first["eps"]],
                              {label: a["robust_accuracy"] for label, a in robust.items()}, r.figs / "robustness.png",
                              xlabel="eps (x 1/255)", ylabel="robust accuracy",
                              title=f"{first['attack']}: robust accuracy")
    doc.figures([(path, "robust accuracy versus eps")])


def _precision_check(r: _Report) -> None:
    """fp32 against bf16 scores of the same run."""
    checks = {label: m["precision_check"] for label, m in r.models.items() if m.get("precision_check")}
    if checks:
        r.doc.heading(2, "Numerical precision: fp32 vs bf16")
        r.doc.para("The same run scores the evaluation images in fp32 and in bf16 (first seed): share of identical "
                   "verdicts and the largest change of P(ai).")
        r.doc.table(["model", "agreement", "max abs Δp", "mean abs Δp", "n"],
                    [[label, c.get("agreement"), c.get("max_abs_diff"), c.get("mean_abs_diff"), c.get("n")]
                     if "skipped" not in c else [label, "—", "—", "—", c["skipped"]] for label, c in checks.items()])


def _run_dirs(r: _Report) -> None:
    """Where each model's runs and their evaluations are."""
    r.doc.heading(2, "Run directories")
    r.doc.para("Each is a normal run: `fakescope evaluate RUN --data ROOT` and `fakescope predict RUN FILES` "
               "accept it.")
    r.doc.table(["model", "seed", "run", "evaluation"],
                [[label, str(x["seed"]), os.path.relpath(x["dir"], r.out), os.path.relpath(x["eval"], r.out)]
                 for label, m in r.models.items() for x in m.get("runs", [])])
