"""What a model says about how it is trained and tested, as data.

A :class:`Recipe` is a paper's training recipe (optimizer, learning rate and schedule, batch size,
augmentation); ``train`` applies each part of it that the user did not set. The augmentation is a
plain dict of ``fakescope.data.transforms.Augment`` fields (models do not import the data
package). A model's test-time geometry says how an image of any size becomes its square input:

* ``resize``: the whole image, shorter side resized to the input size, centre square (the seed's models);
* ``center_crop``: the centre ``input_size`` square at the image's own pixel scale (no resizing; an
  image smaller than the input is first enlarged to it), as the papers of pixel-trace detectors test;
* ``crops``: the mean score of 3 x 3 squares at the image's own pixel scale on an even grid from
  border to border (every pixel is in a crop when the image is at most 3 input sizes on a side).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from fakescope.choices import GEOMETRIES, LR_SCHEDULES
from fakescope.errors import FakescopeError

__all__ = ["DEFAULT_RECIPE", "GEOMETRIES", "LR_SCHEDULES", "PLATEAU_DEFAULTS", "STEP_DEFAULTS", "Recipe",
           "check_geometry"]


def check_geometry(name: str) -> str:
    if name not in GEOMETRIES:
        raise FakescopeError(f"expected a test geometry among {', '.join(GEOMETRIES)}, got {name!r}")
    return name


@dataclass(frozen=True)
class Recipe:
    """A training recipe. ``schedule`` holds the schedule's parameters:

    * ``plateau``: ``factor`` (x lr), ``patience`` (epochs without a validation-accuracy gain of more
      than ``threshold``), ``min_lr`` (training stops once the learning rate would fall below it);
    * ``step``: ``every`` (epochs) and ``factor``.
    """

    lr: float
    batch_size: int
    optimizer: str = "adam"
    betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: str = "constant"
    schedule: dict = field(default_factory=dict)
    augment: dict = field(default_factory=dict)
    source: str = ""
    paired: bool = False
    """Both members of each aligned pair in one batch with the same augmentation (``train --paired``)."""

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_RECIPE = Recipe(lr=1e-3, batch_size=32, source="fakescope's defaults (the study's: Adam, lr 1e-3, batch 32)")
"""What a model without a recipe of its own is trained with."""

PLATEAU_DEFAULTS = {"factor": 0.1, "patience": 5, "threshold": 0.001, "min_lr": 1e-6}
STEP_DEFAULTS = {"every": 10, "factor": 0.9}
