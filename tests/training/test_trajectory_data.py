"""Trajectory fitting: the stiff and Lotka–Volterra data, FlowNet and TrajectoryModule."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from irnet.datamodules import LotkaVolterra, StiffODE
from irnet.datamodules.lotka import ALPHA, BETA, DELTA, GAMMA, lotka_invariant, lotka_rhs
from irnet.datamodules.stiff import stiff_solution
from irnet.linear import Direct
from irnet.module import TrajectoryModule
from irnet.nets import FlowNet, ImplicitNetwork, TrajectoryNetwork, find_blocks
from irnet.solvers import Anderson

pytestmark = pytest.mark.usefixtures("single_thread")


# -- the stiff data --------------------------------------------------------------------------------


def test_the_stiff_solution_solves_the_ode():
    y0 = torch.tensor([[-0.5], [0.0], [1.5]], dtype=torch.float64)
    t = torch.linspace(0, 2, 41, dtype=torch.float64, requires_grad=True)
    y = stiff_solution(y0, t)
    assert torch.equal(y[:, 0].detach(), y0)  # y(0) = y0
    (slope,) = torch.autograd.grad(y.sum(), t)  # the three solutions' slopes, summed
    rhs = (-20 * (y - torch.cos(t)[None, :, None])).sum(dim=(0, 2))
    assert torch.allclose(slope, rhs, atol=1e-10)


@pytest.mark.parametrize("every, observations", [(10, 2), (4, 5), (2, 10), (1, 20)])
def test_stiff_batches_are_initial_values_and_the_observed_states(every, observations):
    data = StiffODE(observe_every=every, samples=[6, 3, 2])
    for split, count in zip(("train", "val", "test"), (6, 3, 2)):
        x, y = data.tensors(split)
        assert x.shape == (count, 1) and y.shape == (count, observations, 1)
        assert x.min() >= -0.5 and x.max() <= 1.5
        t = every * 0.1 * torch.arange(1, observations + 1, dtype=torch.float64)
        exact = stiff_solution(x.double(), t).float()
        assert torch.allclose(y, exact, atol=1e-6)
    assert torch.equal(data.observed_steps(), torch.arange(every, 21, every))
    assert data.step == pytest.approx(0.1) and -20 * data.step == pytest.approx(-2.0)


def test_initial_values_are_seeded_and_differ_between_splits():
    first, again = StiffODE(seed=3), StiffODE(seed=3)
    assert torch.equal(first.tensors("train")[0], again.tensors("train")[0])
    assert not torch.equal(first.tensors("train")[0], StiffODE(seed=4).tensors("train")[0])
    val, test = first.tensors("val")[0], first.tensors("test")[0]
    assert not torch.equal(val, test)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"observe_every": 3}, "observe_every must divide steps=20, got 3"),
        ({"observe_every": 0}, "observe_every"),
        ({"samples": [4, 2]}, "samples must be a list of 3 integers"),
        ({"samples": [4, 0, 2]}, "samples[1]"),
        ({"low": 1.0, "high": 1.0}, "low must be < high"),
        ({"T": -1.0}, "T must be"),
        ({"steps": 0}, "steps"),
    ],
)
def test_stiff_arguments_are_checked_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        StiffODE(**kwargs)


# -- the Lotka–Volterra data -----------------------------------------------------------------------


def test_the_vector_field_is_lotka_volterra_and_vanishes_at_the_equilibrium():
    z = torch.tensor([[2.0, 3.0]], dtype=torch.float64)
    assert torch.allclose(
        lotka_rhs(z), torch.tensor([[ALPHA * 2 - BETA * 6, DELTA * 6 - GAMMA * 3]]).double()
    )
    equilibrium = torch.tensor([GAMMA / DELTA, ALPHA / BETA], dtype=torch.float64)
    assert torch.allclose(lotka_rhs(equilibrium), torch.zeros(2, dtype=torch.float64))


def test_lotka_trajectories_keep_the_invariant():
    data = LotkaVolterra(samples=[6, 2, 2])
    x, _ = data.tensors("train")
    states = data.solve(x.double())
    assert states.shape == (6, 51, 2) and (states > 0).all()
    v = lotka_invariant(states)
    assert (v - v[:, :1]).abs().max() < 1e-8
    # the check can fail: one RK4 step per grid step (h = 0.2) drifts visibly
    coarse = LotkaVolterra(samples=[6, 2, 2], substeps=1).solve(x.double())
    assert (lotka_invariant(coarse) - v[:, :1]).abs().max() > 1e-6
    # and the trajectories move: more than a period (about 7.7) of oscillation in T = 10
    assert (states[:, :, 0].max(1).values - states[:, :, 0].min(1).values).min() > 0.05


def test_lotka_batches_observe_every_few_steps():
    data = LotkaVolterra(observe_every=5, samples=[4, 2, 2])
    x, y = data.tensors("train")
    assert x.shape == (4, 2) and y.shape == (4, 10, 2)
    assert torch.allclose(y, data.solve(x.double())[:, 5::5].float(), atol=1e-6)
    assert (x[:, 0] >= 0.5).all() and (x[:, 0] <= 1.5).all()
    assert (x[:, 1] >= 0.25).all() and (x[:, 1] <= 1.0).all()


def test_lotka_arguments_are_checked_by_name():
    with pytest.raises(ValueError, match="low and high must be positive"):
        LotkaVolterra(low=[0.0, 0.2])
    with pytest.raises(ValueError, match="low and high must be two numbers"):
        LotkaVolterra(low=[0.5])
    with pytest.raises(ValueError, match="substeps"):
        LotkaVolterra(substeps=0)
    with pytest.raises(ValueError, match="observe_every must divide steps=50, got 3"):
        LotkaVolterra(observe_every=3)


# -- FlowNet ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [0.0, 0.5, 1.0])
def test_flownet_takes_one_theta_step_per_layer(theta):
    torch.manual_seed(0)
    net = FlowNet(features=2, layers=4, T=2.0, width=8, theta=theta, observe_every=2)
    x = torch.rand(5, 2)
    states = net.states(x)
    assert states.shape == (5, 5, 2) and torch.equal(states[:, 0], x)
    assert torch.equal(net(x), states[:, 2::2])
    for k, block in enumerate(net.blocks):  # y_k = y_{k-1} + (1 − θ)F_k(y_{k-1}) + θF_k(y_k)
        F = block.F
        before, after = states[:, k], states[:, k + 1]
        step = before + (1 - theta) * F(before) + theta * F(after)
        assert torch.allclose(after, step, atol=1e-4)
    net(x).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_flownet_lists_its_blocks_but_is_not_a_trajectory_network():
    net = FlowNet(layers=5, shared=False)
    assert isinstance(net, ImplicitNetwork) and not isinstance(net, TrajectoryNetwork)
    assert len(find_blocks(net)) == 5
    assert len({id(b.F) for b in net.blocks}) == 5
    shared = FlowNet(layers=5, shared=True)
    assert len({id(b.F) for b in shared.blocks}) == 1
    assert sum(p.numel() for p in shared.parameters()) * 5 == sum(
        p.numel() for p in net.parameters()
    )


def test_flownet_arguments_are_checked_by_name():
    with pytest.raises(ValueError, match="observe_every must divide layers=20, got 3"):
        FlowNet(observe_every=3)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 2\)"):
        FlowNet(features=2)(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="init"):
        FlowNet(init="xavier")


# -- TrajectoryModule ------------------------------------------------------------------------------


def test_the_horizon_grows_to_every_observation():
    module = TrajectoryModule(FlowNet(layers=4), horizon_start=5, horizon_epochs=300)
    horizons = [module.horizon(50, e) for e in range(0, 400, 50)]
    assert horizons == [5, 13, 20, 28, 35, 43, 50, 50]
    assert TrajectoryModule(FlowNet(layers=4)).horizon(50, 0) == 50  # no curriculum


def test_the_training_loss_counts_the_horizon_and_validation_counts_everything():
    module = TrajectoryModule(FlowNet(layers=4), horizon_start=2, horizon_epochs=10)
    pred, target = torch.zeros(3, 4, 1), torch.zeros(3, 4, 1)
    target[:, 2:] = 1.0  # wrong only beyond the first horizon
    module.train()
    assert float(module.compute_loss(pred, target)) == 0.0
    module.eval()
    assert float(module.compute_loss(pred, target)) == pytest.approx(0.5)


def test_the_module_refuses_other_losses_and_mismatched_shapes():
    with pytest.raises(ValueError, match="TrajectoryModule trains with loss 'mse', got 'l2'"):
        TrajectoryModule(FlowNet(layers=4), loss="l2")
    module = TrajectoryModule(FlowNet(layers=4))
    with pytest.raises(ValueError, match="observe_every match"):
        module.compute_loss(torch.zeros(2, 4, 1), torch.zeros(2, 2, 1))


@pytest.mark.parametrize("theta", [0.0, 0.5, 1.0])
def test_a_short_fit_learns_the_stiff_flow(theta):
    """Every θ fits the stiff trajectories: the validation error falls more than fourfold in 60
    epochs (about fivefold, measured, at each θ)."""
    pl.seed_everything(0, verbose=False)
    data = StiffODE(observe_every=4, samples=[8, 4, 4])
    net = FlowNet(
        layers=20,
        T=2.0,
        width=8,
        theta=theta,
        observe_every=4,
        solver=Anderson(atol=1e-6, max_iter=50, history=3),
        linear_solver=Direct(),
    )
    module = TrajectoryModule(net, lr=1e-2)
    x, y = data.tensors("val")
    with torch.no_grad():
        before = float(module.compute_loss(net(x), y))
    trainer = pl.Trainer(
        max_epochs=60,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    module.eval()
    with torch.no_grad():
        after = float(module.compute_loss(net(x), y))
    assert math.isfinite(after) and after < before / 4, (before, after)


def test_flownet_contraction_bounds_every_step_and_warm_starts_fill_the_cache():
    torch.manual_seed(0)
    net = FlowNet(features=2, layers=3, width=8, theta=[0.0, 0.5, 1.0], contraction=0.5)
    assert net.blocks[0].F.constraint is None  # θ = 0: nothing to contract
    a, b = torch.randn(64, 2), torch.randn(64, 2)
    for block in net.blocks[1:]:  # θ · Lip(F) ≤ κ
        with torch.no_grad():
            ratio = (block.F(a) - block.F(b)).norm(dim=1) / (a - b).norm(dim=1)
        assert block.theta * ratio.max() <= 0.5 + 1e-5
    shared = FlowNet(features=2, layers=3, theta=[0.0, 0.5, 1.0], contraction=0.5, shared=True)
    assert shared.blocks[0].F.constraint is not None  # the tightest bound, κ / 1, for all
    warm = FlowNet(features=2, layers=3, theta=1.0, warm_start=True)
    warm(torch.rand(5, 2))
    assert len(warm.warm_start_cache) == 5
    state = warm.state_dict()
    again = FlowNet(features=2, layers=3, theta=1.0, warm_start=True)
    again.load_state_dict(state)
    assert len(again.warm_start_cache) == 5


# -- FlowNet's spectral window on the learned eigenvalues ------------------------------------------


@pytest.mark.parametrize("theta", [0.0, 0.5, 1.0])
def test_eigenvalue_limits_hold_whatever_the_weights(theta):
    """The authors' stiff window: ∂f/∂y = ∂F_k/∂y / h in [−25, −15] at every state, with the
    weights blown up ×10 (checked with the exact scalar derivative, float64)."""
    torch.manual_seed(0)
    net = FlowNet(
        features=1, layers=4, T=0.4, width=8, theta=theta, eigenvalue_limits=[-25, -15]
    ).double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(10)
    y = torch.linspace(-5, 5, 101, dtype=torch.float64).reshape(-1, 1).requires_grad_()
    for F in net.residuals:
        for _ in range(50):  # the power iterations follow the new weights in training mode
            F(y)
        F.eval()
        (slope,) = torch.autograd.grad(F(y).sum(), y)
        eigenvalues = slope / net.step
        assert eigenvalues.min() >= -25 - 1e-9 and eigenvalues.max() <= -15 + 1e-9
        assert eigenvalues.max() - eigenvalues.min() > 0.1  # F is nonlinear, not a constant slope


def test_eigenvalue_limits_map_to_each_steps_amplification():
    from irnet.nets.trajectory import amplification_limits

    # R(z) = (1 + (1 − θ)z) / (1 − θz) at z = hλ = 0.1 · (−25, −15)
    assert amplification_limits([-25, -15], 0.0, 0.1) == pytest.approx([-1.5, -0.5])
    assert amplification_limits([-25, -15], 0.5, 0.1) == pytest.approx([-0.25 / 2.25, 0.25 / 1.75])
    assert amplification_limits([-25, -15], 1.0, 0.1) == pytest.approx([1 / 3.5, 1 / 2.5])
    assert amplification_limits(None, 1.0, 0.1) is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eigenvalue_limits": [-15, -25]}, "eigenvalue_limits must be"),
        ({"eigenvalue_limits": [-25, 12], "theta": 1.0}, "eigenvalue_limits' max"),
        ({"eigenvalue_limits": [-25, -15], "contraction": 0.9}, "mutually exclusive"),
        ({"eigenvalue_limits": [-25, -15], "shared": True, "theta": [0.5, 1.0]}, "one theta"),
        ({"learn_scales": True}, "need stability_limits"),
    ],
)
def test_eigenvalue_limit_arguments_are_checked_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlowNet(**{"layers": 2, "T": 0.2, **kwargs})
