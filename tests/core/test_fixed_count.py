"""Fixed-count solves (``fixed_count=True``): exactly ``max_iter`` iterations or terms, no stopping
test on the way; the answer, its statistics and the block's gradients against known answers."""

from __future__ import annotations

import pytest
import torch
from test_linear import operator_for
from torch import nn

from helpers.problems import (
    DTYPE,
    THETAS,
    LinearF,
    contraction,
    ift_gradients,
    linear_solution,
    mlp,
    residual_norm,
)
from irnet import ImplicitResidualBlock
from irnet.linear import Neumann
from irnet.solvers import FixedPoint, FixedPointProblem

pytestmark = pytest.mark.usefixtures("single_thread")


def picard(problem: FixedPointProblem, y: torch.Tensor, count: int) -> torch.Tensor:
    for _ in range(count):
        y = problem.c + problem.theta * problem.F(y)
    return y


def test_fixed_point_takes_exactly_max_iter_iterations():
    A = contraction(n=4, radius=0.9)
    F = LinearF(A, torch.randn(4, dtype=DTYPE))
    problem = FixedPointProblem(F, torch.randn(3, 4, dtype=DTYPE), theta=1.0)
    y0 = torch.randn(3, 4, dtype=DTYPE)
    y, stats = FixedPoint(atol=1e-300, max_iter=7, fixed_count=True).solve(problem, y0)
    expected = picard(problem, y0, 7)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-14)
    assert (stats.iterations == 7).all()
    # The statistics hold the answer's own residual, not that of an earlier iterate.
    torch.testing.assert_close(
        stats.residual, (expected - picard(problem, expected, 1)).norm(dim=1), rtol=0, atol=1e-14
    )
    assert not stats.converged.any() and not stats.diverged.any()


def test_fixed_point_converged_where_the_last_iterate_meets_atol():
    # Samples that start at the answer meet atol after any count; the others (far away,
    # slow contraction) do not after 5 iterations: per-sample flags, same count for all.
    A = contraction(n=4, radius=0.9)
    F = LinearF(A, torch.randn(4, dtype=DTYPE))
    x = torch.randn(4, 4, dtype=DTYPE)
    solution = linear_solution(A, F.b, x, 1.0)
    y0 = torch.cat([solution[:2], solution[2:] + 100.0])
    problem = FixedPointProblem(F, x, theta=1.0)
    y, stats = FixedPoint(atol=1e-8, max_iter=5, fixed_count=True).solve(problem, y0)
    assert stats.converged.tolist() == [True, True, False, False]
    assert (stats.iterations == 5).all() and not stats.diverged.any()
    torch.testing.assert_close(y[:2], solution[:2], rtol=0, atol=1e-8)


def test_fixed_point_reaches_the_closed_form_answer():
    A = contraction(n=4, radius=0.6)
    F = LinearF(A, torch.randn(4, dtype=DTYPE))
    x = torch.randn(5, 4, dtype=DTYPE)
    block = ImplicitResidualBlock(F, 0.5, FixedPoint(atol=1e-12, max_iter=200, fixed_count=True))
    with torch.no_grad():
        y = block(x)
    torch.testing.assert_close(y, linear_solution(A, F.b, x, 0.5), rtol=0, atol=1e-12)
    assert block.forward_stats.converged.all()
    assert (block.forward_stats.iterations == 200).all()


def test_fixed_point_marks_non_finite_answers_diverged():
    F = LinearF(
        3.0 * torch.eye(2, dtype=DTYPE), torch.zeros(2, dtype=DTYPE)
    )  # θF expands: iterates blow up
    problem = FixedPointProblem(F, torch.ones(2, 2, dtype=DTYPE), theta=1.0)
    _, stats = FixedPoint(max_iter=1000, fixed_count=True).solve(
        problem, torch.ones(2, 2, dtype=DTYPE)
    )
    assert stats.diverged.all() and not stats.converged.any()


def test_neumann_sums_exactly_max_iter_terms():
    A = contraction(n=4, radius=0.5)
    b = torch.randn(2, 4, dtype=DTYPE)
    g, stats = Neumann(rtol=1e-300, max_iter=6, fixed_count=True).solve(
        operator_for(A, 1.0, batch=2), b
    )
    expected, term = torch.zeros_like(b), b
    for _ in range(6):
        expected, term = expected + term, term @ A  # (Aᵀ v) per row is v @ A
    torch.testing.assert_close(g, expected, rtol=0, atol=1e-15)
    assert (stats.iterations == 6).all() and not stats.converged.any() and not stats.diverged.any()
    # The residual of that partial sum is the next term, relative to ‖b‖.
    torch.testing.assert_close(stats.residual, term.norm(dim=1) / b.norm(dim=1), rtol=1e-12, atol=0)


def test_neumann_converged_flags_follow_rtol():
    A = contraction(n=4, radius=0.5)
    b = torch.randn(3, 4, dtype=DTYPE)
    operator = operator_for(A, 1.0, batch=3)
    _, short = Neumann(rtol=1e-6, max_iter=3, fixed_count=True).solve(operator, b)
    _, long = Neumann(rtol=1e-6, max_iter=60, fixed_count=True).solve(operator, b)
    assert not short.converged.any() and long.converged.all()
    assert (long.residual <= 1e-6).all() and (short.residual > 1e-6).all()


@pytest.mark.parametrize("theta", THETAS)
@pytest.mark.parametrize("backward", ["implicit", "unrolled"])
def test_block_gradients_match_the_dense_reference(theta, backward):
    # Enough iterations and terms that the fixed counts solve to rounding: the gradients are
    # the implicit-function-theorem ones (float64, dense Jacobians, torch.linalg solves).
    torch.manual_seed(0)
    F = mlp(n=3, width=5, activation=nn.Tanh)
    x = torch.randn(2, 3, dtype=DTYPE, requires_grad=True)
    w = torch.randn(2, 3, dtype=DTYPE)
    block = ImplicitResidualBlock(
        F,
        theta,
        FixedPoint(atol=1e-12, max_iter=300, fixed_count=True),
        Neumann(rtol=1e-12, max_iter=300, fixed_count=True),
        backward=backward,
    )
    y = block(x)
    params = list(F.parameters())
    gx, *gp = torch.autograd.grad((y * w).sum(), [x, *params])
    assert (residual_norm(F, x, y, theta) <= 1e-12).all()
    rx, rp = ift_gradients(F, x.detach(), y.detach(), theta, w)
    torch.testing.assert_close(gx, rx, rtol=1e-8, atol=1e-10)
    for got, want in zip(gp, rp):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    if backward == "implicit":
        assert (
            block.backward_stats.converged.all() and (block.backward_stats.iterations == 300).all()
        )


@pytest.mark.parametrize(
    "make",
    [lambda v: FixedPoint(fixed_count=v), lambda v: Neumann(fixed_count=v)],
    ids=["FixedPoint", "Neumann"],
)
@pytest.mark.parametrize("bad", [1, "yes", None])
def test_fixed_count_must_be_a_bool(make, bad):
    with pytest.raises(ValueError, match="fixed_count must be True or False"):
        make(bad)


def test_repr_names_the_option():
    assert "fixed_count=True" in repr(FixedPoint(fixed_count=True))
    assert "fixed_count=False" in repr(Neumann())


def test_fixed_count_from_the_command_line(tmp_path, monkeypatch):
    # The option is a config key like any other: the blocks get it and train with it.
    from helpers.training import CONFIGS, QUIET, tiny_net_overrides
    from irnet.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["irnet"])
    solver = "--model.net.init_args.solver.init_args"
    cli = main(
        args=[
            "fit",
            "--config",
            str(CONFIGS / "ex1_sine.yaml"),
            *tiny_net_overrides(2, 8),
            *QUIET,
            "--trainer.callbacks=[]",
            "--trainer.max_epochs",
            "2",
            f"{solver}.fixed_count",
            "true",
            f"{solver}.max_iter",
            "6",
        ]
    )
    block = cli.model.net.blocks[0]
    assert block.solver.fixed_count and (block.forward_stats.iterations == 6).all()
    assert cli.trainer.current_epoch == 2
