"""FGSM: one signed-gradient step to the corner of the L-inf ball."""

from __future__ import annotations

import torch
from torch import nn

from fakescope.attacks.base import LOSSES, Attack, AttackError, check_eps, project_linf


class FGSM(Attack):
    """Fast Gradient Sign Method (Goodfellow, Shlens & Szegedy, "Explaining and Harnessing
    Adversarial Examples", ICLR 2015). White-box, L-inf: ``x + eps * sign(grad_x loss)``,
    clipped to [0, 1].

    Defaults: ``eps=8/255``, ``loss="bce"`` (binary cross-entropy of the true label on
    ``ai_logit``, see :func:`~fakescope.attacks.base.true_label_loss`). Deterministic (no randomness).
    """

    name = "fgsm"
    norm = "linf"

    def __init__(self, model: nn.Module, *, eps: float = 8 / 255, loss: str = "bce", seed: int = 42,
                 threshold: float = 0.5) -> None:
        super().__init__(model, seed=seed, threshold=threshold)
        if loss not in LOSSES:
            raise AttackError(f"expected loss to be one of {', '.join(LOSSES)}, got {loss!r}")
        self.eps = check_eps(eps, self.norm)
        self.loss_kind = loss

    def _options(self) -> dict:
        return {"eps": self.eps, "loss": self.loss_kind, "seed": self.seed}

    def perturb(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.eps == 0:
            return x.clone()
        _, grad = self.loss_and_grad(x, y, self.loss_kind)
        return project_linf(x + self.eps * grad.sign(), x, self.eps)
