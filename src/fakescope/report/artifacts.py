"""Every file an evaluation or an attack leaves behind, written in one place.

The engines (:func:`fakescope.engine.evaluation.evaluate_run`, :func:`fakescope.engine.attack.attack_run`)
return data; the commands and the study call these functions to write the JSON, the figures and
``scores.npz``. Every file is written atomically, and only by rank 0 under torchrun (the other ranks
get the same paths back and write nothing). Matplotlib is used through its Agg canvas only, so
writing figures never changes the process's backend (see :mod:`fakescope.report.plots`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from fakescope import ranks
from fakescope import runfiles as rf
from fakescope.calibration import write_calibration
from fakescope.choices import ONE_CLASS_DIRECTIONS
from fakescope.report import plots as P
from fakescope.report.plots import curve_plot, gallery_plot
from fakescope.runfiles import calibration_path
from fakescope.utils import atomic_write_bytes, slug, write_json

DEGRADE_XLABEL = {"jpeg": "JPEG quality", "blur": "blur sigma", "resize": "scale factor"}


def root_slug(data_root: str | os.PathLike) -> str:
    """The data root's folder name as a file-name part (``/data/GenImage/`` -> ``GenImage``); several
    roots: their names joined by ``+``."""
    if not isinstance(data_root, (str, os.PathLike)):
        return "+".join(root_slug(r) for r in data_root)
    return slug(Path(os.path.abspath(os.fspath(data_root))).name, default="root")


def eval_folder(run_dir: str | os.PathLike, data_root: str | os.PathLike, split: str,
                jpeg_align: int | None = None) -> Path:
    """``RUN/eval-<root>-<split>[-jpegQ]``: one folder per data root and split, so evaluating a run on a
    second data root does not overwrite the first one's figures and scores."""
    tag = f"-jpeg{jpeg_align}" if jpeg_align is not None else ""
    return Path(run_dir) / f"eval-{root_slug(data_root)}-{split}{tag}"


def attack_folder(run_dir: str | os.PathLike, attack: str) -> Path:
    return Path(run_dir) / f"attack-{attack}"


def without_arrays(result: dict) -> dict:
    """The JSON part of an engine's result (``scores`` and ``examples`` are arrays, written apart)."""
    return {k: v for k, v in result.items() if k not in ("scores", "examples")}


def _savez(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def write_evaluation(result: dict, folder: str | os.PathLike, json_path: str | os.PathLike | None = None, *,
                     figures: bool = True) -> dict:
    """Write an evaluation into ``folder``: ``metrics.json`` (or ``json_path``), ``scores.npz``
    (per-image labels, P(ai) — calibrated when the run is, with the raw ``p_ai_raw`` beside it —,
    generators, files and the data root), ``roc.png``, ``confusion.png``, ``reliability.png``,
    ``attribution-confusion.png`` for an attribution run, and one ``degrade-<kind>.png`` per
    degradation (``figures=False``: the JSON and scores only).
    Returns the paths written (``outputs``, also stored in the JSON); ``result`` is not changed and
    nothing else is written (a caller that keeps a model card refreshes it, see :func:`in_run`)."""
    folder = Path(folder)
    json_path = Path(json_path) if json_path else folder / rf.EVAL_METRICS
    outputs = {"json": str(json_path), "folder": str(folder)}
    if not ranks.is_main():
        return outputs
    scores = result.get("scores")
    if scores is not None:
        extra = {"p_ai_raw": np.asarray(scores["p_ai_raw"])} if "p_ai_raw" in scores else {}
        _savez(folder / "scores.npz", labels=np.asarray(scores["labels"]), p_ai=np.asarray(scores["p_ai"]), **extra,
               generators=np.asarray(scores["generators"]).astype(str), files=np.asarray(scores["files"]).astype(str),
               data_root=np.asarray(result.get("data", {}).get("root", "")))
        outputs["scores"] = str(folder / "scores.npz")
    if figures and scores is not None:

        name = result["model"]["name"]
        labels, p, gens = (np.asarray(scores[k]) for k in ("labels", "p_ai", "generators"))
        curves = {"all": (labels, p)}
        for g in sorted(set(gens.tolist())):
            curves[g] = (labels[gens == g], p[gens == g])
        P.roc_plot(curves, folder / "roc.png", title=f"ROC — {name}")
        P.confusion_plot(result["overall"]["confusion"], folder / "confusion.png", title=name)
        rel = {"calibrated" if result.get("calibrated") else "p_ai": (labels, p)}
        if result.get("calibrated") and "p_ai_raw" in scores:
            rel["raw"] = (labels, np.asarray(scores["p_ai_raw"]))
        P.reliability_plot(rel, folder / "reliability.png", title=f"reliability — {name}")
        if result.get("attribution"):
            att = result["attribution"]
            outputs["attribution_confusion"] = P.confusion_plot(
                att["confusion"], folder / "attribution-confusion.png", classes=att["classes"],
                title=f"{name}: attribution (macro F1 {att['macro_f1']:.3f})" if att["macro_f1"] is not None else name)
        for kind, rows in result.get("degradations", {}).items():
            P.curve_plot([r["level"] for r in rows], {
                "accuracy": [r["overall"]["accuracy"] for r in rows],
                "roc_auc": [r["overall"]["roc_auc"] for r in rows]}, folder / f"degrade-{kind}.png",
                xlabel=DEGRADE_XLABEL[kind], ylabel="score", title=f"{name} under {kind}",
                invert_x=kind in ("jpeg", "resize"))
    write_json(json_path, {**without_arrays(result), "outputs": outputs})
    return outputs


def in_run(json_path: str | os.PathLike, run_dir: str | os.PathLike) -> bool:
    """True when ``json_path`` is an evaluation the run's model card lists (``RUN/<folder>/metrics.json``)."""
    json_path = Path(json_path)
    return json_path.name == rf.EVAL_METRICS and json_path.resolve().parent.parent == Path(run_dir).resolve()


def read_scores(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray] | None:
    """``(labels, p_ai)`` from an evaluation folder's ``scores.npz`` (None when absent)."""
    f = Path(folder) / "scores.npz"
    if not f.is_file():
        return None
    with np.load(f, allow_pickle=False) as z:
        return z["labels"], z["p_ai"]


def write_examples(examples: list[dict], folder: str | os.PathLike) -> list[str]:
    """Clean and adversarial example images of an attack: ``{i:04d}_eps{eps:.4f}_clean.png`` and
    ``..._adv.png`` per example (8-bit PNGs, so rounded)."""
    from PIL import Image

    paths: list[str] = []
    if not ranks.is_main():
        return paths
    folder = Path(folder)
    for ex in examples:
        stem = f"{ex['index']:04d}_eps{ex['eps']:.4f}"
        for part in ("clean", "adv"):
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(ex[part])).save(buf, format="PNG")
            atomic_write_bytes(folder / f"{stem}_{part}.png", buf.getvalue())
            paths.append(str(folder / f"{stem}_{part}.png"))
    return paths


def write_attack(result: dict, folder: str | os.PathLike, json_path: str | os.PathLike | None = None, *,
                 examples_dir: str | os.PathLike | None = None) -> dict:
    """Write an attack's ``attack.json`` (or ``json_path``) and ``robust_accuracy.png`` into ``folder``, and
    its example images (``result["examples"]``) into ``examples_dir``. Sets and returns ``result["outputs"]``."""
    folder = Path(folder)
    json_path = Path(json_path) if json_path else folder / "attack.json"
    plot = folder / "robust_accuracy.png"
    outputs = {"json": str(json_path), "plot": str(plot)}
    if examples_dir is not None:
        outputs["examples"] = str(examples_dir)
    result["outputs"] = outputs
    if not ranks.is_main():
        return outputs

    eps = [r["eps"] for r in result["results"]]
    series = {"robust accuracy": [r["robust_accuracy"] for r in result["results"]]}
    for d in ONE_CLASS_DIRECTIONS:
        vals = [r.get("per_direction", {}).get(d, {}).get("robust_accuracy") for r in result["results"]]
        if any(v is not None for v in vals):
            series[d] = vals
    l2 = result["attack"] == "pgd-l2"
    curve_plot([e * 255 for e in eps], series, plot, xlabel="eps (L2, x 1/255)" if l2 else "eps (x 1/255)",
               ylabel="accuracy", title=f"{result['attack']} on {result['model']['name']}")
    if examples_dir is not None:
        write_examples(result.get("examples") or [], examples_dir)
    write_json(json_path, without_arrays(result))
    return outputs


def write_calibration_files(run_dir: str | os.PathLike, calibration) -> dict:
    """Store a :class:`fakescope.calibration.Calibration` in its run: ``calibration.json`` (atomic), and
    nothing else (the caller refreshes the model card, :func:`fakescope.report.model_card.refresh_model_card`,
    which reads only the run's files). Returns its path (rank 0 writes; the others only get the path)."""
    paths = {"calibration": str(calibration_path(run_dir))}
    if ranks.is_main():
        write_calibration(run_dir, calibration)
    return paths


def write_explanation(result: dict, folder: str | os.PathLike) -> dict:
    """``<name>.gradcam.png`` overlays and ``explain.json`` for :func:`fakescope.explain.explain_files`'s
    result; returns the JSON written (each image's ``overlay`` is its PNG's path)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for row in result["images"]:
        row = dict(row)
        pixels = row.pop("overlay_image", None)
        if pixels is not None:
            png = folder / f"{row.pop('name')}.gradcam.png"
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "PNG")
            atomic_write_bytes(png, buf.getvalue())
            row["overlay"] = str(png)
        images.append(row)
    out = {**result, "images": images}
    write_json(folder / "explain.json", out)
    return out


def write_gallery(result: dict, folder: str | os.PathLike) -> dict:
    """``gallery.png`` (the captioned grid), the overlays (``overlays/``) and ``gallery.json`` for
    :func:`fakescope.explain.gallery`'s result; returns the JSON written (``png``: the grid's path or None)."""
    folder = Path(folder)
    written = write_explanation({"images": result["items"]}, folder / "overlays")["images"]
    png = gallery_plot(result["grid"], folder / "gallery.png", title=result["title"]) if result["grid"] else None
    out = {"png": png, **{k: v for k, v in result.items() if k not in ("items", "grid", "title")}, "items": written}
    write_json(folder / "gallery.json", out)
    return out
