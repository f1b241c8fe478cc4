"""The model registry: ``name -> factory``, and the one function that builds a model.

``create_model("cnn32")``, ``create_model("resnet50", pretrained_file=...)`` or
``create_model("timm:efficientnet_b0", freeze=True)``; ``list_models()`` describes them all.
"""

from __future__ import annotations

from collections.abc import Callable

from fakescope.errors import FakescopeError

_FACTORIES: dict[str, Callable] = {}
_DESCRIPTIONS: dict[str, str] = {}
TIMM_PREFIX = "timm:"


def register_model(name: str, description: str) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        _FACTORIES[name] = fn
        _DESCRIPTIONS[name] = description
        return fn

    return deco


def list_models() -> dict[str, str]:
    """Registered names with a one-line description; any ``timm:<name>`` works as well."""
    return dict(sorted(_DESCRIPTIONS.items()))


def check_model_name(name: str) -> str:
    """Raise the registry's error for an unknown name, without building anything."""
    if name.startswith(TIMM_PREFIX):
        import timm

        backbone = name[len(TIMM_PREFIX):]
        if not backbone or not timm.is_model(backbone.split(".")[0]):
            raise FakescopeError(f"unknown timm model {backbone!r}: expected a name from timm.list_models(), "
                                 f"e.g. timm:resnet18")
    elif name not in _FACTORIES or name == "timm":
        choices = ", ".join([*list_models(), "timm:<name>"])
        raise FakescopeError(f"unknown model {name!r}: expected one of {choices}")
    return name


def create_model(name: str, **options):
    """Build the detector registered as ``name`` (or ``timm:<backbone>``) with ``options``."""
    check_model_name(name)
    if name.startswith(TIMM_PREFIX):
        backbone = name[len(TIMM_PREFIX):]
        if not backbone:
            raise FakescopeError("expected a timm model name after 'timm:', e.g. timm:resnet18")
        return _FACTORIES["timm"](backbone=backbone, **options)
    return _FACTORIES[name](**options)
