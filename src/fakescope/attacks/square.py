"""Square Attack, L-inf: a black-box, score-based random search with square-shaped updates."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from fakescope.attacks.base import Attack, AttackError, check_eps, check_positive_int, project_linf


class Square(Attack):
    """Square Attack (Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient
    black-box adversarial attack via random search", ECCV 2020). Black-box (score-based), L-inf.

    Uses only the model's outputs (every query runs under ``torch.no_grad``): it minimises the
    margin ``s * (ai_logit - logit(threshold))`` (``s = +1`` for ai, ``-1`` for nature), starting
    from random vertical stripes of ``+-eps`` and then, at each iteration, setting a random square
    window (per example) to a random ``+-eps`` per channel, keeping the change when the margin
    drops. Each example stops as soon as its decision flips; images that are already misclassified
    are returned unchanged. The window side follows the paper's schedule: the fraction of pixels
    ``p`` starts at ``p_init`` and halves at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000,
    8000 (rescaled from a 10000-query budget to ``n_queries``).

    Defaults: ``eps=8/255``, ``n_queries=1000`` (model queries per example, counting the stripe
    initialisation but not the clean query), ``p_init=0.8`` (the value AutoAttack and torchattacks
    use for L-inf on CIFAR-size images; the paper's ImageNet experiments used 0.05).
    ``self.last_queries`` holds the queries each example of the last call used.
    """

    name = "square"
    norm = "linf"

    def __init__(self, model: nn.Module, *, eps: float = 8 / 255, n_queries: int = 1000, p_init: float = 0.8,
                 seed: int = 42, threshold: float = 0.5) -> None:
        super().__init__(model, seed=seed, threshold=threshold)
        self.eps = check_eps(eps, self.norm)
        self.n_queries = check_positive_int("n_queries", n_queries)
        if isinstance(p_init, bool) or not isinstance(p_init, numbers.Real) or not 0 < float(p_init) <= 1:
            raise AttackError(f"expected p_init in (0, 1], got {p_init!r}")
        self.p_init = float(p_init)
        self.last_queries: torch.Tensor | None = None

    def _options(self) -> dict:
        return {"eps": self.eps, "n_queries": self.n_queries, "p_init": self.p_init, "seed": self.seed}

    def p_selection(self, it: int) -> float:
        """The fraction of pixels a square covers at iteration ``it`` (the paper's piecewise schedule)."""
        it = int(it / self.n_queries * 10000)
        for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                           (8000, 256), (10000, 512)):
            if it <= bound:
                return self.p_init / div
        return self.p_init / 512

    def _margin(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.ai_logit(x)
        sign = y.to(z.dtype) * 2 - 1
        # logit of the threshold, finite at 0 and 1 (where every image is called one class: nothing to flip)
        t = min(max(self.threshold, 1e-12), 1 - 1e-12)
        return sign * (z - math.log(t / (1 - t))), self.is_wrong(z, y)

    @torch.no_grad()
    def perturb(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, c, h, w = x.shape
        dev = x.device
        queries = torch.zeros(b, dtype=torch.long, device=dev)
        self.last_queries = queries
        if self.eps == 0:
            return x.clone()
        x_best = x.clone()
        margin_best, done = self._margin(x, y)
        idx = (~done).nonzero().squeeze(1)
        if idx.numel():  # stripes initialisation (always accepted, as in the paper)
            stripes = torch.randint(0, 2, (idx.numel(), c, 1, w), generator=generator, device=dev).to(x.dtype)
            x_init = project_linf(x[idx] + (2 * stripes - 1) * self.eps, x[idx], self.eps)
            m, wrong = self._margin(x_init, y[idx])
            x_best[idx], margin_best[idx], done[idx] = x_init, m, wrong
            queries[idx] += 1
        rows = torch.arange(h, device=dev)
        cols = torch.arange(w, device=dev)
        for it in range(self.n_queries - 1):
            idx = (~done).nonzero().squeeze(1)
            n = idx.numel()
            if n == 0:
                break
            side = round(math.sqrt(self.p_selection(it) * h * w))
            side = max(1, min(side, min(h, w) - 1))
            top = torch.randint(0, h - side + 1, (n,), generator=generator, device=dev)
            left = torch.randint(0, w - side + 1, (n,), generator=generator, device=dev)
            in_rows = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + side)
            in_cols = (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + side)
            window = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # [n, 1, h, w]
            signs = (2 * torch.randint(0, 2, (n, c, 1, 1), generator=generator, device=dev) - 1).to(x.dtype)
            xc, xb = x[idx], x_best[idx]
            x_new = torch.where(window, project_linf(xc + signs * self.eps, xc, self.eps), xb)
            unchanged = (x_new == xb).flatten(1).all(dim=1)
            if bool(unchanged.any()):  # the window already had these signs: try the opposite ones
                flipped = torch.where(window, project_linf(xc - signs * self.eps, xc, self.eps), xb)
                x_new = torch.where(unchanged[:, None, None, None], flipped, x_new)
            m, wrong = self._margin(x_new, y[idx])
            queries[idx] += 1
            accept = (m < margin_best[idx]) | wrong
            acc = idx[accept]
            x_best[acc], margin_best[acc], done[acc] = x_new[accept], m[accept], wrong[accept]
        return x_best
