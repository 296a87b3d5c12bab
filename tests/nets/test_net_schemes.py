"""The networks hand ``scheme`` to every block: a one-leg ODENet is a chain of one-leg steps."""

from __future__ import annotations

import pytest
import torch

from irnet import ImplicitResidualBlock
from irnet.linear import Direct
from irnet.nets import ConvODENet, ODENet, StagedConvODENet
from irnet.solvers import Anderson

TIGHT = 1e-10


def _net(scheme: str) -> ODENet:
    torch.manual_seed(0)
    return ODENet(
        in_features=2,
        out_features=2,
        layers=3,
        T=1.5,
        width=8,
        theta=0.5,
        activation="tanh",
        stationary_init=False,
        solver=Anderson(atol=TIGHT, max_iter=200),
        linear_solver=Direct(rtol=TIGHT),
        scheme=scheme,
    ).double()


def test_every_block_of_every_network_takes_the_scheme():
    nets = [
        _net("one_leg"),
        ConvODENet(
            in_channels=1, image_size=4, channels=2, hidden_channels=2, layers=2, scheme="one_leg"
        ),
        StagedConvODENet(channels=2, steps=1, scheme="one_leg"),
    ]
    for net in nets:
        blocks = [m for m in net.modules() if isinstance(m, ImplicitResidualBlock)]
        assert blocks and all(b.scheme == "one_leg" for b in blocks)
    assert all(b.scheme == "linear" for b in _net("linear").blocks)  # the default is the paper's


def test_a_one_leg_network_steps_by_the_one_leg_equation():
    net = _net("one_leg")
    x = torch.randn(5, 2, dtype=torch.float64)
    states = net.trajectory(x)
    for block, y_in, y_out in zip(net.blocks, states[:-1], states[1:]):
        stage = (1 - block.theta) * y_in + block.theta * y_out
        assert torch.allclose(y_out, y_in + block.F(stage), atol=1e-8)
    linear = _net("linear")  # the same weights, the paper's step: another trajectory
    assert not torch.allclose(linear.trajectory(x)[-1], states[-1], atol=1e-6)


def test_a_one_leg_network_has_exact_gradients():
    net = _net("one_leg")
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: net(v), (x,), atol=1e-6)


@pytest.mark.parametrize("make", [ODENet, ConvODENet, StagedConvODENet])
def test_a_bad_scheme_is_refused_naming_it(make):
    with pytest.raises(ValueError, match="scheme"):
        make(scheme="implicit_euler")
