"""The model registry: ``name -> factory``, and the one function that builds a model.

``create_model("cnn32")``, ``create_model("resnet50", pretrained_file=...)`` or
``create_model("timm:efficientnet_b0", freeze=True)``; ``list_models()`` describes them all.
Each model declares the options it takes; any other option is an error that names them, never
silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable

from fakescope.errors import FakescopeError

_FACTORIES: dict[str, Callable] = {}
_DESCRIPTIONS: dict[str, str] = {}
_OPTIONS: dict[str, tuple[str, ...]] = {}
TIMM_PREFIX = "timm:"


def register_model(name: str, description: str, options: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Register ``factory(**options)`` as ``name``; ``options`` are the keyword options it accepts."""
    def deco(fn: Callable) -> Callable:
        _FACTORIES[name] = fn
        _DESCRIPTIONS[name] = description
        _OPTIONS[name] = tuple(options)
        return fn

    return deco


def list_models() -> dict[str, str]:
    """Registered names with a one-line description; any ``timm:<name>`` works as well."""
    return dict(sorted(_DESCRIPTIONS.items()))


def _registered(name: str) -> str:
    return "timm" if name.startswith(TIMM_PREFIX) else name


def accepted_options(name: str) -> tuple[str, ...]:
    """The options model ``name`` accepts (``create_model`` refuses any other)."""
    check_model_name(name)
    return _OPTIONS[_registered(name)]


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
    accepted = accepted_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise FakescopeError(f"model {name!r} takes no option {', '.join(map(repr, unknown))}: expected options "
                             f"among {', '.join(accepted)}")
    if name.startswith(TIMM_PREFIX):
        return _FACTORIES["timm"](backbone=name[len(TIMM_PREFIX):], **options)
    return _FACTORIES[name](**options)
