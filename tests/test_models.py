import pytest
import torch
from torch import nn

from fakescope.errors import FakescopeError
from fakescope.models import create_model, list_models


def test_registry_lists_the_study_models():
    names = list_models()
    assert {"cnn32", "resnet50", "convnext_small", "timm"} <= set(names)
    with pytest.raises(FakescopeError,
                       match="unknown model 'vgg': expected one of aligned-crops, cnn32, cnnspot, convnext_small"):
        create_model("vgg")
    with pytest.raises(FakescopeError, match="unknown timm model"):
        create_model("timm:not_a_model_xyz", pretrained=False)


def test_cnn32_layer_by_layer():
    m = create_model("cnn32")
    convs = [m_ for m_ in m.backbone if isinstance(m_, nn.Conv2d)]
    pools = [m_ for m_ in m.backbone if isinstance(m_, nn.MaxPool2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    assert all(c.kernel_size == (3, 3) and c.padding == "same" for c in convs)
    assert len(pools) == 3 and all(p.kernel_size == 2 for p in pools)
    kinds = [type(m_) for m_ in m.backbone]
    assert kinds == [nn.Conv2d, nn.ReLU, nn.MaxPool2d] * 3 + [nn.Flatten]
    dense1, relu, drop, dense2 = m.head_net
    assert (dense1.in_features, dense1.out_features) == (128 * 4 * 4, 128)
    assert isinstance(relu, nn.ReLU) and isinstance(drop, nn.Dropout) and drop.p == 0.5
    assert dense2.out_features == 2
    assert m.preprocess.input_size == 32
    x = torch.rand(5, 3, 32, 32)
    assert m(x).shape == (5, 2)
    m.eval()
    p = m.p_ai(m(x))
    assert p.shape == (5,) and p.dtype == torch.float64
    assert torch.allclose(p, torch.softmax(m(x).double(), 1)[:, 1], atol=1e-6)
    assert create_model("cnn32", filters=[8, 16, 32])(x).shape == (5, 2)


def test_resnet50_backbone_frozen_and_head_shapes():
    m = create_model("resnet50", pretrained=False)
    assert m.frozen
    assert all(not p.requires_grad for p in m.backbone.parameters())
    assert all(p.requires_grad for p in m.head_net.parameters())
    dense1, relu, drop, dense2 = m.head_net
    assert (dense1.in_features, dense1.out_features) == (2048, 256) and drop.p == 0.5
    assert (dense2.in_features, dense2.out_features) == (256, 1)
    m.train()
    assert not m.backbone.training and m.head_net.training  # BatchNorm statistics stay frozen
    assert m.preprocess.input_size == 224
    with torch.no_grad():
        assert m(torch.rand(2, 3, 224, 224)).shape == (2, 1)
    # only the head is trainable: one optimizer step leaves the backbone bit-identical
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    opt = torch.optim.Adam(m.trainable_parameters(), lr=1e-2)
    loss = m.loss(m(torch.rand(2, 3, 64, 64)), torch.tensor([0, 1]))
    loss.backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in m.backbone.state_dict().items())


def test_convnext_small_finetunes_by_default_and_can_freeze():
    m = create_model("convnext_small", pretrained=False)
    assert not m.frozen and all(p.requires_grad for p in m.backbone.parameters())
    assert m.head_net[0].in_features == 768 and m.head_net[-1].out_features == 1
    f = create_model("convnext_small", pretrained=False, freeze=True)
    assert f.frozen and not any(p.requires_grad for p in f.backbone.parameters())


def test_missing_weights_fail_fast_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FakescopeError, match="--pretrained-file PATH.*--no-pretrained"):
        create_model("resnet50")
    with pytest.raises(FakescopeError, match="not found"):
        create_model("resnet50", pretrained_file=str(tmp_path / "nope.safetensors"))


def test_pretrained_file_loads_real_weights_and_preprocessing(lite0_weights):
    m = create_model("timm:tf_efficientnet_lite0", pretrained_file=str(lite0_weights))
    assert m.preprocess.mean == (0.5, 0.5, 0.5) and m.preprocess.input_size == 224
    assert m.frozen
    r = create_model("timm:tf_efficientnet_lite0", pretrained=False)
    w1 = m.backbone.conv_stem.weight
    assert not torch.equal(w1, r.backbone.conv_stem.weight)
    from safetensors.torch import load_file

    ref = load_file(str(lite0_weights))
    assert torch.equal(w1, ref["conv_stem.weight"])


def test_normalisation_happens_inside_the_model():
    m = create_model("timm:resnet18", pretrained=False, input_size=64)
    m.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        direct = m.head(m.backbone((x - torch.tensor(m.preprocess.mean).view(1, 3, 1, 1))
                                   / torch.tensor(m.preprocess.std).view(1, 3, 1, 1)))
        assert torch.allclose(m(x), direct, atol=1e-5)


def test_unknown_options_are_errors_that_name_the_valid_ones():
    with pytest.raises(FakescopeError, match=r"model 'cnn32' takes no option 'freeze', 'pretrained': expected "
                                             r"options among filters, hidden, dropout, input_size"):
        create_model("cnn32", pretrained=False, freeze=True)
    with pytest.raises(FakescopeError, match=r"takes no option 'head_size'.*hidden"):
        create_model("timm:test_efficientnet", pretrained=False, head_size=3)
    with pytest.raises(FakescopeError, match=r"takes no option 'filters'"):
        create_model("resnet50", pretrained=False, filters=[8])
    with pytest.raises(FakescopeError, match=r"input_size of at least 2\*\*layers = 8"):
        create_model("cnn32", input_size=4)


def test_cnn32_input_size_is_a_real_option():
    m = create_model("cnn32", input_size=48, filters=[4, 8, 8], hidden=16, dropout=0.25)
    assert m.preprocess.input_size == 48 and m.head_net[0].in_features == 8 * 6 * 6
    assert m.head_net[2].p == 0.25 and m.head_net[0].out_features == 16
    assert m(torch.rand(2, 3, 48, 48)).shape == (2, 2)


def test_old_cnn32_configs_with_a_pretrained_flag_still_load():
    """fakescope 0.1.0's train command recorded ``pretrained: true`` for every model."""
    from fakescope.engine.checkpoint import build_model

    m = build_model({"model": {"name": "cnn32", "options": {"pretrained": True, "filters": [4, 8, 8]}}})
    assert m.head_net[0].in_features == 8 * 4 * 4
    t = build_model({"model": {"name": "timm:test_efficientnet", "options": {"input_size": 64}}})
    assert t.preprocess.input_size == 64
