"""Explanations: Grad-CAM heat maps of the regions that pushed a detector's score toward AI.

Grad-CAM (Selvaraju et al. 2017) weights a convolutional feature map by the gradient of the
ai-logit (``z`` for one logit, ``z_ai - z_nature`` for two) and keeps the positive part: bright
regions raised P(ai). It is computed by Captum's ``LayerGradCam`` (a maintained library that takes
any forward function, so the ai-logit of both head types fits, and that changes neither the
model's mode nor its gradients' storage).

The layer is picked automatically: the last module, in execution order, whose output is a 4-D
feature map larger than 1x1 and that is not a pooling layer — the last convolutional stage (for
cnn32 the ReLU after the third convolution, 8x8; for timm CNNs the final conv/BN-activation block,
e.g. ``backbone.bn2`` of EfficientNet, ``backbone.layer4`` of ResNet; override with ``layer=``).
Vision transformers have no such map: their tokens are 3-D, and :func:`find_target_layer` says so
(attention rollout, or Grad-CAM on the last block's tokens reshaped to the patch grid, is the usual
choice there; not implemented).

The model sees the centre square of each image (shorter side, then the native and input sizes); the
heat map is returned at the original image's size, zero outside that square (``seen_box``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fakescope.calibration import resolve_decision
from fakescope.data.io import DEFAULT_MAX_PIXELS, list_images, read_image
from fakescope.data.layout import index_root, limit_per_class
from fakescope.data.transforms import Pipeline
from fakescope.engine import runtime
from fakescope.engine.checkpoint import load_run
from fakescope.engine.evaluation import geometry_for, max_side_for, native_size_for, prepare
from fakescope.engine.infer import score_files
from fakescope.errors import FakescopeError, ImageReadError
from fakescope.options import RuntimeOptions

_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d)


def find_target_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """``(name, module)`` of the last convolutional stage (see the module docstring)."""
    size = model.preprocess.input_size
    order: list[tuple[str, nn.Module]] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = []

    tokens_after = []

    def hook(mod, _inp, out):
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] > 1 and out.shape[-2] > 1 \
                and not isinstance(mod, _POOLS) and mod is not model:
            order.append((names[mod], mod))
            tokens_after.clear()
        elif isinstance(out, torch.Tensor) and out.dim() == 3:
            tokens_after.append(names[mod])

    for m in model.modules():
        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), _eval_mode(model):
            model(torch.zeros(1, 3, size, size, device=_device(model)))
    finally:
        for h in hooks:
            h.remove()
    if not order or tokens_after:  # a ViT: its only 4-D map is the patch embedding, then 3-D tokens
        raise FakescopeError(f"expected a model whose last stage is a convolutional feature map for Grad-CAM, "
                             f"got {getattr(model, 'backbone_name', type(model).__name__)}, whose last stage "
                             f"works on 3-D tokens (a vision transformer: attention rollout, or Grad-CAM on the "
                             f"last block's tokens reshaped to the patch grid, is the usual choice; not "
                             f"implemented here)")
    return order[-1]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _eval_mode:  # noqa: N801 - used like a function
    """Eval mode inside, every module's own training flag restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self

    def __exit__(self, *exc) -> None:
        for m, flag in self.flags:
            m.training = flag


def gradcam(model: nn.Module, x: torch.Tensor, layer: nn.Module | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(heat [B, S, S] in [0, 1], cam_max [B])`` for images ``x`` ``[B, 3, S, S]`` in [0, 1].

    Each map is divided by its own maximum (``cam_max``, 0 when nothing pushed toward AI: then the
    map is all zeros). The model's mode, weights and ``requires_grad`` flags are left as they were."""
    from captum.attr import LayerAttribution, LayerGradCam

    if layer is None:
        layer = find_target_layer(model)[1]
    elif isinstance(layer, str):
        modules = dict(model.named_modules())
        if layer not in modules:
            raise FakescopeError(f"expected a layer name of the model (e.g. {find_target_layer(model)[0]}), "
                                 f"got {layer!r}")
        layer = modules[layer]
    dev = _device(model)
    inp = x.detach().to(dev).float().clone().requires_grad_(True)  # gradients reach a frozen backbone's maps

    def ai_logit(t):
        return model.ai_logit(model(t))

    with _eval_mode(model), torch.enable_grad():
        cam = LayerGradCam(ai_logit, layer).attribute(inp, relu_attributions=True)
        cam = LayerAttribution.interpolate(cam.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")
    cam = cam[:, 0].clamp_min(0).cpu().double().numpy()
    peak = cam.reshape(len(cam), -1).max(1)
    heat = np.divide(cam, peak[:, None, None], out=np.zeros_like(cam), where=peak[:, None, None] > 0)
    return heat, peak


def seen_box(h: int, w: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the centre square the model sees (fakescope's ``fit``)."""
    side = min(h, w)
    left, top = int(round((w - side) / 2.0)), int(round((h - side) / 2.0))
    return left, top, left + side, top + side


def to_image_size(heat: np.ndarray, h: int, w: int) -> np.ndarray:
    """A square heat map -> ``[h, w]``: resized onto the centre square, zero outside it."""
    left, top, right, bottom = seen_box(h, w)
    t = torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float32))[None, None]
    sq = torch.nn.functional.interpolate(t, size=(bottom - top, right - left), mode="bilinear", align_corners=False)
    out = np.zeros((h, w), dtype=np.float32)
    out[top:bottom, left:right] = sq[0, 0].clamp(0, 1).numpy()
    return out


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5,
            box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """RGB ``uint8 [H, W, 3]`` image with the heat map (``[H, W]`` in [0, 1]) blended in as a colour map;
    alpha grows with the heat so cold regions stay visible. Outside ``box`` (what the model never saw)
    the image is dimmed and left without colour."""
    from matplotlib import colormaps

    colours = colormaps["jet"](heat)[..., :3]
    a = (alpha * (0.25 + 0.75 * heat))[..., None]
    img = image.astype(np.float64) / 255.0
    out = (1 - a) * img + a * colours
    if box is not None:
        left, top, right, bottom = box
        seen = np.zeros(heat.shape, dtype=bool)
        seen[top:bottom, left:right] = True
        out[~seen] = 0.35 * img[~seen]
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


EXPLAIN_RUNTIME = RuntimeOptions(device="cpu")
"""``explain``'s runtime options when none are given: the CPU (its ``--device`` default)."""


def explain_files(run_dir: str | os.PathLike, paths: list[str], *,
                  method: str = "gradcam", layer: str | None = None, threshold: float | None = None,
                  uncalibrated: bool = False, native_size=None, runtime_options: RuntimeOptions | None = None) -> dict:
    """Grad-CAM overlays of image files, as data (nothing is written: see
    :func:`fakescope.report.artifacts.write_explanation`). ``runtime_options`` (default
    :data:`EXPLAIN_RUNTIME`): the device and the pixel limit (the model runs in fp32, one image at a time).

    Returns ``{"method", "layer", "model", "run", "threshold", "images": [{"path", "name", "p_ai",
    "verdict", "overlay_image" (HxWx3 uint8 at the image's size), "seen_box", "cam_max", "peak_xy"}
    | {"path", "error"}]}``."""
    if method != "gradcam":
        raise FakescopeError(f"expected --method gradcam, got {method!r}")
    options = runtime_options if runtime_options is not None else EXPLAIN_RUNTIME
    decision = resolve_decision(run_dir, threshold, uncalibrated)
    model, config = load_run(run_dir)
    dev = runtime.resolve_device(options.device)
    model.to(dev)
    name, target = _explained_layer(model, layer)
    pipeline = _explain_pipeline(config, model, native_size)
    rows: list[dict] = [{"path": p, "error": "file not found"} for p in paths if not os.path.lexists(p)]
    used: set[str] = set()
    for f in list_images([p for p in paths if os.path.lexists(p)]):
        try:
            img = read_image(f, max_pixels=options.max_pixels or DEFAULT_MAX_PIXELS)
        except ImageReadError as e:
            rows.append({"path": f, "error": e.reason})
            continue
        rows.append(_explain_image(model, target, pipeline, dev, decision, f, img, used))
    return {"method": method, "layer": name, "model": config["model"]["name"], "run": str(Path(run_dir).resolve()),
            "threshold": decision.to_dict(), "images": rows}


def _explained_layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Module]:
    """``(name, module)`` of the layer to explain: ``layer`` when given (it must name a module of the
    model), else :func:`find_target_layer`'s."""
    name, target = (layer, None) if layer else find_target_layer(model)
    if target is None:
        target = dict(model.named_modules()).get(layer)
        if target is None:
            raise FakescopeError(f"expected a layer name of the model (e.g. {find_target_layer(model)[0]}), "
                                 f"got {layer!r}")
    return name, target


def _explain_pipeline(config: dict, model, native_size) -> Pipeline:
    """The run's test-time pipeline with one input per image: ``crops`` is explained on the centre one."""
    geometry = geometry_for(config, model, None)
    return Pipeline(model.preprocess.input_size, native_size_for(config, native_size),
                    config.get("train", {}).get("jpeg_align"),
                    geometry="center_crop" if geometry == "crops" else geometry,
                    max_side=max_side_for(config, None))


def _unique_name(stem: str, used: set[str]) -> str:
    """``stem``, or ``stem-2``, ``stem-3``... when taken (two inputs with the same name in different
    folders); the name returned is added to ``used``."""
    base = stem
    k = 1
    while base in used:
        k += 1
        base = f"{stem}-{k}"
    used.add(base)
    return base


def _explain_image(model, target: nn.Module, pipeline: Pipeline, dev, decision, f: str, img: torch.Tensor,
                   used: set[str]) -> dict:
    """One image's row: its score and verdict, and the Grad-CAM overlay at the image's size."""
    x = pipeline(img).float().div(255)[None].to(dev)
    with torch.no_grad(), _eval_mode(model):
        p_raw = model.p_ai(model(x)).cpu().numpy()
    p = float(decision.p_ai(p_raw)[0])
    heat_s, peak = gradcam(model, x, target)
    h, w = img.shape[-2:]
    heat = to_image_size(heat_s[0], h, w)
    base = _unique_name(Path(f).stem, used)
    py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return {"path": f, "name": base, "p_ai": round(p, 6),
            "verdict": "ai" if p >= decision.threshold else "nature",
            "overlay_image": overlay(img.permute(1, 2, 0).numpy(), heat, box=seen_box(h, w)),
            "seen_box": list(seen_box(h, w)), "cam_max": float(peak[0]),
            "peak_xy": [int(px), int(py)] if peak[0] > 0 else None}


GALLERY_KINDS = (("ai", True), ("ai", False), ("nature", True), ("nature", False))


def gallery(run_dir: str | os.PathLike, data: str | os.PathLike, *, split: str = "val",
            generators=None, per_kind: int = 2, pool: int = 24, threshold: float | None = None,
            uncalibrated: bool = False, runtime_options: RuntimeOptions | None = None) -> dict:
    """"What the model looks at": Grad-CAM overlays of a few correct and wrong examples per class.

    Scores ``pool`` images per generator and class of ``data``'s ``split`` (chosen by path hash), then
    explains the ``per_kind`` most confident ones of each kind (AI caught, AI missed, real passed, real
    flagged). Returns data (``items`` with their ``overlay_image``, ``grid``, a captioned grid for
    :func:`fakescope.report.plots.gallery_plot`, and ``title``); nothing is written: see
    :func:`fakescope.report.artifacts.write_gallery`. ``runtime_options`` (default :data:`EXPLAIN_RUNTIME`):
    the device and the pixel limit (the pool is scored in fp32, without the feature cache)."""
    decision = resolve_decision(run_dir, threshold, uncalibrated)
    index = limit_per_class(index_root(data).select(generators, split), pool)
    files = [index.abspath(i) for i in range(len(index))]
    options = runtime_options if runtime_options is not None else EXPLAIN_RUNTIME
    model, config, pipeline, rt = prepare(run_dir, RuntimeOptions(device=options.device, precision="fp32",
                                                                  max_pixels=options.max_pixels))
    p, _ = score_files(model, files, pipeline, rt.replace(use_cache=False), desc="gallery")
    p = decision.p_ai(p)
    labels = np.asarray(index.labels)
    chosen: list[tuple[str, bool, int]] = []
    for cls, correct in GALLERY_KINDS:
        y = 1 if cls == "ai" else 0
        pred = p >= decision.threshold
        ok = ~np.isnan(p) & (labels == y) & ((pred == bool(y)) == correct)
        idx = np.flatnonzero(ok)
        conf = p[idx] if (y == 1) == correct else -p[idx]  # most confident in the (right or wrong) verdict
        chosen += [(cls, correct, int(i)) for i in idx[np.argsort(-conf, kind="stable")][:per_kind]]
    res = explain_files(run_dir, [files[i] for _, _, i in chosen], threshold=threshold, uncalibrated=uncalibrated,
                        runtime_options=options) if chosen else {"images": [], "layer": None}
    items = []
    for (cls, correct, i), row in zip(chosen, res["images"]):
        items.append({**row, "label": cls, "correct": correct, "generator": index.generators[i]})
    names = {("ai", True): "AI, caught", ("ai", False): "AI, missed", ("nature", True): "real, passed",
             ("nature", False): "real, flagged"}
    grid = []
    for kind in GALLERY_KINDS:
        row = [it for it in items if (it["label"], it["correct"]) == kind and "overlay_image" in it]
        if row:
            grid.append((names[kind], [(it["overlay_image"], f"p_ai {it['p_ai']:.3f} ({it['generator']})")
                                       for it in row]))
    return {"layer": res["layer"], "threshold": decision.to_dict(), "items": items, "grid": grid,
            "title": f"Grad-CAM ({res['layer']}): red = pushed toward AI; threshold {decision.threshold:.3g}",
            "data": {"root": index.root, "split": split, "pool_per_class": pool}}
