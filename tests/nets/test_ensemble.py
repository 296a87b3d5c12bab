"""Seed ensembles (irnet.nets.ensemble): member k of ``ODENet(ensemble=E)`` is, and trains as, the
single network of seed k — outputs, gradients and Adam's steps, for every solver pair."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.problems import LINEAR_SOLVERS, SOLVERS
from irnet.nets import ConvODENet, ODENet, StagedConvODENet
from irnet.nets.ensemble import (
    clip_member_gradients,
    from_member_slabs,
    member_seeds,
    member_state_dict,
    rows_of,
)
from irnet.nets.memberwise import memberwise

SEEDS = [11, 3, 7]
SMALL = dict(in_features=2, out_features=2, layers=3, T=3.0, width=8, readout="linear")


pytestmark = pytest.mark.usefixtures("float64_default")


def single(seed: int, **kwargs) -> ODENet:
    torch.manual_seed(seed)
    return ODENet(**kwargs)


def inputs(batch: int = 9, features: int = 2) -> torch.Tensor:
    return torch.randn(batch, features, generator=torch.Generator().manual_seed(99))


def members(out: torch.Tensor, count: int) -> torch.Tensor:
    return rows_of(out, count)


# -- the members are the single networks of their seeds -------------------------------------------

NET_OPTIONS = {
    "paper_init": dict(init="paper"),
    "bounded_contraction": dict(init="bounded", contraction=0.9),
    "not_stationary": dict(init="bounded", stationary_init=False, contraction=0.5),
    "component_readout": dict(readout="component", component=1, init="bounded"),
    "theta_per_layer": dict(theta=[0.0, 0.5, 1.0], init="bounded", contraction=0.8),
    "one_leg": dict(scheme="one_leg", init="bounded", contraction=0.8),
    "tanh": dict(activation="tanh", init="bounded"),
}


@pytest.mark.parametrize("options", NET_OPTIONS.values(), ids=NET_OPTIONS.keys())
def test_each_member_answers_as_the_single_network_of_its_seed(options):
    kwargs = {**SMALL, **options}
    ensemble = ODENet(**kwargs, ensemble=3, member_seeds=SEEDS)
    x = inputs()
    out = members(ensemble(x), 3)
    for k, seed in enumerate(SEEDS):
        torch.testing.assert_close(out[k], single(seed, **kwargs)(x), rtol=0, atol=1e-12)
    # and the members differ from each other (the seeds are used)
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_parameters_keep_their_names_with_a_member_dimension_first():
    ensemble = ODENet(**SMALL, ensemble=3, member_seeds=SEEDS)
    one = single(SEEDS[0], **SMALL)
    shapes = {name: tuple(p.shape) for name, p in one.named_parameters()}
    assert {name: tuple(p.shape) for name, p in ensemble.named_parameters()} == {
        name: (3, *shape) for name, shape in shapes.items()
    }


def test_default_seeds_follow_the_global_seed():
    torch.manual_seed(40)
    assert member_seeds(3) == [40, 41, 42]
    torch.manual_seed(40)
    ensemble = ODENet(**SMALL, ensemble=2)
    assert ensemble.member_seeds == [40, 41]
    x = inputs()
    torch.testing.assert_close(
        members(ensemble(x), 2)[1], single(41, **SMALL)(x), rtol=0, atol=1e-12
    )


def test_building_an_ensemble_leaves_the_global_generator_as_one_network_would():
    torch.manual_seed(5)
    ODENet(**SMALL)
    after_single = torch.rand(3)
    torch.manual_seed(5)
    ODENet(**SMALL, ensemble=4)
    assert torch.equal(torch.rand(3), after_single)


def test_warm_started_ensemble_matches_warm_started_members():
    kwargs = {**SMALL, "init": "bounded", "contraction": 0.9, "warm_start": True}
    ensemble = ODENet(**kwargs, ensemble=3, member_seeds=SEEDS)
    singles = [single(s, **kwargs) for s in SEEDS]
    x = inputs()
    for _ in range(2):  # the second pass starts from the cached fixed points
        out = members(ensemble(x), 3)
        for k, net in enumerate(singles):
            torch.testing.assert_close(out[k], net(x), rtol=0, atol=1e-12)
    assert ensemble.blocks[0].forward_stats.iterations.max() <= 1  # the cache was hit


def test_rows_are_sample_major():
    slabs = torch.arange(12.0).view(3, 4, 1)  # (members, batch, 1)
    rows = from_member_slabs(slabs)
    assert rows[:, 0].tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    assert torch.equal(rows_of(rows, 3), slabs)


# -- training: every solver pair ------------------------------------------------------------------


def train_steps(net: ODENet, x: torch.Tensor, target: torch.Tensor, steps: int) -> list[float]:
    """Adam on the sum of the members' mean squared errors; every member's loss at each step."""
    count = net.members
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        optimiser.zero_grad()
        errors = (net(x) - target.repeat_interleave(count, 0)).pow(2).sum(1)
        per_member = rows_of(errors, count).mean(1)
        per_member.sum().backward()
        optimiser.step()
        losses.append(per_member.detach().tolist())
    return losses


PAIRS = [(solver, linear) for solver in SOLVERS for linear in LINEAR_SOLVERS]


@pytest.mark.parametrize("solver,linear", PAIRS, ids=["-".join(pair) for pair in PAIRS])
def test_members_train_as_their_own_runs_for_every_solver_pair(solver, linear):
    kwargs = {
        **SMALL,
        "layers": 2,
        "init": "bounded",
        "contraction": 0.3,
        "solver": SOLVERS[solver](atol=1e-9, max_iter=300),
        "linear_solver": LINEAR_SOLVERS[linear](rtol=1e-9, max_iter=300),
    }
    x, target = inputs(5), torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    ensemble = ODENet(**kwargs, ensemble=3, member_seeds=SEEDS)
    together = train_steps(ensemble, x, target, steps=20)
    for k, seed in enumerate(SEEDS):
        alone = single(seed, **kwargs)
        own = train_steps(alone, x, target, steps=20)
        assert [step[k] for step in together] == pytest.approx([s[0] for s in own], abs=1e-6)
        for (name, p), q in zip(ensemble.named_parameters(), alone.parameters()):
            torch.testing.assert_close(p[k], q, rtol=0, atol=1e-6, msg=name)
    assert together[-1] != together[0]  # the members learned


# -- pieces ---------------------------------------------------------------------------------------


def test_member_clipping_is_torch_clipping_of_each_member():
    grads = [torch.randn(3, 4, 5), torch.randn(3, 4)]
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    clip_member_gradients(params, 1.5, 3)
    for k in range(3):
        alone = [torch.zeros_like(g[k], requires_grad=True) for g in grads]
        for p, g in zip(alone, grads):
            p.grad = g[k].clone()
        torch.nn.utils.clip_grad_norm_(alone, 1.5)
        for p, q in zip(params, alone):
            torch.testing.assert_close(p.grad[k], q.grad, rtol=0, atol=1e-15)


def test_a_members_state_dict_loads_into_the_single_network():
    kwargs = {**SMALL, "init": "bounded", "contraction": 0.9, "warm_start": True}
    ensemble = ODENet(**kwargs, ensemble=3, member_seeds=SEEDS)
    x = inputs()
    out = members(ensemble(x), 3)  # fills the warm-start cache
    alone = ODENet(**kwargs)
    alone.load_state_dict(member_state_dict(ensemble.state_dict(), 2, 3))
    torch.testing.assert_close(alone(x), out[2], rtol=0, atol=1e-12)
    assert alone.blocks[0].forward_stats.iterations.max() <= 1  # its own cached fixed points
    with pytest.raises(ValueError, match=r"member must be in \[0, 2\], got 3"):
        member_state_dict(ensemble.state_dict(), 3, 3)


def test_members_contraction_bounds_hold_member_by_member():
    kwargs = {**SMALL, "init": "bounded", "contraction": 0.5}
    ensemble = ODENet(**kwargs, ensemble=3, member_seeds=SEEDS)
    with torch.no_grad():
        ensemble.blocks[0].F.gamma1[1].mul_(50.0)  # only member 1 leaves its bound
    F = ensemble.blocks[0].F
    g1, g2 = F.weights()
    bound = F.step * torch.linalg.matrix_norm(g1, 2) * torch.linalg.matrix_norm(g2, 2)
    assert bound[1] <= F.bound * (1 + 1e-9)
    assert torch.equal(g1[0], F.gamma1[0]) and torch.equal(g1[2], F.gamma1[2])


ERRORS = {
    "ensemble": (dict(ensemble=0), r"ensemble must be .*>= 1"),
    "seeds_length": (
        dict(ensemble=2, member_seeds=[1, 2, 3]),
        "member_seeds must be null or a list of 2",
    ),
    "seeds_repeat": (dict(ensemble=2, member_seeds=[4, 4]), "member_seeds must differ"),
    "rhs": (dict(ensemble=2, rhs="hamiltonian"), "ensemble supports rhs='mlp'.*got rhs='hamil"),
    "window": (
        dict(ensemble=2, stability_limits=[0.5, 0.9, 1.0]),
        "ensemble supports rhs='mlp' without stability_limits",
    ),
}


@pytest.mark.parametrize("kwargs,message", ERRORS.values(), ids=ERRORS.keys())
def test_bad_ensembles_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ODENet(**SMALL, **kwargs)


# -- convolutional members ------------------------------------------------------------------------

CONV = dict(in_channels=1, image_size=6, num_classes=3, channels=2, hidden_channels=3, layers=2)
CONV_OPTIONS = {
    "default": {},
    "bounded_contraction": dict(init="bounded", contraction=0.9),
    "preactivation_warm": dict(
        preactivation=True, init="bounded", contraction=0.5, warm_start=True
    ),
}


def conv_single(seed: int, **kwargs) -> ConvODENet:
    torch.manual_seed(seed)
    return ConvODENet(**kwargs)


def images(batch: int = 4) -> torch.Tensor:
    return torch.rand(batch, 1, 6, 6, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("options", CONV_OPTIONS.values(), ids=CONV_OPTIONS.keys())
def test_each_convolutional_member_answers_as_its_own_network(options):
    kwargs = {**CONV, **options}
    ensemble = ConvODENet(**kwargs, ensemble=3, member_seeds=SEEDS)
    singles = [conv_single(s, **kwargs) for s in SEEDS]
    x = images()
    for _ in range(2):  # with warm starts the second pass starts from the cached fixed points
        out = members(ensemble(x), 3)
        for k, net in enumerate(singles):
            torch.testing.assert_close(out[k], net(x), rtol=0, atol=1e-12)
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_convolutional_members_train_as_their_own_runs():
    kwargs = {**CONV, "init": "bounded", "contraction": 0.5}
    x, target = images(), torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    together = train_steps(ConvODENet(**kwargs, ensemble=3, member_seeds=SEEDS), x, target, 10)
    for k, seed in enumerate(SEEDS):
        own = train_steps(conv_single(seed, **kwargs), x, target, 10)
        assert [step[k] for step in together] == pytest.approx([s[0] for s in own], abs=1e-9)


def test_convolutional_members_contraction_bounds_hold_member_by_member():
    ensemble = ConvODENet(**CONV, init="bounded", contraction=0.5, ensemble=3, member_seeds=SEEDS)
    F = ensemble.blocks[0].F
    with torch.no_grad():
        F.conv1.weight[2].mul_(40.0)  # only member 2 leaves its bound
    w1, w2 = F.weights()
    bound = F.step * F.norm(w1)[0] * F.norm(w2)[0]
    assert bound[2] <= F.bound * (1 + 1e-9) and bound[2] >= F.bound * (1 - 1e-3)
    assert torch.equal(w1[0], F.conv1.weight[0]) and torch.equal(w1[1], F.conv1.weight[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_members_train_as_their_own_runs_on_cuda(solver):
    kwargs = {
        **SMALL,
        "init": "bounded",
        "contraction": 0.5,
        "warm_start": True,
        "solver": SOLVERS[solver](atol=1e-9, max_iter=300),
        "linear_solver": LINEAR_SOLVERS["direct"](rtol=1e-9),
    }
    cuda = torch.device("cuda")
    x, target = inputs(5).to(cuda), torch.randn(5, 2).to(cuda)
    together = train_steps(ODENet(**kwargs, ensemble=3, member_seeds=SEEDS).to(cuda), x, target, 10)
    for k, seed in enumerate(SEEDS):
        own = train_steps(single(seed, **kwargs).to(cuda), x, target, 10)
        assert [step[k] for step in together] == pytest.approx([s[0] for s in own], abs=1e-6)


STAGED_OPTIONS = {
    "default": dict(channels=2),
    "bounded": dict(channels=2, init="bounded", contraction=0.9),
}


@pytest.mark.parametrize("options", STAGED_OPTIONS.values(), ids=STAGED_OPTIONS.keys())
def test_each_staged_member_answers_and_trains_as_its_own_network(options):
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    target = torch.randn(3, 10, generator=torch.Generator().manual_seed(7))
    ensemble = StagedConvODENet(**options, ensemble=2, member_seeds=SEEDS[:2])
    singles = []
    for seed in SEEDS[:2]:
        torch.manual_seed(seed)
        singles.append(StagedConvODENet(**options))
    out = members(ensemble(x), 2)
    for k, net in enumerate(singles):
        torch.testing.assert_close(out[k], net(x), rtol=0, atol=1e-12)
    together = train_steps(ensemble, x, target, 5)
    for k, net in enumerate(singles):
        own = train_steps(net, x, target, 5)
        assert [step[k] for step in together] == pytest.approx([s[0] for s in own], abs=1e-9)


def test_a_layer_without_a_member_wise_form_is_refused():
    with pytest.raises(ValueError, match="no member-wise form of .*BatchNorm2d"):
        memberwise([nn.BatchNorm2d(2), nn.BatchNorm2d(2)])
