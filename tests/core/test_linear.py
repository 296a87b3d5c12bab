"""Adjoint linear solvers on systems with a known matrix: ``(I − θAᵀ) g = b``.

A linear ``F(y) = A y + b`` has the Jacobian ``A`` everywhere, so the adjoint
operator of :class:`irnet.linear.AdjointOperator` is exactly ``I − θAᵀ`` and
every answer can be checked against ``torch.linalg.solve``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers.problems import (
    DTYPE,
    ITERATIVE_LINEAR_CLASSES,
    LINEAR_CLASSES,
    LINEAR_SOLVERS,
    LinearF,
    contraction,
    matrix_with_spectrum,
)
from irnet import ConvergenceWarning, ImplicitResidualBlock
from irnet.linear import GMRES, AdjointOperator, Direct, Neumann
from irnet.solvers import Anderson
from irnet.stats import flush_failure_warnings

pytestmark = pytest.mark.usefixtures("single_thread")

linear_names = pytest.mark.parametrize("linear", list(LINEAR_SOLVERS))


def operator_for(A: torch.Tensor, theta: float, batch: int = 3) -> AdjointOperator:
    n = A.shape[0]
    F = LinearF(A, torch.zeros(n, dtype=A.dtype))
    return AdjointOperator(F, torch.randn(batch, n, dtype=A.dtype), theta)


def exact(A: torch.Tensor, theta: float, b: torch.Tensor) -> torch.Tensor:
    """``(I − θAᵀ)⁻¹ b`` per sample."""
    M = torch.eye(A.shape[0], dtype=A.dtype) - theta * A.T
    return torch.linalg.solve(M, b.T).T


def relative_residual(A, theta, g, b):
    M = torch.eye(A.shape[0], dtype=A.dtype) - theta * A.T
    return torch.linalg.vector_norm(g @ M.T - b, dim=1) / torch.linalg.vector_norm(b, dim=1)


def test_operator_is_I_minus_theta_A_transpose():
    A = matrix_with_spectrum([0.5, -0.3, 0.2, 0.8], seed=2)
    op = operator_for(A, 0.7)
    M = torch.eye(4, dtype=DTYPE) - 0.7 * A.T
    torch.testing.assert_close(op.dense(), M.expand(3, 4, 4), rtol=0, atol=1e-15)
    v = torch.randn(3, 4, dtype=DTYPE)
    torch.testing.assert_close(op(v), v @ M.T, rtol=0, atol=1e-15)


@linear_names
@pytest.mark.parametrize("theta", [0.25, 0.5, 1.0])
def test_known_system(linear, theta):
    A = contraction(n=8, radius=0.7, seed=1)
    b = torch.randn(3, 8, dtype=DTYPE)
    tol = 1e-12
    g, stats = LINEAR_SOLVERS[linear](rtol=tol).solve(operator_for(A, theta), b)
    assert stats.converged.all() and not stats.diverged.any()
    assert (stats.residual <= tol).all()
    torch.testing.assert_close(
        stats.residual, relative_residual(A, theta, g, b), rtol=1e-6, atol=1e-15
    )
    # ‖g − g*‖ ≤ ‖(I − θAᵀ)⁻¹‖ tol ‖b‖ ≤ tol ‖b‖ / (1 − 0.7θ).
    torch.testing.assert_close(g, exact(A, theta, b), rtol=0, atol=1e-11)


def test_gmres_restarted():
    # restart = 3 < n = 8, so convergence needs several Arnoldi cycles.
    A = matrix_with_spectrum([0.9, -0.8, 0.7, 0.5, -0.4, 0.3, 0.2, -0.1], seed=3)
    b = torch.randn(4, 8, dtype=DTYPE)
    solver = GMRES(rtol=1e-11, max_iter=300, restart=3)
    g, stats = solver.solve(operator_for(A, 1.0, batch=4), b)
    assert stats.converged.all()
    assert (stats.iterations > 3).all(), "restarting was not exercised"
    torch.testing.assert_close(g, exact(A, 1.0, b), rtol=0, atol=1e-9)
    # Without restarting, n = 8 Krylov steps solve an 8-dimensional system exactly.
    g_full, stats_full = GMRES(rtol=1e-11, max_iter=50, restart=50).solve(
        operator_for(A, 1.0, batch=4), b
    )
    assert (stats_full.iterations <= 8).all()
    assert (stats.iterations > stats_full.iterations).all()
    torch.testing.assert_close(g_full, exact(A, 1.0, b), rtol=0, atol=1e-9)


@pytest.mark.parametrize("restart", [2, 3, 5])
def test_gmres_restarts_keep_per_sample_stopping(restart):
    # GMRES restarts every `restart` Krylov steps (GMRES(m), the class's `restart` argument).
    # A right-hand side that is an eigenvector of A = I − θAᵀ is solved by the first Krylov
    # step; over restarts its count and answer stay those it has alone, while a generic one
    # needs several cycles. Both reach rtol and torch.linalg.solve's answer.
    A = matrix_with_spectrum([0.9, -0.8, 0.7, 0.5, -0.4, 0.3, 0.2, -0.1], seed=3)
    M = torch.eye(8, dtype=DTYPE) - A.T
    values, vectors = torch.linalg.eig(M)
    easy = vectors[:, values.real.argmax()].real  # real spectrum: a real eigenvector
    hard = torch.randn(8, dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    b = torch.stack([easy, hard])
    solver = GMRES(rtol=1e-11, max_iter=400, restart=restart)
    g, stats = solver.solve(operator_for(A, 1.0, batch=2), b)
    alone, alone_stats = solver.solve(operator_for(A, 1.0, batch=1), b[:1])
    assert stats.converged.all() and (stats.residual <= 1e-11).all()
    assert stats.iterations[0] == alone_stats.iterations[0] == 1
    assert stats.iterations[1] > max(restart, 8), "the hard sample must need several cycles"
    torch.testing.assert_close(g[:1], alone, rtol=0, atol=1e-15)
    torch.testing.assert_close(g, exact(A, 1.0, b), rtol=0, atol=1e-9)


def test_gmres_restart_at_least_max_iter_is_one_cycle():
    # restart ≥ max_iter: one Arnoldi cycle of at most max_iter steps, whatever restart is.
    A = matrix_with_spectrum([0.9, -0.8, 0.7, 0.5, -0.4, 0.3, 0.2, -0.1], seed=3)
    b = torch.randn(3, 8, dtype=DTYPE)
    answers = [
        GMRES(rtol=1e-12, max_iter=6, restart=restart).solve(operator_for(A, 1.0), b)
        for restart in (6, 7, 100)
    ]
    for g, stats in answers:
        assert (stats.iterations == 6).all() and not stats.converged.any()
        torch.testing.assert_close(g, answers[0][0], rtol=0, atol=0)
    # After 6 of 8 possible steps the residual has fallen but not reached the answer.
    assert (answers[0][1].residual < 1).all()


def test_neumann_partial_sums_are_the_series():
    # After k products Neumann's answer is Σ_{i<k} Pⁱ b, with P = θAᵀ (the k-th
    # product, Pᵏ b, is the residual of that partial sum and is not added).
    A = contraction(n=4, radius=0.5)
    b = torch.randn(2, 4, dtype=DTYPE)
    g, stats = Neumann(rtol=1e-300, max_iter=6).solve(operator_for(A, 1.0, batch=2), b)
    expected, term = torch.zeros_like(b), b
    for _ in range(6):
        expected, term = expected + term, term @ A  # (Aᵀ v) per row is v @ A
    assert (stats.iterations == 6).all() and not stats.converged.any()
    torch.testing.assert_close(g, expected, rtol=0, atol=1e-15)


def expansive_matrix() -> torch.Tensor:
    """Spectral radius 3, so θ = 0.5 gives ρ(θA) = 1.5 > 1; I − θA stays well conditioned."""
    return matrix_with_spectrum([3.0, 2.5, 0.5, -1.0], seed=4)


def test_neumann_diverges_flags_and_stays_finite():
    A = expansive_matrix()
    b = torch.randn(3, 4, dtype=DTYPE)
    solver = Neumann(rtol=1e-10, max_iter=200, patience=3)
    g, stats = solver.solve(operator_for(A, 0.5), b)
    assert torch.isfinite(g).all()
    assert stats.diverged.all() and not stats.converged.any()
    assert (stats.iterations < 20).all(), "must stop early, not run to max_iter"
    assert torch.isfinite(stats.residual).all()
    # The returned g is the best partial sum: its reported residual is its own.
    torch.testing.assert_close(stats.residual, relative_residual(A, 0.5, g, b), rtol=1e-6, atol=0)
    # GMRES does not need a convergent series.
    g_gmres, stats_gmres = GMRES(rtol=1e-12, max_iter=50).solve(operator_for(A, 0.5), b)
    assert stats_gmres.converged.all()
    torch.testing.assert_close(g_gmres, exact(A, 0.5, b), rtol=0, atol=1e-10)


def test_block_warns_once_for_divergent_neumann_and_gmres_solves_it():
    # Forward by Anderson (fixed-point iteration diverges on this F too), backward by
    # Neumann: every backward fails, the block warns exactly once.
    A = expansive_matrix()
    c = torch.randn(4, dtype=DTYPE)
    F = LinearF(A, c)
    x = torch.randn(3, 4, dtype=DTYPE, requires_grad=True)
    w = torch.randn(3, 4, dtype=DTYPE)
    block = ImplicitResidualBlock(
        F, 0.5, Anderson(atol=1e-12, max_iter=100), Neumann(rtol=1e-10, max_iter=100)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flush_failure_warnings()  # earlier tests' deferred failures (accelerator path) are not ours
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            (gx,) = torch.autograd.grad((block(x) * w).sum(), x)
            assert block.forward_stats.converged.all()
            assert torch.isfinite(gx).all()
            assert block.backward_stats.diverged.all()
            assert (block.backward_stats.iterations < 20).all()
        flush_failure_warnings()  # the accelerator path defers its warnings to one read per step
    conv = [m for m in caught if issubclass(m.category, ConvergenceWarning)]
    assert len(conv) == 1, [str(m.message) for m in caught]
    assert "Neumann" in str(conv[0].message)

    # The same block with GMRES gives the closed-form gradient
    # ∇_x L = (I + (1−θ)A)ᵀ (I − θA)⁻ᵀ w.
    block = ImplicitResidualBlock(
        F, 0.5, Anderson(atol=1e-12, max_iter=100), GMRES(rtol=1e-12, max_iter=50)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        (gx,) = torch.autograd.grad((block(x) * w).sum(), x)
        flush_failure_warnings()
    eye = torch.eye(4, dtype=DTYPE)
    expected = exact(A, 0.5, w) @ (eye + 0.5 * A)
    torch.testing.assert_close(gx, expected, rtol=1e-10, atol=1e-10)
    assert block.backward_stats.converged.all()


@pytest.mark.parametrize("linear", ["neumann", "gmres"])
def test_per_sample_independence(linear):
    # Symmetric A: b along the eigenvector of eigenvalue 0.05 is easy (Neumann: terms
    # shrink by 0.05; GMRES: a 1-dimensional Krylov space); a generic b is hard.
    Q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=DTYPE))
    A = Q @ torch.diag(torch.tensor([0.05, 0.9, -0.8, 0.7, 0.6, -0.5], dtype=DTYPE)) @ Q.T
    easy = 2.0 * Q[:, 0][None]
    hard = torch.randn(1, 6, dtype=DTYPE)
    solver = LINEAR_SOLVERS[linear](rtol=1e-11)
    g_both, s_both = solver.solve(operator_for(A, 1.0, batch=2), torch.cat([easy, hard]))
    g_alone, s_alone = solver.solve(operator_for(A, 1.0, batch=1), easy)
    assert s_both.iterations[0] < s_both.iterations[1]
    assert s_both.iterations[0] == s_alone.iterations[0]
    torch.testing.assert_close(g_both[:1], g_alone, rtol=0, atol=1e-15)
    assert s_both.converged.all()
    torch.testing.assert_close(g_both, exact(A, 1.0, torch.cat([easy, hard])), rtol=0, atol=1e-9)


@linear_names
def test_zero_right_hand_side(linear):
    # A zero cotangent (a sample that does not affect the loss) gives g = 0, converged.
    A = contraction(n=4, radius=0.5)
    b = torch.randn(3, 4, dtype=DTYPE)
    b[1] = 0
    g, stats = LINEAR_SOLVERS[linear]().solve(operator_for(A, 1.0), b)
    assert torch.equal(g[1], torch.zeros(4, dtype=DTYPE))
    assert stats.converged.all() and torch.isfinite(g).all()
    torch.testing.assert_close(g, exact(A, 1.0, b), rtol=0, atol=1e-10)


@linear_names
@pytest.mark.parametrize("alpha", [1e-8, 1e4])
def test_solve_scales_with_the_right_hand_side(linear, alpha):
    # rtol is relative (‖A g − b‖ ≤ rtol‖b‖ per sample), so a solve is linear in b:
    # solve(αb) = α·solve(b), with the same counts and flags. Every other test has ‖b‖ near
    # 1, where a tolerance taken as absolute would pass unnoticed; α = 1e-8 would then stop
    # at once and α = 1e4 would need more products. rtol = 1e-8 leaves Neumann ~50 terms.
    A = contraction(n=8, radius=0.7, seed=1)
    op = operator_for(A, 1.0)
    b = torch.randn(3, 8, dtype=DTYPE)
    solver = LINEAR_SOLVERS[linear](rtol=1e-8)
    g, stats = solver.solve(op, b)
    g_scaled, stats_scaled = solver.solve(op, alpha * b)
    assert stats.converged.all()
    torch.testing.assert_close(g_scaled, alpha * g, rtol=1e-10, atol=0)
    assert torch.equal(stats_scaled.iterations, stats.iterations)
    assert torch.equal(stats_scaled.converged, stats.converged)
    assert torch.equal(stats_scaled.diverged, stats.diverged)
    # The reported residual is relative too (up to rounding, where GMRES and Direct end).
    torch.testing.assert_close(stats_scaled.residual, stats.residual, rtol=1e-6, atol=1e-13)


def test_direct_refuses_large_states():
    A = contraction(n=6)
    with pytest.raises(ValueError, match=r"\bmax_size\b"):
        Direct(max_size=5).solve(operator_for(A, 1.0), torch.randn(3, 6, dtype=DTYPE))


# -- argument validation ------------------------------------------------------------------


@pytest.mark.parametrize("cls", LINEAR_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("tol", [0, -1e-6, float("nan")])
def test_linear_solver_rejects_bad_tol(cls, tol):
    with pytest.raises(ValueError, match=r"\brtol\b"):
        cls(rtol=tol)


@pytest.mark.parametrize("cls", ITERATIVE_LINEAR_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("max_iter", [0, -1, 2.5, 10.0, True])
def test_linear_solver_rejects_bad_max_iter(cls, max_iter):
    with pytest.raises(ValueError, match=r"\bmax_iter\b"):
        cls(max_iter=max_iter)


@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (GMRES, {"restart": 0}, "restart"),
        (GMRES, {"restart": 1.5}, "restart"),
        (Neumann, {"patience": 0}, "patience"),
        (Direct, {"max_size": 0}, "max_size"),
    ],
)
def test_linear_solver_specific_arguments(cls, kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        cls(**kwargs)


def test_graph_vjp_is_torch_autograd_grad_on_a_retained_graph():
    from irnet.linear.base import graph_vjp

    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 5).double()
    y = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    out = torch.tanh(lin(y))
    v = torch.randn(7, 5, dtype=torch.float64)
    expected = torch.autograd.grad(out, y, v, retain_graph=True)[0]
    assert torch.equal(graph_vjp(out, y, v), expected)  # the engine called directly
    assert torch.equal(graph_vjp(out, y, v), expected)  # the graph is retained
    assert torch.allclose(
        graph_vjp(out, y, v.float()), expected
    )  # another dtype: torch.autograd.grad's path
    assert lin.weight.grad is None  # products never accumulate into parameters
