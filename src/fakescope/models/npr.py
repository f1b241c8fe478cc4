"""NPR: neighbouring pixel relationships (Tan et al., "Rethinking the Up-Sampling Operations in
CNN-based Generative Network for Generalizable Deepfake Detection", CVPR 2024)."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from fakescope.errors import FakescopeError
from fakescope.models.base import Detector, Preprocess
from fakescope.models.recipe import Recipe
from fakescope.models.registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NPR_RECIPE = Recipe(
    lr=2e-4, batch_size=32, optimizer="adam", betas=(0.9, 0.999), lr_schedule="step",
    schedule={"every": 10, "factor": 0.9}, augment={"native_crop": True, "flip": True},
    source="Tan et al. 2024 (official code): Adam lr 2e-4, batch 32, lr x0.9 every 10 epochs, "
           "random 224 crop and horizontal flip, no blur/JPEG augmentation",
)


def npr_residual(x: torch.Tensor) -> torch.Tensor:
    """``x - up2(down2(x))`` with nearest-neighbour resampling, factor 2: every pixel minus the
    top-left pixel of its 2x2 block (what ``F.interpolate(..., 0.5, 'nearest')`` then ``x2`` keeps).

    Zero on any image that is itself a nearest-neighbour x2 up-sampling; odd sizes are handled
    (the last row/column is its own block)."""
    h, w = x.shape[-2:]
    ref = x[..., ::2, ::2].repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)[..., :h, :w]
    return x - ref


class NPR(Detector):
    """Tan et al., CVPR 2024. The neighbouring-pixel residual ``x - up2(down2(x))`` (nearest,
    factor 2), scaled by 2/3, feeds a ResNet-50 cut after its second stage: a 3x3 stride-2 stem
    convolution (64 channels) + BatchNorm + ReLU, 3x3 stride-2 max-pooling, the first two bottleneck
    stages (3 and 4 blocks, 256 and 512 channels), global average pooling and one linear layer
    (512 -> 1, sigmoid); 1.44 M parameters. Trained from scratch (no pretrained weights).

    Recipe (:data:`NPR_RECIPE`, from the official code): Adam, lr 2e-4, batch 32, lr x0.9 every 10
    epochs, random 224 crops and horizontal flips, binary cross-entropy. Test-time geometry:
    ``center_crop`` (the residual lives at the image's pixel scale; resizing would erase it).

    What fakescope does differently: inputs are normalised with ImageNet mean/std inside ``forward``
    (as the official data loader does before the model); the residual is computed by slicing
    rather than two ``F.interpolate`` calls, which gives the same values on even sizes and also
    works on odd ones; images smaller than 224 are enlarged to 224 before cropping instead of padded.
    """

    test_geometry = "center_crop"
    recipe = NPR_RECIPE
    pretrained_weights = False

    def __init__(self, input_size: int = 224) -> None:
        super().__init__(Preprocess(input_size, IMAGENET_MEAN, IMAGENET_STD))
        self.inplanes = 64
        stem = [nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64),
                nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=3, stride=2, padding=1)]
        self.backbone = nn.Sequential(*stem, self._make_layer(64, 3), self._make_layer(128, 4, stride=2),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head_net = nn.Linear(512, 1)
        for m in self.modules():  # torchvision's ResNet initialisation, as the official code
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                                 nn.BatchNorm2d(planes * Bottleneck.expansion))
        layers = [Bottleneck(self.inplanes, planes, stride, down)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(npr_residual(self.normalize(x)) * (2.0 / 3.0))


@register_model("npr", "Tan et al. CVPR 2024: nearest-neighbour up-sampling residual into the first two "
                       "ResNet-50 stages, 1 logit; trained from scratch; centre-crop test geometry",
                options=("input_size", "pretrained", "pretrained_file", "freeze"))
def npr(input_size: int = 224, pretrained: bool = True, pretrained_file: str | None = None,
        freeze: bool | None = None) -> NPR:
    """NPR has no pretrained weights: ``pretrained`` (on by default on the command line) has no effect,
    a ``pretrained_file`` or ``freeze`` is an error."""
    if pretrained_file:
        raise FakescopeError("expected no --pretrained-file for npr: it is trained from scratch (no pretrained "
                             "weights exist); drop the option")
    if freeze:
        raise FakescopeError("expected no --freeze for npr: it is trained from scratch, end to end; drop the option")
    return NPR(int(input_size))
