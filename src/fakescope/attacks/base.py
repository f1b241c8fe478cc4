"""What every attack shares: the :class:`Attack` interface, the loss on the decision score,
eps validation and the projections onto the L-inf / L2 balls.

An attack is called as ``attack(x, y) -> x_adv`` with images in [0, 1] (``[B, 3, S, S]``) and
long labels (nature=0, ai=1). It maximises the loss of the true label on the detector's decision
score ``model.ai_logit(logits)``, so a one-logit (sigmoid) and a two-logit (softmax) head that
implement the same decision function are attacked identically. During the call the model is in
eval mode; every module's train/eval flag is restored afterwards, gradients are taken with
``torch.autograd.grad`` with respect to the input only (no ``.grad`` is left on parameters), and
all randomness comes from a local ``torch.Generator`` seeded with ``seed`` at each call, so the
same attack object called twice on the same inputs returns the same ``x_adv``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from fakescope import parsing
from fakescope.errors import FakescopeError

NORMS: tuple[str, ...] = ("linf", "l2")
LOSSES: tuple[str, ...] = ("bce", "margin")


class AttackError(FakescopeError, ValueError):
    """A bad attack argument (unknown attack, negative eps, wrong input shape...)."""


def check_eps(eps: object, norm: str = "linf") -> float:
    """``eps`` as a float: finite, >= 0 and, for the L-inf norm, <= 1 (images are in [0, 1])."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise AttackError(f"expected eps to be a number, got {eps!r}")
    value = float(eps)
    if not math.isfinite(value) or value < 0:
        raise AttackError(f"expected eps >= 0, got {eps!r}")
    if norm == "linf" and value > 1:
        raise AttackError(f"expected an L-inf eps <= 1 (images are in [0, 1]), got {eps!r}")
    return value


def parse_eps(text: str, norm: str = "linf") -> list[float]:
    """``"0,1/255,2/255"`` -> ``[0.0, 0.00392..., 0.00784...]``: comma-separated numbers or
    fractions ``a/b``, each >= 0 and, for ``norm="linf"``, <= 1."""
    if norm not in NORMS:
        raise AttackError(f"expected norm to be one of {', '.join(NORMS)}, got {norm!r}")
    if not isinstance(text, str) or not text.strip():
        raise AttackError(f"expected a comma-separated list of eps values such as 0,1/255,8/255, got {text!r}")
    values: list[float] = []
    for token in text.split(","):
        item = token.strip()
        try:
            if "/" in item:
                num, den = item.split("/")
                value = float(num) / float(den)
            else:
                value = float(item)
        except (ValueError, ZeroDivisionError):
            raise AttackError(f"expected each eps to be a number or a fraction like 8/255, got {item!r} "
                              f"in {text!r}") from None
        if not math.isfinite(value) or value < 0:
            raise AttackError(f"expected eps >= 0, got {item!r} in {text!r}")
        if norm == "linf" and value > 1:
            raise AttackError(f"expected an L-inf eps <= 1 (images are in [0, 1]), got {item!r} in {text!r}")
        values.append(value)
    return values


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise AttackError(f"expected {name} to be an integer >= {minimum}, got {value!r}")
    return int(value)


def true_label_loss(ai_logit: torch.Tensor, y: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """Per-example loss of the true label on the decision score ``z = ai_logit`` (higher = more wrong).

    ``bce``: binary cross-entropy with logits, ``softplus(-s*z)`` with ``s = +1`` for ai and ``-1``
    for nature. It equals ``F.binary_cross_entropy_with_logits(z, y)`` and, for a two-logit head,
    the softmax cross-entropy (which depends only on ``z_ai - z_nature``), but its gradient
    ``-sigmoid(-s*z)`` does not cancel to exactly zero for confident predictions the way
    ``sigmoid(z) - y`` does in float32. ``margin``: ``-s*z``, which never saturates.
    """
    sign = y.to(ai_logit.dtype) * 2 - 1
    margin = sign * ai_logit
    if kind == "bce":
        return F.softplus(-margin)
    if kind == "margin":
        return -margin
    raise AttackError(f"expected loss to be one of {', '.join(LOSSES)}, got {kind!r}")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode, and give every submodule its own train/eval flag back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The nearest point to ``x_adv`` in the L-inf ball of radius ``eps`` around ``x`` and in [0, 1]."""
    return (x + (x_adv - x).clamp(-eps, eps)).clamp(0.0, 1.0)


def l2_norms(d: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norms of ``[B, ...]`` (computed in float64), shape ``[B]``."""
    return d.flatten(1).double().norm(dim=1)


def project_l2(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x_adv`` pulled back into the L2 ball of radius ``eps`` around ``x``, then clipped to [0, 1]
    (clipping only shrinks every coordinate of the perturbation, so it stays in the ball)."""
    delta = x_adv - x
    norms = l2_norms(delta)
    factor = torch.where(norms > eps, eps / norms.clamp_min(1e-30), torch.ones_like(norms))
    delta = delta * factor.to(delta.dtype).view(-1, *([1] * (delta.dim() - 1)))
    return (x + delta).clamp(0.0, 1.0)


class Attack:
    """Base class: subclasses set ``name`` and ``norm`` and implement :meth:`perturb`.

    ``model``: a fakescope ``Detector`` (anything with ``forward`` and ``ai_logit``). ``seed``:
    seeds a local ``torch.Generator`` on the input's device at each call. ``threshold``: the
    decision threshold on ``p_ai`` used by attacks that check for success (Square).
    """

    name: str = "attack"
    norm: str = "linf"

    def __init__(self, model: nn.Module, *, seed: int = 42, threshold: float = 0.5) -> None:
        if not isinstance(model, nn.Module) or not callable(getattr(model, "ai_logit", None)):
            raise AttackError(f"expected a fakescope Detector (an nn.Module with ai_logit), got {type(model).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise AttackError(f"expected seed to be an integer, got {seed!r}")
        self.model = model
        self.seed = int(seed)
        self.threshold = parsing.check_threshold(threshold)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({opts})"

    def _options(self) -> dict:
        return {"seed": self.seed}

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = self._check_inputs(x, y)
        if x.shape[0] == 0:
            return x.clone()
        generator = torch.Generator(device=x.device)
        generator.manual_seed(self.seed)
        with eval_mode(self.model):
            x_adv = self.perturb(x, y, generator)
        return x_adv.detach()

    def perturb(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The adversarial images for clean ``x`` (detached) and labels ``y``; the model is in eval mode."""
        raise NotImplementedError

    # helpers for subclasses -------------------------------------------------------------------------

    def ai_logit(self, x: torch.Tensor) -> torch.Tensor:
        """The decision score ``[B]`` (float32) of images ``x``."""
        return self.model.ai_logit(self.model(x).float())

    def is_wrong(self, ai_logit: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Whether the decision ``p_ai >= threshold`` disagrees with ``y`` (bool ``[B]``)."""
        return (torch.sigmoid(ai_logit) >= self.threshold) != y.bool()

    def loss(self, x: torch.Tensor, y: torch.Tensor, kind: str = "bce") -> torch.Tensor:
        """Per-example loss of the true label at ``x`` (no gradient)."""
        with torch.no_grad():
            return true_label_loss(self.ai_logit(x), y, kind)

    def loss_and_grad(self, x: torch.Tensor, y: torch.Tensor, kind: str = "bce") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example loss ``[B]`` at ``x`` and its gradient with respect to ``x`` only."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            loss = true_label_loss(self.ai_logit(xg), y, kind)
            (grad,) = torch.autograd.grad(loss.sum(), xg)
        return loss.detach(), grad.detach()

    @staticmethod
    def _check_inputs(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            got = f"{x.dtype} tensor of shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise AttackError(f"expected images as a float tensor [B, 3, S, S], got {got}")
        if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.is_floating_point() or y.is_complex():
            got = f"{y.dtype} tensor of shape {list(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise AttackError(f"expected labels as an integer tensor of shape [{x.shape[0]}], got {got}")
        if x.shape[0]:
            lo, hi = float(x.min()), float(x.max())
            if lo < 0 or hi > 1:
                raise AttackError(f"expected images with values in [0, 1], got values in [{lo:g}, {hi:g}]")
            if bool(((y != 0) & (y != 1)).any()):
                raise AttackError(f"expected labels 0 (nature) or 1 (ai), got {sorted(set(y.tolist()))}")
        return x.detach(), y.detach().long().to(x.device)
