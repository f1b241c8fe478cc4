"""Robustness evaluation: run one attack over a data set at several eps and count what it breaks.

``robustness(model, batches, attack="pgd", eps_list=[0, 1/255, 8/255])`` iterates ``batches``
once; for each batch it predicts the clean images, then attacks the images in scope (by
``direction``) at every eps and predicts the adversarial ones. Counts are integers summed over
batches, so eps = 0 (never attacked: the clean predictions are reused) gives exactly the clean
accuracy. With ``source_model`` the examples are crafted on that model and judged by ``model``
(transfer).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from fakescope.attacks.base import Attack, AttackError, check_eps, check_threshold, eval_mode, l2_norms
from fakescope.progress import progress

DIRECTIONS: tuple[str, ...] = ("both", "ai-to-real", "real-to-ai")
_LABEL_OF_DIRECTION = {"ai-to-real": 1, "real-to-ai": 0}


def scope_mask(y: torch.Tensor, direction: str) -> torch.Tensor:
    """Which images ``direction`` attacks: ai (label 1) for ai-to-real, nature (0) for real-to-ai, all for both."""
    if direction not in DIRECTIONS:
        raise AttackError(f"expected direction to be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if direction == "both":
        return torch.ones_like(y, dtype=torch.bool)
    return y == _LABEL_OF_DIRECTION[direction]


def perturb_batch(attack: Attack, x: torch.Tensor, y: torch.Tensor, direction: str = "both") -> torch.Tensor:
    """``x`` with the images in scope of ``direction`` replaced by ``attack``'s adversarial versions;
    the others are returned untouched."""
    mask = scope_mask(y, direction)
    x_adv = x.detach().clone()
    if bool(mask.any()):
        x_adv[mask] = attack(x[mask], y[mask])
    return x_adv


class _Tally:
    """Integer counts for one group of images at one eps."""

    def __init__(self) -> None:
        self.n = self.clean_correct = self.adv_correct = self.flipped = 0

    def add(self, clean_ok: torch.Tensor, adv_ok: torch.Tensor) -> None:
        self.n += int(clean_ok.numel())
        self.clean_correct += int(clean_ok.sum())
        self.adv_correct += int(adv_ok.sum())
        self.flipped += int((clean_ok & ~adv_ok).sum())

    def as_dict(self) -> dict:
        return {"robust_accuracy": self.adv_correct / self.n if self.n else None,
                "success_rate": self.flipped / self.clean_correct if self.clean_correct else None,
                "n": self.n}


class _EpsResult:
    def __init__(self, eps: float) -> None:
        self.eps = eps
        self.all = _Tally()
        self.per_generator: dict[str, _Tally] = {}
        self.per_direction = {"ai-to-real": _Tally(), "real-to-ai": _Tally()}
        self.n_attacked = 0
        self.sum_linf = 0.0
        self.sum_l2 = 0.0
        self.psnr_sum = 0.0
        self.psnr_n = 0

    def as_dict(self, direction: str) -> dict:
        per_direction = {}
        for d, tally in self.per_direction.items():
            per_direction[d] = {**tally.as_dict(), "attacked": direction in ("both", d)}
        return {
            "eps": self.eps,
            **{k: v for k, v in self.all.as_dict().items() if k != "n"},
            "mean_linf": self.sum_linf / self.n_attacked if self.n_attacked else None,
            "mean_l2": self.sum_l2 / self.n_attacked if self.n_attacked else None,
            "psnr": self.psnr_sum / self.psnr_n if self.psnr_n else None,
            "per_generator": {g: t.as_dict() for g, t in sorted(self.per_generator.items())},
            "per_direction": per_direction,
        }


def _predict_ai(model: nn.Module, x: torch.Tensor, threshold: float) -> torch.Tensor:
    with torch.no_grad():
        return model.p_ai(model(x)) >= threshold


def _save_png(img: torch.Tensor, path: Path) -> None:
    arr = (img.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())
    Image.fromarray(np.ascontiguousarray(arr)).save(path)


def _input_size(model: nn.Module) -> int | None:
    pre = getattr(model, "preprocess", None)
    return getattr(pre, "input_size", None)


def robustness(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor, list[str]]], *, attack: str,
               eps_list: list[float], steps: int = 10, step_size: float | None = None, direction: str = "both",
               seed: int = 42, source_model: nn.Module | None = None, save_examples: str | Path | None = None,
               threshold: float = 0.5, max_examples: int = 16, attack_options: dict | None = None) -> dict:
    """Robust accuracy of ``model`` under ``attack`` at each eps of ``eps_list`` (in that order).

    ``batches``: iterated once, tuples ``(x, y, generators)`` with ``x`` float ``[B, 3, S, S]`` in
    [0, 1] on the model's device, ``y`` long labels (nature=0, ai=1), ``generators`` one name per
    image. ``direction``: ``both`` attacks every image, ``ai-to-real`` only ai images,
    ``real-to-ai`` only nature images; the top-level counts cover the images in scope, and
    ``per_direction`` also reports the out-of-scope class (left clean, ``"attacked": False``).
    ``steps`` / ``step_size`` apply to pgd and pgd-l2; ``attack_options`` are further keyword
    arguments for the attack (e.g. ``{"n_queries": 200}`` for square). Prediction: ``p_ai >= threshold``.

    Per eps: ``robust_accuracy`` (correct after the attack, over all images in scope, a clean
    mistake counting as wrong), ``success_rate`` (flipped among those correct before; None if none
    were), ``mean_linf`` / ``mean_l2`` (mean perturbation norms over attacked images), ``psnr``
    (mean PSNR in dB over the images the attack changed; None when it changed none, e.g. eps = 0).
    ``save_examples``: a folder that receives, for up to ``max_examples`` images in scope and each
    eps > 0, ``{i:04d}_eps{eps:.4f}_clean.png`` and ``..._adv.png`` (8-bit PNGs, so rounded).
    """
    from fakescope.attacks import attack_class, create_attack

    cls = attack_class(attack)
    for role, m in (("model", model), ("source_model", source_model)):
        if m is not None and not (callable(getattr(m, "ai_logit", None)) and callable(getattr(m, "p_ai", None))):
            raise AttackError(f"expected {role} to be a fakescope Detector (with ai_logit and p_ai), "
                              f"got {type(m).__name__}")
    if direction not in DIRECTIONS:
        raise AttackError(f"expected direction to be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if isinstance(eps_list, (str, bytes)) or not isinstance(eps_list, Iterable):
        raise AttackError(f"expected eps_list to be a list of numbers, got {eps_list!r}")
    eps_values = [check_eps(e, cls.norm) for e in eps_list]
    if not eps_values:
        raise AttackError("expected at least one eps in eps_list, got an empty list")
    threshold = check_threshold(threshold)
    if isinstance(max_examples, bool) or not isinstance(max_examples, numbers.Integral) or max_examples < 0:
        raise AttackError(f"expected max_examples to be an integer >= 0, got {max_examples!r}")
    options = dict(attack_options or {})
    reserved = {"eps", "seed", "threshold", "steps", "step_size"} & set(options)
    if reserved:
        raise AttackError(f"expected attack_options without {', '.join(sorted(reserved))} (pass them as arguments), "
                          f"got {sorted(options)}")
    if cls.name in ("pgd", "pgd-l2"):
        options.update(steps=steps, step_size=step_size)
    crafter = source_model if source_model is not None else model
    if source_model is not None and _input_size(source_model) != _input_size(model):
        raise AttackError(f"expected source_model to take the same input size as model ({_input_size(model)}), "
                          f"got {_input_size(source_model)}")
    attacks = [create_attack(attack, crafter, eps=e, seed=seed, threshold=threshold, **options) if e > 0 else None
               for e in eps_values]

    out_dir = Path(save_examples) if save_examples is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    n_saved = 0
    clean = _Tally()
    results = [_EpsResult(e) for e in eps_values]
    total = len(batches) if hasattr(batches, "__len__") else None
    with eval_mode(model):
        for batch in progress(batches, desc=f"attack {attack}", total=total):
            x, y, generators = batch
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                raise AttackError(f"expected each batch's images as a tensor [B, 3, S, S], got {type(x).__name__} "
                                  f"{list(getattr(x, 'shape', []))}")
            y = torch.as_tensor(y, device=x.device).long()
            generators = list(generators)
            if y.shape != (x.shape[0],) or len(generators) != x.shape[0]:
                raise AttackError(f"expected {x.shape[0]} labels and {x.shape[0]} generator names, "
                                  f"got {list(y.shape)} labels and {len(generators)} names")
            in_scope = scope_mask(y, direction)
            clean_ok = _predict_ai(model, x, threshold) == y.bool()
            clean.add(clean_ok[in_scope], clean_ok[in_scope])
            keep = in_scope.nonzero().squeeze(1).tolist()
            gens = [generators[i] for i in keep]
            to_save = keep[:max(0, max_examples - n_saved)] if out_dir is not None else []
            for res, att in zip(results, attacks, strict=True):
                if att is None:
                    x_adv, adv_ok = x, clean_ok
                else:
                    x_adv = perturb_batch(att, x, y, direction)
                    adv_ok = _predict_ai(model, x_adv, threshold) == y.bool()
                res.all.add(clean_ok[in_scope], adv_ok[in_scope])
                for d, label in _LABEL_OF_DIRECTION.items():
                    sel = y == label
                    res.per_direction[d].add(clean_ok[sel], adv_ok[sel])
                ok_c, ok_a = clean_ok[in_scope].tolist(), adv_ok[in_scope].tolist()
                for g, c_ok, a_ok in zip(gens, ok_c, ok_a, strict=True):
                    t = res.per_generator.setdefault(g, _Tally())
                    t.n += 1
                    t.clean_correct += int(c_ok)
                    t.adv_correct += int(a_ok)
                    t.flipped += int(c_ok and not a_ok)
                if att is None or not keep:
                    res.n_attacked += len(keep)
                    continue
                delta = (x_adv[in_scope] - x[in_scope]).double()
                res.n_attacked += len(keep)
                res.sum_linf += float(delta.flatten(1).abs().amax(dim=1).sum())
                res.sum_l2 += float(l2_norms(delta).sum())
                mse = delta.flatten(1).pow(2).mean(dim=1)
                changed = mse > 0
                res.psnr_sum += float((10 * torch.log10(1.0 / mse[changed])).sum())
                res.psnr_n += int(changed.sum())
                for j, i in enumerate(to_save):
                    stem = f"{n_saved + j:04d}_eps{res.eps:.4f}"
                    _save_png(x[i], out_dir / f"{stem}_clean.png")
                    _save_png(x_adv[i], out_dir / f"{stem}_adv.png")
            n_saved += len(to_save)
    n = clean.n
    return {
        "attack": attack,
        "direction": direction,
        "threshold": float(threshold),
        "transfer": source_model is not None,
        "clean_accuracy": clean.adv_correct / n if n else None,
        "n": n,
        "results": [r.as_dict(direction) for r in results],
    }
