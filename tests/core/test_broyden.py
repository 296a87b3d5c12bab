"""Broyden: known answers in float64, a non-contracting map, restarts, per-sample independence,
inference mode and gradients through a block (dense implicit-function-theorem reference).

The table-driven tests of test_solvers.py and test_layer.py run Broyden too
(``"broyden"`` in ``problems.SOLVERS``); these are the checks specific to it.
"""

from __future__ import annotations

import pytest
import torch

from helpers.expansive import expansive_tanh, residual_jacobian, spectral_radius
from helpers.problems import (
    DTYPE,
    contraction,
    ift_gradients,
    matrix_with_spectrum,
    mlp,
    residual_norm,
)
from irnet import ImplicitResidualBlock
from irnet.linear import GMRES, Direct
from irnet.solvers import Broyden, FixedPoint, FixedPointProblem
from irnet.stats import flush_failure_warnings

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(
    "eigenvalues", [[2.5, 0.5, -1.0, 3.0], [0.9, 0.5, -0.5, 0.3]], ids=["expansive", "contractive"]
)
@pytest.mark.parametrize("theta", [0.5, 1.0])
def test_linear_map_solved_exactly_within_2n_steps(eigenvalues, theta):
    # y = c + θAy: Broyden's good method ends in at most 2n steps on a linear
    # problem (Gay, SIAM J. Numer. Anal. 1979), contracting or not.
    A = matrix_with_spectrum(eigenvalues, seed=1)
    c = torch.randn(3, 4, dtype=DTYPE)
    problem = FixedPointProblem(lambda y: y @ A.T, c, theta)
    y, stats = Broyden(atol=1e-11, max_iter=50).solve(problem, c)
    exact = torch.linalg.solve(torch.eye(4, dtype=DTYPE) - theta * A, c.T).T
    assert stats.converged.all() and not stats.diverged.any()
    assert (stats.iterations <= 8).all(), stats.iterations
    # ‖y − y*‖ ≤ ‖(I − θA)⁻¹‖ · 1e-11; the inverses here have norm < 20.
    torch.testing.assert_close(y, exact, rtol=0, atol=2e-10)


@pytest.mark.parametrize("theta", [0.5, 1.0])
def test_nonlinear_contraction_matches_tight_fixed_point(theta):
    F = mlp(n=3, width=6, lipschitz=0.8)
    x = torch.randn(5, 3, dtype=DTYPE)
    with torch.no_grad():
        c = x + (1 - theta) * F(x)
        problem = FixedPointProblem(F, c, theta)
        want, want_stats = FixedPoint(atol=1e-14, max_iter=2000).solve(problem, x)
        got, stats = Broyden(atol=1e-11, max_iter=100).solve(problem, x)
    assert want_stats.converged.all() and stats.converged.all()
    assert (stats.iterations < want_stats.iterations).all()
    # ‖y − y*‖ ≤ ‖r‖ / (1 − 0.8θ) ≤ 5e-11.
    torch.testing.assert_close(got, want, rtol=0, atol=5e-11)


@pytest.mark.parametrize("radius, seed", [(1.5, 0), (2.0, 1), (3.0, 0)])
def test_non_contracting_map_fixed_point_fails_broyden_finds_root(radius, seed):
    F = expansive_tanh(radius=radius, seed=seed)
    assert spectral_radius(F.A.detach()) == pytest.approx(radius)
    x = torch.randn(8, 6, dtype=DTYPE)
    fixed = ImplicitResidualBlock(F, 1.0, FixedPoint(atol=1e-10, max_iter=100))
    broyden = ImplicitResidualBlock(F, 1.0, Broyden(atol=1e-10, max_iter=100))
    with torch.no_grad(), pytest.warns(UserWarning, match="did not converge"):
        fixed(x)
        flush_failure_warnings()  # the accelerator path defers its warnings to one read per step
    assert not fixed.forward_stats.converged.any()
    with torch.no_grad():
        y = broyden(x)
    assert broyden.forward_stats.converged.all()
    # The root is a true root, checked from scratch, where the map expands:
    # ρ(θ ∂F/∂y) > 1 at every sample's answer.
    assert (residual_norm(F, x, y, 1.0) <= 1e-10).all()
    for i in range(len(y)):
        J_map = torch.eye(6, dtype=DTYPE) - residual_jacobian(F, y[i], 1.0)
        assert spectral_radius(J_map) > 1.2


def test_restart_when_memory_is_full():
    # With memory m the (m+1)-th step starts again from H = I: the same as a fresh
    # solver's first step from the m-th iterate.
    F = expansive_tanh(radius=2.0, seed=0)
    c = torch.randn(4, 6, dtype=DTYPE)
    problem = FixedPointProblem(F, c, 1.0)
    solver = Broyden(atol=1e-12, max_iter=50, memory=3)
    with torch.no_grad():
        state = solver.init(problem, c)
        for _ in range(3):
            state = solver.step(problem, state)
        assert len(state.us) == 3
        after = solver.step(problem, state)
        fresh = solver.step(problem, solver.init(problem, state.y))
    assert len(after.us) == 1
    torch.testing.assert_close(after.y, fresh.y, rtol=0, atol=0)
    # The first step from H = I is the fixed-point step y − r(y) = c + θF(y).
    with torch.no_grad():
        torch.testing.assert_close(fresh.y, problem.map(state.y), rtol=0, atol=1e-14)


def test_small_memory_still_converges_on_linear_problem():
    A = matrix_with_spectrum([2.5, 0.5, -1.0, 3.0], seed=1)
    c = torch.randn(3, 4, dtype=DTYPE)
    problem = FixedPointProblem(lambda y: y @ A.T, c, 0.5)
    y, stats = Broyden(atol=1e-10, max_iter=200, memory=4).solve(problem, c)
    exact = torch.linalg.solve(torch.eye(4, dtype=DTYPE) - 0.5 * A, c.T).T
    assert stats.converged.all()
    torch.testing.assert_close(y, exact, rtol=0, atol=2e-9)


def test_degenerate_update_is_skipped_not_nan():
    # A sample that starts at its root has s = 0 and Δr = 0: its update is skipped
    # (zero terms), its answer is its start, and the other sample is unaffected.
    A = contraction(n=3, radius=0.5)
    c = torch.randn(2, 3, dtype=DTYPE)
    root = torch.linalg.solve(torch.eye(3, dtype=DTYPE) - A, c.T).T
    problem = FixedPointProblem(lambda y: y @ A.T, c, 1.0)
    solver = Broyden(atol=1e-12, max_iter=30)
    start = torch.stack([root[0], c[1]])
    state = solver.step(problem, solver.init(problem, start))
    assert torch.equal(state.us[0][0], torch.zeros(3, dtype=DTYPE))
    y, stats = solver.solve(problem, start)
    assert torch.isfinite(y).all() and stats.converged.all()
    assert stats.iterations[0] == 0 and stats.iterations[1] > 0
    torch.testing.assert_close(y, root, rtol=0, atol=1e-11)


def test_per_sample_independence_on_non_contracting_map():
    F = expansive_tanh(radius=3.0, seed=1)
    x = torch.randn(6, 6, dtype=DTYPE)
    block = ImplicitResidualBlock(F, 1.0, Broyden(atol=1e-10, max_iter=100))
    with torch.no_grad():
        both = block(x)
        stats = block.forward_stats
        for i in range(len(x)):
            alone = block(x[i : i + 1])
            assert block.forward_stats.iterations[0] == stats.iterations[i]
            # Equal up to rounding: a 1-row and a 6-row matrix product may sum in another order.
            torch.testing.assert_close(alone[0], both[i], rtol=0, atol=1e-14)
            torch.testing.assert_close(
                block.forward_stats.residual[0], stats.residual[i], rtol=0, atol=1e-14
            )
    assert len(set(stats.iterations.tolist())) > 1, "samples should need different counts"


def test_inference_mode_non_contracting_same_bits():
    F = expansive_tanh(radius=3.0, seed=1)
    x = torch.randn(4, 6, dtype=DTYPE)
    block = ImplicitResidualBlock(F, 1.0, Broyden(atol=1e-10, max_iter=100))
    with torch.no_grad():
        want = block(x)
    with torch.inference_mode():
        got = block(x.clone())
    assert block.forward_stats.converged.all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("linear", ["gmres", "direct"])
def test_gradients_on_non_contracting_map_match_dense_ift(linear):
    # Where the map expands, the Neumann adjoint diverges too; GMRES and Direct do not.
    F = expansive_tanh(radius=3.0, seed=1)
    x = torch.randn(3, 6, dtype=DTYPE, requires_grad=True)
    w = torch.randn(3, 6, dtype=DTYPE)
    adjoint = GMRES(rtol=1e-12, max_iter=50) if linear == "gmres" else Direct(rtol=1e-12)
    block = ImplicitResidualBlock(F, 1.0, Broyden(atol=1e-12, max_iter=200), adjoint)
    y = block(x)
    grads = torch.autograd.grad((y * w).sum(), [x, *F.parameters()])
    assert block.forward_stats.converged.all() and block.backward_stats.converged.all()
    ref_x, ref_params = ift_gradients(F, x.detach(), y.detach(), 1.0, w)
    torch.testing.assert_close(grads[0], ref_x, rtol=1e-8, atol=1e-9)
    for got, want in zip(grads[1:], ref_params):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("memory", [0, -1, 2.5, True])
def test_rejects_bad_memory(memory):
    with pytest.raises(ValueError, match=r"\bmemory\b"):
        Broyden(memory=memory)


def test_repr_names_its_arguments():
    want = "Broyden(atol=1e-06, max_iter=20, memory=7)"
    assert repr(Broyden(atol=1e-6, max_iter=20, memory=7)) == want
