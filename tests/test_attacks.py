"""Adversarial attacks on a really trained detector: eps-balls, monotonicity, determinism,
one- vs two-logit heads, direction filtering, transfer, errors. CPU only, a few seconds."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fakescope.attacks import (
    ATTACKS,
    FGSM,
    PGD,
    PGDL2,
    AttackError,
    Square,
    create_attack,
    parse_eps,
    perturb_batch,
    robustness,
    true_label_loss,
)
from fakescope.attacks.base import project_l2, project_linf
from fakescope.models import Detector, create_model
from fakescope.models.cnn32 import CNN32

EPS_LINF = [0, 1 / 255, 2 / 255, 4 / 255, 8 / 255]
SIZE = 32
# the study's cnn32 architecture at reduced width, so training and attacks take a second on two cores
CNN = dict(filters=(8, 16, 32), hidden=32)
CHECKER, CAST = 0.02, 0.03  # amplitudes of the two 'ai' traces
SMALL = {"fgsm": {}, "pgd": {"steps": 5}, "pgd-l2": {"steps": 5}, "square": {"n_queries": 40}}


def make_images(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Half 'nature' (0): smooth grey-ish colour fields; half 'ai' (1): the same plus a faint
    checkerboard (an up-sampling trace, random phase) and a warm colour cast (R up, B down).
    Both carry a little noise. The two traces are small enough for eps = 8/255 to erase or forge."""
    y = torch.arange(n) % 2
    low = torch.rand(n, 1, 4, 4, generator=g) + 0.02 * torch.randn(n, 3, 1, 1, generator=g)
    x = F.interpolate(low, size=SIZE, mode="bilinear", align_corners=False) * 0.6 + 0.2
    i = torch.arange(SIZE)
    checker = ((i[:, None] + i[None, :]) % 2).float() * 2 - 1
    phase = torch.randint(0, 2, (n, 1, 1, 1), generator=g).float() * 2 - 1
    cast = torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1)
    x = x + y.view(-1, 1, 1, 1).float() * (CHECKER * checker * phase + CAST * cast)
    x = x + 0.01 * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1), y.long()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float(((model.p_ai(model(x)) >= 0.5).long() == y).float().mean())


def train_detector(seed: int, max_steps: int = 400) -> Detector:
    """A cnn32 trained with Adam until it fits its training images (checked every 25 steps); a run
    that stalls (it happens to small nets) is retried from another seed, so the fixture is always trained."""
    for attempt in range(3):
        torch.manual_seed(seed + 1000 * attempt)
        g = torch.Generator().manual_seed(seed + 1000 * attempt)
        x, y = make_images(256, g)
        model = create_model("cnn32", **CNN)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        for step in range(1, max_steps + 1):
            idx = torch.randint(0, len(x), (32,), generator=g)
            model.train()
            loss = model.loss(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 25 == 0 and accuracy(model.eval(), x, y) >= 0.99:
                opt.zero_grad(set_to_none=True)
                return model.eval()
    raise RuntimeError("the fixture detector did not fit its training images")


class OneLogit(Detector):
    """The same decision function as a two-logit detector, as one logit ``z_ai - z_nature``."""

    num_outputs = 1

    def __init__(self, two_logit: Detector) -> None:
        super().__init__(two_logit.preprocess)
        self.inner = two_logit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.inner(x)
        return logits[:, 1:2] - logits[:, 0:1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small convolutions run fastest on one thread, and stay fast when other work shares the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(one_thread):
    return train_detector(seed=0)


@pytest.fixture(scope="module")
def data(one_thread):
    x, y = make_images(64, torch.Generator().manual_seed(1234))
    gens = ["alpha" if i % 4 < 2 else "beta" for i in range(len(y))]
    return x, y, gens


def batches(data, size: int = 32):
    x, y, gens = data
    return [(x[i:i + size], y[i:i + size], gens[i:i + size]) for i in range(0, len(y), size)]


def accs(result) -> list[float]:
    return [r["robust_accuracy"] for r in result["results"]]


def test_fixture_detector_is_trained(model, data):
    x, y, _ = data
    assert accuracy(model, x, y) > 0.9


@pytest.mark.parametrize("name", list(ATTACKS))
def test_eps_zero_gives_exactly_the_clean_accuracy(model, data, name):
    res = robustness(model, batches(data), attack=name, eps_list=[0],
                     attack_options=SMALL["square"] if name == "square" else None)
    x, y, gens = data
    r = res["results"][0]
    assert res["clean_accuracy"] == accuracy(model, x, y) and res["n"] == len(y)
    assert r["robust_accuracy"] == accuracy(model, x, y)  # the eps row's own tally, against a direct count
    for g in set(gens):  # and per generator, against the model's answers on that generator's images
        sel = torch.tensor([h == g for h in gens])
        assert r["per_generator"][g]["robust_accuracy"] == accuracy(model, x[sel], y[sel]), g
    assert r["success_rate"] == 0.0 and r["mean_linf"] == 0.0 and r["mean_l2"] == 0.0 and r["psnr"] is None
    att = create_attack(name, model, eps=0.0)
    assert torch.equal(att(x, y), x)


@pytest.fixture(scope="module")
def fgsm_pgd_curves(model, data):
    pgd = robustness(model, batches(data), attack="pgd", eps_list=EPS_LINF, seed=7)
    fgsm = robustness(model, batches(data), attack="fgsm", eps_list=EPS_LINF, seed=7)
    return pgd, fgsm


def test_pgd_robust_accuracy_never_rises_with_eps_and_never_beats_fgsm(fgsm_pgd_curves, model, data):
    pgd, fgsm = fgsm_pgd_curves
    x, y, _ = data
    a_pgd, a_fgsm = accs(pgd), accs(fgsm)
    assert [r["eps"] for r in pgd["results"]] == EPS_LINF
    assert all(later <= earlier for earlier, later in zip(a_pgd, a_pgd[1:], strict=False)), a_pgd
    assert all(p <= f for p, f in zip(a_pgd, a_fgsm, strict=True)), (a_pgd, a_fgsm)
    assert a_pgd[0] == a_fgsm[0] == accuracy(model, x, y)  # eps 0: the model's own accuracy, counted directly


def test_gradient_attacks_flip_decisions(fgsm_pgd_curves, model, data):
    pgd, fgsm = fgsm_pgd_curves
    clean = pgd["clean_accuracy"]
    assert accs(pgd)[-1] <= clean - 0.4 and accs(fgsm)[-1] <= clean - 0.2
    r = pgd["results"][-1]
    assert r["success_rate"] >= 0.4
    assert r["mean_linf"] <= 8 / 255 + 1e-6 and r["mean_linf"] > 4 / 255
    assert 20 < r["psnr"] < 60
    l2 = robustness(model, batches(data), attack="pgd-l2", eps_list=[0, 0.5, 1.0])
    assert accs(l2)[2] <= accs(l2)[1] <= clean and accs(l2)[2] <= clean - 0.2
    assert l2["results"][2]["mean_l2"] <= 1.0 + 1e-6


def test_square_black_box_flips_decisions_with_a_small_budget(model, data):
    res = robustness(model, batches(data), attack="square", eps_list=[0, 8 / 255],
                     attack_options={"n_queries": 200})
    assert accs(res)[1] <= res["clean_accuracy"] - 0.15
    assert res["results"][1]["success_rate"] >= 0.15


@pytest.mark.parametrize("name", list(ATTACKS))
def test_perturbations_stay_in_the_ball_and_in_unit_range(model, data, name):
    x, y, _ = data
    x, y = x[:24], y[:24]
    eps = 0.75 if name == "pgd-l2" else 8 / 255
    x_adv = create_attack(name, model, eps=eps, **SMALL[name])(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    d = (x_adv - x).flatten(1)
    norms = d.norm(dim=1) if name == "pgd-l2" else d.abs().amax(dim=1)
    assert float(norms.max()) <= eps + 1e-6
    assert float(norms.max()) > eps / 2  # it did move


def test_images_near_the_range_edges_stay_in_range(model):
    x = torch.zeros(4, 3, SIZE, SIZE)
    x[2:] = 1.0
    y = torch.tensor([0, 1, 0, 1])
    for name in ATTACKS:
        x_adv = create_attack(name, model, eps=0.5 if name == "pgd-l2" else 8 / 255, **SMALL[name])(x, y)
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


@pytest.mark.parametrize("name", list(ATTACKS))
def test_mode_is_restored_and_no_parameter_gradients_are_left(model, data, name):
    x, y, _ = data
    seen = []
    hook = model.register_forward_pre_hook(lambda m, inp: seen.append(m.training))
    try:
        for mode in (True, False):
            model.train(mode)
            model.head_net[2].eval()  # a mixed state (dropout off in train mode) must come back as it was
            before = [m.training for m in model.modules()]
            create_attack(name, model, eps=0.5 if name == "pgd-l2" else 4 / 255, **SMALL[name])(x[:8], y[:8])
            assert [m.training for m in model.modules()] == before
            assert all(p.grad is None for p in model.parameters())
    finally:
        hook.remove()
        model.eval()
    assert seen and not any(seen)  # every forward pass of the attack ran in eval mode


def test_attack_inside_no_grad_and_mode_restored_after_an_error(model, data):
    x, y, _ = data
    with torch.no_grad():
        x_adv = PGD(model, steps=3)(x[:8], y[:8])
    assert not torch.equal(x_adv, x[:8])
    model.train()
    try:
        with pytest.raises(AttackError, match=r"expected images with values in \[0, 1\]"):
            PGD(model)(x[:4] * 3, y[:4])
        with pytest.raises(AttackError, match="expected labels"):
            PGD(model)(x[:4], y[:3])
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize("name", list(ATTACKS))
def test_one_logit_and_two_logit_heads_give_the_same_examples(model, data, name):
    x, y, _ = data
    one = OneLogit(model).eval()
    x, y = x[:32], y[:32]
    with torch.no_grad():
        assert torch.equal(one.ai_logit(one(x)), model.ai_logit(model(x)))
    eps = 0.5 if name == "pgd-l2" else 8 / 255
    a = create_attack(name, model, eps=eps, seed=3, **SMALL[name])(x, y)
    b = create_attack(name, one, eps=eps, seed=3, **SMALL[name])(x, y)
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
    opts = SMALL[name] if name == "square" else None
    kw = dict(attack=name, eps_list=[0, eps], seed=3, attack_options=opts)
    if name in ("pgd", "pgd-l2"):
        kw["steps"] = SMALL[name]["steps"]
    assert accs(robustness(model, batches(data), **kw)) == accs(robustness(one, batches(data), **kw))


def test_the_loss_is_bce_on_the_decision_score_for_both_heads():
    torch.manual_seed(0)
    logits = torch.randn(16, 2) * 3
    y = torch.randint(0, 2, (16,))
    z = logits[:, 1] - logits[:, 0]
    bce = true_label_loss(z, y, "bce")
    assert torch.allclose(bce, F.binary_cross_entropy_with_logits(z, y.float(), reduction="none"), atol=1e-5)
    assert torch.allclose(bce, F.cross_entropy(logits, y, reduction="none"), atol=1e-5)
    assert torch.equal(true_label_loss(z, y, "margin"), -(2 * y.float() - 1) * z)
    # no cancellation to an exactly zero gradient for a very confident, correct prediction
    zc = torch.tensor([40.0, -40.0], requires_grad=True)
    (g,) = torch.autograd.grad(true_label_loss(zc, torch.tensor([1, 0])).sum(), zc)
    assert bool((g != 0).all()) and g[0] < 0 < g[1]


@pytest.mark.parametrize("name", ["pgd", "pgd-l2", "square"])
def test_same_seed_same_examples(model, data, name):
    x, y, _ = data
    x, y = x[:16], y[:16]
    eps = 0.5 if name == "pgd-l2" else 8 / 255
    att = create_attack(name, model, eps=eps, seed=11, **SMALL[name])
    first = att(x, y)
    assert torch.equal(first, att(x, y))  # a call does not consume the seed
    assert torch.equal(first, create_attack(name, model, eps=eps, seed=11, **SMALL[name])(x, y))
    other = create_attack(name, model, eps=eps, seed=12, **SMALL[name])(x, y)
    assert not torch.equal(first, other)
    state = torch.random.get_rng_state()
    att(x, y)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is never touched


def test_fgsm_is_deterministic_and_pgd_without_random_start_too(model, data):
    x, y, _ = data
    assert torch.equal(FGSM(model, seed=1)(x, y), FGSM(model, seed=2)(x, y))
    assert torch.equal(PGD(model, random_start=False, seed=1, steps=3)(x, y),
                       PGD(model, random_start=False, seed=2, steps=3)(x, y))


def test_ai_to_real_leaves_real_images_untouched(model, data):
    x, y, _ = data
    x_adv = perturb_batch(PGD(model, steps=3), x, y, "ai-to-real")
    assert torch.equal(x_adv[y == 0], x[y == 0])
    assert not torch.equal(x_adv[y == 1], x[y == 1])
    x_adv = perturb_batch(PGD(model, steps=3), x, y, "real-to-ai")
    assert torch.equal(x_adv[y == 1], x[y == 1]) and not torch.equal(x_adv[y == 0], x[y == 0])

    res = robustness(model, batches(data), attack="pgd", eps_list=[0, 8 / 255], steps=3, direction="ai-to-real")
    assert res["direction"] == "ai-to-real" and res["n"] == int((y == 1).sum())
    assert res["clean_accuracy"] == accuracy(model, x[y == 1], y[y == 1])
    real_clean = accuracy(model, x[y == 0], y[y == 0])
    for r in res["results"]:
        real = r["per_direction"]["real-to-ai"]
        assert real["attacked"] is False and real["n"] == int((y == 0).sum())
        assert real["robust_accuracy"] == real_clean and real["success_rate"] in (0.0, None)
        assert r["per_direction"]["ai-to-real"]["attacked"] is True
        assert r["per_direction"]["ai-to-real"]["robust_accuracy"] == r["robust_accuracy"]
    assert res["results"][1]["robust_accuracy"] < res["clean_accuracy"]


def test_per_generator_and_per_direction_counts_add_up(model, data):
    _, y, gens = data
    res = robustness(model, batches(data), attack="pgd", eps_list=[4 / 255], steps=3)
    r = res["results"][0]
    assert set(r["per_generator"]) == {"alpha", "beta"}
    assert sum(v["n"] for v in r["per_generator"].values()) == res["n"] == len(y)
    weighted = sum(v["robust_accuracy"] * v["n"] for v in r["per_generator"].values()) / res["n"]
    assert math.isclose(weighted, r["robust_accuracy"])
    both = r["per_direction"]
    assert both["ai-to-real"]["n"] + both["real-to-ai"]["n"] == res["n"]
    assert both["ai-to-real"]["attacked"] and both["real-to-ai"]["attacked"]


@pytest.fixture(scope="module")
def other_model(one_thread):
    return train_detector(seed=1)


def test_transfer_crafts_on_the_source_and_judges_the_target(model, other_model, data):
    x, y, _ = data
    kw = dict(attack="pgd", eps_list=[0, 8 / 255], steps=4, seed=5)
    res = robustness(other_model, batches(data), source_model=model, **kw)
    assert res["transfer"] is True
    assert res["clean_accuracy"] == accuracy(other_model, x, y)  # clean accuracy is the target's
    # the same numbers by hand: examples from the source, judged by the target
    x_adv = torch.cat([PGD(model, eps=8 / 255, steps=4, seed=5)(xb, yb) for xb, yb, _ in batches(data)])
    assert accs(res)[1] == accuracy(other_model, x_adv, y)
    white = robustness(other_model, batches(data), **kw)
    assert white["transfer"] is False and white["clean_accuracy"] == res["clean_accuracy"]
    assert accs(white)[1] <= accs(res)[1]  # white-box on the target is at least as strong as transfer here
    small = CNN32(filters=CNN["filters"], hidden=CNN["hidden"], input_size=64)
    with pytest.raises(AttackError, match="same input size"):
        robustness(other_model, batches(data), source_model=small, **kw)


def test_examples_come_back_as_arrays_and_are_written_as_pngs(model, data, tmp_path):
    from fakescope.report.artifacts import write_examples

    x, _, _ = data
    res = robustness(model, batches(data), attack="fgsm", eps_list=[0, 2 / 255, 8 / 255], max_examples=3)
    ex = res["examples"]
    assert sorted((e["index"], e["eps"]) for e in ex) == [(i, e) for i in range(3) for e in (2 / 255, 8 / 255)]
    for e in ex:
        clean = torch.from_numpy(e["clean"]).permute(2, 0, 1).float() / 255
        assert torch.allclose(clean, x[e["index"]], atol=0.5 / 255 + 1e-6)  # the clean image, 8-bit rounded
        diff = (e["adv"].astype(int) - e["clean"].astype(int))
        assert diff.any() and abs(diff).max() <= round(e["eps"] * 255) + 1
    assert "examples" not in robustness(model, batches(data), attack="fgsm", eps_list=[0])  # none asked: none kept
    out = tmp_path / "examples"
    write_examples(ex, out)
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 3 * 2 * 2
    assert "0000_eps0.0314_clean.png" in names and "0002_eps0.0078_adv.png" in names
    assert all(re.fullmatch(r"\d{4}_eps\d\.\d{4}_(clean|adv)\.png", n) for n in names)


def test_square_queries_only_outputs_within_its_budget(model, data):
    x, y, _ = data
    grad_modes = []
    hook = model.register_forward_pre_hook(lambda m, inp: grad_modes.append(torch.is_grad_enabled()))
    try:
        att = Square(model, eps=8 / 255, n_queries=25)
        att(x[:16], y[:16])
    finally:
        hook.remove()
    assert grad_modes and not any(grad_modes)
    assert int(att.last_queries.max()) <= 25


def test_unknown_attack_and_bad_eps_give_clear_errors(model, data):
    with pytest.raises(ValueError, match="unknown attack 'cw': expected one of fgsm, pgd, pgd-l2, square"):
        create_attack("cw", model)
    with pytest.raises(ValueError, match="unknown attack"):
        robustness(model, batches(data), attack="deepfool", eps_list=[0])
    with pytest.raises(ValueError, match=r"expected eps >= 0, got -0\.1"):
        FGSM(model, eps=-0.1)
    with pytest.raises(ValueError, match=r"expected eps >= 0, got -0\.5"):
        PGDL2(model, eps=-0.5)
    with pytest.raises(ValueError, match=r"expected an L-inf eps <= 1"):
        PGD(model, eps=1.5)
    with pytest.raises(ValueError, match=r"expected eps >= 0"):
        robustness(model, batches(data), attack="pgd", eps_list=[0, -1 / 255])
    with pytest.raises(ValueError, match="expected direction to be one of both, ai-to-real, real-to-ai"):
        robustness(model, batches(data), attack="pgd", eps_list=[0], direction="sideways")
    with pytest.raises(ValueError, match="expected steps to be an integer >= 1, got 0"):
        PGD(model, steps=0)
    with pytest.raises(ValueError, match="expected n_queries"):
        Square(model, n_queries=0)
    with pytest.raises(ValueError, match="bad options for attack 'fgsm'"):
        create_attack("fgsm", model, steps=3)
    with pytest.raises(ValueError, match="bad options for attack 'square'"):
        robustness(model, batches(data), attack="square", eps_list=[8 / 255], attack_options={"queries": 3})
    with pytest.raises(ValueError, match="expected attack_options without steps"):
        robustness(model, batches(data), attack="pgd", eps_list=[8 / 255], attack_options={"steps": 3})
    with pytest.raises(ValueError, match="expected a fakescope Detector"):
        FGSM(nn.Linear(3, 1))


def test_parse_eps():
    assert parse_eps("0,1/255, 2/255,0.5") == [0.0, 1 / 255, 2 / 255, 0.5]
    assert parse_eps("2,3", norm="l2") == [2.0, 3.0]
    for bad, msg in [("0,-1/255", r"expected eps >= 0, got '-1/255'"), ("2", r"expected an L-inf eps <= 1"),
                     ("0,abc", r"expected each eps to be a number or a fraction like 8/255, got 'abc'"),
                     ("1/0", "got '1/0'"), ("", "expected a comma-separated list"), ("nan", "expected eps >= 0")]:
        with pytest.raises(ValueError, match=msg):
            parse_eps(bad)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), eps=st.floats(0, 1), scale=st.floats(0, 5))
def test_projections_land_in_the_ball_and_the_unit_cube(seed, eps, scale):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 3, 4, 4, generator=g)
    far = x + scale * torch.randn(x.shape, generator=g)
    p = project_linf(far, x, eps)
    assert float((p - x).abs().max()) <= eps + 1e-6 and 0 <= float(p.min()) and float(p.max()) <= 1
    q = project_l2(far, x, eps)
    assert float((q - x).flatten(1).norm(dim=1).max()) <= eps + 1e-6 and 0 <= float(q.min()) and float(q.max()) <= 1
