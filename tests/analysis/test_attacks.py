"""FGSM / PGD and robustness curves: closed forms, bounds, ordering, and an implicit network."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as functional
from torch import nn

from helpers.classification import disk_and_ring
from irnet.analysis.attacks import accuracy_under_attack, accuracy_under_noise, fgsm, pgd
from irnet.linear import Neumann
from irnet.nets import ODENet
from irnet.solvers import FixedPoint


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny tensors: a thread pool only adds contention on a shared machine."""


def loss(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        return functional.cross_entropy(model(x), target).item()


def test_fgsm_on_a_linear_model_is_the_closed_form():
    model = nn.Linear(3, 4).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    target = torch.randint(0, 4, (8,))
    # ∇_x CE(Wx + b, y) = Wᵀ(softmax(Wx + b) − e_y)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    grad = (p - functional.one_hot(target, 4)) @ model.weight.detach()
    assert torch.equal(fgsm(model, x, target, 0.1), x + 0.1 * grad.sign())
    assert model.weight.grad is None and model.bias.grad is None


def test_perturbations_stay_in_the_ball_and_the_data_range(trained):
    model, x, target = trained
    for adv in (
        fgsm(model, x, target, 0.3, clamp=(-2.0, 2.0)),
        pgd(model, x, target, 0.3, steps=5, clamp=(-2.0, 2.0)),
    ):
        assert not adv.requires_grad
        inside = (x >= -2) & (x <= 2)  # where x is in range, the ball is respected exactly
        assert (adv - x)[inside].abs().max() <= 0.3 + 1e-6
        assert adv.min() >= -2.0 and adv.max() <= 2.0
    unclamped = fgsm(model, x, target, 0.3)
    assert torch.allclose((unclamped - x).abs(), torch.full_like(x, 0.3))


def test_eps_zero_returns_a_copy_of_x(trained):
    model, x, target = trained
    for attack in (fgsm, pgd):
        adv = attack(model, x, target, 0.0)
        assert torch.equal(adv, x) and adv is not x


def test_pgd_beats_fgsm_beats_clean(trained):
    model, x, target = trained
    clean = loss(model, x, target)
    one_step = loss(model, fgsm(model, x, target, 0.75), target)
    # From x itself: a random start may climb to another corner's lower local maximum.
    many_steps = loss(model, pgd(model, x, target, 0.75, steps=20, random_start=False), target)
    assert clean < one_step <= many_steps


def test_pgd_with_a_generator_is_reproducible(trained):
    model, x, target = trained
    first = pgd(model, x, target, 0.5, steps=3, generator=torch.Generator().manual_seed(7))
    again = pgd(model, x, target, 0.5, steps=3, generator=torch.Generator().manual_seed(7))
    other = pgd(model, x, target, 0.5, steps=3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    # With negligible steps the result is the start: uniform over the whole ball.
    start = pgd(model, x, target, 0.5, steps=1, step_size=1e-9) - x
    assert start.min() < -0.45 and start.max() > 0.45 and start.mean().abs() < 0.05


def test_accuracy_falls_with_eps_and_sigma_and_the_model_is_untouched(trained):
    model, x, target = trained
    eps_list = [0.0, 0.25, 0.5, 1.0, 2.0]
    curves = [
        accuracy_under_attack(model, x, target, "fgsm", eps_list, batch_size=64),
        accuracy_under_attack(
            model, x, target, pgd, eps_list, steps=5, generator=torch.Generator().manual_seed(0)
        ),
        accuracy_under_noise(
            model,
            x,
            target,
            [0.0, 0.5, 1.0, 3.0],
            generator=torch.Generator().manual_seed(0),
            repeats=2,
        ),
    ]
    for curve in curves:
        accs = list(curve.values())
        assert accs[0] > 0.95 and accs[-1] < accs[0] - 0.2
        assert all(a >= b for a, b in zip(accs, accs[1:])), curve
    assert model.training  # the fixture left it training; eval was temporary
    assert all(p.grad is None for p in model.parameters())


def test_eval_mode_is_used_and_restored():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.9))
    x, target = disk_and_ring(16)
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(m.training))
    pgd(model, x, target, 0.1, steps=2)
    assert seen and not any(seen) and model.training
    model.eval()
    fgsm(model, x, target, 0.1)
    assert not model.training


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda m, x, t: fgsm(m, x, t, -0.1), "eps"),
        (lambda m, x, t: fgsm(m, x, t, 0.1, clamp=(1.0, 0.0)), "clamp"),
        (lambda m, x, t: fgsm(m, x[:3], t, 0.1), "target"),
        (lambda m, x, t: pgd(m, x, t, 0.1, steps=0), "steps"),
        (lambda m, x, t: pgd(m, x, t, 0.1, step_size=0.0), "step_size"),
        (lambda m, x, t: accuracy_under_attack(m, x, t, "cw", [0.1]), "attack"),
        (lambda m, x, t: accuracy_under_attack(m, x, t, fgsm, [0.1, -1]), r"eps_list\[1\]"),
        (lambda m, x, t: accuracy_under_attack(m, x, t, fgsm, [0.1], batch_size=0), "batch_size"),
        (lambda m, x, t: accuracy_under_noise(m, x, t, []), "sigmas"),
        (lambda m, x, t: accuracy_under_noise(m, x, t, [0.1], repeats=0), "repeats"),
    ],
)
def test_bad_arguments_name_the_argument(call, name):
    x, target = disk_and_ring(8)
    with pytest.raises(ValueError, match=name):
        call(nn.Linear(2, 2), x, target)


def test_fgsm_on_an_implicit_network_follows_the_finite_difference_gradient():
    torch.manual_seed(0)
    net = ODENet(
        in_features=2,
        out_features=2,
        layers=3,
        T=1.0,
        width=16,
        theta=0.5,
        activation="tanh",
        readout="linear",
        solver=FixedPoint(atol=1e-12, max_iter=500),
        linear_solver=Neumann(rtol=1e-12, max_iter=500),
    ).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    target = torch.tensor([0, 1, 1, 0])

    def total_loss(z: torch.Tensor) -> float:
        with torch.no_grad():
            return functional.cross_entropy(net(z), target, reduction="sum").item()

    h, fd = 1e-6, torch.zeros_like(x)
    for idx in torch.cartesian_prod(torch.arange(4), torch.arange(2)).tolist():
        step = torch.zeros_like(x)
        step[tuple(idx)] = h
        fd[tuple(idx)] = (total_loss(x + step) - total_loss(x - step)) / (2 * h)
    assert fd.abs().min() > 1e-5  # every sign is meaningful
    assert torch.equal(fgsm(net, x, target, 0.01), x + 0.01 * fd.sign())
    assert all(p.grad is None for p in net.parameters())
