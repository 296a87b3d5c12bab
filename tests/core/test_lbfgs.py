"""L-BFGS: known answers in float64, a non-contracting map, per-sample independence, statistics,
arguments, a Fallback link and gradients through a block (dense implicit-function-theorem
reference).

test_solvers.py runs L-BFGS on its table-driven problems too; these are the checks specific to it.
"""

from __future__ import annotations

import pytest
import torch

from helpers.expansive import TanhLinear, expansive_tanh, residual_jacobian, spectral_radius
from helpers.problems import DTYPE, ift_gradients, matrix_with_spectrum, mlp, residual_norm
from irnet import ImplicitResidualBlock
from irnet.linear import GMRES, Direct
from irnet.solvers import LBFGS, Broyden, Fallback, FixedPoint, FixedPointProblem, NonlinearCG
from irnet.stats import flush_failure_warnings

pytestmark = pytest.mark.usefixtures("single_thread")


def monotone_tanh(n: int = 6, seed: int = 0) -> TanhLinear:
    """``F(y) = A y + tanh(y + b)`` with ``A`` symmetric, eigenvalues spread over [−3, −1.5].

    At θ = 1 the map ``y ↦ c + F(y)`` expands (``ρ(∂F/∂y) ≥ 1.5``), so fixed-point iteration
    diverges; but ``I − ∂F/∂y = I − A − diag(sech²) ⪰ 1.5 I`` everywhere, so the gradient
    ``(I − ∂F/∂y)ᵀ r`` of ``½‖r‖²`` vanishes only at a root: a descent on ``½‖r‖²`` can stall
    nowhere else (on :func:`helpers.expansive.expansive_tanh` it can, at local minima of
    ``‖r‖``, where Broyden still finds roots).
    """
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=DTYPE, generator=gen))
    A = Q @ torch.diag(torch.linspace(-3.0, -1.5, n, dtype=DTYPE)) @ Q.T
    return TanhLinear(A, torch.randn(n, dtype=DTYPE, generator=gen))


# -- known answers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "eigenvalues", [[2.5, 0.5, -1.0, 3.0], [0.9, 0.5, -0.5, 0.3]], ids=["expansive", "contractive"]
)
@pytest.mark.parametrize("theta", [0.5, 1.0])
@pytest.mark.parametrize("history", [1, 10])
def test_linear_map_matches_exact_solve(eigenvalues, theta, history):
    # y = c + θAy. ½‖r‖² is then a convex quadratic and the line search's first move (the
    # minimiser of the quadratic through φ(0), φ'(0), φ(1)) is exact, and L-BFGS with exact line
    # searches on a quadratic takes conjugate-gradient steps: n = 4 in exact arithmetic, whatever
    # the history (Nocedal & Wright §7.2); one more allowed for rounding.
    A = matrix_with_spectrum(eigenvalues, seed=1)
    c = torch.randn(3, 4, dtype=DTYPE)
    problem = FixedPointProblem(lambda y: y @ A.T, c, theta)
    y, stats = LBFGS(atol=1e-11, max_iter=50, history=history).solve(problem, c)
    M = torch.eye(4, dtype=DTYPE) - theta * A
    exact = torch.linalg.solve(M, c.T).T
    assert stats.converged.all() and not stats.diverged.any()
    assert (stats.iterations <= 5).all(), stats.iterations
    # ‖y − y*‖ ≤ ‖M⁻¹‖ · 1e-11; ‖M⁻¹‖₂ < 12 for these four systems.
    assert float(torch.linalg.matrix_norm(torch.linalg.inv(M), ord=2)) < 12
    torch.testing.assert_close(y, exact, rtol=0, atol=1.2e-10)


@pytest.mark.parametrize("theta", [0.5, 1.0])
def test_nonlinear_contraction_matches_tight_fixed_point(theta):
    F = mlp(n=3, width=6, lipschitz=0.8)
    x = torch.randn(5, 3, dtype=DTYPE)
    with torch.no_grad():
        c = x + (1 - theta) * F(x)
        problem = FixedPointProblem(F, c, theta)
        want, want_stats = FixedPoint(atol=1e-14, max_iter=2000).solve(problem, x)
        got, stats = LBFGS(atol=1e-11, max_iter=100).solve(problem, x)
    assert want_stats.converged.all() and stats.converged.all()
    assert (stats.iterations < want_stats.iterations).all()
    # ‖y − y*‖ ≤ ‖r‖ / (1 − 0.8θ) ≤ 5e-11.
    torch.testing.assert_close(got, want, rtol=0, atol=5e-11)


def test_non_contracting_map_fixed_point_fails_lbfgs_finds_root():
    F = monotone_tanh()
    x = 2 * torch.randn(8, 6, dtype=DTYPE)
    fixed = ImplicitResidualBlock(F, 1.0, FixedPoint(atol=1e-10, max_iter=100))
    lbfgs = ImplicitResidualBlock(F, 1.0, LBFGS(atol=1e-10, max_iter=100))
    with torch.no_grad(), pytest.warns(UserWarning, match="did not converge"):
        fixed(x)
        flush_failure_warnings()  # the accelerator path defers its warnings to one read per step
    assert not fixed.forward_stats.converged.any()
    with torch.no_grad():
        y = lbfgs(x)
    assert lbfgs.forward_stats.converged.all()
    assert (lbfgs.forward_stats.iterations <= 30).all()  # measured 9–11
    assert (residual_norm(F, x, y, 1.0) <= 1e-10).all()
    # A true root where the map expands: ρ(θ ∂F/∂y) > 1 at every sample's answer.
    for i in range(len(y)):
        J_map = torch.eye(6, dtype=DTYPE) - residual_jacobian(F, y[i], 1.0)
        assert spectral_radius(J_map) > 1.4


def test_on_expansive_tanh_solved_samples_are_roots_and_the_rest_stall_at_minima_of_the_residual():
    # The documented limit of any descent on ½‖r‖²: where I − θ∂F/∂y is singular somewhere,
    # ‖r‖ can have local minima that are not roots. Every sample L-BFGS leaves is at one
    # (gradient near 0, residual far from 0), and Broyden, which does not descend on ‖r‖,
    # solves all eight.
    F = expansive_tanh(radius=3.0, seed=1)
    x = torch.randn(8, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    problem = FixedPointProblem(F, x, 1.0)
    with torch.no_grad():
        y, stats = LBFGS(atol=1e-10, max_iter=300).solve(problem, x)
        _, broyden = Broyden(atol=1e-10, max_iter=300).solve(problem, x)
    _, grad = problem.residual_and_gradient(y)
    assert broyden.converged.all()
    assert 0 < int(stats.converged.sum()) < 8  # measured 6 of 8
    left = ~stats.converged
    assert (stats.residual[left] > 0.1).all()
    assert (grad.norm(dim=1)[left] < 1e-6).all()


def test_expansive_linear_scale_in_one_step():
    # F(y) = 3y, θ = 0.5: y = x + 1.5x + 1.5y, so y = −5x; r is affine and isotropic, so the
    # first line search lands on the root.
    x = torch.randn(4, 3, dtype=DTYPE)
    block = ImplicitResidualBlock(lambda y: 3 * y, 0.5, LBFGS(atol=1e-11))
    with torch.no_grad():
        y = block(x)
    torch.testing.assert_close(y, -5 * x, rtol=0, atol=1e-11)
    assert (block.forward_stats.iterations == 1).all()


def test_fewer_iterations_than_nonlinear_cg_on_a_contraction():
    # Measured on this problem: L-BFGS 5–6 iterations, NonlinearCG 9–16.
    F = mlp(n=3, width=6, lipschitz=0.8)
    x = torch.randn(5, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    problem = FixedPointProblem(F, x, 1.0)
    with torch.no_grad():
        _, lbfgs = LBFGS(atol=1e-11, max_iter=200).solve(problem, x)
        _, cg = NonlinearCG(atol=1e-11, max_iter=200).solve(problem, x)
    assert lbfgs.converged.all() and cg.converged.all()
    assert lbfgs.iterations.sum() < cg.iterations.sum()


# -- per sample ----------------------------------------------------------------------------------


def test_per_sample_independence():
    F = monotone_tanh(seed=2)
    x = 2 * torch.randn(6, 6, dtype=DTYPE)
    block = ImplicitResidualBlock(F, 1.0, LBFGS(atol=1e-10, max_iter=100))
    with torch.no_grad():
        both = block(x)
        stats = block.forward_stats
        assert stats.converged.all()
        for i in range(len(x)):
            alone = block(x[i : i + 1])
            assert block.forward_stats.iterations[0] == stats.iterations[i]
            # Equal up to rounding: a 1-row and a 6-row matrix product may sum in another order.
            torch.testing.assert_close(alone[0], both[i], rtol=0, atol=1e-14)
            torch.testing.assert_close(
                block.forward_stats.residual[0], stats.residual[i], rtol=0, atol=1e-14
            )
    assert len(set(stats.iterations.tolist())) > 1, "samples should need different counts"


def test_a_sample_at_its_root_is_not_moved_and_does_not_disturb_the_others():
    # A sample that starts at its root has ∇φ = 0: no direction, no pair (sᵀΔg = 0 is skipped),
    # no NaN; the other sample is solved as alone.
    F = monotone_tanh(seed=3)
    x = torch.randn(2, 6, dtype=DTYPE)
    problem = FixedPointProblem(F, x, 1.0)
    solver = LBFGS(atol=1e-12, max_iter=50)
    with torch.no_grad():
        root, _ = solver.solve(problem, x)
        start = torch.stack([root[0], x[1]])
        state = solver.step(problem, solver.init(problem, start))
        y, stats = solver.solve(problem, start)
        alone, alone_stats = solver.solve(FixedPointProblem(F, x[1:], 1.0), x[1:])
    assert torch.isfinite(state.steps).all() and torch.isfinite(state.rho).all()
    assert stats.converged.all() and stats.iterations[0] == 0
    assert stats.iterations[1] == alone_stats.iterations[0]
    torch.testing.assert_close(y[0], root[0], rtol=0, atol=0)
    torch.testing.assert_close(y[1], alone[0], rtol=0, atol=1e-14)


def test_direction_is_the_bfgs_matrix_of_the_kept_pairs():
    # The compact form H g (Byrd, Nocedal & Schnabel) against the BFGS recursion written out
    # densely per sample: H ← (I − ρ s Δgᵀ) H (I − ρ Δg sᵀ) + ρ s sᵀ from H₀ = γI, over the pairs
    # kept, oldest first. After 7 steps with history 4 some samples have dropped pairs (full
    # history) and some skipped pairs (no curvature) or started again.
    from irnet.solvers.lbfgs import _apply_inverse_hessian

    F = expansive_tanh(radius=3.0, seed=1)
    x = torch.randn(8, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    problem = FixedPointProblem(F, x, 1.0)
    solver = LBFGS(atol=1e-10, max_iter=300, history=4)
    with torch.no_grad():
        state = solver.init(problem, x)
        for _ in range(7):
            state = solver.step(problem, state)
    g = torch.randn(8, 6, dtype=DTYPE)
    got = _apply_inverse_hessian(state, g)
    eye = torch.eye(6, dtype=DTYPE)
    kept = 0
    for i in range(8):
        H = state.gamma[i] * eye
        for s, change, rho in zip(state.steps[i], state.changes[i], state.rho[i]):
            if rho > 0:
                kept += 1
                H = (eye - rho * torch.outer(s, change)) @ H @ (
                    eye - rho * torch.outer(change, s)
                ) + rho * torch.outer(s, s)
        torch.testing.assert_close(got[i], H @ g[i], rtol=1e-9, atol=1e-12)
    assert kept > 8


def test_pairs_without_positive_curvature_are_skipped():
    # ½‖r‖² is not convex on this problem: some steps have sᵀΔg ≤ 0. Such a pair must not join
    # the history (it would make H indefinite); every other pair joins as the newest, with
    # ρ = 1/sᵀΔg. So every kept ρ is ≥ 0 (0: an empty slot).
    F = expansive_tanh(radius=3.0, seed=1)
    x = torch.randn(8, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    problem = FixedPointProblem(F, x, 1.0)
    solver = LBFGS(atol=1e-10, max_iter=300, history=5)
    skipped = joined = 0
    with torch.no_grad():
        state = solver.init(problem, x)
        for _ in range(40):
            new = solver.step(problem, state)
            s, change = new.y - state.y, new.grad - state.grad
            curvature = (s * change).sum(1)
            moved = (s != 0).any(1)
            assert (new.rho >= 0).all()
            for i in torch.nonzero(moved).flatten().tolist():
                if curvature[i] <= 0:
                    skipped += 1
                    # the history is the old one, or none (a sample that starts again)
                    kept = torch.equal(new.rho[i], state.rho[i])
                    assert kept or torch.equal(new.rho[i], torch.zeros_like(new.rho[i]))
                    if kept:
                        assert torch.equal(new.steps[i], state.steps[i])
                else:
                    joined += 1
                    torch.testing.assert_close(new.rho[i, -1], 1 / curvature[i], rtol=1e-12, atol=0)
                    torch.testing.assert_close(new.steps[i, -1], s[i], rtol=0, atol=0)
                    torch.testing.assert_close(new.changes[i, -1], change[i], rtol=0, atol=0)
            state = new
    assert skipped > 0 and joined > 0, (skipped, joined)  # measured 35 and 245


# -- statistics ------------------------------------------------------------------------------


def test_statistics_of_a_solve_cut_short():
    # Two iterations are too few on this problem: every sample reports max_iter iterations,
    # not converged, not diverged, and the residual of the iterate it returns (its best).
    F = monotone_tanh(seed=4)
    x = 2 * torch.randn(5, 6, dtype=DTYPE)
    block = ImplicitResidualBlock(F, 1.0, LBFGS(atol=1e-12, max_iter=2))
    with torch.no_grad(), pytest.warns(UserWarning, match="did not converge"):
        y = block(x)
        flush_failure_warnings()
    stats = block.forward_stats
    assert (stats.iterations == 2).all() and stats.iterations.dtype == torch.long
    assert not stats.converged.any() and not stats.diverged.any()
    torch.testing.assert_close(stats.residual, residual_norm(F, x, y, 1.0), rtol=1e-12, atol=0)
    # The same solve with room to finish: counts within max_iter, residuals within atol.
    block.solver = LBFGS(atol=1e-12, max_iter=100)
    with torch.no_grad():
        y = block(x)
    stats = block.forward_stats
    assert stats.converged.all() and (stats.iterations > 2).all()
    assert (stats.residual <= 1e-12).all()
    torch.testing.assert_close(stats.residual, residual_norm(F, x, y, 1.0), rtol=0, atol=1e-15)


def test_in_a_fallback_chain():
    # FixedPoint cannot solve the non-contracting samples; L-BFGS, second link, finishes them.
    F = monotone_tanh(seed=5)
    x = 2 * torch.randn(6, 6, dtype=DTYPE)
    chain = Fallback([FixedPoint(atol=1e-10, max_iter=5), LBFGS(atol=1e-10, max_iter=100)])
    block = ImplicitResidualBlock(F, 1.0, chain)
    with torch.no_grad():
        y = block(x)
    stats = block.forward_stats
    assert stats.converged.all()
    assert (stats.method == 1).all()
    assert (stats.iterations > 5).all()  # the first link's 5 count too
    assert (residual_norm(F, x, y, 1.0) <= 1e-10).all()


# -- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("linear", ["gmres", "direct"])
def test_gradients_on_non_contracting_map_match_dense_ift(linear):
    F = monotone_tanh(seed=6)
    x = torch.randn(3, 6, dtype=DTYPE, requires_grad=True)
    w = torch.randn(3, 6, dtype=DTYPE)
    adjoint = GMRES(rtol=1e-12, max_iter=50) if linear == "gmres" else Direct(rtol=1e-12)
    block = ImplicitResidualBlock(F, 1.0, LBFGS(atol=1e-12, max_iter=200), adjoint)
    y = block(x)
    grads = torch.autograd.grad((y * w).sum(), [x, *F.parameters()])
    assert block.forward_stats.converged.all() and block.backward_stats.converged.all()
    ref_x, ref_params = ift_gradients(F, x.detach(), y.detach(), 1.0, w)
    torch.testing.assert_close(grads[0], ref_x, rtol=1e-8, atol=1e-9)
    for got, want in zip(grads[1:], ref_params):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


def test_unrolled_gradients_match_the_implicit_ones():
    # Differentiating through L-BFGS's iterations (its line searches and pairs included)
    # converges to the implicit-function-theorem gradient as the solve does.
    F = mlp(n=3, width=5, lipschitz=0.8)
    x = torch.randn(2, 3, dtype=DTYPE, requires_grad=True)
    w = torch.randn(2, 3, dtype=DTYPE)
    unrolled = ImplicitResidualBlock(F, 0.5, LBFGS(atol=1e-12, max_iter=100), backward="unrolled")
    y = unrolled(x)
    grads = torch.autograd.grad((y * w).sum(), [x, *F.parameters()])
    assert all(torch.isfinite(g).all() for g in grads)
    ref_x, ref_params = ift_gradients(F, x.detach(), y.detach(), 0.5, w)
    torch.testing.assert_close(grads[0], ref_x, rtol=1e-7, atol=1e-8)
    for got, want in zip(grads[1:], ref_params):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-8)


# -- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize("history", [0, -1, 2.5, True, None])
def test_rejects_bad_history(history):
    with pytest.raises(ValueError, match=r"\bhistory\b"):
        LBFGS(history=history)


@pytest.mark.parametrize("max_backtracks", [-1, 1.5, False])
def test_rejects_bad_max_backtracks(max_backtracks):
    with pytest.raises(ValueError, match=r"\bmax_backtracks\b"):
        LBFGS(max_backtracks=max_backtracks)


@pytest.mark.parametrize("kwargs, name", [({"atol": 0}, "atol"), ({"max_iter": 0}, "max_iter")])
def test_rejects_bad_shared_arguments(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        LBFGS(**kwargs)


def test_repr_names_its_arguments():
    want = "LBFGS(atol=1e-06, max_iter=20, history=4, max_backtracks=8)"
    assert repr(LBFGS(atol=1e-6, max_iter=20, history=4, max_backtracks=8)) == want
