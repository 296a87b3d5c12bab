"""The one-leg θ-step ``y = x + F((1 − θ)x + θy)`` of :class:`~irnet.ImplicitResidualBlock`.

Its output is checked against its own equation (recomputed from scratch), against the linear
θ-step (the same step for affine F, another one for nonlinear F, the same for θ ∈ {0, 1}),
and its gradients against

(a) a dense implicit-function-theorem reference in float64: per sample
    ``dy/dx = (I − θJ)⁻¹(I + (1−θ)J)`` with ``J = ∂F/∂z`` at the stage
    ``z = (1−θ)x + θy`` from ``torch.autograd.functional.jacobian`` and ``torch.linalg``,
    and ``∇_γ L = (∂F(z)/∂γ)ᵀ (I − θJ)⁻ᵀ w`` (nothing of irnet's linear solvers);
(b) ``torch.autograd.gradcheck`` (central differences of solves to 1e-12);
(c) the block's unrolled mode, which differentiates the iterations themselves.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.problems import DTYPE, LINEAR_SOLVERS, SOLVERS, LinearF, contraction, mlp
from irnet import ImplicitResidualBlock
from irnet.solvers import FixedPoint, FixedPointProblem

pytestmark = pytest.mark.usefixtures("single_thread")

THETAS = (0.25, 0.5, 0.75, 1.0)
FAMILIES = ("fixed_point", "anderson", "broyden")  # the forward solver families
GRADCHECK = dict(eps=1e-5, atol=1e-6, rtol=1e-5)  # as tests/core/test_layer.py


def one_leg_residual(F: nn.Module, x: torch.Tensor, y: torch.Tensor, theta: float):
    """Per-sample ``‖y − x − F((1−θ)x + θy)‖₂``, recomputed from scratch."""
    with torch.no_grad():
        r = y - x - F((1 - theta) * x + theta * y)
    return torch.linalg.vector_norm(r.flatten(1), dim=1)


def jacobian(F: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Dense ``∂F/∂z`` of one sample (no batch dimension), shape (n, n)."""
    n = z.numel()
    return torch.autograd.functional.jacobian(
        lambda v: F(v.reshape(1, *z.shape)).reshape(n), z.detach().reshape(n)
    )


def dense_gradients(F: nn.Module, x, y, theta: float, w):
    """Dense IFT gradients of ``L = Σ w · y`` for the one-leg step solved by ``y``."""
    n = x[0].numel()
    eye = torch.eye(n, dtype=x.dtype)
    z = (1 - theta) * x + theta * y
    gx, gs = [], []
    for i in range(x.shape[0]):
        J = jacobian(F, z[i])
        g = torch.linalg.solve((eye - theta * J).T, w[i].reshape(n))
        gx.append(((eye + (1 - theta) * J).T @ g).reshape(x[i].shape))
        gs.append(g.reshape(x[i].shape))
    with torch.enable_grad():
        total = (F(z.detach()) * torch.stack(gs)).sum()
        gp = torch.autograd.grad(total, list(F.parameters()))
    return torch.stack(gx), list(gp)


def gradients(block: ImplicitResidualBlock, x: torch.Tensor, w: torch.Tensor):
    """``y``, ``∇_x`` and ``∇_γ`` of ``L = Σ w · block(x)``."""
    y = block(x)
    grads = torch.autograd.grad((y * w).sum(), [x, *block.F.parameters()])
    return y, grads[0], list(grads[1:])


def assert_all_close(got: list, want: list, rtol: float, atol: float) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def one_leg(F, theta, solver="fixed_point", linear="gmres", **kwargs) -> ImplicitResidualBlock:
    return ImplicitResidualBlock(
        F, theta, SOLVERS[solver](), LINEAR_SOLVERS[linear](), scheme="one_leg", **kwargs
    )


# -- the forward step ------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("theta", THETAS)
def test_output_solves_the_one_leg_equation(solver, theta):
    # Every solver, including the line searches that evaluate F on stacked trial steps.
    F = mlp(n=3, width=5)
    x = torch.randn(4, 3, dtype=DTYPE)
    block = one_leg(F, theta, solver)
    with torch.no_grad():
        y = block(x)
    stats = block.forward_stats
    assert stats.converged.all()
    residual = one_leg_residual(F, x, y, theta)
    assert (residual <= block.solver.atol).all(), residual
    # The statistics report the one-leg step's own residual.
    torch.testing.assert_close(stats.residual, residual, rtol=1e-3, atol=1e-14)


@pytest.mark.parametrize("theta", THETAS)
def test_default_tolerance_bounds_the_one_leg_residual(theta):
    # The default solver (FixedPoint, atol 1e-5), float32: the atol is the one-leg residual's.
    torch.manual_seed(0)
    F = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(16, 3)
    block = ImplicitResidualBlock(F, theta, scheme="one_leg")
    y = block(x)
    assert block.forward_stats.converged.all()
    assert (one_leg_residual(F, x, y, theta) <= 1e-5).all()


@pytest.mark.parametrize("theta", [0.25, 0.5, 0.75])
def test_affine_F_gives_the_linear_step(theta):
    # For F(y) = Ay + b both steps are y = (I − θA)⁻¹((I + (1−θ)A)x + b).
    F = LinearF(contraction(n=4, radius=0.6), torch.randn(4, dtype=DTYPE))
    x = torch.randn(3, 4, dtype=DTYPE, requires_grad=True)
    w = torch.randn(3, 4, dtype=DTYPE)
    linear = ImplicitResidualBlock(F, theta, SOLVERS["fixed_point"](), LINEAR_SOLVERS["direct"]())
    y_lin, *g_lin = gradients(linear, x, w)
    y_one, *g_one = gradients(one_leg(F, theta, linear="direct"), x, w)
    torch.testing.assert_close(y_one, y_lin, rtol=0, atol=1e-11)
    assert_all_close([g_one[0], *g_one[1]], [g_lin[0], *g_lin[1]], rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("theta", [0.25, 0.5, 0.75])
def test_nonlinear_F_gives_another_step(theta):
    F = mlp(n=3, width=5)
    x = 2 * torch.randn(4, 3, dtype=DTYPE)
    with torch.no_grad():
        y_lin = ImplicitResidualBlock(F, theta, SOLVERS["fixed_point"]())(x)
        y_one = one_leg(F, theta)(x)
    # Each solves its own equation to 1e-12, not the other's.
    assert (one_leg_residual(F, x, y_one, theta) <= 1e-12).all()
    assert (one_leg_residual(F, x, y_lin, theta) > 1e-4).any()
    assert float((y_one - y_lin).abs().max()) > 1e-3


def test_theta_zero_and_one_are_the_same_step_in_both_schemes():
    F = mlp(n=3, width=5)
    x = torch.randn(4, 3, dtype=DTYPE, requires_grad=True)
    w = torch.randn(4, 3, dtype=DTYPE)
    for theta in (0.0, 1.0):
        linear = ImplicitResidualBlock(F, theta, SOLVERS["anderson"](), LINEAR_SOLVERS["gmres"]())
        y_lin, *g_lin = gradients(linear, x, w)
        y_one, *g_one = gradients(one_leg(F, theta, "anderson"), x, w)
        assert torch.equal(y_one, y_lin)
        assert_all_close([g_one[0], *g_one[1]], [g_lin[0], *g_lin[1]], rtol=0, atol=0)
    with torch.no_grad():  # θ = 0: the explicit step, no solve
        assert torch.equal(one_leg(F, 0.0)(x), x + F(x))


def test_warm_start_reaches_the_same_answer():
    F = mlp(n=3, width=5)
    x = torch.randn(4, 3, dtype=DTYPE)
    block = one_leg(F, 0.5)
    with torch.no_grad():
        y = block(x)
        cold = block.forward_stats.iterations
        guess = y.clone()
        guess[0] = float("nan")  # a sample without a previous answer starts as usual
        warm = block(x, guess)
    torch.testing.assert_close(warm, y, rtol=0, atol=1e-11)
    assert int(block.forward_stats.iterations[0]) == int(cold[0])
    assert (block.forward_stats.iterations[1:] == 0).all()


@pytest.mark.filterwarnings("ignore::irnet.ConvergenceWarning")  # 4 iterations are too few
def test_fixed_count_measures_the_one_leg_residual():
    F = mlp(n=3, width=5)
    x = torch.randn(4, 3, dtype=DTYPE, requires_grad=True)
    for theta in (0.5, 0.75):
        block = ImplicitResidualBlock(
            F, theta, FixedPoint(max_iter=4, fixed_count=True), scheme="one_leg"
        )
        y = block(x)  # with a graph: the residual is measured on the graph at the answer
        want = one_leg_residual(F, x.detach(), y.detach(), theta)
        torch.testing.assert_close(block.forward_stats.residual, want, rtol=1e-10, atol=1e-15)
        assert (block.forward_stats.iterations == 4).all()
        with torch.no_grad():  # without one: the solver measures it
            y = block(x)
        torch.testing.assert_close(
            block.forward_stats.residual,
            one_leg_residual(F, x.detach(), y, theta),
            rtol=1e-10,
            atol=1e-15,
        )


def test_problem_copy_with_stacked_rows_is_the_same_problem():
    # The line search stacks k trial batches by copying the problem with c repeated k times;
    # a one-leg problem keeps x in c, so the copy evaluates each row's own step.
    F = mlp(n=3, width=5)
    x, y = torch.randn(2, 3, dtype=DTYPE), torch.randn(2, 3, dtype=DTYPE)
    problem = FixedPointProblem(F, x, 0.5, one_leg=True)
    with torch.no_grad():
        torch.testing.assert_close(problem.map(y), x + F(0.5 * x + 0.5 * y), rtol=0, atol=1e-15)
        stacked = FixedPointProblem(F, torch.cat([x, x]), 0.5, one_leg=True)
        torch.testing.assert_close(
            stacked.residual(torch.cat([y, y])), problem.residual(y).repeat(2, 1)
        )


# -- gradients -------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", FAMILIES)
@pytest.mark.parametrize("linear", list(LINEAR_SOLVERS))
@pytest.mark.parametrize("theta", THETAS)
def test_gradients_match_the_dense_reference(solver, linear, theta):
    F = mlp(n=3, width=5)
    x = torch.randn(2, 3, dtype=DTYPE, requires_grad=True)
    w = torch.randn(2, 3, dtype=DTYPE)
    block = one_leg(F, theta, solver, linear)
    y, gx, gp = gradients(block, x, w)
    assert (one_leg_residual(F, x.detach(), y.detach(), theta) <= 1e-12).all()
    assert block.backward_stats.converged.all()
    want_x, want_p = dense_gradients(F, x.detach(), y.detach(), theta, w)
    # y to ~5e-12 and the adjoint to a relative 1e-12; I − θJ is conditioned ≤ 1/(1 − 0.8).
    assert_all_close([gx, *gp], [want_x, *want_p], rtol=1e-9, atol=1e-10)

    # (c) the unrolled iterations' derivative converges to the same gradient.
    unrolled = one_leg(F, theta, solver, backward="unrolled")
    _, ux, up = gradients(unrolled, x, w)
    assert_all_close([ux, *up], [want_x, *want_p], rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("solver", FAMILIES)
@pytest.mark.parametrize("linear", list(LINEAR_SOLVERS))
def test_gradcheck(solver, linear):
    F = mlp(n=2, width=4)
    x = torch.randn(2, 2, dtype=DTYPE, requires_grad=True)
    block = one_leg(F, 0.5, solver, linear)
    assert torch.autograd.gradcheck(lambda x, *params: block(x), (x, *F.parameters()), **GRADCHECK)


def test_gradients_reach_a_data_input_free_block_through_the_stage_only():
    # x without grad (data): only F's parameters get gradients, through F(z) alone.
    F = mlp(n=3, width=5)
    x = torch.randn(3, 3, dtype=DTYPE)
    w = torch.randn(3, 3, dtype=DTYPE)
    block = one_leg(F, 0.75, "anderson", "direct")
    y = block(x)
    gp = torch.autograd.grad((y * w).sum(), list(F.parameters()))
    _, want = dense_gradients(F, x, y.detach(), 0.75, w)
    assert_all_close(list(gp), want, rtol=1e-9, atol=1e-10)


# -- what the regularisers and monitors read -------------------------------------------------------


@pytest.mark.parametrize("theta", [0.25, 0.5, 1.0])
def test_fixed_point_residuals_follow_the_one_leg_map(theta):
    F = mlp(n=3, width=5)
    x = torch.randn(3, 3, dtype=DTYPE)
    block = one_leg(F, theta)
    norms = block.fixed_point_residuals(x, 4)
    assert norms.shape == (4, 3) and norms.requires_grad
    with torch.no_grad():  # y¹ = x + F(x), yᵏ⁺¹ = x + F((1−θ)x + θyᵏ)
        y, want = x + F(x), []
        for _ in range(4):
            want.append(one_leg_residual(F, x, y, theta))
            y = x + F((1 - theta) * x + theta * y)
    torch.testing.assert_close(norms.detach(), torch.stack(want), rtol=1e-12, atol=1e-15)
    assert (norms[1:] < norms[:-1]).all()  # a contraction: the residuals fall


def test_map_jacobian_products_at_the_stage():
    F = mlp(n=3, width=5)
    theta = 0.25
    x, y = torch.randn(2, 3, dtype=DTYPE), torch.randn(2, 3, dtype=DTYPE)
    vectors = torch.randn(4, 2, 3, dtype=DTYPE)
    block = one_leg(F, theta)
    with pytest.raises(ValueError, match="needs the layer's input x for scheme='one_leg'"):
        block.map_jacobian_products(y, vectors)
    products = block.map_jacobian_products(y, vectors, x=x)
    z = (1 - theta) * x + theta * y
    for i in range(2):
        want = theta * vectors[:, i] @ jacobian(F, z[i])
        torch.testing.assert_close(products[:, i].detach(), want, rtol=1e-12, atol=1e-14)
    # θ = 1: the linear block's products, x or not.
    torch.testing.assert_close(
        one_leg(F, 1.0).map_jacobian_products(y, vectors, x=x),
        ImplicitResidualBlock(F, 1.0).map_jacobian_products(y, vectors),
    )


# -- the option ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["one-leg", "Linear", None])
def test_bad_scheme_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match=r"scheme must be one of \('linear', 'one_leg'\)"):
        ImplicitResidualBlock(mlp(), 0.5, scheme=bad)


def test_scheme_is_shown_and_defaults_to_linear():
    assert ImplicitResidualBlock(mlp(), 0.5).scheme == "linear"
    assert "scheme='linear'" in repr(ImplicitResidualBlock(mlp(), 0.5))
    assert "scheme='one_leg'" in repr(ImplicitResidualBlock(mlp(), 0.5, scheme="one_leg"))


def test_jacobian_free_gradient_takes_the_one_leg_graph():
    # JacobianFree takes g = ∇_y L (no solve), so ∇_x L = (I + (1−θ)J_F(z))ᵀ ∇_y L exactly.
    from irnet.linear import JacobianFree

    F, theta = mlp(n=3, width=5), 0.25
    x = torch.randn(2, 3, dtype=DTYPE, requires_grad=True)
    w = torch.randn(2, 3, dtype=DTYPE)
    block = ImplicitResidualBlock(F, theta, SOLVERS["anderson"](), JacobianFree(), scheme="one_leg")
    y, gx, _ = gradients(block, x, w)
    z = (1 - theta) * x.detach() + theta * y.detach()
    eye = torch.eye(3, dtype=DTYPE)
    want = torch.stack([(eye + (1 - theta) * jacobian(F, z[i])).T @ w[i] for i in range(2)])
    torch.testing.assert_close(gx, want, rtol=1e-12, atol=1e-13)
