"""ImageNet backbones from timm with the study's small binary head.

``resnet50`` (frozen, as the study specifies), ``convnext_small`` (fine-tuned end to end by
default) and any ``timm:<name>``. Pretrained weights come from the Hugging Face hub through timm,
or from a local file (``pretrained_file``). When weights are wanted and cannot be had, creation
fails at once with a message that says how to provide them; it never falls back to random weights.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from fakescope.errors import FakescopeError
from fakescope.models.base import Detector, Preprocess
from fakescope.models.registry import register_model


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _in_hub_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return False
    for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(hub_id, fname), str):
            return True
    return False


def _weights_help(name: str) -> str:
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = (getattr(cfg, "hf_hub_id", None) if cfg is not None else None) or f"timm/{name}"
    return (f"pass --pretrained-file PATH (the {name} weights as .safetensors or .pth, e.g. downloaded "
            f"with `huggingface-cli download {hub_id}` on a machine with internet), "
            f"or --no-pretrained to train from random weights on purpose")


def build_backbone(name: str, pretrained: bool, pretrained_file: str | None, **create_kwargs) -> nn.Module:
    """``timm.create_model(name, num_classes=0, **create_kwargs)`` with weights from ``pretrained_file`` or the hub."""
    if not timm.is_model(name.split(".")[0]):
        raise FakescopeError(f"unknown timm model {name!r}: expected a name from timm.list_models(), e.g. resnet18")
    kwargs: dict = {"num_classes": 0, **create_kwargs}
    if pretrained and pretrained_file:
        if not os.path.isfile(pretrained_file):
            raise FakescopeError(f"pretrained weights file not found: {pretrained_file}")
        kwargs["pretrained_cfg_overlay"] = dict(file=os.path.abspath(pretrained_file))
    elif pretrained and not _in_hub_cache(name) and not _hub_reachable():
        raise FakescopeError(f"ImageNet weights for {name} are not in the local cache and the Hugging Face "
                             f"hub cannot be reached: {_weights_help(name)}")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except FakescopeError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        if pretrained:
            raise FakescopeError(f"could not load ImageNet weights for {name} ({str(e).splitlines()[0][:200]}): "
                                 f"{_weights_help(name)}") from None
        raise


class TimmDetector(Detector):
    """A timm backbone (global-pooled features) + head: dense ``hidden`` + ReLU, dropout, dense 1 (sigmoid)."""

    def __init__(self, backbone: str, *, pretrained: bool = True, pretrained_file: str | None = None,
                 freeze: bool = True, hidden: int = 256, dropout: float = 0.5, input_size: int | None = None) -> None:
        net = build_backbone(backbone, pretrained, pretrained_file)
        cfg = net.pretrained_cfg
        size = int(input_size or cfg.get("input_size", (3, 224, 224))[-1])
        super().__init__(Preprocess(size, tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                                    tuple(cfg.get("std", (0.229, 0.224, 0.225)))))
        self.set_backbone(net, backbone, freeze)
        self.head_net = nn.Sequential(
            nn.Linear(getattr(net, "head_hidden_size", None) or net.num_features, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, 1),
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))


TIMM_OPTIONS = ("pretrained", "pretrained_file", "freeze", "hidden", "dropout", "input_size")


@register_model("timm", "any timm backbone: timm:<name> (frozen by default; --finetune to train it)",
                options=TIMM_OPTIONS)
def timm_detector(backbone: str, **kw) -> TimmDetector:
    return TimmDetector(backbone, **kw)


@register_model("resnet50", "ImageNet ResNet-50, every conv layer frozen; head: GAP, dense 256 + ReLU, "
                            "dropout 0.5, dense 1 (sigmoid)", options=TIMM_OPTIONS)
def resnet50(**kw) -> TimmDetector:
    kw.setdefault("freeze", True)
    return TimmDetector("resnet50.tv_in1k", **kw)


@register_model("convnext_small", "ImageNet ConvNeXt-Small with the same head, fine-tuned end to end "
                                  "(--freeze to freeze)", options=TIMM_OPTIONS)
def convnext_small(**kw) -> TimmDetector:
    kw.setdefault("freeze", False)
    return TimmDetector("convnext_small.fb_in1k", **kw)
