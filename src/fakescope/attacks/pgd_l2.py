"""PGD under the L2 norm (same bookkeeping as the L-inf version)."""

from __future__ import annotations

import torch
from torch import nn

from fakescope.attacks.base import l2_norms, project_l2
from fakescope.attacks.pgd import PGD


def _per_example(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


class PGDL2(PGD):
    """Projected Gradient Descent, L2 (Madry et al., "Towards Deep Learning Models Resistant to
    Adversarial Attacks", ICLR 2018). White-box.

    Steps along the L2-normalised gradient, then projects onto the L2 ball of radius ``eps`` around
    ``x`` and clips to [0, 1]. Defaults: ``eps=0.5``, ``steps=10``, ``step_size=2.5*eps/steps``,
    ``random_start=True`` (uniform in the L2 ball: a Gaussian direction with radius
    ``eps * U**(1/d)``), ``loss="bce"``. As in :class:`PGD`, the point one full step ``eps`` along
    the normalised clean gradient is scored as a candidate and the highest-loss candidate is returned.
    """

    name = "pgd-l2"
    norm = "l2"

    def __init__(self, model: nn.Module, *, eps: float = 0.5, steps: int = 10, step_size: float | None = None,
                 random_start: bool = True, loss: str = "bce", seed: int = 42, threshold: float = 0.5) -> None:
        super().__init__(model, eps=eps, steps=steps, step_size=step_size, random_start=random_start, loss=loss,
                         seed=seed, threshold=threshold)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return project_l2(x_adv, x, self.eps)

    def random_point(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        direction = direction / _per_example(l2_norms(direction).clamp_min(1e-30), x)
        d = x[0].numel()
        u = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=torch.float64)
        radius = self.eps * u ** (1.0 / d)
        return self.project(x + direction * _per_example(radius, x), x)

    def ascent(self, grad: torch.Tensor) -> torch.Tensor:
        return grad / _per_example(l2_norms(grad).clamp_min(1e-30), grad)

    def first_candidate(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return self.project(x + self.eps * self.ascent(grad), x)
