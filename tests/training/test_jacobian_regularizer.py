"""R_jac, the Jacobian regulariser: exact and Hutchinson values against dense float64 Jacobians, its
gradient against finite differences, its effect on training, and its configuration."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch.autograd.functional import jacobian

from helpers.training import tiny_odenet
from irnet.datamodules import SineRegression
from irnet.module import ImplicitNetModule
from irnet.regularizers import JacobianRegularizer


def small_net(theta: float = 0.5, layers: int = 2, seed: int = 0):
    net = tiny_odenet(
        layers=layers,
        width=6,
        theta=theta,
        in_features=2,
        out_features=1,
        tol=1e-13,
        max_iter=400,
        seed=seed,
    ).double()
    # Weights large enough that the Jacobians are far from 0 (the test would pass on zeros).
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2.0)
    return net


def dense_jacobians(net, states) -> list[list[torch.Tensor]]:
    """θ·∂F/∂y at each implicit layer's output: a dense (n, n) matrix per sample, without irnet."""
    out = []
    for block, y in zip(net.blocks, states[1:]):
        if block.theta == 0:
            continue
        out.append(
            [
                block.theta * jacobian(lambda v: block.F(v[None])[0], y[b].detach())
                for b in range(y.shape[0])
            ]
        )
    return out


def exact_value(net, x) -> float:
    """Mean over implicit layers of the batch mean of ‖θ ∂F/∂y‖_F², from dense Jacobians."""
    with torch.no_grad():
        states = net.trajectory(x)
    mats = dense_jacobians(net, states)
    return sum(sum(float((J**2).sum()) for J in layer) / len(layer) for layer in mats) / len(mats)


@pytest.fixture()
def batch():
    torch.manual_seed(1)
    return torch.randn(5, 2, dtype=torch.float64)


def test_exact_mode_equals_the_dense_jacobian_norm(batch):
    net = small_net()
    states = net.trajectory(batch)
    value = JacobianRegularizer(weight=1.0, samples=None)(net, batch, states)
    reference = exact_value(net, batch)
    assert reference > 0.05
    assert value.item() == pytest.approx(reference, rel=1e-10)


def test_a_one_leg_network_is_measured_at_each_layers_stage(batch):
    """One-leg steps: the map's Jacobian is θ·∂F/∂y at the stage (1 − θ)y_t + θy_{t+1}."""
    net = small_net(theta=0.5)
    for block in net.blocks:
        block.scheme = "one_leg"
    states = net.trajectory(batch)
    value = JacobianRegularizer(weight=1.0, samples=None)(net, batch, states)

    def dense(points: list[torch.Tensor]) -> float:
        per_layer = [
            sum(
                float((0.5 * jacobian(lambda v, F=block.F: F(v[None])[0], z[i])).pow(2).sum())
                for i in range(z.shape[0])
            )
            / z.shape[0]
            for block, z in zip(net.blocks, points)
        ]
        return sum(per_layer) / len(per_layer)

    stages = [torch.lerp(a, b, 0.5).detach() for a, b in zip(states[:-1], states[1:])]
    assert value.item() == pytest.approx(dense(stages), rel=1e-10)
    # at the outputs (the linear step's point) the number differs: the stage matters here
    assert dense([y.detach() for y in states[1:]]) != pytest.approx(value.item(), rel=1e-3)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_mean_within_its_statistical_bound(batch, noise):
    net = small_net()
    states = [s.detach() for s in net.trajectory(batch)]
    samples = 400
    value = JacobianRegularizer(weight=1.0, samples=samples, noise=noise, seed=3)(
        net, batch, states
    ).item()
    mats = dense_jacobians(net, states)
    exact = sum(sum(float((J**2).sum()) for J in layer) / len(layer) for layer in mats) / len(mats)
    # Var ‖vᵀA‖² = 2‖AAᵀ‖_F² for Gaussian v (an upper bound for Rademacher); independent draws per
    # layer and sample, averaged: Var = Σ_t Σ_b 2‖A_tb A_tbᵀ‖_F² / (L² B² S).
    layers, per = len(mats), len(mats[0])
    var = sum(2 * float(((J @ J.T) ** 2).sum()) for layer in mats for J in layer) / (
        layers**2 * per**2 * samples
    )
    assert abs(value - exact) < 5 * math.sqrt(var)
    assert abs(value - exact) > 0  # an estimate, not the exact value


def test_explicit_layers_contribute_nothing(batch):
    net = small_net(theta=0.0)
    value = JacobianRegularizer(samples=None)(net, batch, net.trajectory(batch))
    assert value.item() == 0.0


def test_gradient_matches_finite_differences_of_the_exact_value(batch):
    net = small_net()
    weight = net.blocks[0].F.gamma1
    value = JacobianRegularizer(samples=None)(net, batch, net.trajectory(batch))
    (grad,) = torch.autograd.grad(value, weight)
    h = 1e-5
    for index in [(1, 0), (2, 1), (5, 0), (3, 3)]:
        with torch.no_grad():
            weight[index] += h
            plus = exact_value(net, batch)
            weight[index] -= 2 * h
            minus = exact_value(net, batch)
            weight[index] += h
        fd = (plus - minus) / (2 * h)
        assert abs(fd) > 1e-3
        # Perturbing a first-layer weight moves y_1 and y_2: the match covers the path through them.
        assert grad[index].item() == pytest.approx(fd, rel=1e-5, abs=1e-8)


def frobenius_after_training(r_jac) -> float:
    torch.manual_seed(0)
    data = SineRegression(num_points=21)
    net = tiny_odenet(layers=2, width=16, theta=1.0, tol=1e-6, max_iter=100, seed=0)
    module = ImplicitNetModule(net, lr=2e-2, r_jac=r_jac)
    trainer = pl.Trainer(
        max_epochs=15,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    x, _ = data.tensors("val")
    net = net.double()
    return exact_value(net, x.double()) ** 0.5


def test_training_with_r_jac_lowers_the_jacobian_norm():
    # Measured: ‖θJ‖_F (root of the layer and sample mean) 0.20 at initialisation, 0.69 after 15
    # epochs without R_jac, 0.38 with weight 5.
    without = frobenius_after_training(None)
    with_r_jac = frobenius_after_training(JacobianRegularizer(weight=5.0, samples=2))
    assert with_r_jac < 0.7 * without


def test_logged_and_configurable_from_yaml(tmp_path, monkeypatch):
    from irnet.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["irnet"])  # the CLI parses only the test's args
    config = tmp_path / "jac.yaml"
    config.write_text(
        "model:\n"
        "  class_path: irnet.module.ImplicitNetModule\n"
        "  init_args:\n"
        "    net: {class_path: irnet.nets.ODENet, init_args: {in_features: 1, out_features: 1,"
        " layers: 2, width: 8, T: 1.0, theta: 0.5, activation: tanh}}\n"
        "    r_jac: {class_path: irnet.regularizers.JacobianRegularizer,"
        " init_args: {weight: 0.1}}\n"
        "data: {class_path: irnet.datamodules.SineRegression, init_args: {num_points: 11}}\n"
    )
    cli = main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_epochs",
            "2",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
        ]
    )
    assert isinstance(cli.model.r_jac, JacobianRegularizer) and cli.model.r_jac.weight == 0.1
    metrics = cli.trainer.callback_metrics
    assert metrics["train/r_jac"].item() > 0
    assert metrics["train/total"].item() == pytest.approx(
        (metrics["train/loss"] + metrics["train/r_jac"]).item(), rel=1e-5
    )


def test_uses_the_states_of_the_modules_forward_path(batch):
    seen = {}

    class Recording(JacobianRegularizer):
        def __call__(self, net, x, states, trajectory=None):
            seen["states"] = states
            return super().__call__(net, x, states, trajectory)

    class Hooked(ImplicitNetModule):
        def trajectory(self, x):
            seen["hooked"] = super().trajectory(x)
            return seen["hooked"]

    module = Hooked(small_net(), r_jac=Recording(weight=0.5))
    x = torch.randn(4, 2, dtype=torch.float64)
    terms = module.regularization(x, module.trajectory(x))
    assert seen["states"] is seen["hooked"]
    assert terms["r_jac"].item() > 0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"samples": 0}, "samples"),
        ({"samples": 1.5}, "samples"),
        ({"noise": "uniform"}, "noise"),
        ({"weight": -1.0}, "weight"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_are_refused(kwargs, name):
    with pytest.raises(ValueError, match=name):
        JacobianRegularizer(**kwargs)
