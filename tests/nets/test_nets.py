"""The paper's ODE networks (eq. 11): structure, initialisation, and whole-network gradients."""

from __future__ import annotations

import pytest
import torch

from irnet.linear import Neumann
from irnet.nets import ConvODENet, ODENet
from irnet.solvers import FixedPoint


def test_odenet_structure_and_paper_initialisation():
    torch.manual_seed(0)
    net = ODENet(in_features=1, out_features=1, layers=10, T=10.0, width=100)
    assert len(net.blocks) == 10
    first = net.blocks[0].F
    assert first.gamma1.shape == (100, 2) and first.gamma2.shape == (2, 100)
    assert first.step == pytest.approx(1.0)  # h = T / layers
    rho = torch.linalg.eigvals(first.gamma2 @ first.gamma1).abs().max()
    assert rho.item() == pytest.approx(1.0, rel=1e-5)  # normalised by the spectral radius
    assert first.bias.abs().sum().item() == 0.0
    for block in net.blocks[1:]:  # "initial stationary weights"
        assert torch.equal(block.F.gamma1, first.gamma1) and torch.equal(
            block.F.gamma2, first.gamma2
        )
        assert block.theta == 0.5


def test_odenet_lifts_to_x_x_and_reads_component_one():
    net = ODENet(in_features=1, out_features=1, layers=3, width=8, theta=0.0)
    x = torch.tensor([[0.3], [-2.0]])
    states = net.trajectory(x)
    assert len(states) == 4
    assert torch.equal(states[0], torch.tensor([[0.3, 0.3], [-2.0, -2.0]]))
    assert torch.equal(net(x), states[-1][:, 1:2])


def test_explicit_odenet_is_forward_euler_by_hand():
    torch.manual_seed(1)
    net = ODENet(
        in_features=1, out_features=1, layers=2, T=1.0, width=3, theta=0.0, stationary_init=False
    ).double()
    x = torch.tensor([[0.7]], dtype=torch.float64)
    y = torch.cat([x, x], 1)
    for block in net.blocks:
        F = block.F
        y = y + 0.5 * torch.relu(y @ F.gamma1.T + F.bias) @ F.gamma2.T
    assert torch.allclose(net(x), y[:, 1:2], atol=1e-14)


def test_linear_readout_and_per_layer_theta():
    net = ODENet(
        in_features=2,
        out_features=3,
        layers=3,
        T=1.0,
        width=4,
        readout="linear",
        theta=[0.0, 0.5, 1.0],
    )
    assert [b.theta for b in net.blocks] == [0.0, 0.5, 1.0]
    assert net(torch.randn(5, 2)).shape == (5, 3)
    with pytest.raises(ValueError, match="theta"):
        ODENet(layers=3, theta=[0.5, 0.5])
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(5, 3))


def test_conv_odenet_on_digit_images():
    net = ConvODENet(layers=2, channels=4, hidden_channels=4)
    logits = net(torch.randn(3, 1, 8, 8))
    assert logits.shape == (3, 10)
    assert len(net.trajectory(torch.randn(2, 1, 8, 8))) == 3


@pytest.mark.parametrize("theta", [0.0, 0.5, 1.0])
def test_whole_network_gradients_match_finite_differences(theta):
    """Implicit backward of a two-layer float64 tanh network against central differences."""
    torch.manual_seed(0)
    net = ODENet(
        in_features=2,
        out_features=2,
        layers=2,
        T=1.0,
        width=3,
        theta=theta,
        activation="tanh",
        readout="linear",
        stationary_init=False,
        solver=FixedPoint(atol=1e-13, max_iter=500),
        linear_solver=Neumann(rtol=1e-13, max_iter=500),
    ).double()
    names, params = zip(*net.named_parameters())
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)

    def output(x, *p):
        return torch.func.functional_call(net, dict(zip(names, p)), (x,))

    inputs = (x, *(p.detach().clone().requires_grad_() for p in params))
    assert torch.autograd.gradcheck(output, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
