"""Madry-style adversarial training: the optimizer really sees PGD examples inside the eps-ball."""

import pytest
import torch

from fakescope.attacks import PGD
from fakescope.engine.train import TrainOptions, train

from synth import make_dataset


@pytest.mark.parametrize("mix", [0.0, 0.5])
def test_training_batches_are_pgd_examples(tmp_path, monkeypatch, mix):
    data = make_dataset(tmp_path / "data", generators=("g",), n_train=20, n_val=4, seed=3)
    eps = 4 / 255
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_call = PGD.__call__

    def spy(self, x, y):
        x_adv = real_call(self, x, y)
        seen.append((x.detach().clone(), x_adv.detach().clone()))
        return x_adv

    monkeypatch.setattr(PGD, "__call__", spy)
    fed: list[torch.Tensor] = []
    from fakescope.models import cnn32 as cnn32_module

    real_features = cnn32_module.CNN32.features

    def record(self, x):
        if self.training:
            fed.append(x.detach().clone())
        return real_features(self, x)

    monkeypatch.setattr(cnn32_module.CNN32, "features", record)
    train(TrainOptions(model="cnn32", data=str(data), epochs=1, batch_size=8, adv_train="pgd", adv_eps=eps,
                       adv_steps=3, adv_mix=mix), tmp_path / "run")
    assert len(seen) == len(fed) > 0  # one attack per training batch
    for (clean, _adv), x_in in zip(seen, fed):
        k = int(round(len(clean) * mix))
        assert torch.equal(x_in[:k], clean[:k])  # the clean share of the batch
        delta = (x_in[k:] - clean[k:]).abs()
        assert delta.max() <= eps + 1e-6 and delta.max() > eps / 2  # PGD examples inside the ball
        assert x_in.min() >= 0 and x_in.max() <= 1
