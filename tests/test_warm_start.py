"""Warm starts and the evaluation count of a block: same answers, fewer evaluations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from irnet import ImplicitResidualBlock
from irnet.linear import Neumann
from irnet.nets import ODENet
from irnet.solvers import FixedPoint
from irnet.warm_start import WarmStartCache

TOL = 1e-10


def _net(warm_start: bool, seed: int = 0) -> ODENet:
    torch.manual_seed(seed)
    return ODENet(1, 1, layers=3, T=1.5, width=16, theta=0.5, warm_start=warm_start,
                  solver=FixedPoint(atol=TOL, max_iter=200),
                  linear_solver=Neumann(rtol=TOL, max_iter=200)).double()


def _iterations(net: ODENet) -> torch.Tensor:
    return torch.stack([b.forward_stats.iterations for b in net.blocks])


def _nudge(net: nn.Module, scale: float = 1e-4, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_warm_and_cold_solves_agree_and_warm_takes_fewer_iterations():
    cold, warm = _net(False), _net(True)
    x = torch.linspace(-2, 2, 11, dtype=torch.float64)[:, None]
    warm(x)  # fills the cache
    _nudge(cold), _nudge(warm)
    y_cold, y_warm = cold.trajectory(x), warm.trajectory(x)
    for a, b in zip(y_cold, y_warm):
        # each is within TOL of the layer's fixed point; the map contracts, so they agree
        assert torch.allclose(a, b, atol=1e-8, rtol=0)
    it_cold, it_warm = _iterations(cold), _iterations(warm)
    assert it_warm.float().mean() < 0.9 * it_cold.float().mean()


def test_unchanged_weights_restart_at_the_fixed_point():
    net = _net(True)
    x = torch.randn(7, 1, dtype=torch.float64)
    net(x)
    net(x)
    # the stored y* already meets the tolerance: no iteration is needed
    assert (_iterations(net) == 0).all()


def test_gradients_with_warm_start_match_cold_ones():
    cold, warm = _net(False), _net(True)
    x = torch.randn(9, 1, dtype=torch.float64)
    warm(x)
    _nudge(cold), _nudge(warm)
    for net in (cold, warm):
        net.zero_grad()
        net(x).pow(2).sum().backward()
    for p, q in zip(cold.parameters(), warm.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-7, rtol=1e-6)


def test_cache_is_keyed_by_sample_so_order_and_new_samples_are_handled():
    net = _net(True)
    x = torch.randn(6, 1, dtype=torch.float64)
    net(x)
    perm = torch.tensor([5, 3, 0, 1, 4, 2])
    fresh = torch.randn(2, 1, dtype=torch.float64) + 10
    batch = torch.cat([x[perm], fresh])
    net(batch)
    it = _iterations(net)
    assert (it[:, :6] == 0).all()  # known samples, in any order
    assert (it[:, 6:] > 0).all()  # new samples start cold
    assert len(net.warm_start_cache) == 8


def test_cache_evicts_least_recently_used():
    cache = WarmStartCache(capacity=2)
    y = [torch.ones(1, 2)]
    for name in (b"a", b"b", b"a", b"c"):
        cache.store([name], y)
    assert cache.lookup([b"b"], 1) is None  # evicted: "a" was used more recently
    assert cache.lookup([b"a"], 1) is not None and cache.lookup([b"c"], 1) is not None


def test_cache_travels_with_the_state_dict():
    net = _net(True)
    x = torch.randn(5, 1, dtype=torch.float64)
    net(x)
    other = _net(True, seed=3)
    other.load_state_dict(net.state_dict())
    other(x)
    assert (_iterations(other) == 0).all()


def test_cache_filled_under_inference_mode_is_writable_in_training():
    net = _net(True)
    x = torch.randn(4, 1, dtype=torch.float64)
    with torch.inference_mode():
        net(x)  # e.g. Lightning's sanity check
    net(x).sum().backward()  # training writes the same store
    assert (_iterations(net) == 0).all()


class _Counting(nn.Module):
    def __init__(self, dim: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim).double()
        with torch.no_grad():
            self.lin.weight.mul_(0.3)
        self.calls = 0

    def forward(self, y):
        self.calls += 1
        return torch.tanh(self.lin(y))


def test_block_evaluates_F_once_at_x_and_once_at_the_solution():
    F = _Counting()
    block = ImplicitResidualBlock(F, theta=0.5, solver=FixedPoint(atol=1e-9, max_iter=100))
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = block(x)
    forward_calls = F.calls
    y.sum().backward()
    k = int(block.forward_stats.iterations.max())
    # F(x) once; the solve from the explicit step: its residual, then one per iteration;
    # F(y*) once with a graph, which backward reuses: no evaluation in backward.
    assert forward_calls == 1 + (k + 1) + 1
    assert F.calls == forward_calls


def test_paused_warm_start_solves_cold_and_leaves_the_cache_alone():
    net = _net(True)
    x = torch.randn(5, 1, dtype=torch.float64)
    net(x)
    with net.warm_start_paused():
        net(x + 1.0)
        assert (_iterations(net) > 0).all()
    assert len(net.warm_start_cache) == 5
    net(x)
    assert (_iterations(net) == 0).all()


def test_non_finite_input_is_refused_without_a_check_of_its_own():
    block = ImplicitResidualBlock(_Counting(), theta=0.5)
    x = torch.randn(3, 3, dtype=torch.float64)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        block(x)
