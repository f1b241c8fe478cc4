"""Presets of the field's detectors built on pretrained backbones: ``cnnspot`` and ``univfd``.

(``npr``, trained from scratch, lives in :mod:`fakescope.models.npr`.) Each carries its paper's
preprocessing, training recipe and test-time geometry as data; pretrained weights come through
timm exactly as for the other backbones (the hub when online, ``pretrained_file`` offline), and a
missing weight file fails at once with the message that says how to provide it.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from fakescope.errors import FakescopeError
from fakescope.models.base import Detector, Preprocess
from fakescope.models.npr import IMAGENET_MEAN, IMAGENET_STD
from fakescope.models.recipe import PLATEAU_DEFAULTS, Recipe
from fakescope.models.registry import register_model
from fakescope.models.timm_models import build_backbone

CNNSPOT_BACKBONE = "resnet50.tv_in1k"
CLIP_BACKBONE = "vit_large_patch14_clip_quickgelu_224.openai"
"""timm's CLIP ViT-L/14 (OpenAI) with CLIP's own QuickGELU activation; its weights are those of
``vit_large_patch14_clip_224.openai`` (the same Hugging Face repository, timm/vit_large_patch14_clip_224.openai)."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_EMBED_DIM = 768

CNNSPOT_RECIPE = Recipe(
    lr=1e-4, batch_size=64, optimizer="adam", betas=(0.9, 0.999), lr_schedule="plateau",
    schedule=dict(PLATEAU_DEFAULTS),
    augment={"blur_prob": 0.5, "blur_sigma": (0.0, 3.0), "jpeg_prob": 0.5, "jpeg_quality": (30, 100),
             "native_crop": True, "flip": True},
    source="Wang et al. 2020, 'Blur+JPEG (0.5)': Adam lr 1e-4 (beta1 0.9), batch 64, Gaussian blur sigma in "
           "[0, 3] and JPEG quality in [30, 100] each with probability 0.5, random 224 crop, horizontal flip, "
           "lr / 10 when validation accuracy has not improved by 0.1 % for 5 epochs, stop below 1e-6",
)

UNIVFD_RECIPE = Recipe(
    lr=1e-4, batch_size=256, optimizer="adam", betas=(0.9, 0.999), lr_schedule="plateau",
    schedule=dict(PLATEAU_DEFAULTS), augment={},
    source="Ojha et al. 2023: linear probe on frozen CLIP ViT-L/14 features, Adam lr 1e-4, batch 256, BCE, "
           "lr / 10 on a validation-accuracy plateau (the training loop of Wang et al.); 224 crops",
)


def _head_init(layer: nn.Linear) -> nn.Linear:
    """Both papers' code initialises the new linear layer with N(0, 0.02)."""
    nn.init.normal_(layer.weight, 0.0, 0.02)
    nn.init.zeros_(layer.bias)
    return layer


class CNNSpot(Detector):
    """Wang et al., "CNN-generated images are surprisingly easy to spot... for now", CVPR 2020.

    An ImageNet ResNet-50 (torchvision's weights, timm ``resnet50.tv_in1k``) whose classifier is
    replaced by one linear layer (2048 -> 1, sigmoid), fine-tuned end to end with binary
    cross-entropy; 23.5 M parameters. ImageNet mean/std; 224 input.

    Recipe (:data:`CNNSPOT_RECIPE`, the paper's "Blur+JPEG (0.5)" model): Adam lr 1e-4 (beta1 0.9),
    batch 64, Gaussian blur (sigma in [0, 3]) and JPEG (quality in [30, 100]) each with probability
    0.5, a random 224 crop at the image's pixel scale and a horizontal flip, learning rate divided
    by 10 when validation accuracy plateaus (no gain over 0.1 % in 5 epochs; training ends below 1e-6).
    Test-time geometry: ``center_crop``.

    What fakescope does differently: Wang et al. score the whole image at test time; fakescope
    scores its centre 224 crop (``--test-geometry crops`` averages crops covering the image), so
    images of any size are batched. ``--freeze`` trains the linear layer only (not in the paper).
    """

    test_geometry = "center_crop"
    recipe = CNNSPOT_RECIPE

    def __init__(self, *, pretrained: bool = True, pretrained_file: str | None = None, freeze: bool = False,
                 input_size: int = 224) -> None:
        net = build_backbone(CNNSPOT_BACKBONE, pretrained, pretrained_file)
        super().__init__(Preprocess(int(input_size), IMAGENET_MEAN, IMAGENET_STD))
        self.set_backbone(net, CNNSPOT_BACKBONE, freeze)
        self.head_net = _head_init(nn.Linear(net.num_features, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))


class UnivFD(Detector):
    """Ojha et al., "Towards Universal Fake Image Detectors that Generalize Across Generative
    Models", CVPR 2023.

    The frozen image encoder of OpenAI's CLIP ViT-L/14 (its 768-d projected embedding, through
    timm), then one linear layer (768 -> 1, sigmoid), binary cross-entropy; 304 M frozen parameters
    and 769 trained ones. CLIP's mean/std; 224 input. The encoder is frozen, so its features are
    computed once and cached (as for any frozen backbone) and training is a linear probe.

    Recipe (:data:`UNIVFD_RECIPE`): Adam lr 1e-4, batch 256, learning rate divided by 10 on a
    validation-accuracy plateau. Test-time geometry: ``center_crop`` (224 crops, as the paper).

    What fakescope does differently: training sees the centre 224 crop of each image (not a random
    crop) and no blur/JPEG augmentation by default, so the encoder runs once per image and its
    features are cached; ``--aug-native-crop``/``--aug-blur``/``--aug-jpeg`` restore them at one
    encoder pass per image per epoch. The weights are timm's ``vit_large_patch14_clip_224.openai``,
    run with CLIP's QuickGELU activation (timm's ``vit_large_patch14_clip_quickgelu_224``) so the
    embedding is the one CLIP computes. ``tiny=True`` builds a 2-block, 64-wide encoder of the same
    design with random weights, for tests.
    """

    test_geometry = "center_crop"
    recipe = UNIVFD_RECIPE

    def __init__(self, *, pretrained: bool = True, pretrained_file: str | None = None, freeze: bool = True,
                 tiny: bool = False, input_size: int = 224) -> None:
        if tiny:
            if pretrained and pretrained_file:
                raise FakescopeError("expected no --pretrained-file with tiny=True: the tiny encoder has no weights")
            net = timm.create_model(CLIP_BACKBONE.split(".")[0], pretrained=False, num_classes=32, embed_dim=64,
                                    depth=2, num_heads=2, img_size=int(input_size))
        else:
            net = build_backbone(CLIP_BACKBONE, pretrained, pretrained_file, num_classes=CLIP_EMBED_DIM,
                                 img_size=int(input_size))
        super().__init__(Preprocess(int(input_size), CLIP_MEAN, CLIP_STD))
        self.set_backbone(net, CLIP_BACKBONE + (":tiny" if tiny else ""), freeze)
        self.head_net = _head_init(nn.Linear(net.num_classes, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))


@register_model("cnnspot", "Wang et al. CVPR 2020: ImageNet ResNet-50 fine-tuned end to end, 1 logit; "
                           "Blur+JPEG (0.5) recipe; centre-crop test geometry",
                options=("pretrained", "pretrained_file", "freeze", "input_size"))
def cnnspot(pretrained: bool = True, pretrained_file: str | None = None, freeze: bool = False,
            input_size: int = 224) -> CNNSpot:
    return CNNSpot(pretrained=pretrained, pretrained_file=pretrained_file, freeze=freeze, input_size=input_size)


@register_model("univfd", "Ojha et al. CVPR 2023: frozen CLIP ViT-L/14 (OpenAI) embedding + one linear layer; "
                          "centre-crop test geometry",
                options=("pretrained", "pretrained_file", "freeze", "tiny", "input_size"))
def univfd(pretrained: bool = True, pretrained_file: str | None = None, freeze: bool = True, tiny: bool = False,
           input_size: int = 224) -> UnivFD:
    return UnivFD(pretrained=pretrained, pretrained_file=pretrained_file, freeze=freeze, tiny=tiny,
                  input_size=input_size)
