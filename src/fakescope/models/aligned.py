"""``aligned-crops``: a pixel-level detector for aligned training data (real images and their
autoencoder reconstructions, ``fakescope data align``), after Rajan et al., ICLR 2025.

Rajan, Ojha, Schloesser and Lee ("Aligned Datasets Improve Detection of Latent Diffusion-Generated
Images") train a ResNet-50 *without its first down-sampling* on 96-pixel crops of real images and
their latent-diffusion autoencoder reconstructions, with blur, JPEG and resize augmentation, and
"Sync": both members of a pair get the same crop and augmentation. The preset carries that recipe
as data: an ImageNet backbone whose stem keeps full resolution (``stem_stride=1``), native-scale
crops (no whole-image resize at training or test), paired batches, and blur/JPEG/down-scaling
applied alike to both members of every pair.
"""

from __future__ import annotations

import torch
from torch import nn

from fakescope.errors import FakescopeError
from fakescope.models.base import Detector, Preprocess
from fakescope.models.recipe import PLATEAU_DEFAULTS, Recipe
from fakescope.models.registry import register_model
from fakescope.models.timm_models import build_backbone

ALIGNED_BACKBONE = "tf_efficientnet_lite0.in1k"
ALIGNED_CROP = 96

ALIGNED_RECIPE = Recipe(
    lr=1e-4, batch_size=64, optimizer="adam", betas=(0.9, 0.999), lr_schedule="plateau",
    schedule=dict(PLATEAU_DEFAULTS),
    augment={"blur_prob": 0.5, "blur_sigma": (0.0, 3.0), "jpeg_prob": 0.5, "jpeg_quality": (30, 100),
             "scale": (0.5, 1.0), "native_crop": True, "flip": True},
    paired=True,
    source="after Rajan et al. ICLR 2025 (aligned pairs): Adam lr 1e-4, batch 64 (32 pairs), both members of a "
           "pair in one batch with the same random native-scale crop, flip, Gaussian blur (sigma in [0, 3], "
           "p 0.5), JPEG (quality in [30, 100], p 0.5) and down-scaling (factor in [0.5, 1]); lr / 10 on a "
           "validation-accuracy plateau (the authors' script adds colour jitter, cutout, noise and rot90: "
           "colour jitter and greyscale exist as --aug-color / --aug-gray, not in this recipe; cutout, noise "
           "and rot90 do not)",
)


def _first_conv(net: nn.Module) -> nn.Conv2d:
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            return m
    raise FakescopeError(f"expected a convolutional backbone for stem_stride, got {type(net).__name__}")


class AlignedCrops(Detector):
    """An ImageNet backbone (default tf_efficientnet_lite0) fine-tuned end to end, its first
    convolution's stride set to ``stem_stride`` (1: no first down-sampling, as Rajan et al. do to
    their ResNet-50), global pooling and one linear layer (N(0, 0.02) init, 1 logit); the backbone's
    own mean/std; ``input_size`` (default 96) crops at the image's pixel scale.

    Test geometry ``crops``: the mean score of a 3 x 3 grid of native-scale crops (never a resize).
    Recipe :data:`ALIGNED_RECIPE` (paired batches). ``backbone`` takes any timm name; the weights
    come from ``pretrained_file`` or the hub as for the other backbones."""

    test_geometry = "crops"
    recipe = ALIGNED_RECIPE

    def __init__(self, *, pretrained: bool = True, pretrained_file: str | None = None, freeze: bool = False,
                 input_size: int = ALIGNED_CROP, backbone: str = ALIGNED_BACKBONE, stem_stride: int = 1) -> None:
        if int(stem_stride) not in (1, 2):
            raise FakescopeError(f"expected stem_stride 1 (no first down-sampling) or 2 (the backbone's own), "
                                 f"got {stem_stride}")
        net = build_backbone(backbone, pretrained, pretrained_file)
        conv = _first_conv(net)
        if int(stem_stride) == 1:
            conv.stride = (1, 1)
        cfg = net.pretrained_cfg
        super().__init__(Preprocess(int(input_size), tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                                    tuple(cfg.get("std", (0.229, 0.224, 0.225)))))
        self.set_backbone(net, f"{backbone}:stem{int(stem_stride)}", freeze)
        layer = nn.Linear(net.num_features, 1)
        nn.init.normal_(layer.weight, 0.0, 0.02)
        nn.init.zeros_(layer.bias)
        self.head_net = layer

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))


@register_model("aligned-crops", "for aligned pairs (data align), after Rajan et al. ICLR 2025: ImageNet "
                                 "tf_efficientnet_lite0 without its first down-sampling, fine-tuned on 96-px "
                                 "native-scale crops; paired batches, blur/JPEG/scale; crops test geometry",
                options=("pretrained", "pretrained_file", "freeze", "input_size", "backbone", "stem_stride"))
def aligned_crops(pretrained: bool = True, pretrained_file: str | None = None, freeze: bool = False,
                  input_size: int = ALIGNED_CROP, backbone: str = ALIGNED_BACKBONE,
                  stem_stride: int = 1) -> AlignedCrops:
    return AlignedCrops(pretrained=pretrained, pretrained_file=pretrained_file, freeze=freeze, input_size=input_size,
                        backbone=backbone, stem_stride=stem_stride)
