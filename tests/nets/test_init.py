"""``init="bounded"``: the initial network's output is bounded for every seed (docs/contraction.md).

With ``Lip(F_t) = ℓ = c / layers`` and F_t(0) = 0, layer t maps ``‖x‖`` to at most
``g(θ) ‖x‖``, ``g(θ) = (1 + (1−θ)ℓ) / (1 − θℓ)``; so ``|output| ≤ ‖y(T)‖ ≤ g^layers · √2 |x|``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from irnet.nets import BOUNDED_INIT_LIPSCHITZ, ConvODENet, ODENet
from irnet.solvers import FixedPoint

LAYERS, T, WIDTH, X_MAX = 10, 10.0, 100, 5.0
X = torch.linspace(-X_MAX, X_MAX, 101)[:, None]
ATOL = 1e-6


def proven_bound(theta: float, layers: int = LAYERS) -> float:
    """``√2 · X_MAX · g(θ)^layers``, with a small slack for the solves' tolerance."""
    ell = BOUNDED_INIT_LIPSCHITZ / layers
    gain = (1 + (1 - theta) * ell) / (1 - theta * ell)
    return math.sqrt(2) * X_MAX * gain**layers + layers * ATOL * 10


def initial_output(seed: int, theta: float, init: str) -> torch.Tensor:
    torch.manual_seed(seed)
    net = ODENet(
        in_features=1,
        out_features=1,
        layers=LAYERS,
        T=T,
        width=WIDTH,
        theta=theta,
        init=init,
        solver=FixedPoint(atol=ATOL, max_iter=100),
    )
    with torch.no_grad():
        return net(X)


def test_proven_bound_values():
    """The bound itself, by hand: (1.1)^10, (1.05/0.95)^10, (1/0.9)^10 times 5√2."""
    assert proven_bound(0.0) == pytest.approx(5 * math.sqrt(2) * 1.1**10, rel=1e-5)
    assert proven_bound(0.5) == pytest.approx(5 * math.sqrt(2) * (1.05 / 0.95) ** 10, rel=1e-5)
    assert proven_bound(1.0) == pytest.approx(5 * math.sqrt(2) / 0.9**10, rel=1e-5)
    assert proven_bound(1.0) < 5 * math.sqrt(2) * math.exp(1 / 0.9) + 1e-3


@pytest.mark.parametrize("theta", [0.0, 0.5, 1.0])
def test_bounded_init_output_is_bounded_for_50_seeds(theta):
    outputs = [initial_output(seed, theta, "bounded").abs().max().item() for seed in range(50)]
    assert max(outputs) <= proven_bound(theta)
    assert min(outputs) > 0.1  # the network is not trivially zero


def test_paper_init_exceeds_the_bound_on_some_seed():
    """The same check fails for the paper's initialisation (explicit layers, no solve needed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outputs = [initial_output(seed, 0.0, "paper").abs().max().item() for seed in range(50)]
    exceeding = sum(o > proven_bound(0.0) for o in outputs)
    assert exceeding >= 10  # 43 of 50 measured, the largest about 2e8
    assert max(outputs) > 1e5


def test_bounded_init_gives_each_layer_the_lipschitz_constant_c_over_layers():
    torch.manual_seed(0)
    net = ODENet(layers=LAYERS, T=T, width=WIDTH, init="bounded", activation="gelu")
    for block in net.blocks:
        F = block.F
        n1 = np.linalg.svd(F.gamma1.detach().double().numpy(), compute_uv=False).max()
        n2 = np.linalg.svd(F.gamma2.detach().double().numpy(), compute_uv=False).max()
        assert F.step * F.activation_lipschitz * n1 * n2 == pytest.approx(1 / LAYERS, rel=1e-5)
        assert n1 == pytest.approx(n2, rel=1e-5)
        assert torch.count_nonzero(F.bias) == 0
        assert torch.equal(F.gamma1, net.blocks[0].F.gamma1)  # stationary_init copies layer 0


def test_paper_init_is_the_default_and_unchanged():
    torch.manual_seed(7)
    default = ODENet(layers=3, width=5)
    torch.manual_seed(7)
    paper = ODENet(layers=3, width=5, init="paper")
    for a, b in zip(default.parameters(), paper.parameters()):
        assert torch.equal(a, b)
    first = default.blocks[0].F
    rho = torch.linalg.eigvals(first.gamma2 @ first.gamma1).abs().max()
    assert rho.item() == pytest.approx(1.0, rel=1e-5)


def test_conv_bounded_init_bounds_each_residual():
    torch.manual_seed(1)
    net = ConvODENet(
        in_channels=1,
        image_size=5,
        num_classes=3,
        channels=2,
        hidden_channels=3,
        layers=4,
        T=1.0,
        init="bounded",
    ).double()
    for block in net.blocks:
        F = block.F
        zero = torch.zeros(1, 2, 5, 5, dtype=torch.float64)
        assert torch.count_nonzero(F(zero)) == 0
        norms = []
        for _ in range(5):
            J = torch.autograd.functional.jacobian(F, torch.randn(1, 2, 5, 5, dtype=torch.float64))
            norms.append(np.linalg.svd(J.reshape(50, 50).numpy(), compute_uv=False).max())
        assert max(norms) <= BOUNDED_INIT_LIPSCHITZ / 4
        assert max(norms) > 0.2 * BOUNDED_INIT_LIPSCHITZ / 4
    with pytest.raises(ValueError, match="init"):
        ConvODENet(init="paper")
