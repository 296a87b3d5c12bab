"""The spectral window (irnet.nets.spectral_window): each layer's amplification in [min, max].

The guarantee, on dense float64 Jacobians of small layers: at θ = 1 every layer's step Jacobian
``∂y/∂x = (I − ∂F/∂y)⁻¹`` (also checked against the block's own derivative) has eigenvalue
moduli in ``[min, max]`` — after a few training steps, and again after every parameter has
been blown up ×10 — for every right-hand side and for convolutions; at θ = 0 the same holds
for ``I + ∂F/∂x``. Also: F's Lipschitz bound ``max(|a|, |b|)`` that makes the solvers converge,
the power iterations' bookkeeping, the limits' checks, and that nothing changes without it.
"""

from __future__ import annotations

import pytest
import torch

from irnet.linear import Direct
from irnet.nets import RHS, ConvODENet, ODENet, SpectralWindow
from irnet.nets.spectral_window import (
    inverse_stability_function,
    stability_function,
    window_bounds,
)
from irnet.solvers import FixedPoint

LIMITS = [0.6, 0.9, 1.2]


def dense(f, v: torch.Tensor) -> torch.Tensor:
    """Dense Jacobian of a one-sample map, flattened to (n, n)."""
    J = torch.autograd.functional.jacobian(lambda u: f(u.view(1, *v.shape)).flatten(), v.flatten())
    return J.reshape(v.numel(), v.numel())


def train(net, x: torch.Tensor, target_fn, steps: int = 8) -> None:
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-2)
    net.train()
    for _ in range(steps):
        optimiser.zero_grad()
        target_fn(net(x)).backward()
        optimiser.step()


def check_layers(net, x: torch.Tensor, limits, tol: float = 1e-9) -> list[float]:
    """Every layer's step-Jacobian eigenvalue moduli are in [min, max]; returns them all."""
    lo, hi = limits[0], limits[-1]
    moduli = []
    states = net.trajectory(x)
    for block, x_t, y_t in zip(net.blocks, states, states[1:]):
        for i in range(x.shape[0]):
            if block.theta == 1.0:
                J = dense(block.F, y_t[i].detach())
                step = torch.linalg.inv(torch.eye(J.shape[0], dtype=J.dtype) - J)
                # the block's own derivative (implicit backward, dense adjoint) is the same matrix
                own = dense(block, x_t[i].detach())
                assert torch.allclose(own, step, atol=1e-8)
            else:
                assert block.theta == 0.0
                J = dense(block.F, x_t[i].detach())
                step = torch.eye(J.shape[0], dtype=J.dtype) + J
            m = torch.linalg.eigvals(step).abs()
            assert m.min() >= lo * (1 - tol) and m.max() <= hi * (1 + tol), (m.min(), m.max())
            moduli += m.tolist()
    return moduli


def blow_up(net) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(10)


@pytest.mark.parametrize("rhs", RHS)
def test_step_jacobians_stay_in_the_limits_at_theta_one(rhs):
    torch.manual_seed(0)
    net = ODENet(
        in_features=2,
        out_features=1,
        layers=3,
        T=3.0,
        width=6,
        theta=[1.0, 1.0, 0.0],
        activation="tanh",
        readout="linear",
        rhs=rhs,
        stability_limits=LIMITS,
        learn_scales=True,
        learn_shift=True,
        stationary_init=False,
        solver=FixedPoint(atol=1e-12, max_iter=300),
        linear_solver=Direct(),
    ).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    train(net, x, lambda out: (out - 1).pow(2).mean())
    moduli = check_layers(net, x, LIMITS)
    assert max(moduli) - min(moduli) > 0.01  # not one linear map: the weights matter
    blow_up(net)
    net.train()
    net(x)  # one training pass: the power iterations see the new weights
    check_layers(net, x, LIMITS)
    net.eval()
    check_layers(net, x, LIMITS)
    assert all(b.forward_stats.converged.all() for b in net.blocks if b.theta > 0)


def test_conv_step_jacobians_stay_in_the_limits():
    torch.manual_seed(1)
    limits = [0.4, 0.8, 1.1]
    net = ConvODENet(
        in_channels=1,
        image_size=4,
        num_classes=2,
        channels=2,
        hidden_channels=3,
        layers=2,
        theta=1.0,
        preactivation=True,
        stability_limits=limits,
        learn_scales=True,
        learn_shift=True,
        solver=FixedPoint(atol=1e-12, max_iter=300),
        linear_solver=Direct(),
    ).double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1])
    train(net, x, lambda out: torch.nn.functional.cross_entropy(out, labels))
    check_layers(net, x, limits)
    blow_up(net)
    net.train()
    net(x)
    check_layers(net, x, limits)


def test_lipschitz_bound_makes_fixed_point_iteration_contract():
    """‖∂F/∂y‖₂ ≤ max(|a|, |b|) everywhere (docs/contraction.md), here 2/3 < 1 at θ = 1."""
    torch.manual_seed(2)
    net = ODENet(in_features=2, layers=2, width=8, theta=1.0, stability_limits=LIMITS).double()
    a, _, b = window_bounds(LIMITS, 1.0)
    blow_up(net)
    net.train()
    for block in net.blocks:
        block.F(torch.zeros(1, 4, dtype=torch.float64))  # power iterations on the new weights
        for y in 5 * torch.randn(20, 4, dtype=torch.float64):
            assert torch.linalg.matrix_norm(dense(block.F, y), ord=2) <= max(-a, b) * (1 + 1e-9)


def test_stability_function_and_its_inverse():
    for theta in (0.0, 0.3, 0.5, 1.0):
        for r in (0.2, 0.9, 1.0, 1.7):
            z = inverse_stability_function(theta, r)
            assert stability_function(theta, z) == pytest.approx(r, rel=1e-12)
            assert theta * z < 1  # on the branch left of the pole
    assert window_bounds([0.5, 2.0], 1.0) == pytest.approx((-1.0, -0.25, 0.5))


@pytest.mark.parametrize(
    "limits, theta, match",
    [
        ([0.5], 1.0, "stability_limits must be"),
        ([0.9, 0.5, 1.2], 1.0, "stability_limits must be"),
        ([0.5, float("inf")], 1.0, "stability_limits must be"),
        ("0.5, 1", 1.0, "stability_limits must be"),
        ([0.0, 0.5, 1.0], 1.0, "stability_limits' min must be > 0"),
        ([-1.0, 1.0], 0.5, r"stability_limits' min must be > -1"),
    ],
)
def test_bad_limits_are_refused(limits, theta, match):
    with pytest.raises(ValueError, match=match):
        ODENet(layers=2, width=4, theta=theta, stability_limits=limits)


def test_learning_options_need_the_window():
    with pytest.raises(ValueError, match="learn_scales and learn_shift need stability_limits"):
        ODENet(layers=2, learn_shift=True)
    with pytest.raises(ValueError, match="power_iters"):
        ODENet(layers=2, stability_limits=LIMITS, power_iters=0)


def test_window_starts_centred_on_init_and_learned_ends_stay_inside():
    window = SpectralWindow(LIMITS, theta=1.0, features=(3,), learn_shift=True).double()
    a, c, b = window.a, window.c, window.b
    lo, hi = window.bounds()
    assert (lo + hi).item() / 2 == pytest.approx(c)
    assert min(c - lo.item(), hi.item() - c) == pytest.approx(0.99 * min(c - a, b - c))
    with torch.no_grad():
        window.shift.copy_(torch.tensor([50.0, 50.0]))
    lo, hi = window.bounds()
    assert a <= lo.item() and hi.item() <= b
    assert isinstance(window.shift, torch.nn.Parameter)
    fixed = SpectralWindow(LIMITS, theta=1.0, features=(3,))
    assert "shift" in dict(fixed.named_buffers()) and not list(fixed.parameters())


def test_power_iterations_run_once_per_weight_change_in_training_only():
    torch.manual_seed(3)
    net = ODENet(in_features=2, layers=1, width=5, theta=1.0, stability_limits=LIMITS)
    F = net.blocks[0].F
    norm = F.window.norms["gamma1"]
    y = torch.randn(3, 4)
    with torch.no_grad():
        F.gamma1.add_(0.3 * torch.randn_like(F.gamma1))
    v0 = norm.v.clone()
    net.eval()
    F(y)
    assert torch.equal(norm.v, v0)  # eval: no iterations
    net.train()
    F(y)
    v1 = norm.v.clone()
    assert not torch.equal(v1, v0)
    F(y)
    assert torch.equal(norm.v, v1)  # the same weights: no further iterations
    # converged on the largest singular value after enough steps
    for _ in range(300):
        norm.iterate(F.gamma1, 1)
    sigma = torch.linalg.matrix_norm(F.gamma1.detach(), ord=2)
    assert norm.sigma(F.gamma1).item() == pytest.approx(sigma.item(), rel=1e-5)


def test_window_state_follows_the_module_and_checkpoints():
    torch.manual_seed(4)
    kwargs = dict(
        in_features=2, layers=2, width=5, theta=1.0, stability_limits=LIMITS, learn_shift=True
    )
    net = ODENet(**kwargs).double()
    F = net.blocks[0].F
    assert F.window.norms["gamma1"].v.dtype == torch.float64
    assert F.window.scales.dtype == torch.float64
    x = torch.randn(3, 2, dtype=torch.float64)
    train(net, x, lambda out: out.pow(2).mean(), steps=3)
    net.eval()
    copy = ODENet(**kwargs).double()
    copy.load_state_dict(net.state_dict())
    copy.eval()
    assert torch.allclose(copy(x), net(x), atol=1e-12)


def test_without_the_window_nothing_changes():
    torch.manual_seed(5)
    net = ODENet(in_features=2, layers=2, width=5)
    assert set(net.state_dict()) == {
        f"blocks.{i}.F.{name}" for i in range(2) for name in ("gamma1", "bias", "gamma2")
    } | {"_extra_state"}
    assert all(b.F.window is None for b in net.blocks)
    conv = ConvODENet(layers=1)
    assert not any("window" in k for k in conv.state_dict())
