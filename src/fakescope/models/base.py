"""The detector interface every model implements.

A :class:`Detector` takes images in [0, 1] (float, ``[B, 3, S, S]`` at ``preprocess.input_size``)
and normalises them itself, so attacks and callers never see mean/std. It is split into
``features`` (the backbone) and ``head`` so that a frozen backbone's features can be cached.
Its output is one logit (sigmoid, P(ai)), two logits (softmax over nature, ai) or, for generator
attribution, ``1 + N`` logits (softmax over nature and N generators); ``ai_logit`` turns any of them
into the same decision score, the log-odds of ``p_ai = 1 - P(nature)``.

Each model also carries, as data, its training :class:`~fakescope.models.recipe.Recipe` (``recipe``;
None: fakescope's defaults) and its test-time geometry (``test_geometry``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fakescope.models.recipe import Recipe


@dataclass(frozen=True)
class Preprocess:
    """What a model expects, as data: square input size and the normalisation it applies inside."""

    input_size: int
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def to_dict(self) -> dict:
        return asdict(self)


class Detector(nn.Module):
    """Base class: subclasses build ``self.backbone`` (may be empty) and ``self.head_net``."""

    num_outputs: int = 1
    frozen: bool = False
    recipe: Recipe | None = None
    test_geometry: str = "resize"
    pretrained_weights: bool = True
    """False for models trained from scratch (no pretrained weights exist)."""

    def __init__(self, preprocess: Preprocess) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.register_buffer("_mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(preprocess.std).view(1, 3, 1, 1), persistent=False)

    def set_backbone(self, net: nn.Module, name: str, freeze: bool) -> None:
        """Attach the backbone ``net`` (named ``name`` in configs and cache keys); ``freeze`` stops its
        gradients and keeps it in eval mode (BatchNorm statistics fixed, no dropout)."""
        self.backbone_name = name
        self.backbone = net
        self.frozen = bool(freeze)
        if self.frozen:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            self.backbone.eval()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._mean.to(x.dtype)) / self._std.to(x.dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> feature vectors ``[B, D]``."""
        raise NotImplementedError

    def head(self, f: torch.Tensor) -> torch.Tensor:
        """Feature vectors -> logits ``[B, num_outputs]``."""
        return self.head_net(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True) -> Detector:
        super().train(mode)
        if self.frozen:  # a frozen backbone keeps its BatchNorm statistics and has no dropout
            self.backbone.eval()
        return self

    def ai_logit(self, logits: torch.Tensor) -> torch.Tensor:
        """The decision score: log-odds of 'ai' (``z`` for one logit, ``z_ai - z_nature`` for two,
        ``logsumexp(z_generators) - z_nature`` for attribution: the log-odds of ``1 - P(nature)``)."""
        if logits.shape[1] == 1:
            return logits[:, 0]
        if logits.shape[1] == 2:
            return logits[:, 1] - logits[:, 0]
        return torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0]

    def p_ai(self, logits: torch.Tensor) -> torch.Tensor:
        """P(ai), computed in float64 so that the logit stays recoverable (|z| up to ~36, where float32
        saturates at ~17): calibration divides that logit by a temperature."""
        return torch.sigmoid(self.ai_logit(logits.double()))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy for one logit, categorical cross-entropy for two or more (as in the study)."""
        if logits.shape[1] == 1:
            return F.binary_cross_entropy_with_logits(logits[:, 0].float(), labels.float())
        return F.cross_entropy(logits.float(), labels.long())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def set_num_outputs(model: Detector, k: int) -> Detector:
    """Give ``model`` a fresh last linear layer with ``k`` outputs (e.g. ``1 + N`` classes for generator
    attribution); every other layer is kept. Works for any detector whose head ends in ``nn.Linear``."""
    head = model.head_net
    if isinstance(head, nn.Linear):
        model.head_net = nn.Linear(head.in_features, k)
    else:
        names = [n for n, m in head.named_modules() if isinstance(m, nn.Linear)]
        if not names:
            raise ValueError(f"{type(model).__name__}'s head has no linear layer to resize")
        parent = head
        *path, last = names[-1].split(".")
        for part in path:
            parent = getattr(parent, part)
        old = getattr(parent, last)
        setattr(parent, last, nn.Linear(old.in_features, k))
    model.num_outputs = k
    return model
