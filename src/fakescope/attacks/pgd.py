"""PGD under the L-inf norm, keeping per example the iterate with the highest loss."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from fakescope.attacks.base import LOSSES, Attack, AttackError, check_eps, check_positive_int, project_linf


def _step_size(step_size: float | None, eps: float, steps: int) -> float:
    if step_size is None:
        return 2.5 * eps / steps
    if isinstance(step_size, bool) or not isinstance(step_size, numbers.Real) or not float(step_size) >= 0:
        raise AttackError(f"expected step_size >= 0 (or None for 2.5 * eps / steps), got {step_size!r}")
    return float(step_size)


def keep_best(best_x: torch.Tensor, best_loss: torch.Tensor, x: torch.Tensor, loss: torch.Tensor) -> None:
    """In place: where ``loss > best_loss``, take ``x`` and ``loss``."""
    better = loss > best_loss
    best_x[better] = x[better]
    best_loss[better] = loss[better]


class PGD(Attack):
    """Projected Gradient Descent, L-inf (Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep
    Learning Models Resistant to Adversarial Attacks", ICLR 2018). White-box.

    Defaults: ``eps=8/255``, ``steps=10``, ``step_size=2.5*eps/steps``, ``random_start=True``
    (start uniformly in the eps-ball, drawn from the attack's own generator), ``loss="bce"``.

    Two choices beyond the textbook loop, so that PGD is never weaker than FGSM and does not lose
    progress to a last bad step: (1) the gradient at the clean point is always taken and the FGSM
    point ``x + eps*sign(grad)`` is scored as a candidate (with ``random_start=False`` that gradient
    also drives the first step); (2) per example, the candidate with the highest loss among the
    clean point, the FGSM point and every iterate (the random start and the final one included) is
    returned, not the final iterate. Because the decision is monotone in the loss, an example that
    FGSM flips at some eps is also flipped by PGD at that eps. Cost: ``steps + 1`` gradients
    (``steps`` without random start) and two extra forward passes. An example whose loss no
    candidate raises is returned unchanged.
    """

    name = "pgd"
    norm = "linf"

    def __init__(self, model: nn.Module, *, eps: float = 8 / 255, steps: int = 10, step_size: float | None = None,
                 random_start: bool = True, loss: str = "bce", seed: int = 42, threshold: float = 0.5) -> None:
        super().__init__(model, seed=seed, threshold=threshold)
        if loss not in LOSSES:
            raise AttackError(f"expected loss to be one of {', '.join(LOSSES)}, got {loss!r}")
        self.eps = check_eps(eps, self.norm)
        self.steps = check_positive_int("steps", steps)
        self.step_size = _step_size(step_size, self.eps, self.steps)
        self.random_start = bool(random_start)
        self.loss_kind = loss

    def _options(self) -> dict:
        return {"eps": self.eps, "steps": self.steps, "step_size": self.step_size, "random_start": self.random_start,
                "loss": self.loss_kind, "seed": self.seed}

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return project_linf(x_adv, x, self.eps)

    def random_point(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.project(x + (2 * noise - 1) * self.eps, x)

    def ascent(self, grad: torch.Tensor) -> torch.Tensor:
        """The step direction for a gradient (scaled by ``step_size``)."""
        return grad.sign()

    def first_candidate(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The single-step point scored before the iterations (FGSM for L-inf)."""
        return self.project(x + self.eps * grad.sign(), x)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.eps == 0:
            return x.clone()
        kind = self.loss_kind
        loss0, grad0 = self.loss_and_grad(x, y, kind)
        best_x, best_loss = x.clone(), loss0.clone()
        x1 = self.first_candidate(x, grad0)
        keep_best(best_x, best_loss, x1, self.loss(x1, y, kind))
        if self.random_start:
            x_adv = self.random_point(x, generator)
            loss, grad = self.loss_and_grad(x_adv, y, kind)
            keep_best(best_x, best_loss, x_adv, loss)
        else:
            x_adv, grad = x, grad0
        for i in range(self.steps):
            x_adv = self.project(x_adv + self.step_size * self.ascent(grad), x)
            if i + 1 < self.steps:
                loss, grad = self.loss_and_grad(x_adv, y, kind)
            else:
                loss = self.loss(x_adv, y, kind)
            keep_best(best_x, best_loss, x_adv, loss)
        return best_x
