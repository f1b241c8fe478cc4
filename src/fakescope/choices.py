"""Lists of valid values that several layers check (data and models, the engine, configuration files,
the command line): each list is defined here once, in the base layer, and everything else (argparse
``choices``, configuration validation, error messages) derives from it. Registries whose keys are the
valid names own their own lists: attacks (:data:`fakescope.attacks.ATTACKS`), models, degradations."""

from __future__ import annotations

GEOMETRIES: tuple[str, ...] = ("resize", "center_crop", "crops")
"""Test-time geometries: the whole image resized to the input size, the centre square at the image's
pixel scale, or the mean score of a 3x3 grid of such squares."""

LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine", "plateau", "step")
"""Learning-rate schedules (:class:`fakescope.engine.hyperparams.Schedule`)."""

TASKS: tuple[str, ...] = ("binary", "attribution")
"""Training tasks: ai vs nature, or one class per generator plus nature."""

ATTACK_DIRECTIONS: tuple[str, ...] = ("both", "ai-to-real", "real-to-ai")
"""Which images an attack perturbs: every image, only ai images (to be called real), only real ones."""
ONE_CLASS_DIRECTIONS: tuple[str, ...] = ATTACK_DIRECTIONS[1:]
"""The directions that attack one class (the keys of a result's ``per_direction``)."""

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
"""Numeric precisions (``--precision``; :func:`fakescope.engine.runtime.resolve_precision`): ``auto`` is bf16
for inference where the processor supports it, else fp32, and always fp32 for training."""

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
"""Devices (``--device``), besides ``cuda:N`` for one GPU: ``auto`` is CUDA when present, else the CPU."""
