"""The field's detectors as presets: npr, cnnspot, univfd (architecture, recipe and geometry as data)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fakescope.errors import FakescopeError
from fakescope.models import GEOMETRIES, create_model, list_models, set_num_outputs
from fakescope.models.npr import npr_residual
from fakescope.models.presets import CLIP_EMBED_DIM


def test_presets_are_registered_with_their_geometry_and_recipe():
    assert {"npr", "cnnspot", "univfd"} <= set(list_models())
    npr = create_model("npr")
    assert npr.test_geometry == "center_crop" and npr.test_geometry in GEOMETRIES
    assert (npr.recipe.lr, npr.recipe.batch_size, npr.recipe.optimizer) == (2e-4, 32, "adam")
    spot = create_model("cnnspot", pretrained=False)
    r = spot.recipe
    assert (r.lr, r.batch_size, r.betas[0], r.lr_schedule) == (1e-4, 64, 0.9, "plateau")
    assert r.schedule["factor"] == 0.1
    assert r.augment["blur_prob"] == 0.5 and tuple(r.augment["blur_sigma"]) == (0.0, 3.0)
    assert r.augment["jpeg_prob"] == 0.5 and tuple(r.augment["jpeg_quality"]) == (30, 100)
    assert r.augment["native_crop"] is True
    uni = create_model("univfd", pretrained=False, tiny=True, input_size=28)
    assert uni.recipe.lr == 1e-4 and uni.test_geometry == "center_crop"
    assert create_model("cnn32").test_geometry == "resize" and create_model("cnn32").recipe is None
    assert not npr.pretrained_weights and spot.pretrained_weights and uni.pretrained_weights


def test_npr_residual_hand_computed():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # every pixel minus the top-left pixel of its 2x2 block
    expected = torch.tensor([[0, 1, 0, 1], [4, 5, 4, 5], [0, 1, 0, 1], [4, 5, 4, 5]], dtype=torch.float32)
    assert torch.equal(npr_residual(x)[0, 0], expected)
    odd = torch.arange(9.0).view(1, 1, 3, 3)  # the last row and column are blocks of their own
    assert torch.equal(npr_residual(odd)[0, 0], torch.tensor([[0.0, 1, 0], [3, 4, 3], [0, 1, 0]]))


def test_npr_residual_equals_the_official_interpolate_form_and_vanishes_on_nearest_upsampling():
    x = torch.rand(2, 3, 16, 12)
    official = x - F.interpolate(F.interpolate(x, scale_factor=0.5, mode="nearest", recompute_scale_factor=True),
                                 scale_factor=2, mode="nearest", recompute_scale_factor=True)
    assert torch.allclose(npr_residual(x), official)
    up = F.interpolate(torch.rand(2, 3, 8, 8), scale_factor=2, mode="nearest")
    assert torch.count_nonzero(npr_residual(up)) == 0
    # so NPR cannot tell two different nearest-upsampled images apart (it sees only the residual)
    m = create_model("npr", input_size=16).eval()
    other = F.interpolate(torch.rand(2, 3, 8, 8), scale_factor=2, mode="nearest")
    with torch.no_grad():
        assert torch.allclose(m(up), m(other))
        assert not torch.allclose(m(up), m(torch.rand(2, 3, 16, 16)))


def test_npr_architecture_and_parameter_count():
    m = create_model("npr")
    stem = m.backbone[0]
    assert isinstance(stem, nn.Conv2d) and stem.kernel_size == (3, 3) and stem.stride == (2, 2)
    assert stem.out_channels == 64 and isinstance(m.backbone[3], nn.MaxPool2d)
    layer1, layer2 = m.backbone[4], m.backbone[5]
    assert len(layer1) == 3 and len(layer2) == 4  # ResNet-50's first two stages only
    assert layer1[-1].conv3.out_channels == 256 and layer2[-1].conv3.out_channels == 512
    assert (m.head_net.in_features, m.head_net.out_features) == (512, 1)
    assert sum(p.numel() for p in m.parameters()) == 1_437_761  # Tan et al.: 1.44 M
    assert m.preprocess.input_size == 224 and all(p.requires_grad for p in m.parameters())
    with torch.no_grad():
        assert m(torch.rand(3, 3, 224, 224)).shape == (3, 1)
    with pytest.raises(FakescopeError, match="trained from scratch"):
        create_model("npr", pretrained_file="w.safetensors")


def test_npr_learns_a_small_fixture_with_its_recipe_optimizer():
    """'nature' images are full-resolution noise, 'ai' ones noise up-sampled x2 (bilinear, a generator's
    up-sampling trace): NPR with its recipe's optimizer (Adam, lr 2e-4) separates held-out images.
    (Batches of 8: BatchNorm's running statistics need a few dozen steps before evaluation works.)"""
    g = torch.Generator().manual_seed(0)

    def batch(n, s=16):
        y = torch.arange(n) % 2
        full = torch.rand(n, 3, s, s, generator=g)
        up = F.interpolate(torch.rand(n, 3, s // 2, s // 2, generator=g), scale_factor=2, mode="bilinear")
        return torch.where(y.view(-1, 1, 1, 1) == 1, up, full), y

    xtr, ytr = batch(128)
    xte, yte = batch(64)
    torch.manual_seed(0)
    m = create_model("npr", input_size=16)
    opt = torch.optim.Adam(m.parameters(), lr=m.recipe.lr, betas=m.recipe.betas)
    for _ in range(3):
        for s in range(0, len(xtr), 8):
            loss = m.loss(m(xtr[s:s + 8]), ytr[s:s + 8])
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.eval()
    with torch.no_grad():
        acc = ((m.p_ai(m(xte)) >= 0.5).long() == yte).float().mean().item()
    assert acc >= 0.95


def test_cnnspot_is_resnet50_with_one_linear_logit():
    m = create_model("cnnspot", pretrained=False)
    # torchvision ResNet-50 (25,557,032 parameters) with its 1000-way fc replaced by 2048 -> 1
    assert sum(p.numel() for p in m.parameters()) == 25_557_032 - 2048 * 1000 - 1000 + 2048 + 1
    assert isinstance(m.head_net, nn.Linear) and (m.head_net.in_features, m.head_net.out_features) == (2048, 1)
    assert not m.frozen and all(p.requires_grad for p in m.parameters())  # fine-tuned end to end
    assert 0.01 < m.head_net.weight.std().item() < 0.03  # N(0, 0.02) as in the paper's code
    assert m.preprocess.mean == (0.485, 0.456, 0.406)
    with torch.no_grad():
        assert m.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 1)


def test_univfd_tiny_plumbing_and_frozen_encoder():
    m = create_model("univfd", pretrained=False, tiny=True, input_size=28)
    assert m.frozen and not any(p.requires_grad for p in m.backbone.parameters())
    assert [p.numel() for p in m.trainable_parameters()] == [32, 1]  # one linear layer
    assert m.preprocess.mean == (0.48145466, 0.4578275, 0.40821073)
    m.train()
    assert not m.backbone.training
    with torch.no_grad():
        assert m(torch.rand(2, 3, 28, 28)).shape == (2, 1)
        assert m.features(torch.rand(2, 3, 28, 28)).shape == (2, 32)


def test_univfd_full_size_parameter_count_without_allocating():
    with torch.device("meta"):
        m = create_model("univfd", pretrained=False)
    enc = sum(p.numel() for p in m.backbone.parameters())
    # CLIP ViT-L/14 image encoder: 303,966,208 parameters + timm's (zero) projection bias
    assert enc == 303_966_208 + CLIP_EMBED_DIM
    assert (m.head_net.in_features, m.head_net.out_features) == (768, 1)
    assert type(m.backbone.blocks[0].mlp.act).__name__ == "QuickGELU"  # CLIP's own activation
    assert m.backbone.patch_embed.proj.kernel_size == (14, 14) and len(m.backbone.blocks) == 24


def test_missing_weights_fail_with_the_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FakescopeError, match=r"resnet50.tv_in1k.*--pretrained-file PATH.*--no-pretrained"):
        create_model("cnnspot")
    with pytest.raises(FakescopeError, match=r"huggingface-cli download timm/vit_large_patch14_clip_224\.openai"):
        create_model("univfd")
    with pytest.raises(FakescopeError, match="not found"):
        create_model("univfd", pretrained_file=str(tmp_path / "clip.safetensors"))


def test_set_num_outputs_resizes_only_the_last_linear_layer():
    for name, kw in (("cnn32", {}), ("npr", {"input_size": 32}), ("timm:resnet18", {"pretrained": False})):
        m = create_model(name, **kw)
        before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
        set_num_outputs(m, 7)
        assert m.num_outputs == 7 and m.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 7)
        assert all(torch.equal(before[k], v) for k, v in m.backbone.state_dict().items())


def test_p_ai_of_an_attribution_head_is_one_minus_p_nature():
    m = create_model("cnn32")
    z = torch.randn(5, 4)
    assert torch.allclose(m.p_ai(z), 1 - torch.softmax(z.double(), 1)[:, 0])
    z2 = torch.randn(5, 2)
    assert torch.allclose(m.p_ai(z2), torch.softmax(z2.double(), 1)[:, 1])
