"""R_fp (eq. 9) and R_rnd (eq. 10) against values computed by hand in float64."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from helpers.training import CONFIGS
from irnet.cli import main
from irnet.linear import Neumann
from irnet.nets import ODENet
from irnet.perturbations import GaussianPerturbation, Perturbation
from irnet.regularizers import FixedPointRegularizer, PerturbationRegularizer, power_weights
from irnet.solvers import FixedPoint

THETA = 0.5
STEP = 0.5  # T = 1 over 2 layers
WEIGHTS = [  # (γ1, b, γ2) of the two layers, width 2, state size 2
    ([[0.5, -0.3], [0.2, 0.4]], [0.1, -0.2], [[0.3, 0.1], [-0.2, 0.5]]),
    ([[-0.4, 0.2], [0.3, 0.3]], [0.0, 0.05], [[0.2, -0.3], [0.4, 0.1]]),
]
X = torch.tensor([[0.7], [-1.2], [0.1]], dtype=torch.float64)


def tiny_net(theta: float = THETA) -> ODENet:
    """Two tanh layers of width 2 with the weights above, float64, tight solvers."""
    net = ODENet(
        in_features=1,
        out_features=1,
        layers=2,
        T=1.0,
        width=2,
        theta=theta,
        activation="tanh",
        solver=FixedPoint(atol=1e-13, max_iter=500),
        linear_solver=Neumann(rtol=1e-13, max_iter=500),
    ).double()
    with torch.no_grad():
        for block, (g1, b, g2) in zip(net.blocks, WEIGHTS):
            block.F.gamma1.copy_(torch.tensor(g1, dtype=torch.float64))
            block.F.bias.copy_(torch.tensor(b, dtype=torch.float64))
            block.F.gamma2.copy_(torch.tensor(g2, dtype=torch.float64))
    return net


# -- the hand computation: plain float64 arithmetic on one sample at a time ------------
def F_hand(layer: int, y: list[float]) -> list[float]:
    g1, b, g2 = WEIGHTS[layer]
    hidden = [
        torch.tanh(
            torch.tensor(g1[j][0] * y[0] + g1[j][1] * y[1] + b[j], dtype=torch.float64)
        ).item()
        for j in range(2)
    ]
    return [STEP * (g2[i][0] * hidden[0] + g2[i][1] * hidden[1]) for i in range(2)]


def iterates_hand(
    layer: int, x: list[float], count: int, theta: float = THETA
) -> list[list[float]]:
    """Fixed-point iterates y^0 = x, y^{k+1} = x + (1−θ)F(x) + θF(y^k), k < count."""
    fx = F_hand(layer, x)
    c = [x[i] + (1 - theta) * fx[i] for i in range(2)]
    ys = [x]
    for _ in range(count):
        fy = F_hand(layer, ys[-1])
        ys.append([c[i] + theta * fy[i] for i in range(2)])
    return ys


def dist(a: list[float], b: list[float]) -> float:
    return ((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5


def trajectory_hand(x0: float) -> list[list[float]]:
    """States [y0, y1, y2] of one input, each layer solved by 400 fixed-point iterations."""
    states = [[x0, x0]]
    for layer in range(2):
        states.append(iterates_hand(layer, states[-1], 400)[-1])
    return states


def iterations_hand(layer: int, x: list[float], tol: float, max_iter: int = 500) -> int:
    """Fixed-point iterations from y^0 = x until ‖y^k − y^{k+1}‖ ≤ tol (the solver's stop rule)."""
    ys = iterates_hand(layer, x, max_iter + 1)
    return next((k for k in range(max_iter + 1) if dist(ys[k], ys[k + 1]) <= tol), max_iter)


def r_fp_hand(K: int | list[int], p: float) -> float:
    """R_fp with K iterates per layer (one K for all layers, or one per layer)."""
    Ks = [K, K] if isinstance(K, int) else K
    total = 0.0
    for x0 in X[:, 0].tolist():
        states = trajectory_hand(x0)
        for layer, K_t in enumerate(Ks):
            ys = iterates_hand(layer, states[layer], K_t + 1)
            total += sum((k / K_t) ** p * dist(ys[k], ys[k + 1]) for k in range(1, K_t + 1))
    return total / X.shape[0]


class Shift(Perturbation):
    """Deterministic: the p-th call (p = 1, 2, …) adds ``p · delta``."""

    def __init__(self, delta: float) -> None:
        self.delta, self.calls = delta, 0

    def noise(self, x: Tensor, generator=None) -> Tensor:
        self.calls += 1
        return torch.full_like(x, self.calls * self.delta)


# -- R_fp -------------------------------------------------------------------------------
@pytest.mark.parametrize("K, p", [(1, 1.0), (3, 2.0), (5, 0.5)])
def test_r_fp_matches_hand_computation(K, p):
    net = tiny_net()
    states = net.trajectory(X)
    value = FixedPointRegularizer(weight=1.0, p=p, iterations=K)(net, X, states)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(r_fp_hand(K, p), rel=1e-10)


def test_r_fp_default_K_is_the_forward_iteration_count():
    net = tiny_net()
    states = net.trajectory(X)
    # K of each layer: the most iterations any sample's forward solve took
    counts = [int(b.forward_stats.iterations.max()) for b in net.blocks]
    assert all(c > 3 for c in counts)  # tol 1e-13 takes many iterations
    # the same counts by hand, from y^0 = x (a solver that starts at the explicit step x + F(x),
    # the first iterate, takes one fewer)
    hand_states = [trajectory_hand(x0) for x0 in X[:, 0].tolist()]
    by_hand = [
        max(iterations_hand(layer, s[layer], tol=1e-13) for s in hand_states) for layer in range(2)
    ]
    assert all(h - c in (0, 1) for h, c in zip(by_hand, counts)), (by_hand, counts)
    adaptive = FixedPointRegularizer(p=2.0)(net, X, states)
    assert adaptive.item() == pytest.approx(r_fp_hand(counts, 2.0), rel=1e-10)
    # another K gives another value: the default really is the iteration count
    assert abs(r_fp_hand([c + 1 for c in counts], 2.0) - adaptive.item()) > 1e-6 * adaptive.item()


def test_r_fp_gradient_reaches_only_the_layer_weights():
    net = tiny_net()
    x = X.clone().requires_grad_()
    states = net.trajectory(x)
    FixedPointRegularizer(iterations=3)(net, x, states).backward()
    assert x.grad is None  # each layer's input is detached (a function of γ_t only)
    for block in net.blocks:
        assert block.F.gamma1.grad.abs().sum() > 0 and block.F.gamma2.grad.abs().sum() > 0


def test_r_fp_gradient_matches_finite_differences():
    net = tiny_net()
    states = [s.detach() for s in net.trajectory(X)]
    reg = FixedPointRegularizer(p=2.0, iterations=4)

    class Penalty(torch.nn.Module):  # so functional_call can swap the network's weights
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self) -> Tensor:
            return reg(self.net, X, states)

    penalty = Penalty()
    names, params = zip(*penalty.named_parameters())

    def value(*p):
        return torch.func.functional_call(penalty, dict(zip(names, p)), ())

    inputs = tuple(p.detach().clone().requires_grad_() for p in params)
    assert torch.autograd.gradcheck(value, inputs, eps=1e-6, atol=1e-8)


def test_r_fp_is_zero_for_explicit_layers():
    net = tiny_net(theta=0.0)
    assert FixedPointRegularizer(iterations=3)(net, X, net.trajectory(X)).item() == 0.0


# -- R_rnd ------------------------------------------------------------------------------
@pytest.mark.parametrize("streams, r", [(1, 0.0), (2, 1.0), (3, 2.0)])
def test_r_rnd_matches_hand_computation(streams, r):
    delta = 0.03
    net = tiny_net()
    reg = PerturbationRegularizer(weight=1.0, streams=streams, r=r, perturbation=Shift(delta))
    value = reg(net, X, net.trajectory(X))
    total, per_layer = 0.0, [0.0, 0.0]
    for x0 in X[:, 0].tolist():
        clean = trajectory_hand(x0)
        for p in range(1, streams + 1):
            noisy = trajectory_hand(x0 + p * delta)
            for t in (1, 2):
                d = dist(clean[t], noisy[t])
                total += (t / 2) ** r * d
                per_layer[t - 1] += d / (streams * X.shape[0])
    assert value.item() == pytest.approx(total / X.shape[0], rel=1e-9)
    assert reg.last_distances.shape == (2,)
    assert not reg.last_distances.requires_grad
    assert reg.last_distances.tolist() == pytest.approx(per_layer, rel=1e-9)


def test_r_rnd_is_differentiable_and_keeps_the_clean_solver_stats():
    net = tiny_net()
    states = net.trajectory(X)
    clean_stats = [b.forward_stats for b in net.blocks]
    reg = PerturbationRegularizer(streams=2, sigma=0.1)
    reg(net, X, states).backward()
    assert all(b.forward_stats is s for b, s in zip(net.blocks, clean_stats))
    assert net.blocks[0].F.gamma1.grad.abs().sum() > 0


def test_r_rnd_noise_is_reseeded_from_seed_and_epoch():
    x = torch.zeros(4, 3)
    reg = PerturbationRegularizer(streams=2, sigma=0.1, seed=7)
    reg.on_train_epoch_start(5)
    first = reg.perturb(x)
    assert first.shape == (8, 3)
    assert not torch.equal(first[:4], first[4:])  # streams differ
    reg.on_train_epoch_start(5)
    assert torch.equal(reg.perturb(x), first)  # a resumed epoch draws the same noise
    reg.on_train_epoch_start(6)
    assert not torch.equal(reg.perturb(x), first)  # fresh noise every epoch
    other = PerturbationRegularizer(streams=2, sigma=0.1, seed=8)
    other.on_train_epoch_start(5)
    assert not torch.equal(other.perturb(x), first)


def test_gaussian_perturbation_has_the_configured_sigma():
    x = torch.full((200_000, 2), 3.0, dtype=torch.float64)
    noisy = GaussianPerturbation(0.05)(x, torch.Generator().manual_seed(0))
    assert x.eq(3.0).all()  # the input is not modified
    noise = noisy - 3.0
    assert noise.std().item() == pytest.approx(0.05, rel=0.01)
    assert abs(noise.mean().item()) < 3 * 0.05 / 200_000**0.5 * 2**0.5


def r_rnd_noise(reg: PerturbationRegularizer, size: int = 100_000) -> Tensor:
    """The noise R_rnd adds to ``size`` zero inputs (all its streams), float64."""
    return reg.perturb(torch.zeros(size, 1, dtype=torch.float64))


@pytest.mark.parametrize("sigma", [0.05, 0.3])
def test_r_rnd_draws_its_noise_with_the_configured_sigma(sigma):
    # The σ given to R_rnd must reach the perturbation it draws from, not only be stored.
    reg = PerturbationRegularizer(streams=2, sigma=sigma, seed=1)
    assert reg.perturbation.sigma == sigma
    noise = r_rnd_noise(reg)
    assert noise.shape == (200_000, 1)
    assert noise.std().item() == pytest.approx(
        sigma, rel=0.01
    )  # 200 000 draws: std error about 0.16 %


def test_r_rnd_draws_scale_with_sigma():
    # Same seed and epoch, another σ: the same standard normal draws times the new σ.
    small, large = (PerturbationRegularizer(streams=2, sigma=s, seed=4) for s in (0.05, 0.3))
    a, b = r_rnd_noise(small, 1000), r_rnd_noise(large, 1000)
    assert torch.allclose(b, 6.0 * a, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize(
    "override, sigma", [([], 0.05), (["--model.r_rnd.init_args.sigma", "0.3"], 0.3)]
)
def test_r_rnd_sigma_reaches_the_noise_from_the_config(override, sigma, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["irnet"])  # pytest's own arguments are not the CLI's
    cli = main(["--config", str(CONFIGS / "ex2_spirals.yaml"), *override], run=False)
    reg = cli.model.r_rnd
    assert r_rnd_noise(reg).std().item() == pytest.approx(sigma, rel=0.01)


def test_perturbation_is_replaceable_at_run_time():
    reg = PerturbationRegularizer(sigma=0.1)
    reg.perturbation = Shift(0.5)
    assert torch.equal(reg.perturb(torch.zeros(2, 1)), torch.full((2, 1), 0.5))


def test_power_weights():
    assert power_weights(4, 2.0, torch.zeros(1)).tolist() == pytest.approx(
        [1 / 16, 1 / 4, 9 / 16, 1.0]
    )


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: FixedPointRegularizer(weight=-1.0), "weight"),
        (lambda: FixedPointRegularizer(p=-0.5), "p"),
        (lambda: FixedPointRegularizer(iterations=0), "iterations"),
        (lambda: PerturbationRegularizer(streams=0), "streams"),
        (lambda: PerturbationRegularizer(r=-1.0), "r"),
        (lambda: PerturbationRegularizer(sigma=0.0), "sigma"),
        (
            lambda: PerturbationRegularizer(sigma=0.1, perturbation=GaussianPerturbation(0.1)),
            "sigma",
        ),
        (lambda: PerturbationRegularizer(perturbation="gauss"), "perturbation"),
    ],
)
def test_bad_arguments_name_the_argument(build, name):
    with pytest.raises(ValueError, match=name):
        build()
