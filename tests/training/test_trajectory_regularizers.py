"""The authors' regularisers along the trajectory — R_div, R_mag, R_res and R_tv — each against an
independent float64 computation (dense Jacobians, hand-written sums), their gradients, their
logging and short fits, and their configuration."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.autograd.functional import jacobian

from helpers.training import tiny_odenet
from irnet.datamodules import SineRegression
from irnet.layer import ImplicitResidualBlock
from irnet.module import ImplicitNetModule
from irnet.nets.residual import MLPResidual
from irnet.regularizers import (
    DivergenceRegularizer,
    MagnitudeRegularizer,
    ResidualRegularizer,
    TotalVariationRegularizer,
)

NEW = {
    "r_div": DivergenceRegularizer,
    "r_mag": MagnitudeRegularizer,
    "r_res": ResidualRegularizer,
    "r_tv": TotalVariationRegularizer,
}


def small_net(theta=0.5, layers: int = 3, seed: int = 0, stationary: bool = False):
    """A float64 ODENet with a 4-dimensional state (in_features 2), tight solves, weights large
    enough that the Jacobians are far from 0, and (unless ``stationary``) different per layer."""
    net = tiny_odenet(
        layers=layers, width=6, theta=theta, in_features=2, tol=1e-13, max_iter=400, seed=seed
    ).double()
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for block in net.blocks:
            for p in block.F.parameters():
                p.mul_(2.0)
                if not stationary:
                    p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return net


@pytest.fixture()
def batch():
    torch.manual_seed(1)
    return torch.randn(5, 2, dtype=torch.float64)


def dense_traces(net, states) -> list[list[float]]:
    """tr ∂F_t/∂y at each layer's input state, per sample, from dense Jacobians (no irnet)."""
    return [
        [
            float(torch.trace(jacobian(lambda v: block.F(v[None])[0], y[b].detach())))
            for b in range(y.shape[0])
        ]
        for block, y in zip(net.blocks, states[:-1])
    ]


def divergence_by_hand(traces: list[list[float]], p: float, dim: int) -> float:
    """σ((1 / (T d)) Σ_t ((t+1)/T)^p · mean_b tr_tb), in plain Python."""
    T = len(traces)
    s = sum(((t + 1) / T) ** p * sum(tr) / len(tr) for t, tr in enumerate(traces))
    return 1 / (1 + math.exp(-s / (T * dim)))


# -- R_div -----------------------------------------------------------------------------------------


def test_all_sign_vectors_give_the_exact_trace(batch):
    # E[vᵀAv] = tr A for ±1 probes: over all 2^d of them the mean is the trace itself, exactly.
    net = small_net()
    states = net.trajectory(batch)
    dim = states[0].shape[1]
    signs = torch.tensor(list(itertools.product([1.0, -1.0], repeat=dim)), dtype=torch.float64)
    probes = signs[:, None, :].expand(len(signs), *states[0].shape)
    exact = dense_traces(net, states)
    for block, y, layer in zip(net.blocks, states[:-1], exact):
        forms = DivergenceRegularizer.quadratic_forms(block.F, y, probes)  # (2^d, batch)
        assert forms.shape == (2**dim, batch.shape[0])
        assert forms.mean(0).tolist() == pytest.approx(layer, rel=1e-12, abs=1e-12)
        assert (forms - forms.mean(0)).abs().max() > 1e-2  # single probes are not the trace
    assert max(abs(tr) for layer in exact for tr in layer) > 0.1


@pytest.mark.parametrize("p", [0.0, 1.0, 2.0])
def test_exact_mode_matches_the_dense_trace(batch, p):
    net = small_net()
    states = net.trajectory(batch)
    reg = DivergenceRegularizer(samples=None, p=p)
    exact = dense_traces(net, states)
    assert reg.layer_traces(net, states).tolist() == pytest.approx(
        [sum(layer) / len(layer) for layer in exact], rel=1e-12
    )
    value = reg(net, batch, states).item()
    assert value == pytest.approx(divergence_by_hand(exact, p, dim=4), rel=1e-12)
    assert abs(value - 0.5) > 1e-3  # the divergence is far enough from 0 to see the weights


def form_variance(A: torch.Tensor, noise: str) -> float:
    """Var vᵀAv for one probe, with S = (A + Aᵀ)/2: 2‖S‖_F² for Gaussian v, 2(‖S‖_F² − Σ_i S_ii²)
    for ±1 v (whose diagonal terms v_i² A_ii are constant)."""
    sym = (A + A.T) / 2
    diagonal = float((sym.diag() ** 2).sum()) if noise == "rademacher" else 0.0
    return 2 * (float((sym**2).sum()) - diagonal)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_mean_within_its_statistical_bound(batch, noise):
    net = small_net()
    states = [s.detach() for s in net.trajectory(batch)]
    samples = 2000
    reg = DivergenceRegularizer(samples=samples, noise=noise, seed=5)
    estimate = reg.layer_traces(net, states)
    for t, (block, y) in enumerate(zip(net.blocks, states[:-1])):
        mats = [jacobian(lambda v: block.F(v[None])[0], y[b]) for b in range(y.shape[0])]
        exact = sum(float(torch.trace(A)) for A in mats) / len(mats)
        # Independent draws per sample, `samples` per sample, averaged over the batch B:
        # Var = Σ_b Var_b / (B² · samples).
        var = sum(form_variance(A, noise) for A in mats) / (len(mats) ** 2 * samples)
        assert abs(estimate[t].item() - exact) < 5 * math.sqrt(var), t
        assert abs(estimate[t].item() - exact) > 0  # an estimate, not the exact value


def test_divergence_gradient_reaches_the_weights_not_the_states(batch):
    net = small_net()
    states = net.trajectory(batch)
    value = DivergenceRegularizer(samples=None)(net, batch, states)
    weights = [p for block in net.blocks for p in block.F.parameters()]
    grads = torch.autograd.grad(value, [*weights, states[1]], allow_unused=True)
    assert grads[-1] is None  # the states are detached, as in the authors' code
    assert all(g is not None and g.abs().max() > 0 for g in grads[:-1])
    # against finite differences of the hand computation with the states held
    fixed = [s.detach() for s in states]
    weight = net.blocks[1].F.gamma1
    (grad,) = torch.autograd.grad(DivergenceRegularizer(samples=None)(net, batch, fixed), weight)
    h = 1e-6
    for index in [(0, 0), (2, 1), (5, 3)]:
        values = []
        for step in (h, -2 * h):
            with torch.no_grad():
                weight[index] += step
            values.append(divergence_by_hand(dense_traces(net, fixed), 2.0, dim=4))
        with torch.no_grad():
            weight[index] += h
        fd = (values[0] - values[1]) / (2 * h)
        assert abs(fd) > 1e-6
        assert grad[index].item() == pytest.approx(fd, rel=1e-5, abs=1e-10)


# -- R_mag -----------------------------------------------------------------------------------------


def magnitude_by_hand(net, states) -> float:
    total = 0.0
    for block, y in zip(net.blocks, states[:-1]):
        f = block.F(y.detach()).detach()
        total += sum(float((f[b] ** 2).sum()) for b in range(y.shape[0])) / y.shape[0]
    return total


def test_magnitude_is_the_sum_over_layers_of_the_mean_squared_step(batch):
    net = small_net(theta=[0.0, 0.5, 1.0])
    states = net.trajectory(batch)
    value = MagnitudeRegularizer()(net, batch, states).item()
    assert value > 0.05
    assert value == pytest.approx(magnitude_by_hand(net, states), rel=1e-12)


def test_magnitude_gradient_reaches_the_weights_directly_and_through_the_states(batch):
    net = small_net()
    weight = net.blocks[0].F.gamma1

    def full(net) -> float:
        with torch.no_grad():
            return magnitude_by_hand(net, net.trajectory(batch))

    (grad,) = torch.autograd.grad(MagnitudeRegularizer()(net, batch, net.trajectory(batch)), weight)
    # A first-layer weight moves F_0(y_0) and every later state: the finite difference recomputes
    # the whole trajectory, so the match covers the path through the states.
    h = 1e-6
    for index in [(1, 0), (3, 1)]:
        with torch.no_grad():
            weight[index] += h
        plus = full(net)
        with torch.no_grad():
            weight[index] -= 2 * h
        minus = full(net)
        with torch.no_grad():
            weight[index] += h
        fd = (plus - minus) / (2 * h)
        assert grad[index].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)
    detached = [s.detach() for s in net.trajectory(batch)]
    (direct,) = torch.autograd.grad(MagnitudeRegularizer()(net, batch, detached), weight)
    assert (direct - grad).abs().max() > 1e-3  # the path through the states is not negligible


# -- R_res -----------------------------------------------------------------------------------------


def test_residual_is_tiny_at_converged_states(batch):
    net = small_net(theta=[0.5, 1.0, 0.3])
    assert ResidualRegularizer()(net, batch, net.trajectory(batch)).item() < 1e-20


def test_residual_matches_the_hand_sum_at_other_states(batch):
    net = small_net(theta=[0.0, 0.5, 1.0, 0.3], layers=4)
    torch.manual_seed(2)
    states = [s.detach() + 0.1 * torch.randn_like(s) for s in net.trajectory(batch)]
    value = ResidualRegularizer()(net, batch, states).item()
    by_hand = 0.0
    for block, y0, y1 in zip(net.blocks, states[:-1], states[1:]):
        if block.theta == 0:  # explicit layers satisfy their equation by construction
            continue
        r = y1 - y0 - (1 - block.theta) * block.F(y0) - block.theta * block.F(y1)
        by_hand += sum(float((r[b] ** 2).sum()) for b in range(r.shape[0])) / r.shape[0]
    assert by_hand > 1e-3
    assert value == pytest.approx(by_hand, rel=1e-12)


def test_residual_of_a_one_leg_block_is_that_of_its_equation(batch):
    # A block that declares the one-leg scheme y₁ = y₀ + F((1−θ)y₀ + θy₁): only its F, θ and
    # scheme are read, so stand-ins serve (the block's own solve is tested in tests/core/).
    torch.manual_seed(4)
    F = MLPResidual(3, width=5).double()
    net = SimpleNamespace(
        blocks=[SimpleNamespace(F=F, theta=theta, scheme="one_leg") for theta in (0.5, 1.0)]
    )
    states = [torch.randn(4, 3, dtype=torch.float64) for _ in range(3)]
    by_hand = 0.0
    for theta, y0, y1 in zip((0.5, 1.0), states, states[1:]):
        r = (y1 - y0 - F((1 - theta) * y0 + theta * y1)).detach()
        by_hand += sum(float((r[b] ** 2).sum()) for b in range(4)) / 4
    value = ResidualRegularizer()(net, states[0], states).item()
    assert value == pytest.approx(by_hand, rel=1e-12)
    linear = SimpleNamespace(blocks=[SimpleNamespace(F=F, theta=0.5), net.blocks[1]])
    assert abs(ResidualRegularizer()(linear, states[0], states).item() - value) > 1e-3


def test_residual_gradient_reaches_the_weights_not_the_states(batch):
    net = small_net()
    torch.manual_seed(3)
    states = [
        (s.detach() + 0.1 * torch.randn_like(s)).requires_grad_() for s in net.trajectory(batch)
    ]
    value = ResidualRegularizer()(net, batch, states)
    weights = [p for block in net.blocks for p in block.F.parameters()]
    grads = torch.autograd.grad(value, [*weights, *states], allow_unused=True)
    assert all(g is None for g in grads[len(weights) :])
    assert all(g is not None and g.abs().max() > 0 for g in grads[: len(weights)])


# -- R_tv ------------------------------------------------------------------------------------------


def test_total_variation_is_zero_for_a_stationary_network(batch):
    net = small_net(stationary=True)
    assert TotalVariationRegularizer()(net, batch, net.trajectory(batch)).item() == 0.0


def test_total_variation_matches_the_hand_sum(batch):
    net = small_net(layers=4)
    value = TotalVariationRegularizer()(net, batch, net.trajectory(batch)).item()
    named = [dict(block.F.named_parameters()) for block in net.blocks]
    by_hand = sum(
        float(((after[k] - before[k]) ** 2).sum())
        for before, after in zip(named, named[1:])
        for k in before
    )
    assert by_hand > 0.1
    assert value == pytest.approx(by_hand, rel=1e-12)


def test_total_variation_gradient_is_twice_the_differences(batch):
    net = small_net(layers=3)
    value = TotalVariationRegularizer()(net, batch, net.trajectory(batch))
    w = [block.F.gamma2 for block in net.blocks]
    grads = torch.autograd.grad(value, w)
    with torch.no_grad():
        assert torch.allclose(grads[0], 2 * (w[0] - w[1]))
        assert torch.allclose(grads[1], 2 * (w[1] - w[0]) - 2 * (w[2] - w[1]))
        assert torch.allclose(grads[2], 2 * (w[2] - w[1]))


def test_total_variation_refuses_layers_of_different_shapes():
    net = small_net()
    net.blocks[1] = ImplicitResidualBlock(MLPResidual(4, width=3), theta=0.5).double()
    with pytest.raises(ValueError, match=r"r_tv .* layer 0.* layer 1"):
        ImplicitNetModule(net, r_tv=TotalVariationRegularizer(weight=0.1))
    ImplicitNetModule(net, r_tv=TotalVariationRegularizer(weight=0.0))  # off: not checked


# -- in the module ---------------------------------------------------------------------------------


def fit(module, epochs: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, SineRegression(num_points=11))
    return trainer


@pytest.mark.parametrize("name", sorted(NEW))
def test_each_is_logged_and_trains(name):
    module = ImplicitNetModule(tiny_odenet(seed=0), lr=1e-2, **{name: NEW[name](weight=0.5)})
    assert list(module.active_regularizers()) == [name] and getattr(module, name).name == name
    before = [p.detach().clone() for p in module.parameters()]
    trainer = fit(module)
    m = {k: v.item() for k, v in trainer.callback_metrics.items()}
    assert f"train/{name}" in m and math.isfinite(m[f"train/{name}"])
    # one full batch per epoch: the epoch values are those of the last step
    assert m["train/total"] == pytest.approx(m["train/loss"] + m[f"train/{name}"], rel=1e-5)
    assert m[f"train/{name}"] >= 0 if name == "r_res" else m[f"train/{name}"] > 0
    assert any((p - q).abs().max() > 0 for p, q in zip(module.parameters(), before))


def test_all_four_together_with_the_paper_regularisers():
    from irnet.regularizers import FixedPointRegularizer

    module = ImplicitNetModule(
        tiny_odenet(seed=0),
        r_fp=FixedPointRegularizer(weight=0.01, iterations=2),
        **{name: cls(weight=0.1) for name, cls in NEW.items()},
    )
    m = fit(module).callback_metrics
    terms = ["train/r_fp", *(f"train/{name}" for name in NEW)]
    assert m["train/total"].item() == pytest.approx(
        m["train/loss"].item() + sum(m[k].item() for k in terms), rel=1e-5
    )


@pytest.mark.parametrize("name", sorted(NEW))
def test_a_network_without_a_trajectory_is_refused(name):
    with pytest.raises(ValueError, match=rf"{name} needs a network with \.trajectory\(\)"):
        ImplicitNetModule(nn.Linear(1, 1), **{name: NEW[name](weight=0.1)})
    module = ImplicitNetModule(nn.Linear(1, 1), **{name: NEW[name](weight=0.0)})
    assert module.active_regularizers() == {}


def test_configurable_on_the_command_line(tmp_path, monkeypatch):
    from irnet.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["irnet"])  # the CLI parses only the test's args
    config = tmp_path / "net.yaml"
    config.write_text(
        "model:\n"
        "  class_path: irnet.module.ImplicitNetModule\n"
        "  init_args:\n"
        "    net: {class_path: irnet.nets.ODENet, init_args: {in_features: 1, out_features: 1,"
        " layers: 2, width: 8, T: 1.0, theta: 0.5, activation: tanh}}\n"
        "data: {class_path: irnet.datamodules.SineRegression, init_args: {num_points: 11}}\n"
    )
    overrides = [
        "--model.r_div.init_args.weight=0.2",
        "--model.r_div.init_args.p=1",
        "--model.r_mag.init_args.weight=0.3",
        "--model.r_res.init_args.weight=0.4",
        "--model.r_tv.init_args.weight=0.5",
    ]
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    cli = main(["fit", "--config", str(config), "--trainer.max_epochs=1", *quiet, *overrides])
    model = cli.model
    assert [type(getattr(model, n)) for n in sorted(NEW)] == [NEW[n] for n in sorted(NEW)]
    assert [getattr(model, n).weight for n in ("r_div", "r_mag", "r_res", "r_tv")] == [
        0.2,
        0.3,
        0.4,
        0.5,
    ]
    assert model.r_div.p == 1.0
    assert all(f"train/{n}" in cli.trainer.callback_metrics for n in NEW)


@pytest.mark.parametrize(
    "build, name",
    [
        *((lambda cls=cls: cls(weight=-1.0), "weight") for cls in NEW.values()),
        (lambda: DivergenceRegularizer(samples=0), "samples"),
        (lambda: DivergenceRegularizer(samples=1.5), "samples"),
        (lambda: DivergenceRegularizer(noise="uniform"), "noise"),
        (lambda: DivergenceRegularizer(p=-1.0), "p"),
        (lambda: DivergenceRegularizer(seed=-1), "seed"),
        (lambda: ImplicitNetModule(tiny_odenet(), r_div=0.1), "r_div"),
        (lambda: ImplicitNetModule(tiny_odenet(), r_mag="yes"), "r_mag"),
        (lambda: ImplicitNetModule(tiny_odenet(), r_res=1), "r_res"),
        (lambda: ImplicitNetModule(tiny_odenet(), r_tv=[]), "r_tv"),
    ],
)
def test_bad_arguments_name_the_argument(build, name):
    with pytest.raises(ValueError, match=name):
        build()
