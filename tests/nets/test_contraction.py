"""Contraction by construction: ``ODENet(contraction=κ)`` keeps θ·Lip(F) ≤ κ through training.

The bound is checked independently of :mod:`irnet.nets.contraction`: by the largest
singular value of dense float64 Jacobians of F on random inputs, and by numpy's
SVD of the weights F actually uses; the solvers' iteration counts are checked
against the rate a κ-contraction guarantees.
"""

from __future__ import annotations

import copy
import math
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from helpers.sync import HostReads
from helpers.training import CONFIGS, QUIET, scalars, tiny_net_overrides
from irnet.cli import main
from irnet.datamodules import SineRegression
from irnet.device_path import forced_path
from irnet.failure import TrainingFailure
from irnet.linear import Neumann
from irnet.module import ImplicitNetModule
from irnet.nets import ConvODENet, ConvResidual, MLPResidual, ODENet
from irnet.nets.contraction import MARGIN, conv_norm, gelu_lipschitz
from irnet.solvers import FixedPoint

KAPPA = 0.8


def jacobian_norm(F: nn.Module, y: torch.Tensor) -> float:
    """σ_max of the dense Jacobian of F at one sample ``y`` (batch of 1), float64."""
    J = torch.autograd.functional.jacobian(F, y)
    return torch.linalg.matrix_norm(J.reshape(y.numel(), y.numel()), ord=2).item()


def push_hard(
    net: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int = 8, lr: float = 1.0
) -> None:
    """Several Adam steps with a large learning rate toward a target the net cannot fit."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((net(x) - target) ** 2).mean()
        loss.backward()
        opt.step()


def numpy_norm(w: torch.Tensor) -> float:
    return float(
        np.linalg.svd(
            w.detach().double().numpy().reshape(w.shape[0], -1)
            if w.dim() == 2
            else w.detach().double().numpy(),
            compute_uv=False,
        ).max()
    )


@pytest.fixture(scope="module")
def trained_mlp() -> ODENet:
    torch.manual_seed(0)
    net = ODENet(
        in_features=2,
        out_features=2,
        layers=3,
        T=3.0,
        width=12,
        theta=[0.5, 1.0, 0.0],
        activation="relu",
        contraction=KAPPA,
        solver=FixedPoint(atol=1e-10, max_iter=300),
        linear_solver=Neumann(rtol=1e-10, max_iter=300),
    ).double()
    x = torch.randn(32, 2, dtype=torch.float64)
    push_hard(net, x, 20 * torch.sin(3 * x))
    return net


def test_bad_contraction_values_raise():
    for bad in (0, 0.0, 1, 1.0, -0.5, 1.5, True, "0.9", float("nan")):
        with pytest.raises(ValueError, match=r"contraction .*\(0, 1\)"):
            ODENet(layers=2, width=4, contraction=bad)
        with pytest.raises(ValueError, match=r"contraction .*\(0, 1\)"):
            ConvODENet(layers=2, channels=2, hidden_channels=2, contraction=bad)
    with pytest.raises(ValueError, match="init"):
        ODENet(layers=2, width=4, init="xavier")


def test_weights_were_pushed_past_the_bound_and_f_uses_scaled_ones(trained_mlp):
    for block in trained_mlp.blocks:
        F = block.F
        raw = F.step * numpy_norm(F.gamma1) * numpy_norm(F.gamma2)
        used = F.step * numpy_norm(F.weights()[0]) * numpy_norm(F.weights()[1])
        if block.theta == 0:
            assert F.constraint is None
            continue
        assert block.theta * raw > 2 * KAPPA  # the raw weights break the bound: it is active
        assert block.theta * used == pytest.approx(KAPPA * (1 - MARGIN), rel=1e-9)


def test_jacobian_norm_stays_below_kappa_over_theta_after_training(trained_mlp):
    torch.manual_seed(1)
    for block in trained_mlp.blocks:
        if block.theta == 0:
            continue
        norms = [
            jacobian_norm(block.F, 3 * torch.randn(1, 4, dtype=torch.float64)) for _ in range(40)
        ]
        assert block.theta * max(norms) <= KAPPA
        assert block.theta * max(norms) > 0.5 * KAPPA  # the check is not vacuous (0.51-0.56 here)


def iteration_bound(r0: torch.Tensor, tol: float, kappa: float) -> torch.Tensor:
    """⌈log(tol/‖r⁰‖)/log κ⌉ per sample (0 where r⁰ already meets tol)."""
    k = torch.ceil(torch.log(tol / r0) / math.log(kappa))
    return torch.where(r0 <= tol, torch.zeros_like(k), k).long()


def test_fixed_point_and_neumann_iterations_never_exceed_the_contraction_bound(trained_mlp):
    torch.manual_seed(2)
    x = 4 * torch.randn(64, 2, dtype=torch.float64)
    states = trained_mlp.trajectory(x)
    y = states[-1]
    (y**2).sum().backward()  # one adjoint solve per implicit block
    checked = 0
    for block, inp in zip(trained_mlp.blocks, states[:-1]):
        if block.theta == 0:
            continue
        with torch.no_grad():  # r⁰ at the solver's start, the explicit step x + F(x) (x at θ = 1)
            fx = block.F(inp)
            explicit = inp + (1 - block.theta) * fx
            y0 = inp + fx if block.theta < 1 else inp
            r0 = (y0 - explicit - block.theta * block.F(y0)).norm(dim=1)
        stats = block.forward_stats
        bound = iteration_bound(r0, block.solver.atol, KAPPA)
        assert stats.converged.all()
        assert (stats.iterations <= bound).all(), (stats.iterations, bound)
        assert stats.iterations.max() >= 5  # deep enough to mean something at atol 1e-10
        neumann = block.backward_stats
        assert neumann.converged.all()
        assert neumann.iterations.max() <= math.ceil(
            math.log(block.linear_solver.rtol) / math.log(KAPPA)
        )
        checked += 1
    assert checked == 2


def test_conv_norm_matches_dense_operators():
    """Equal to the circular convolution's exact norm, and above the zero-padded one's."""
    torch.manual_seed(3)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    size = 5
    grid = size + 1
    circular = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", bias=False).double()
    padded = nn.Conv2d(2, 3, 3, padding=1, bias=False).double()
    with torch.no_grad():
        circular.weight.copy_(w)
        padded.weight.copy_(w)

    def dense(conv, n):
        J = torch.autograd.functional.jacobian(conv, torch.zeros(1, 2, n, n, dtype=torch.float64))
        return np.linalg.svd(J.reshape(3 * n * n, 2 * n * n).numpy(), compute_uv=False).max()

    bound = conv_norm(w, size)[0].item()
    assert bound == pytest.approx(dense(circular, grid), rel=1e-10)
    assert dense(padded, size) <= bound
    assert dense(padded, size) > 0.7 * bound


def finite_difference_check(F: nn.Module, y: torch.Tensor) -> None:
    """Autograd's gradient of ⟨F(y), v⟩ in every parameter against central differences (float64)."""
    v = torch.randn_like(F(y))
    params = list(F.parameters())
    grads = torch.autograd.grad((F(y) * v).sum(), params)
    for p, g in zip(params, grads):
        direction = torch.randn_like(p)
        eps = 1e-6
        with torch.no_grad():
            p.add_(eps * direction)
            plus = (F(y) * v).sum().item()
            p.sub_(2 * eps * direction)
            minus = (F(y) * v).sum().item()
            p.add_(eps * direction)
        assert (g * direction).sum().item() == pytest.approx(
            (plus - minus) / (2 * eps), rel=1e-6, abs=1e-9
        )


def test_gradients_through_the_rescaling_match_finite_differences():
    torch.manual_seed(6)
    F = MLPResidual(3, 7, step=0.7, activation="tanh", lipschitz=0.4).double()
    with torch.no_grad():
        F.bias.normal_()
    assert F.constraint.lipschitz(F.gamma1, F.gamma2) > 0.4  # active
    finite_difference_check(F, torch.randn(5, 3, dtype=torch.float64))
    C = ConvResidual(2, 3, step=0.5, activation="tanh", lipschitz=0.3, image_size=4).double()
    assert C.constraint.lipschitz(C.conv1.weight, C.conv2.weight) > 0.3
    finite_difference_check(C, torch.randn(2, 2, 4, 4, dtype=torch.float64))


def test_conv_jacobian_norm_stays_below_kappa_over_theta_after_training():
    torch.manual_seed(4)
    net = ConvODENet(
        in_channels=1,
        image_size=5,
        num_classes=3,
        channels=2,
        hidden_channels=3,
        layers=2,
        T=2.0,
        theta=[0.5, 1.0],
        activation="relu",
        contraction=KAPPA,
        solver=FixedPoint(atol=1e-10, max_iter=300),
    ).double()
    x = torch.randn(16, 1, 5, 5, dtype=torch.float64)
    labels = torch.randint(0, 3, (16,))
    opt = torch.optim.Adam(net.parameters(), lr=1.0)
    for _ in range(8):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x) * 10, labels).backward()
        opt.step()
    for block in net.blocks:
        F = block.F
        raw = F.step * conv_norm(F.conv1.weight, 5)[0] * conv_norm(F.conv2.weight, 5)[0]
        assert block.theta * raw.item() > KAPPA  # the raw kernels break the bound
        norms = [jacobian_norm(F, torch.randn(1, 2, 5, 5, dtype=torch.float64)) for _ in range(10)]
        assert block.theta * max(norms) <= KAPPA
        assert block.theta * max(norms) > 0.1 * KAPPA
        assert block.forward_stats.converged.all()


def test_gelu_is_refused_nowhere_but_accounted_for():
    """GELU's Lipschitz constant (≈ 1.1289) enters the bound; checked against a fine grid."""
    t = torch.linspace(-6, 6, 200001, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(nn.functional.gelu(t).sum(), t)
    assert gelu_lipschitz() == pytest.approx(grad.max().item(), rel=1e-8)
    F = MLPResidual(2, 8, step=0.5, activation="gelu", lipschitz=0.3).double()
    with torch.no_grad():
        F.gamma1.mul_(10)
    used = numpy_norm(F.weights()[0]) * numpy_norm(F.weights()[1])
    assert 0.5 * gelu_lipschitz() * used == pytest.approx(0.3 * (1 - MARGIN), rel=1e-9)


def test_conv_residual_refuses_larger_images_and_missing_size():
    with pytest.raises(ValueError, match="image_size"):
        ConvResidual(2, 3, lipschitz=1.0)
    F = ConvResidual(2, 3, lipschitz=1.0, image_size=4)
    with pytest.raises(ValueError, match="at most 4"):
        F(torch.randn(1, 2, 6, 6))


@pytest.mark.filterwarnings("ignore:Forward solve")  # the unconstrained paper net at h = 10/3
def test_default_is_unchanged_and_state_dict_round_trips():
    torch.manual_seed(5)
    plain = ODENet(layers=3, width=6)
    torch.manual_seed(5)
    constrained = ODENet(layers=3, width=6, contraction=0.5)
    assert plain.state_dict().keys() == constrained.state_dict().keys()
    for key, value in plain.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, constrained.state_dict()[key])
    x = torch.linspace(-2, 2, 7)[:, None]
    copy = ODENet(layers=3, width=6, contraction=0.5)
    copy.load_state_dict(constrained.state_dict())
    assert torch.equal(copy(x), constrained(x))
    # h = 10/3: the paper's init has θh‖γ2‖‖γ1‖ ≥ θhρ(γ2γ1) > 0.5, so F is rescaled
    assert not torch.allclose(plain(x), constrained(x))


def test_cached_weights_follow_in_place_updates():
    F = MLPResidual(2, 8, step=1.0, lipschitz=0.5).double()
    y = torch.randn(4, 2, dtype=torch.float64)
    with torch.no_grad():
        F.bias.normal_()
        first = F(y)
        F.gamma2[:, 0].mul_(3)  # in place, as an optimiser step: the cache must notice
        second = F(y)
    with torch.enable_grad():
        fresh = F(y)
    assert torch.allclose(second, fresh.detach(), rtol=1e-12, atol=1e-14)
    assert (first - second).abs().max() > 1e-3


@pytest.mark.slow
def test_config_with_contraction_trains_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["irnet"])
    monkeypatch.chdir(tmp_path)
    cli = main(
        [
            "fit",
            "--config",
            str(CONFIGS / "ex1_sine.yaml"),
            *QUIET,
            *tiny_net_overrides(4, 16, 10.0),
            "--model.init_args.r_fp",
            "null",
            "--trainer.callbacks",
            "[]",
            "--model.init_args.net.init_args.contraction",
            "0.9",
            "--model.init_args.net.init_args.init",
            "bounded",
            "--trainer.max_epochs",
            "25",
        ]
    )
    net = cli.model.net
    assert net.contraction == 0.9 and net.init == "bounded"
    for block in net.blocks:  # θ = 0.5, h = 2.5: each F rescaled to h·‖γ2‖‖γ1‖ ≤ 0.9 / 0.5
        w1, w2 = block.F.weights()
        assert block.F.step * numpy_norm(w1) * numpy_norm(w2) <= 1.8
        assert block.forward_stats.converged.all()
    loss = [v for _, v in scalars(tmp_path / "runs" / "ex1_sine" / "version_0")["train/loss"]]
    assert len(loss) == 25 and loss[-1] < 0.8 * loss[0]


def test_training_resumed_from_a_state_dict_matches_bit_for_bit():
    """The rescaling keeps no state: a net and optimiser reloaded mid-training go on identically."""

    def make():
        torch.manual_seed(8)
        net = ODENet(
            layers=3, width=8, T=3.0, theta=[0.5, 1.0, 0.5], contraction=0.7, warm_start=False
        )
        return net, torch.optim.Adam(net.parameters(), lr=0.1)

    x = torch.linspace(-3, 3, 17)[:, None]

    def train(net, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            ((net(x) - torch.sin(x)) ** 2).mean().backward()
            opt.step()

    whole, whole_opt = make()
    train(whole, whole_opt, 3)
    saved = (
        {k: v.clone() for k, v in whole.state_dict().items() if isinstance(v, torch.Tensor)},
        copy.deepcopy(whole_opt.state_dict()),
    )
    train(whole, whole_opt, 3)
    resumed, resumed_opt = make()
    resumed.load_state_dict(saved[0], strict=False)
    resumed_opt.load_state_dict(saved[1])
    train(resumed, resumed_opt, 3)
    assert any(
        b.F.constraint.lipschitz(b.F.gamma1, b.F.gamma2) > 0.7 / b.theta for b in whole.blocks
    )
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


# -- the accelerator path: σ stays on the device, no host read, same gradients ---------------------


def reference_constrained(F: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """F(y) with the rescaling in plain autograd: σ by differentiable SVDs, factor min(1, ·)^½."""
    if isinstance(F, MLPResidual):
        w1, w2 = F.gamma1, F.gamma2
        sigmas = [torch.linalg.matrix_norm(w, ord=2) for w in (w1, w2)]
    else:
        w1, w2 = F.conv1.weight, F.conv2.weight
        grid = F.image_size + w1.shape[-1] // 2
        sigmas = [
            torch.linalg.svdvals(torch.fft.rfft2(w, s=(grid, grid)).permute(2, 3, 0, 1)).max()
            for w in (w1, w2)
        ]
    lip = F.constraint.scale * sigmas[0] * sigmas[1]
    factor = torch.clamp(F.constraint.bound * (1 - MARGIN) / lip, max=1.0) ** 0.5
    w1, w2 = w1 * factor, w2 * factor
    if isinstance(F, MLPResidual):
        return F.step * nn.functional.linear(F.activation(nn.functional.linear(y, w1, F.bias)), w2)
    hidden = F.activation(nn.functional.conv2d(y, w1, F.conv1.bias, padding=F.conv1.padding))
    return F.step * nn.functional.conv2d(hidden, w2, F.conv2.bias, padding=F.conv2.padding)


def constrained_pair(active: bool) -> list[tuple[nn.Module, torch.Tensor]]:
    """A constrained MLP and conv residual (float64) whose bound is reached (``active``) or not."""
    torch.manual_seed(6)
    F = MLPResidual(3, 7, step=0.7, activation="tanh", lipschitz=0.4 if active else 40.0).double()
    C = ConvResidual(
        2, 3, step=0.5, activation="tanh", lipschitz=0.3 if active else 30.0, image_size=4
    ).double()
    with torch.no_grad():
        F.bias.normal_()
        C.conv1.bias.normal_()
    return [
        (F, torch.randn(5, 3, dtype=torch.float64)),
        (C, torch.randn(2, 2, 4, 4, dtype=torch.float64)),
    ]


@pytest.mark.parametrize("active", [True, False], ids=["bound reached", "bound not reached"])
def test_gradients_are_those_of_the_rescaled_f_on_both_paths(active):
    for F, y in constrained_pair(active):
        weights = (
            (F.gamma1, F.gamma2) if isinstance(F, MLPResidual) else (F.conv1.weight, F.conv2.weight)
        )
        assert (F.constraint.lipschitz(*weights) > F.constraint.bound) == active
        v = torch.randn_like(F(y))
        params = list(F.parameters())
        want = torch.autograd.grad((reference_constrained(F, y) * v).sum(), params)
        got = {}
        for path in ("cpu", "accelerator"):
            F.constraint._forget()
            with forced_path(path):
                got[path] = torch.autograd.grad((F(y) * v).sum(), params)
            for g, w in zip(got[path], want):
                assert torch.allclose(g, w, rtol=1e-10, atol=1e-13), (path, type(F).__name__)
        for a, b in zip(got["cpu"], got["accelerator"]):
            if active:
                assert torch.allclose(a, b, rtol=1e-13, atol=1e-15)
            else:  # factor exactly 1 with derivative 0: the gradient of the weights used untouched
                assert torch.equal(a, b)


@pytest.mark.parametrize("path", ["cpu", "accelerator"])
def test_gradients_match_finite_differences_on_both_paths(path):
    with forced_path(path):
        for F, y in constrained_pair(active=True):
            finite_difference_check(F, y)


def test_no_host_read_on_the_accelerator_path():
    """Forward and backward of a constrained MLP and conv residual: nothing read but the two SVDs of
    the first call (one per weight), which synchronise on CUDA by themselves (NormGroup batches a
    network's)."""
    for F, y in constrained_pair(active=True) + constrained_pair(active=False):
        reads = HostReads()
        with forced_path("accelerator"), reads.patched(), reads.counting():
            F(y).sum().backward()  # the first call: the SVDs
            F(y).sum().backward()
            with torch.no_grad():
                F(y)
            with torch.inference_mode():
                F(y)
        assert reads.count == 2 and all("contraction.py" in k for k in reads.sources), (
            reads.report()
        )


def test_validation_reuses_the_training_step_svds():
    """σ and dσ/dW are cached by weight version, not inference mode: one SVD per weight and step."""
    F = MLPResidual(2, 8, step=1.0, lipschitz=0.5).double()
    calls = []
    norm = F.constraint.norm
    F.constraint.norm = lambda w: calls.append(1) or norm(w)
    y = torch.randn(4, 2, dtype=torch.float64)
    optimizer = torch.optim.SGD(F.parameters(), lr=0.1)
    for _ in range(3):
        with torch.inference_mode():  # validation after the step (first: the sanity check)
            F(y)
            F(y)
        optimizer.zero_grad()
        F(y).pow(2).sum().backward()  # σ and M made under inference mode serve the backward
        optimizer.step()
    assert len(calls) == 3 * 2


@pytest.mark.parametrize("path", ["cpu", "accelerator"])
def test_non_finite_weights_do_not_raise_in_the_svd(path):
    for F, y in constrained_pair(active=True):
        weight = F.gamma1 if isinstance(F, MLPResidual) else F.conv1.weight
        with torch.no_grad():
            weight.view(-1)[0] = float("nan")
            weight.view(-1)[1] = float("inf")
        with forced_path(path):
            out = F(y)
            out.sum().backward()
        assert torch.isnan(
            out
        ).any()  # the NaN reaches F's output, where the failure report finds it


class _Poison(pl.Callback):
    def __init__(self, name: str) -> None:
        self.name = name

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            with torch.no_grad():
                dict(pl_module.named_parameters())[self.name].view(-1)[0] = float("nan")


def test_a_nan_weight_under_contraction_stops_the_fit_in_one_line_naming_it(tmp_path):
    name = "net.blocks.1.F.gamma1"
    torch.manual_seed(0)
    net = ODENet(
        layers=2,
        width=8,
        T=1.0,
        contraction=0.9,
        init="bounded",
        solver=FixedPoint(atol=1e-6, max_iter=50),
        linear_solver=Neumann(rtol=1e-6, max_iter=50),
    )
    trainer = pl.Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[_Poison(name)],
        default_root_dir=tmp_path,
    )
    with pytest.raises(TrainingFailure) as failure:
        trainer.fit(ImplicitNetModule(net, lr=1e-2), SineRegression(num_points=11))
    message = str(failure.value)
    assert "\n" not in message and f"non-finite parameters: {name}" in message
