"""A model's training recipe applied to the training options, and the learning-rate schedules.

``train`` leaves every option the user did not set (``None``) to the model's
:class:`~fakescope.models.recipe.Recipe` (fakescope's defaults for models without one): learning
rate, batch size, Adam's betas, the schedule and its parameters, the augmentation and whether
aligned pairs are batched together (``paired``). Giving any
augmentation option replaces the recipe's augmentation as a whole.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from fakescope.data.transforms import Augment
from fakescope.errors import FakescopeError
from fakescope.models.recipe import DEFAULT_RECIPE, LR_SCHEDULES, PLATEAU_DEFAULTS, STEP_DEFAULTS, Recipe


def augment_from(d: dict) -> Augment:
    return Augment(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def apply_recipe(opts, recipe: Recipe | None):
    """``opts`` (a ``TrainOptions``) with its unset fields taken from ``recipe``; ``opts.recipe``
    records where each value came from."""
    r = recipe or DEFAULT_RECIPE
    given = {k: getattr(opts, k) is not None for k in ("lr", "batch_size", "lr_schedule", "augment")}
    schedule = opts.lr_schedule or r.lr_schedule
    if schedule not in LR_SCHEDULES:
        raise FakescopeError(f"expected --lr-schedule among {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    params = dict(r.schedule) if schedule == r.lr_schedule else {}
    defaults = PLATEAU_DEFAULTS if schedule == "plateau" else STEP_DEFAULTS if schedule == "step" else {}
    params = {**defaults, **params, **(opts.schedule or {})}
    return replace(
        opts,
        lr=opts.lr if given["lr"] else r.lr,
        batch_size=opts.batch_size if given["batch_size"] else r.batch_size,
        lr_schedule=schedule,
        schedule=params,
        betas=tuple(opts.betas) if opts.betas else tuple(r.betas),
        augment=opts.augment if given["augment"] else augment_from(r.augment),
        paired=bool(opts.paired) if getattr(opts, "paired", None) is not None else r.paired,
        recipe=opts.recipe or {"source": r.source, "from_recipe": sorted(k for k, v in given.items() if not v)},
    )


class Schedule:
    """The learning-rate schedule of a run: ``constant``, ``cosine`` (over the epochs), ``step``
    (x ``factor`` every ``every`` epochs) or ``plateau`` (x ``factor`` when validation accuracy has
    not improved by more than ``threshold`` for ``patience`` epochs; ``done`` once the rate would
    fall below ``min_lr``). ``step(val_accuracy)`` is called once per epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, params: dict, epochs: int) -> None:
        self.optimizer, self.name, self.params = optimizer, name, dict(params)
        self.best: float | None = None
        self.bad = 0
        self.done = False
        self.torch_scheduler = None
        if name == "cosine":
            self.torch_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        elif name == "step":
            self.torch_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=int(self.params["every"]),
                                                                   gamma=float(self.params["factor"]))

    def step(self, val_accuracy: float | None) -> None:
        if self.torch_scheduler is not None:
            self.torch_scheduler.step()
            return
        if self.name != "plateau" or val_accuracy is None or math.isnan(val_accuracy):
            return
        if self.best is None or val_accuracy > self.best + float(self.params["threshold"]):
            self.best, self.bad = val_accuracy, 0
            return
        self.bad += 1
        if self.bad >= int(self.params["patience"]):
            self.bad = 0
            new = self.optimizer.param_groups[0]["lr"] * float(self.params["factor"])
            if new < float(self.params["min_lr"]):
                self.done = True
                return
            for g in self.optimizer.param_groups:
                g["lr"] = new

    def state_dict(self) -> dict:
        return {"best": self.best, "bad": self.bad, "done": self.done,
                "torch": self.torch_scheduler.state_dict() if self.torch_scheduler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad, self.done = state.get("best"), state.get("bad", 0), state.get("done", False)
        if self.torch_scheduler is not None and state.get("torch") is not None:
            self.torch_scheduler.load_state_dict(state["torch"])
