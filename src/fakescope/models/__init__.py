"""Detectors: a registry of factories (``create_model``), each model carrying its preprocessing."""

from fakescope.models import aligned, cnn32, npr, presets, timm_models  # noqa: F401  (registers the models)
from fakescope.models.base import Detector, Preprocess, set_num_outputs
from fakescope.models.recipe import GEOMETRIES, Recipe
from fakescope.models.registry import accepted_options, check_model_name, create_model, list_models, register_model

__all__ = ["GEOMETRIES", "Detector", "Preprocess", "Recipe", "accepted_options", "check_model_name", "create_model",
           "list_models", "register_model", "set_num_outputs"]
