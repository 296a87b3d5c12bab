"""Jacobian-free and phantom adjoints against closed forms, and the fidelity probe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from irnet import ImplicitResidualBlock
from irnet.analysis.fidelity import gradient_cosine
from irnet.linear import AdjointOperator, Direct, JacobianFree, Neumann, Phantom
from irnet.nets import ODENet
from irnet.solvers import FixedPoint

THETA = 0.7


def _linear_operator(n: int = 4, batch: int = 3, seed: int = 0):
    """F(y) = W y, so θJᵀ = θWᵀ is known in closed form."""
    g = torch.Generator().manual_seed(seed)
    W = 0.5 * torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    F = lambda y: y @ W.T  # noqa: E731
    y = torch.randn(batch, n, generator=g, dtype=torch.float64)
    b = torch.randn(batch, n, generator=g, dtype=torch.float64)
    return AdjointOperator(F, y, THETA), THETA * W.T, b


@pytest.mark.parametrize("steps,damping", [(1, 1.0), (3, 1.0), (4, 0.5), (7, 0.3)])
def test_phantom_is_damped_adjoint_iteration_in_closed_form(steps, damping):
    operator, P, b = _linear_operator()
    g, stats = Phantom(steps=steps, damping=damping).solve(operator, b)
    # by hand, with the dense matrix: g ← (1−λ)g + λ(b + Pᵀ-product), row vectors: v P → v @ P.T
    expected = b.clone()
    for _ in range(steps):
        expected = (1 - damping) * expected + damping * (b + expected @ P.T)
    assert torch.allclose(g, expected, atol=1e-13)
    assert (stats.iterations == steps).all()
    exact = torch.linalg.solve(torch.eye(4, dtype=torch.float64) - P, b.T).T
    # the reported residual is the true relative residual of the returned g
    true_res = torch.linalg.vector_norm((g - g @ P.T) - b, dim=1) / torch.linalg.vector_norm(
        b, dim=1
    )
    assert torch.allclose(stats.residual, true_res, atol=1e-12)
    assert not torch.allclose(g, exact, atol=1e-6)  # a few steps are not the exact answer


def test_phantom_approaches_the_exact_adjoint_with_more_steps():
    operator, P, b = _linear_operator()
    exact = torch.linalg.solve(torch.eye(4, dtype=torch.float64) - P, b.T).T
    errors = [
        float((Phantom(steps=k, damping=0.8).solve(operator, b)[0] - exact).norm())
        for k in (1, 5, 20, 80)
    ]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-10


def test_jacobian_free_returns_the_right_hand_side():
    operator, P, b = _linear_operator()
    g, stats = JacobianFree().solve(operator, b)
    assert torch.equal(g, b)
    assert (stats.iterations == 0).all()
    expected = torch.linalg.vector_norm(b @ P.T, dim=1) / torch.linalg.vector_norm(b, dim=1)
    assert torch.allclose(stats.residual, expected, atol=1e-12)


def test_jacobian_free_block_gradient_is_the_explicit_formula():
    torch.manual_seed(0)
    F = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        F[2].weight.mul_(0.3)
    block = ImplicitResidualBlock(
        F, theta=THETA, solver=FixedPoint(atol=1e-12, max_iter=200), linear_solver=JacobianFree()
    )
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, 3, dtype=torch.float64)
    y = block(x)
    (gx,) = torch.autograd.grad(y, x, v)
    # g = v, then ∂/∂x of x + (1−θ)F(x) + θF(y*) at fixed y*: v + (1−θ) J_F(x)ᵀ v
    x2 = x.detach().requires_grad_()
    (jtv,) = torch.autograd.grad(F(x2), x2, v)
    assert torch.allclose(gx, v + (1 - THETA) * jtv, atol=1e-12)


def _probe_net(linear_solver):
    torch.manual_seed(0)
    return ODENet(
        1,
        1,
        layers=3,
        T=1.5,
        width=16,
        theta=1.0,
        solver=FixedPoint(atol=1e-12, max_iter=300),
        linear_solver=linear_solver,
    ).double()


def test_gradient_cosine_is_one_for_exact_adjoints_and_below_for_shortcuts():
    x = torch.linspace(-2, 2, 17, dtype=torch.float64)[:, None]
    cosines = {}
    for name, solver in {
        "neumann": Neumann(rtol=1e-12, max_iter=500),
        "direct": Direct(),
        "phantom1": Phantom(steps=1, damping=1.0),
        "phantom40": Phantom(steps=40, damping=1.0),
        "jfb": JacobianFree(),
    }.items():
        net = _probe_net(solver)
        cosines[name] = float(gradient_cosine(net, lambda: net(x).pow(2).sum()))
    assert cosines["neumann"] == pytest.approx(1.0, abs=1e-9)
    assert cosines["direct"] == pytest.approx(1.0, abs=1e-9)
    assert cosines["jfb"] < 0.999
    assert cosines["phantom1"] < cosines["phantom40"]
    assert cosines["phantom40"] == pytest.approx(1.0, abs=1e-6)


def test_gradient_cosine_leaves_the_stats_and_solvers_alone():
    net = _probe_net(Phantom(steps=2))
    x = torch.randn(4, 1, dtype=torch.float64)
    net(x).sum().backward()
    before = [(b.forward_stats, b.backward_stats, b.linear_solver) for b in net.blocks]
    gradient_cosine(net, lambda: net(x).sum())
    assert before == [(b.forward_stats, b.backward_stats, b.linear_solver) for b in net.blocks]


def test_gradient_cosine_works_under_inference_mode():
    net = _probe_net(JacobianFree())
    x = torch.randn(4, 1, dtype=torch.float64)
    with torch.inference_mode():
        c = gradient_cosine(net, lambda: net(x.clone()).pow(2).sum())
    assert -1.0 <= float(c) <= 1.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: Phantom(steps=0),
        lambda: Phantom(damping=0),
        lambda: Phantom(damping=1.5),
        lambda: JacobianFree(rtol=-1),
    ],
)
def test_bad_arguments_are_named(make):
    with pytest.raises(ValueError, match="steps|damping|rtol"):
        make()
