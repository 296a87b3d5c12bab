"""Forward solvers on problems with known answers; per-sample stopping; argument checks."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from helpers.problems import (
    DOTTIE,
    DTYPE,
    LINEAR_SOLVERS,
    SOLVER_CLASSES,
    SOLVERS,
    THETAS,
    TIGHT,
    Cos,
    LinearF,
    Scale,
    contraction,
    ift_gradients,
    linear_solution,
    matrix_with_spectrum,
    mlp,
    residual_norm,
)
from irnet import ConvergenceWarning, ImplicitResidualBlock
from irnet.solvers import (
    LBFGS,
    Anderson,
    FixedPoint,
    FixedPointProblem,
    GradientDescent,
    NonlinearCG,
)
from irnet.stats import flush_failure_warnings

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSES = SOLVER_CLASSES

solver_names = pytest.mark.parametrize("solver", list(SOLVERS))
thetas = pytest.mark.parametrize("theta", THETAS)


@solver_names
@thetas
@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU], ids=["tanh", "relu"])
def test_residual_within_tol_on_mlp(solver, theta, activation):
    tol = 1e-10
    F = mlp(n=3, width=6, activation=activation)
    x = torch.randn(5, 3, dtype=DTYPE)
    block = ImplicitResidualBlock(F, theta, SOLVERS[solver](atol=tol, max_iter=500))
    with torch.no_grad():
        y = block(x)
    res = residual_norm(F, x, y, theta)
    stats = block.forward_stats
    assert stats.converged.all()
    assert (res <= tol).all(), res
    # The stats report the residual of the returned y (up to rounding).
    torch.testing.assert_close(stats.residual, res, rtol=0, atol=1e-14)
    assert (stats.iterations >= 1).all() and (stats.iterations < 500).all()
    assert not stats.diverged.any()


@solver_names
@thetas
def test_linear_F_closed_form(solver, theta):
    A = contraction(n=4, radius=0.6)
    b = torch.randn(4, dtype=DTYPE)
    F = LinearF(A, b)
    x = torch.randn(3, 4, dtype=DTYPE)
    block = ImplicitResidualBlock(F, theta, SOLVERS[solver]())
    with torch.no_grad():
        y = block(x)
    # ‖y − y*‖ ≤ ‖(I − θA)⁻¹‖ ‖r(y)‖ ≤ tol / (1 − 0.6 θ) ≤ 2.5e-12.
    torch.testing.assert_close(y, linear_solution(A, b, x, theta), rtol=0, atol=3e-12)


@solver_names
def test_theta_zero_is_explicit_layer(solver):
    F = mlp()
    x = torch.randn(4, 3, dtype=DTYPE)
    block = ImplicitResidualBlock(F, 0.0, SOLVERS[solver]())
    y = block(x)
    assert torch.equal(y, x + F(x))
    assert (block.forward_stats.iterations == 0).all()
    assert block.forward_stats.converged.all()


@solver_names
@pytest.mark.parametrize("theta", [0.25, 0.5, 0.75])
def test_scalar_contraction_negative_identity(solver, theta):
    # F(y) = −y: y = x − (1−θ)x − θy, so y = θx / (1 + θ).
    x = torch.randn(6, 2, dtype=DTYPE)
    block = ImplicitResidualBlock(Scale(-1.0), theta, SOLVERS[solver]())
    y = block(x)
    torch.testing.assert_close(y, theta * x / (1 + theta), rtol=0, atol=1e-12)


@solver_names
def test_cosine_dottie_number(solver):
    # θ = 1, x = 0: y = cos(y), whose root is the Dottie number.
    x = torch.zeros(3, 2, dtype=DTYPE)
    block = ImplicitResidualBlock(Cos(), 1.0, SOLVERS[solver]())
    y = block(x)
    torch.testing.assert_close(y, torch.full_like(x, DOTTIE), rtol=0, atol=1e-12)


def test_first_fixed_point_iterate_is_heun_step():
    # The block starts from the explicit layer y⁰ = x + F(x); one fixed-point step
    # at θ = 0.5 is then Heun's method, y¹ = x + ½F(x) + ½F(x + F(x)), returned
    # whenever it lowers the residual (F small here).
    F = mlp(lipschitz=0.3)
    x = torch.randn(4, 3, dtype=DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        y = ImplicitResidualBlock(F, 0.5, FixedPoint(atol=1e-14, max_iter=1))(x)
    with torch.no_grad():
        want = x + 0.5 * F(x) + 0.5 * F(x + F(x))
    torch.testing.assert_close(y, want, rtol=0, atol=1e-15)


@solver_names
def test_per_sample_independence(solver):
    # F(y) = 0.8 Q tanh(5y) / 5 (Q orthogonal): near 0 its Jacobian has norm 0.8
    # (slow), for larger y tanh saturates and F is nearly constant (fast).
    F = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).to(DTYPE)
    Q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=DTYPE))
    with torch.no_grad():
        F[0].weight.copy_(5 * torch.eye(3, dtype=DTYPE))
        F[0].bias.zero_()
        F[2].weight.copy_(0.8 * Q / 5)
        F[2].bias.zero_()
    easy = torch.tensor([[1.0, -0.8, 0.9]], dtype=DTYPE)  # 4–7 iterations, by solver
    hard = torch.tensor([[0.2, -0.1, 0.15]], dtype=DTYPE)  # 13–84 iterations
    make = SOLVERS[solver]
    both_block = ImplicitResidualBlock(F, 1.0, make(atol=1e-11))
    alone_block = ImplicitResidualBlock(F, 1.0, make(atol=1e-11))
    with torch.no_grad():
        both = both_block(torch.cat([easy, hard]))
        alone = alone_block(easy)
    it_both, it_alone = both_block.forward_stats.iterations, alone_block.forward_stats.iterations
    assert it_both[0] < it_both[1], "the problem must have an easy and a hard sample"
    assert it_both[0] == it_alone[0]
    # Equal up to rounding: a 1-row and a 2-row matrix product may sum in another order.
    torch.testing.assert_close(both[:1], alone, rtol=0, atol=1e-15)
    torch.testing.assert_close(
        both_block.forward_stats.residual[:1],
        alone_block.forward_stats.residual,
        rtol=0,
        atol=1e-15,
    )


def test_nonconvergence_expansive_fixed_point():
    # F(y) = 3y, θ = 0.5: the map y ↦ c + 1.5y is expansive; FixedPoint cannot converge.
    block = ImplicitResidualBlock(Scale(3.0), 0.5, FixedPoint(atol=1e-8, max_iter=30))
    x = torch.randn(4, 3, dtype=DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flush_failure_warnings()  # earlier tests' deferred failures (accelerator path) are not ours
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            y = block(x)
            assert torch.isfinite(y).all()
            assert not block.forward_stats.converged.any()
            assert (block.forward_stats.iterations == 30).all()
        flush_failure_warnings()  # the accelerator path defers its warnings to one read per step
    conv = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(conv) == 1, [str(w.message) for w in caught]
    # The returned y is the best iterate: here the start y⁰ = x + F(x) = 4x, whose
    # residual 4x − 2.5x − 1.5·4x = −4.5x grows by 1.5 at every step.
    torch.testing.assert_close(block.forward_stats.residual, residual_norm(Scale(3.0), x, y, 0.5))
    torch.testing.assert_close(block.forward_stats.residual, 4.5 * x.norm(dim=1))
    torch.testing.assert_close(y, 4 * x)


@pytest.mark.parametrize(
    "solver", ["anderson", "gradient_descent", "cg_fletcher_reeves", "cg_polak_ribiere", "lbfgs"]
)
def test_other_solvers_solve_expansive_linear_case(solver):
    # Where fixed-point iteration diverges the others still find y = x + 1.5x + 1.5y = −5x.
    x = torch.randn(4, 3, dtype=DTYPE)
    block = ImplicitResidualBlock(Scale(3.0), 0.5, SOLVERS[solver](max_iter=100))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        y = block(x)
    torch.testing.assert_close(y, -5 * x, rtol=0, atol=1e-11)


@pytest.mark.parametrize("history", [5, 6, 9])
@pytest.mark.parametrize(
    "eigenvalues", [[2.5, 0.5, -1.0, 3.0], [0.9, 0.5, -0.5, 0.3]], ids=["expansive", "contractive"]
)
def test_anderson_full_history_solves_linear_problem_in_n_plus_1_steps(history, eigenvalues):
    # Unregularised Anderson with a window of ≥ n + 1 iterates is GMRES on a linear
    # problem (Walker & Ni 2011): y = c + θAy is solved after n + 1 = 5 steps,
    # even where fixed-point iteration diverges (θρ(A) = 1.5). A window that
    # shrinks while it fills (a former bug) needs far more, or never converges.
    A = matrix_with_spectrum(eigenvalues, seed=1)
    c = torch.randn(3, 4, dtype=DTYPE)
    problem = FixedPointProblem(lambda y: y @ A.T, c, 0.5)
    y, stats = Anderson(atol=1e-10, max_iter=50, history=history, regularization=0.0).solve(
        problem, c
    )
    assert stats.converged.all()
    assert (stats.iterations <= 5).all(), stats.iterations
    exact = torch.linalg.solve(torch.eye(4, dtype=DTYPE) - 0.5 * A, c.T).T
    torch.testing.assert_close(y, exact, rtol=0, atol=1e-9)


@thetas
@pytest.mark.parametrize("max_iter", [500, 4], ids=["converges", "stops_short"])
def test_anderson_with_history_one_and_no_damping_is_fixed_point_iteration(theta, max_iter):
    # Documented: Anderson(history=1, mixing=1) mixes one map value with weight 1, i.e.
    # y ← g(y). Its iterates, counts and flags must then be FixedPoint's, sample by sample:
    # a window that keeps an older iterate, or a damped mix, changes the iterates. Samples
    # of different sizes stop at different counts (5 to 18); max_iter = 4 stops every one
    # short, so the answer is the last (best) iterate itself.
    F = mlp(n=3, width=6, lipschitz=0.8)
    x = (
        torch.randn(5, 3, dtype=DTYPE)
        * torch.tensor([1e-3, 0.1, 1.0, 3.0, 10.0], dtype=DTYPE)[:, None]
    )
    problem = FixedPointProblem(F, x, theta)
    with torch.no_grad():
        y_fp, s_fp = FixedPoint(atol=TIGHT, max_iter=max_iter).solve(problem, x)
        y_aa, s_aa = Anderson(atol=TIGHT, max_iter=max_iter, history=1, mixing=1.0).solve(
            problem, x
        )
    assert torch.equal(s_aa.iterations, s_fp.iterations)
    assert torch.equal(s_aa.converged, s_fp.converged)
    assert s_fp.converged.all() if max_iter == 500 else not s_fp.converged.any()
    assert torch.equal(s_aa.diverged, s_fp.diverged)
    torch.testing.assert_close(y_aa, y_fp, rtol=0, atol=1e-14)
    torch.testing.assert_close(s_aa.residual, s_fp.residual, rtol=1e-12, atol=1e-16)


def test_direct_solver_call_on_problem():
    # The solvers are usable without the block: solve(problem, y0) -> (y, stats).
    A = contraction(n=3, radius=0.5)
    c = torch.randn(2, 3, dtype=DTYPE)
    problem = FixedPointProblem(lambda y: y @ A.T, c, 1.0)
    y, stats = FixedPoint(atol=1e-13, max_iter=200).solve(problem, c)
    torch.testing.assert_close(
        y, torch.linalg.solve(torch.eye(3, dtype=DTYPE) - A, c.T).T, rtol=0, atol=1e-12
    )
    assert stats.converged.all() and stats.iterations.dtype == torch.long


@pytest.mark.parametrize("linear", list(LINEAR_SOLVERS))
@thetas
def test_lbfgs_gradients_match_dense_ift_and_finite_differences(linear, theta):
    # test_layer.py's gradient table for the solvers of helpers.problems, for L-BFGS: the block's
    # gradients against a dense implicit-function-theorem reference (float64, torch.linalg)
    # and against central differences (a smooth tanh F, solves to 1e-12; eps 1e-5 leaves
    # ~1e-10 truncation and ≤ 2.5e-7 from the solve).
    F = mlp(n=3, width=5)
    x = torch.randn(2, 3, dtype=DTYPE, requires_grad=True)
    w = torch.randn(2, 3, dtype=DTYPE)
    block = ImplicitResidualBlock(F, theta, SOLVERS["lbfgs"](), LINEAR_SOLVERS[linear]())
    y = block(x)
    grads = torch.autograd.grad((y * w).sum(), [x, *F.parameters()])
    assert block.forward_stats.converged.all() and block.backward_stats.converged.all()
    ref_x, ref_params = ift_gradients(F, x.detach(), y.detach(), theta, w)
    torch.testing.assert_close(grads[0], ref_x, rtol=1e-9, atol=1e-10)
    for got, want in zip(grads[1:], ref_params, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert torch.autograd.gradcheck(
        lambda x, *params: block(x),
        (x, *F.parameters()),
        fast_mode=True,
        eps=1e-5,
        atol=1e-6,
        rtol=1e-5,
    )


# -- argument validation ------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("tol", [0, 0.0, -1e-6, float("nan")])
def test_solver_rejects_bad_tol(cls, tol):
    with pytest.raises(ValueError, match=r"\batol\b"):
        cls(atol=tol)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("max_iter", [0, -3, 2.5, 10.0, True])
def test_solver_rejects_bad_max_iter(cls, max_iter):
    with pytest.raises(ValueError, match=r"\bmax_iter\b"):
        cls(max_iter=max_iter)


@pytest.mark.parametrize("beta", ["hestenes-stiefel", "FR", "", None])
def test_nonlinear_cg_rejects_unknown_beta(beta):
    with pytest.raises(ValueError, match=r"\bbeta\b"):
        NonlinearCG(beta=beta)


@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (Anderson, {"history": 0}, "history"),
        (Anderson, {"mixing": 0.0}, "mixing"),
        (Anderson, {"mixing": 1.5}, "mixing"),
        (Anderson, {"regularization": -1e-3}, "regularization"),
        (GradientDescent, {"max_backtracks": -1}, "max_backtracks"),
        (NonlinearCG, {"max_backtracks": -1}, "max_backtracks"),
        (LBFGS, {"history": 0}, "history"),
        (LBFGS, {"max_backtracks": -1}, "max_backtracks"),
    ],
)
def test_solver_specific_arguments(cls, kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        cls(**kwargs)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_solver_defaults_are_valid_and_repr(cls):
    solver = cls()
    assert solver.atol > 0 and solver.max_iter >= 1
    assert repr(solver).startswith(cls.__name__ + "(")


# -- inference mode (Lightning's sanity check, validate, test, predict) -----------------


@solver_names
@pytest.mark.parametrize("theta", [0.5, 1.0])
def test_inference_mode_gives_the_same_answer(solver, theta):
    """Gradient-based solvers leave inference mode; every solver returns the normal path's bits."""
    F = mlp(n=3, width=6)
    x = torch.randn(5, 3, dtype=DTYPE)
    block = ImplicitResidualBlock(F, theta, SOLVERS[solver](atol=1e-10))
    with torch.no_grad():
        want = block(x)
    want_stats = block.forward_stats
    with torch.inference_mode():
        got = block(x.clone())
    stats = block.forward_stats
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(stats.iterations, want_stats.iterations)
    torch.testing.assert_close(stats.residual, want_stats.residual, rtol=0, atol=0)
    assert stats.converged.all()
    assert (residual_norm(F, x, got.clone(), theta) <= 1e-10).all()


@pytest.mark.parametrize("cls", [GradientDescent, NonlinearCG, LBFGS])
def test_gradient_solvers_keep_callers_grad_mode_off(cls):
    """Leaving inference mode must not build graphs through F's parameters."""
    F = mlp(n=3, width=6)
    problem = FixedPointProblem(F, torch.randn(4, 3, dtype=DTYPE), 0.5)
    with torch.inference_mode():
        y, stats = cls(atol=1e-10).solve(problem, torch.zeros(4, 3, dtype=DTYPE))
    assert y.grad_fn is None and not y.requires_grad and stats.converged.all()
    assert not y.is_inference()  # made outside inference mode, usable in a later graph


def test_residual_and_gradient_under_inference_mode():
    """The gradient of ½‖r‖² is (I − θJ)ᵀ r with J built column by column from F."""
    F = LinearF(contraction(n=3, radius=0.7), torch.randn(3, dtype=DTYPE))
    c, y = torch.randn(2, 3, dtype=DTYPE), torch.randn(2, 3, dtype=DTYPE)
    theta = 0.5
    problem = FixedPointProblem(F, c, theta)
    with torch.inference_mode():
        r, grad = problem.residual_and_gradient(y)
    A = F.A.detach()
    want_r = y - c - theta * (y @ A.T + F.b.detach())
    want_grad = want_r @ (
        torch.eye(3, dtype=DTYPE) - theta * A
    )  # rows: rᵀ(I − θA) = ((I − θA)ᵀ r)ᵀ
    torch.testing.assert_close(r, want_r)
    torch.testing.assert_close(grad, want_grad)
