"""Robustness evaluation: run one attack over a data set at several eps and count what it breaks.

``robustness(model, batches, attack="pgd", eps_list=[0, 1/255, 8/255])`` iterates ``batches``
once; for each batch it predicts the clean images, then attacks the images in scope (by
``direction``) at every eps and predicts the adversarial ones. Counts are integers summed over
batches, so eps = 0 (never attacked: the clean predictions are reused) gives exactly the clean
accuracy. With ``source_model`` the examples are crafted on that model and judged by ``model``
(transfer). Nothing is written to disk: example images come back as arrays in ``examples``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from fakescope import parsing
from fakescope.attacks.base import Attack, AttackError, check_eps, eval_mode, l2_norms
from fakescope.attacks.registry import attack_class, create_attack
from fakescope.choices import ATTACK_DIRECTIONS, ONE_CLASS_DIRECTIONS
from fakescope.progress import progress

DIRECTIONS = ATTACK_DIRECTIONS
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
        self.per_direction = {d: _Tally() for d in ONE_CLASS_DIRECTIONS}
        self.n_attacked = 0
        self.sum_linf = 0.0
        self.sum_l2 = 0.0
        self.psnr_sum = 0.0
        self.psnr_n = 0

    def count(self, clean_ok: torch.Tensor, adv_ok: torch.Tensor, y: torch.Tensor, in_scope: torch.Tensor,
              generators: list[str]) -> None:
        """Adds one batch's right and wrong answers, before and after the attack: over the images in
        scope, per direction (each class, in scope or not) and per generator (the images in scope,
        ``generators`` naming them in order)."""
        self.all.add(clean_ok[in_scope], adv_ok[in_scope])
        for d, label in _LABEL_OF_DIRECTION.items():
            sel = y == label
            self.per_direction[d].add(clean_ok[sel], adv_ok[sel])
        ok_c, ok_a = clean_ok[in_scope].tolist(), adv_ok[in_scope].tolist()
        for g, c_ok, a_ok in zip(generators, ok_c, ok_a, strict=True):
            t = self.per_generator.setdefault(g, _Tally())
            t.n += 1
            t.clean_correct += int(c_ok)
            t.adv_correct += int(a_ok)
            t.flipped += int(c_ok and not a_ok)
        self.n_attacked += len(generators)

    def measure(self, delta: torch.Tensor) -> None:
        """Adds the perturbations ``delta`` (one per attacked image) to the norm and PSNR sums."""
        delta = delta.double()
        self.sum_linf += float(delta.flatten(1).abs().amax(dim=1).sum())
        self.sum_l2 += float(l2_norms(delta).sum())
        mse = delta.flatten(1).pow(2).mean(dim=1)
        changed = mse > 0
        self.psnr_sum += float((10 * torch.log10(1.0 / mse[changed])).sum())
        self.psnr_n += int(changed.sum())

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


def _uint8(img: torch.Tensor) -> np.ndarray:
    """An image ``[3, S, S]`` in [0, 1] as ``S x S x 3`` uint8 (what a PNG of it holds)."""
    return np.ascontiguousarray(img.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
                                .permute(1, 2, 0).cpu().numpy())


def _input_size(model: nn.Module) -> int | None:
    pre = getattr(model, "preprocess", None)
    return getattr(pre, "input_size", None)


def robustness(model: nn.Module, batches: Iterable[tuple], *, attack: str,
               eps_list: list[float], steps: int = 10, step_size: float | None = None, direction: str = "both",
               seed: int = 42, source_model: nn.Module | None = None, crafter: nn.Module | None = None,
               threshold: float = 0.5, max_examples: int = 0, attack_options: dict | None = None) -> dict:
    """Robust accuracy of ``model`` under ``attack`` at each eps of ``eps_list`` (in that order).

    ``batches``: iterated once, tuples ``(x, y, generators)`` with ``x`` float ``[B, 3, S, S]`` in
    [0, 1] on the model's device, ``y`` long labels (nature=0, ai=1), ``generators`` one name per
    image; with ``source_model``, a batch may carry a fourth element, the same images as the source
    model sees them (its own preprocessing): the attack is crafted there and its perturbation is
    added to ``x`` (clipped to [0, 1]). ``crafter``: the model whose gradients or queries craft the
    examples when it is not ``model`` itself (e.g. the same detector in fp32 while ``model``
    judges in bf16); ``source_model`` (a transfer attack) takes precedence. ``direction``: ``both``
    attacks every image, ``ai-to-real`` only ai images, ``real-to-ai`` only nature images; the
    top-level counts cover the images in scope, and
    ``per_direction`` also reports the out-of-scope class (left clean, ``"attacked": False``).
    ``steps`` / ``step_size`` apply to pgd and pgd-l2; ``attack_options`` are further keyword
    arguments for the attack (e.g. ``{"n_queries": 200}`` for square). Prediction: ``p_ai >= threshold``.

    Per eps: ``robust_accuracy`` (correct after the attack, over all images in scope, a clean
    mistake counting as wrong), ``success_rate`` (flipped among those correct before; None if none
    were), ``mean_linf`` / ``mean_l2`` (mean perturbation norms over attacked images), ``psnr``
    (mean PSNR in dB over the images the attack changed; None when it changed none, e.g. eps = 0).
    ``examples``: for up to ``max_examples`` images in scope and each eps > 0,
    ``{"index", "eps", "clean", "adv"}`` with the images as ``S x S x 3`` uint8 arrays
    (:func:`fakescope.report.artifacts.write_examples` saves them as PNGs).
    """
    cls = attack_class(attack)
    _check_models(model, source_model)
    if direction not in DIRECTIONS:
        raise AttackError(f"expected direction to be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    eps_values = _eps_values(eps_list, cls.norm)
    threshold = parsing.check_threshold(threshold)
    if isinstance(max_examples, bool) or not isinstance(max_examples, numbers.Integral) or max_examples < 0:
        raise AttackError(f"expected max_examples to be an integer >= 0, got {max_examples!r}")
    options = _attack_options(cls.name, attack_options, steps, step_size)
    crafter = _crafter(model, source_model, crafter)
    run = _Run(model, eps_values, [_attack_at(attack, crafter, e, seed, threshold, options) for e in eps_values],
               direction=direction, threshold=threshold, max_examples=max_examples)
    total = len(batches) if hasattr(batches, "__len__") else None
    with eval_mode(model):
        for batch in progress(batches, desc=f"attack {attack}", total=total):
            run.add(*_batch_tensors(batch, source_model))
    n = run.clean.n
    return {
        "attack": attack,
        "direction": direction,
        "threshold": float(threshold),
        "transfer": source_model is not None,
        "clean_accuracy": run.clean.adv_correct / n if n else None,
        "n": n,
        "results": [r.as_dict(direction) for r in run.results],
        **({"examples": run.examples} if max_examples else {}),
    }


def _check_models(model: nn.Module, source_model: nn.Module | None) -> None:
    for role, m in (("model", model), ("source_model", source_model)):
        if m is not None and not (callable(getattr(m, "ai_logit", None)) and callable(getattr(m, "p_ai", None))):
            raise AttackError(f"expected {role} to be a fakescope Detector (with ai_logit and p_ai), "
                              f"got {type(m).__name__}")


def _eps_values(eps_list, norm: str) -> list[float]:
    if isinstance(eps_list, (str, bytes)) or not isinstance(eps_list, Iterable):
        raise AttackError(f"expected eps_list to be a list of numbers, got {eps_list!r}")
    eps_values = [check_eps(e, norm) for e in eps_list]
    if not eps_values:
        raise AttackError("expected at least one eps in eps_list, got an empty list")
    return eps_values


def _attack_options(name: str, attack_options: dict | None, steps: int, step_size: float | None) -> dict:
    """The attack's keyword arguments beyond eps, seed and threshold (``steps``/``step_size`` for pgd and pgd-l2)."""
    options = dict(attack_options or {})
    reserved = {"eps", "seed", "threshold", "steps", "step_size"} & set(options)
    if reserved:
        raise AttackError(f"expected attack_options without {', '.join(sorted(reserved))} (pass them as arguments), "
                          f"got {sorted(options)}")
    if name in ("pgd", "pgd-l2"):
        options.update(steps=steps, step_size=step_size)
    return options


def _crafter(model: nn.Module, source_model: nn.Module | None, crafter: nn.Module | None) -> nn.Module:
    """The model whose gradients or queries craft the examples: the transfer source, else ``crafter``,
    else ``model``."""
    if source_model is not None and _input_size(source_model) != _input_size(model):
        raise AttackError(f"expected source_model to take the same input size as model ({_input_size(model)}), "
                          f"got {_input_size(source_model)}")
    return source_model if source_model is not None else crafter if crafter is not None else model


def _attack_at(attack: str, crafter: nn.Module, eps: float, seed: int, threshold: float,
               options: dict) -> Attack | None:
    """The attack at ``eps``; None at eps = 0 (never attacked: the clean predictions are reused)."""
    return create_attack(attack, crafter, eps=eps, seed=seed, threshold=threshold, **options) if eps > 0 else None


def _batch_tensors(batch: tuple, source_model: nn.Module | None) -> tuple:
    """``(x, x_craft, y, generators)`` of one batch, checked: ``x_craft`` is what the attack is crafted on
    (the source model's view of the images in a transfer attack that brings one, else ``x``)."""
    x, y, generators = batch[:3]
    x_craft = batch[3] if len(batch) > 3 and source_model is not None else x
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise AttackError(f"expected each batch's images as a tensor [B, 3, S, S], got {type(x).__name__} "
                          f"{list(getattr(x, 'shape', []))}")
    y = torch.as_tensor(y, device=x.device).long()
    generators = list(generators)
    if y.shape != (x.shape[0],) or len(generators) != x.shape[0]:
        raise AttackError(f"expected {x.shape[0]} labels and {x.shape[0]} generator names, "
                          f"got {list(y.shape)} labels and {len(generators)} names")
    return x, x_craft, y, generators


class _Run:
    """The counts of one :func:`robustness` call, batch after batch: the clean tally, one
    :class:`_EpsResult` per eps and the example images kept so far."""

    def __init__(self, model: nn.Module, eps_values: list[float], attacks: list[Attack | None], *, direction: str,
                 threshold: float, max_examples: int) -> None:
        self.model, self.attacks = model, attacks
        self.direction, self.threshold, self.max_examples = direction, threshold, max_examples
        self.clean = _Tally()
        self.results = [_EpsResult(e) for e in eps_values]
        self.examples: list[dict] = []
        self.n_saved = 0

    def add(self, x: torch.Tensor, x_craft: torch.Tensor, y: torch.Tensor, generators: list[str]) -> None:
        """Predicts the clean batch, then attacks it at every eps and counts what changed."""
        in_scope = scope_mask(y, self.direction)
        clean_ok = _predict_ai(self.model, x, self.threshold) == y.bool()
        self.clean.add(clean_ok[in_scope], clean_ok[in_scope])
        keep = in_scope.nonzero().squeeze(1).tolist()
        gens = [generators[i] for i in keep]
        to_save = keep[:max(0, self.max_examples - self.n_saved)]
        for res, att in zip(self.results, self.attacks, strict=True):
            if att is None:
                res.count(clean_ok, clean_ok, y, in_scope, gens)
                continue
            x_adv = perturb_batch(att, x_craft, y, self.direction)
            if x_craft is not x:  # the source's perturbation, on the target's view of the images
                x_adv = (x + (x_adv - x_craft)).clamp_(0, 1)
            res.count(clean_ok, _predict_ai(self.model, x_adv, self.threshold) == y.bool(), y, in_scope, gens)
            if keep:
                res.measure(x_adv[in_scope] - x[in_scope])
                self.examples += [{"index": self.n_saved + j, "eps": res.eps, "clean": _uint8(x[i]),
                                   "adv": _uint8(x_adv[i])} for j, i in enumerate(to_save)]
        self.n_saved += len(to_save)
