"""SPSA, PGD with restarts, transfer, tighter solves and the strongest-attack accuracy.

References: closed-form gradients of linear models, FGSM, a model whose
gradient is masked by quantisation (PGD fails, SPSA does not), and float64
reference solves for the tolerance checks.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as functional
from torch import nn

from helpers.classification import disk_and_ring, train_mlp
from irnet.analysis.attacks import fgsm, pgd
from irnet.analysis.strong_attacks import (
    margin_loss,
    pgd_restarts,
    spsa,
    spsa_gradient,
    strong_attacks,
    strongest_attack_accuracy,
    tighter_attack,
    tighter_solves,
    transfer,
    transfer_attack,
)
from irnet.linear import Direct, Neumann
from irnet.nets import ODENet
from irnet.solvers import Anderson, Fallback, FixedPoint

DOC = Path(__file__).resolve().parents[2] / "docs" / "robustness.md"


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny tensors: a thread pool only adds contention on a shared machine."""


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def accuracy(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == target).double().mean().item()


def per_sample(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    """Misclassified?, and the per-sample cross-entropy."""
    with torch.no_grad():
        logits = model(x)
    loss = functional.cross_entropy(logits, target, reduction="none")
    return logits.argmax(dim=1) != target, loss


class Quantize(nn.Module):
    """Rounds the input to a grid: the model's input gradient is zero almost everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x / 0.25) * 0.25


class NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("this model has no backward pass")


class Undifferentiable(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(NoBackward.apply(x))


def small_odenet(solver=None, linear_solver=None, theta: float = 0.5) -> ODENet:
    torch.manual_seed(0)
    return ODENet(
        in_features=2,
        out_features=2,
        layers=3,
        T=1.0,
        width=8,
        theta=theta,
        activation="tanh",
        readout="linear",
        solver=solver or FixedPoint(atol=1e-3, max_iter=50),
        linear_solver=linear_solver or Neumann(rtol=1e-2, max_iter=50),
    ).double()


# ---------------------------------------------------------------- SPSA


def test_spsa_gradient_converges_to_the_closed_form_gradient():
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    target = torch.randint(0, 3, (6,))
    w = model.weight.detach()
    with torch.no_grad():
        logits = model(x)
    # margin = z_j* − z_y (j* the best other class): ∇ = w_j* − w_y; CE: ∇ = Wᵀ(softmax − e_y).
    runner_up = logits.masked_fill(functional.one_hot(target, 3).bool(), -torch.inf).argmax(dim=1)
    exact = {
        "margin": w[runner_up] - w[target],
        "ce": (logits.softmax(dim=1) - functional.one_hot(target, 3)) @ w,
    }
    losses = {
        "margin": margin_loss,
        "ce": lambda z, t: functional.cross_entropy(z, t, reduction="none"),
    }
    for name, loss_fn in losses.items():
        errors = []
        for samples in (250, 4000):
            estimate = spsa_gradient(
                model, x, target, samples=samples, delta=1e-4, loss_fn=loss_fn, generator=seeded()
            )
            errors.append(((estimate - exact[name]).norm(dim=1) / exact[name].norm(dim=1)).max())
        # Rademacher estimator: relative error ~ √((d − 1) / samples) = 0.13 and 0.03 here.
        assert errors[1] < 0.08 and errors[1] < errors[0] / 2, (name, errors)


def test_one_spsa_step_on_a_linear_model_is_the_fgsm_step():
    model = nn.Linear(4, 2).double()
    with torch.no_grad():  # each component of w_1 − w_0 well away from 0
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.0, 1.0, -1.0, 0.0]]))
    x = torch.randn(10, 4, dtype=torch.float64)
    with torch.no_grad():
        target = model(x).argmax(dim=1)  # all classified correctly: every sample is attacked
    expected = fgsm(model, x, target, 0.1)
    for update in ("sign", "adam"):
        adv = spsa(
            model,
            x,
            target,
            0.1,
            steps=1,
            samples=2000,
            step_size=0.1,
            update=update,
            generator=seeded(),
        )
        # Adam's first step is m̂ / (√v̂ + 1e-8) = g / (|g| + 1e-8): the sign, to 1e-8.
        assert torch.allclose(adv, expected, rtol=0, atol=1e-7), update


def test_spsa_is_as_strong_as_pgd_on_a_trained_model(trained):
    model, x, target = trained
    clean = accuracy(model, x, target)
    by_pgd = accuracy(model, pgd(model, x, target, 0.75, steps=20, generator=seeded()), target)
    adv = spsa(model, x, target, 0.75, steps=20, samples=32, generator=seeded())
    by_spsa = accuracy(model, adv, target)
    # Measured: clean 1.0, PGD 0.435, SPSA 0.39.
    assert clean == 1.0 and by_spsa < clean - 0.4 and by_spsa <= by_pgd + 0.02


def test_spsa_and_transfer_break_a_masked_gradient_that_pgd_does_not(trained):
    model, x, target = trained
    masked = nn.Sequential(Quantize(), model)
    eps = 0.75
    assert accuracy(masked, x, target) == 1.0
    # The input gradient is zero: FGSM does nothing, PGD moves only by its random start.
    assert accuracy(masked, fgsm(masked, x, target, eps), target) == 1.0
    by_pgd = accuracy(masked, pgd(masked, x, target, eps, steps=20, generator=seeded()), target)
    # Differences across the grid (δ = 0.1 > half a cell on many probes) see the decision boundary.
    by_spsa = accuracy(
        masked,
        spsa(masked, x, target, eps, steps=20, samples=32, delta=0.1, generator=seeded()),
        target,
    )
    by_transfer = transfer(
        model, masked, x, target, eps, steps=20, generator=seeded()
    ).target_accuracy
    unmasked = accuracy(model, pgd(model, x, target, eps, steps=20, generator=seeded()), target)
    # Measured: PGD 0.97, SPSA 0.395, transfer 0.415, PGD on the unmasked model 0.435.
    assert by_pgd > 0.9
    assert by_spsa < unmasked + 0.05 and by_transfer < unmasked + 0.05


def test_spsa_needs_no_backward_pass(trained):
    model, x, target = trained
    blind = Undifferentiable(model)
    with pytest.raises(RuntimeError, match="no backward"):
        pgd(blind, x, target, 0.5, steps=1)  # the model really has no gradient
    results = [spsa(blind, x, target, 0.75, steps=20, samples=8, generator=seeded())]
    with torch.no_grad():
        results.append(spsa(blind, x, target, 0.75, steps=20, samples=8, generator=seeded()))
    with torch.inference_mode():
        results.append(spsa(blind, x, target, 0.75, steps=20, samples=8, generator=seeded()))
    assert all(torch.equal(results[0], r) for r in results[1:])
    assert accuracy(model, results[0], target) < 0.5  # it did attack
    assert all(p.grad is None for p in model.parameters())


def test_spsa_samples_are_independent_of_each_other():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x = torch.randn(12, 2, dtype=torch.float64)
    target = torch.randint(0, 3, (12,))
    other = x.clone()
    other[1:] = torch.randn(11, 2, dtype=torch.float64)  # every sample but the first changes
    runs = [
        spsa(model, z, target, 0.5, steps=10, samples=16, generator=seeded()) for z in (x, other)
    ]
    assert torch.allclose(runs[0][0], runs[1][0], rtol=0, atol=1e-12)
    assert not torch.allclose(runs[0][1:], runs[1][1:])
    # A sample misclassified from the start is left where it is.
    wrong = per_sample(model, x, target)[0]
    assert wrong.any() and torch.equal(runs[0][wrong], x[wrong])


def test_spsa_with_a_generator_is_reproducible(trained):
    model, x, target = trained
    first, again, other = (
        spsa(model, x, target, 0.75, steps=3, samples=4, update="sign", generator=seeded(s))
        for s in (7, 7, 8)
    )
    assert torch.equal(first, again) and not torch.equal(first, other)


# ---------------------------------------------------------------- restarts, bounds


def test_restarts_are_never_worse_than_one_pgd_run_per_sample(trained):
    model, x, target = trained
    eps = 0.75
    single = pgd(model, x, target, eps, steps=10, generator=seeded())  # = restarts' first run
    from_x = pgd(model, x, target, eps, steps=10, random_start=False)  # = its clean start
    best = pgd_restarts(model, x, target, eps, steps=10, restarts=4, generator=seeded())
    best_mis, best_loss = per_sample(model, best, target)
    for run in (single, from_x):
        mis, loss = per_sample(model, run, target)
        assert not (mis & ~best_mis).any()
        both_right = ~mis & ~best_mis
        assert (best_loss[both_right] >= loss[both_right]).all()
    assert accuracy(model, best, target) < accuracy(model, single, target)  # 0.385 < 0.435 measured


def test_perturbations_stay_in_the_ball_and_the_data_range(trained):
    model, x, target = trained
    box = (-2.0, 2.0)
    for adv in (
        spsa(model, x, target, 0.5, steps=5, samples=8, clamp=box, generator=seeded()),
        spsa(model, x, target, 0.5, steps=5, samples=8, update="sign", clamp=box),
        pgd_restarts(model, x, target, 0.5, steps=5, restarts=2, clamp=box),
    ):
        assert not adv.requires_grad and adv.shape == x.shape
        inside = (x >= -2) & (x <= 2)
        assert (adv - x)[inside].abs().max() <= 0.5 + 1e-6
        assert adv.min() >= -2.0 and adv.max() <= 2.0
    for attack in (spsa, pgd_restarts):
        adv = attack(model, x, target, 0.0)
        assert torch.equal(adv, x) and adv is not x
    assert model.training and all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- transfer


def test_transfer_to_itself_is_the_white_box_attack_and_to_a_twin_nearly(trained):
    model, x, target = trained
    same = transfer(model, model, x, target, 0.75, attack=pgd, steps=10, random_start=False)
    assert torch.equal(same.adversarial, pgd(model, x, target, 0.75, steps=10, random_start=False))
    assert same.source_accuracy == same.target_accuracy == accuracy(model, same.adversarial, target)
    twin = train_mlp(x, target, seed=1)
    crafted = transfer_attack(twin, pgd, steps=10, random_start=False)
    moved = crafted(model, x, target, 0.75)
    assert torch.equal(moved, pgd(twin, x, target, 0.75, steps=10, random_start=False))
    # The same task gives the same boundary: the twin's attack works on the model (0.455 vs 0.435).
    assert accuracy(model, moved, target) < accuracy(model, x, target) - 0.4


# ---------------------------------------------------------------- tighter solves


def tolerances(net: nn.Module) -> list:
    return [(s.atol, s.max_iter) for s in {id(b.solver): b.solver for b in net.blocks}.values()] + [
        (s.rtol, getattr(s, "max_iter", None))
        for s in {id(b.linear_solver): b.linear_solver for b in net.blocks}.values()
    ]


def test_tighter_solves_changes_each_shared_solver_once_and_restores_it_exactly():
    net = small_odenet(FixedPoint(atol=3e-4, max_iter=40), Neumann(rtol=7e-3, max_iter=30))
    twin = small_odenet(net.blocks[0].solver, Direct(rtol=1e-3))  # shares the forward solver
    both = nn.ModuleList([net, twin])
    assert net.blocks[0].solver is net.blocks[2].solver is twin.blocks[1].solver
    before = tolerances(net) + tolerances(twin)
    with tighter_solves(both, atol_factor=100, rtol_factor=10, iter_factor=3) as changed:
        assert len(changed) == 3  # one FixedPoint, one Neumann, one Direct
        assert net.blocks[1].solver.atol == pytest.approx(3e-6)
        assert net.blocks[1].solver.max_iter == 120
        assert net.blocks[1].linear_solver.rtol == pytest.approx(7e-4)
        assert net.blocks[1].linear_solver.max_iter == 90
        assert twin.blocks[0].linear_solver.rtol == pytest.approx(1e-4)
        assert not hasattr(twin.blocks[0].linear_solver, "max_iter")
    assert tolerances(net) + tolerances(twin) == before  # exact, not approximate
    with pytest.raises(KeyError):
        with tighter_solves(net, atol_factor=7):
            raise KeyError("inside")
    assert tolerances(net) == before[: len(tolerances(net))]


def test_tighter_solves_reaches_into_a_fallback_chain():
    chain = Fallback([FixedPoint(atol=1e-3, max_iter=5), Anderson(atol=1e-3, max_iter=20)])
    net = small_odenet(chain)
    with tighter_solves(net, atol_factor=10, iter_factor=2):
        assert [s.atol for s in (chain, *chain.solvers)] == pytest.approx([1e-4] * 3)
        assert [s.max_iter for s in (chain, *chain.solvers)] == [50, 10, 40]
    assert [s.atol for s in (chain, *chain.solvers)] == [1e-3] * 3
    assert [s.max_iter for s in (chain, *chain.solvers)] == [25, 5, 20]


def test_tighter_solves_bring_outputs_and_input_gradients_to_the_exact_ones():
    net = small_odenet(FixedPoint(atol=1e-2, max_iter=50), Neumann(rtol=1e-1, max_iter=50))
    exact = copy.deepcopy(net)
    for block in exact.blocks:
        block.solver = FixedPoint(atol=1e-13, max_iter=2000)
        block.linear_solver = Neumann(rtol=1e-13, max_iter=2000)
    x = 2 * torch.randn(16, 2, dtype=torch.float64)
    target = torch.arange(16) % 2

    def output_and_gradient(model):
        z = x.clone().requires_grad_()
        out = model(z)
        (grad,) = torch.autograd.grad(functional.cross_entropy(out, target, reduction="sum"), z)
        return out.detach(), grad

    reference, loose, tight = output_and_gradient(exact), output_and_gradient(net), None
    with tighter_solves(net, atol_factor=1e4, rtol_factor=1e4):
        tight = output_and_gradient(net)
    for ref, lo, ti in zip(reference, loose, tight):
        assert (ti - ref).abs().max() < (lo - ref).abs().max() / 100
    # The tightened attack uses those gradients; the evaluation runs at the loose tolerance.
    adv = tighter_attack(fgsm, atol_factor=1e4, rtol_factor=1e4)(net, x, target, 0.1)
    assert torch.equal(adv, fgsm(exact, x, target, 0.1))
    assert net.blocks[0].solver.atol == 1e-2


# ---------------------------------------------------------------- the strongest attack


def test_strongest_attack_accuracy_is_the_per_sample_worst_case(trained):
    model, x, target = trained
    attacks = {
        "fgsm": fgsm,
        "pgd": lambda m, z, t, eps: pgd(m, z, t, eps, steps=10, generator=seeded()),
        "spsa": lambda m, z, t, eps: spsa(m, z, t, eps, steps=10, samples=16, generator=seeded()),
    }
    result = strongest_attack_accuracy(model, x, target, 0.75, attacks, batch_size=64)
    correct = [per_sample(model, x, target)[0].logical_not()]
    for name, attack in attacks.items():
        hits = torch.cat(
            [
                ~per_sample(model, attack(model, xb, tb, 0.75), tb)[0]
                for xb, tb in zip(x.split(64), target.split(64))
            ]
        )
        assert result.per_attack[name] == hits.double().mean().item()
        correct.append(hits)
    assert torch.equal(result.robust, torch.stack(correct).all(dim=0))
    assert result.accuracy == result.robust.double().mean().item()
    assert result.per_attack["clean"] == 1.0
    assert result.accuracy <= min(result.per_attack.values())
    assert result.accuracy < min(result.per_attack.values())  # the attacks do not all agree


def test_strong_attacks_on_an_implicit_network_with_its_explicit_twin():
    implicit = small_odenet(theta=0.5)
    explicit = copy.deepcopy(implicit)
    for block in explicit.blocks:
        block.theta = 0.0
    x, target = disk_and_ring(24)
    x = x.double()
    attacks = strong_attacks(
        clamp=(-3.0, 3.0), steps=5, restarts=2, spsa_samples=8, source_model=explicit
    )
    assert list(attacks) == ["fgsm", "pgd", "pgd_restarts", "spsa", "pgd_tight", "transfer"]
    first = strongest_attack_accuracy(implicit, x, target, 0.5, attacks)
    again = strongest_attack_accuracy(implicit, x, target, 0.5, attacks)
    assert first.per_attack == again.per_attack  # every randomised attack is seeded per call
    assert set(first.per_attack) == {"clean", *attacks}
    assert first.accuracy <= min(first.per_attack.values())
    assert first.accuracy < first.per_attack["clean"]
    assert implicit.blocks[0].solver.atol == 1e-3  # pgd_tight restored it


# ---------------------------------------------------------------- arguments, docs


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda m, x, t: spsa(m, x, t, -0.1), "eps"),
        (lambda m, x, t: spsa(m, x, t, 0.1, steps=0), "steps"),
        (lambda m, x, t: spsa(m, x, t, 0.1, samples=0), "samples"),
        (lambda m, x, t: spsa(m, x, t, 0.1, step_size=0), "step_size"),
        (lambda m, x, t: spsa(m, x, t, 0.1, delta=-1e-3), "delta"),
        (lambda m, x, t: spsa(m, x, t, 0.1, update="rmsprop"), "update"),
        (lambda m, x, t: spsa(m, x, t, 0.1, clamp=(1, 0)), "clamp"),
        (lambda m, x, t: spsa(m, x[:3], t, 0.1), "target"),
        (lambda m, x, t: spsa_gradient(m, x, t, samples=0), "samples"),
        (lambda m, x, t: pgd_restarts(m, x, t, 0.1, restarts=0), "restarts"),
        (lambda m, x, t: pgd_restarts(m, x, t, 0.1, clean_start="yes"), "clean_start"),
        (lambda m, x, t: pgd_restarts(m, x, t, 0.1, steps=0), "steps"),
        (lambda m, x, t: transfer(m, m, x, t, 0.1, attack="pgd"), "attack"),
        (lambda m, x, t: transfer(m, "net", x, t, 0.1), "target_model"),
        (lambda m, x, t: transfer_attack(None), "source_model"),
        (lambda m, x, t: tighter_solves(m, atol_factor=0.5).__enter__(), "atol_factor"),
        (lambda m, x, t: tighter_solves(m, rtol_factor="10").__enter__(), "rtol_factor"),
        (lambda m, x, t: tighter_solves(m, iter_factor=0).__enter__(), "iter_factor"),
        (lambda m, x, t: tighter_attack(pgd, atol_factor=0.1), "atol_factor"),
        (lambda m, x, t: strongest_attack_accuracy(m, x, t, 0.1, {}), "attacks"),
        (lambda m, x, t: strongest_attack_accuracy(m, x, t, 0.1, {"clean": fgsm}), "attacks"),
        (lambda m, x, t: strongest_attack_accuracy(m, x, t, 0.1, {"a": 1}), r"attacks\['a'\]"),
        (lambda m, x, t: strongest_attack_accuracy(m, x, t, -1.0, {"a": fgsm}), "eps"),
        (
            lambda m, x, t: strongest_attack_accuracy(m, x, t, 0.1, {"a": fgsm}, batch_size=0),
            "batch_size",
        ),
        (lambda m, x, t: strong_attacks(steps=0), "steps"),
        (lambda m, x, t: margin_loss(torch.zeros(3, 1), t[:3]), "logits"),
    ],
)
def test_bad_arguments_name_the_argument(call, name):
    x, target = disk_and_ring(8)
    with pytest.raises(ValueError, match=name):
        call(nn.Linear(2, 2), x, target)


def test_the_example_in_docs_robustness_runs():
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(code) == 1
    scope: dict = {}
    exec(compile(code[0], str(DOC), "exec"), scope)
    result = scope["result"]
    assert result.accuracy <= min(result.per_attack.values())
