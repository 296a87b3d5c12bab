"""The structured right-hand sides (irnet.nets.rhs) and pre-activation convolutions.

Each structure is checked on dense float64 Jacobians at random states with random weights and
biases: the Hamiltonian F's Jacobian is Hamiltonian (Jᵀ𝕁 + 𝕁J = 0), the parabolic one's is
symmetric negative semi-definite, the hollow one's has a zero diagonal (and output i does not
move when input i does). Whole networks of each are differentiated against central
differences, and each trains a few steps.
"""

from __future__ import annotations

import pytest
import torch

from irnet.linear import Direct, Neumann
from irnet.nets import (
    RHS,
    ConvODENet,
    ConvResidual,
    HamiltonianResidual,
    HollowResidual,
    ODENet,
    ParabolicResidual,
)
from irnet.nets.contraction import ACTIVATION_LIPSCHITZ
from irnet.solvers import FixedPoint

DIM = 6


def jacobians(F, y: torch.Tensor) -> torch.Tensor:
    """Dense ∂F/∂y of each sample, shape (batch, dim, dim) (plain autograd: the contraction's
    rescaling is an autograd.Function without functorch support)."""
    return torch.stack(
        [torch.autograd.functional.jacobian(lambda v: F(v.unsqueeze(0)).squeeze(0), v) for v in y]
    )


def randomised(F):
    """F in float64 with every parameter (biases too) drawn at random."""
    F = F.double()
    with torch.no_grad():
        for p in F.parameters():
            p.normal_()
    return F


def symplectic(dim: int) -> torch.Tensor:
    half = dim // 2
    eye, zero = torch.eye(half, dtype=torch.float64), torch.zeros(half, half, dtype=torch.float64)
    return torch.cat([torch.cat([zero, eye], 1), torch.cat([-eye, zero], 1)], 0)


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
@pytest.mark.parametrize("window", [None, [0.5, 0.8, 1.0]])
def test_hamiltonian_jacobian_is_hamiltonian(activation, window):
    torch.manual_seed(0)
    F = randomised(HamiltonianResidual(DIM, width=5, step=0.3, activation=activation))
    y = torch.randn(8, DIM, dtype=torch.float64)
    J = jacobians(F, y)
    S = symplectic(DIM)
    assert J.abs().max() > 0.1  # not trivially zero
    assert torch.allclose(J.mT @ S + S @ J, torch.zeros_like(J), atol=1e-12)
    # J = 𝕁·(symmetric Hessian): the blocks on the diagonal vanish
    assert torch.allclose(J[:, :3, :3], torch.zeros(8, 3, 3, dtype=torch.float64))
    if window is not None:
        # the window adds a multiple of the identity and scales: structure no longer exact,
        # but the F it wraps is the same Hamiltonian field
        W = HamiltonianResidual(DIM, width=5, activation=activation, stability_limits=window)
        assert W(torch.randn(2, DIM)).shape == (2, DIM)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_parabolic_jacobian_is_symmetric_negative_semidefinite(activation):
    torch.manual_seed(1)
    F = randomised(ParabolicResidual(DIM, width=9, step=0.7, activation=activation))
    J = jacobians(F, torch.randn(8, DIM, dtype=torch.float64))
    assert torch.allclose(J, J.mT, atol=1e-14)
    eig = torch.linalg.eigvalsh(J)
    assert eig.max() <= 1e-12 and eig.min() < -0.1


def test_parabolic_refuses_a_non_monotone_activation():
    with pytest.raises(ValueError, match="monotone"):
        ParabolicResidual(DIM, activation="gelu")


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_hollow_jacobian_has_a_zero_diagonal(activation):
    torch.manual_seed(2)
    F = randomised(HollowResidual(DIM, width=7, step=0.5, activation=activation))
    y = torch.randn(8, DIM, dtype=torch.float64)
    J = jacobians(F, y)
    assert torch.diagonal(J, dim1=1, dim2=2).abs().max() <= 1e-13
    assert (J - torch.diag_embed(torch.diagonal(J, dim1=1, dim2=2))).abs().max() > 0.1
    # not only the derivative: output i does not change when input i does, by any amount
    for i in range(DIM):
        moved = y.clone()
        moved[:, i] += 3.0
        assert torch.allclose(F(moved)[:, i], F(y)[:, i], atol=1e-12)


def test_hollow_matches_one_masked_mlp_per_output():
    torch.manual_seed(3)
    F = randomised(HollowResidual(4, width=5, step=0.5, activation="tanh"))
    y = torch.randn(3, 4, dtype=torch.float64)
    for i in range(4):
        masked = y.clone()
        masked[:, i] = 0
        expected = 0.5 * torch.tanh(masked @ F.gamma1.T + F.bias) @ F.gamma2[i]
        assert torch.allclose(F(y)[:, i], expected, atol=1e-14)


@pytest.mark.parametrize("rhs", RHS)
def test_bounded_init_bounds_the_jacobian(rhs):
    torch.manual_seed(4)
    activation = "tanh" if rhs == "parabolic" else "gelu"
    net = ODENet(in_features=3, layers=4, T=2.0, width=6, rhs=rhs, activation=activation)
    F = net.blocks[0].F.double()
    F.bounded_init(0.25)
    norms = torch.linalg.matrix_norm(jacobians(F, 3 * torch.randn(64, 6).double()), ord=2)
    assert norms.max() <= 0.25 * (1 + 1e-12)
    assert torch.allclose(F(torch.zeros(1, 6, dtype=torch.float64)), torch.zeros(1, 6).double())


@pytest.mark.parametrize("rhs", RHS)
@pytest.mark.parametrize("window", [None, [0.6, 0.9, 1.2]])
def test_network_gradients_match_finite_differences(rhs, window):
    """Implicit backward of a two-layer float64 network of each rhs against central
    differences (the window's power iterations do not run in eval mode, so F is a fixed
    function of its parameters)."""
    torch.manual_seed(5)
    net = ODENet(
        in_features=2,
        out_features=2,
        layers=2,
        T=1.0,
        width=4,
        theta=[0.5, 1.0],
        activation="tanh",
        readout="linear",
        stationary_init=False,
        rhs=rhs,
        stability_limits=window,
        learn_scales=window is not None,
        learn_shift=window is not None,
        solver=FixedPoint(atol=1e-13, max_iter=500),
        linear_solver=Neumann(rtol=1e-13, max_iter=500),
    ).double()
    net.eval()
    names, params = zip(*net.named_parameters())
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)

    def output(x, *p):
        return torch.func.functional_call(net, dict(zip(names, p)), (x,))

    inputs = (x, *(p.detach().clone().requires_grad_() for p in params))
    assert torch.autograd.gradcheck(output, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("rhs", RHS)
def test_each_rhs_trains_in_an_odenet(rhs):
    torch.manual_seed(6)
    x = torch.linspace(-2, 2, 32).unsqueeze(1)
    target = torch.sin(x)
    net = ODENet(
        in_features=1,
        layers=3,
        T=1.0,
        width=16,
        theta=0.5,
        rhs=rhs,
        activation="tanh",
        init="bounded",
        readout="linear",
        linear_solver=Direct(),
    )
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        optimiser.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), target)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]
    assert all(b.forward_stats.converged.all() for b in net.blocks)


def test_bad_rhs_names_rhs_and_the_choices():
    with pytest.raises(ValueError, match=r"rhs must be one of .*'hamiltonian'.*'hollow'.*'x'"):
        ODENet(rhs="x")


@pytest.mark.parametrize("rhs", ["hamiltonian", "hollow"])
def test_contraction_needs_a_lipschitz_bound(rhs):
    with pytest.raises(ValueError, match=f"contraction.*rhs={rhs!r}"):
        ODENet(rhs=rhs, contraction=0.9)
    with pytest.raises(ValueError, match="contraction"):
        make = HamiltonianResidual if rhs == "hamiltonian" else HollowResidual
        make(4, lipschitz=0.5)


def test_parabolic_contraction_holds_after_blowing_the_weight_up():
    torch.manual_seed(7)
    net = ODENet(in_features=2, layers=2, width=5, rhs="parabolic", theta=1.0, contraction=0.5)
    net = net.double()
    for block in net.blocks:
        F = block.F
        with torch.no_grad():
            F.K.mul_(10)
        K = F.weight()
        lip = F.step * torch.linalg.matrix_norm(K, ord=2) ** 2
        assert lip <= 0.5 * (1 + 1e-9)
        J = jacobians(F, torch.randn(16, 4, dtype=torch.float64))
        assert torch.linalg.matrix_norm(J, ord=2).max() <= 0.5 * (1 + 1e-9)


def test_contraction_and_the_spectral_window_exclude_each_other():
    with pytest.raises(ValueError, match="contraction and stability_limits"):
        ODENet(contraction=0.9, stability_limits=[0.5, 1.0])
    with pytest.raises(ValueError, match="contraction and stability_limits"):
        ConvODENet(contraction=0.9, stability_limits=[0.5, 1.0])


# -- pre-activation convolutions -------------------------------------------------------------------


def test_preactivation_applies_sigma_before_each_convolution():
    torch.manual_seed(8)
    F = ConvResidual(2, 3, step=0.5, activation="tanh", preactivation=True).double()
    plain = ConvResidual(2, 3, step=0.5, activation="tanh").double()
    plain.load_state_dict(F.state_dict())
    y = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    expected = 0.5 * F.conv2(torch.tanh(F.conv1(torch.tanh(y))))
    assert torch.allclose(F(y), expected, atol=1e-14)
    assert torch.allclose(plain(y), 0.5 * F.conv2(torch.tanh(F.conv1(y))), atol=1e-14)
    assert not torch.allclose(F(y), plain(y))


def test_preactivation_contraction_counts_sigma_twice():
    torch.manual_seed(9)
    F = ConvResidual(
        2, 3, step=0.5, activation="gelu", lipschitz=0.3, image_size=4, preactivation=True
    ).double()
    a = ACTIVATION_LIPSCHITZ["gelu"]
    assert F.constraint.scale == pytest.approx(0.5 * a**2)
    with torch.no_grad():
        F.conv1.weight.mul_(20)
    y = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda v: F(v.view(1, 2, 4, 4)).flatten(), y.flatten())
    assert torch.linalg.matrix_norm(J, ord=2) <= 0.3 * (1 + 1e-9)


def test_conv_odenet_with_preactivation_trains():
    torch.manual_seed(10)
    net = ConvODENet(layers=2, channels=2, hidden_channels=4, preactivation=True, init="bounded")
    assert all(b.F.preactivation for b in net.blocks)
    x, labels = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), labels)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
