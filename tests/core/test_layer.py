"""The implicit residual block: gradients against three references, memory, dtypes, arguments.

Gradients of every forward solver × every adjoint solver × θ are compared with

(a) ``torch.autograd.gradcheck`` (finite differences; a smooth tanh F and
    solves to 1e-12 so central differences are meaningful),
(b) a dense implicit-function-theorem reference built from
    ``torch.autograd.functional.jacobian`` and ``torch.linalg.solve``
    (:func:`problems.ift_gradients`), and
(c) the block's own unrolled mode (``backward="unrolled"``), which
    differentiates through the solver iterations instead.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from helpers.problems import (
    DOTTIE,
    DTYPE,
    LINEAR_SOLVERS,
    SOLVERS,
    THETAS,
    LinearF,
    SavedTensors,
    contraction,
    conv_f,
    ift_gradients,
    linear_solution,
    mlp,
    residual_norm,
)
from irnet import ConvergenceWarning, ImplicitResidualBlock
from irnet.device_path import on_accelerator_path
from irnet.linear import GMRES, Neumann
from irnet.solvers import Anderson, FixedPoint, GradientDescent, NonlinearCG

pytestmark = pytest.mark.usefixtures("single_thread")

solver_names = pytest.mark.parametrize("solver", list(SOLVERS))
linear_names = pytest.mark.parametrize("linear", list(LINEAR_SOLVERS))
thetas = pytest.mark.parametrize("theta", THETAS)

# Finite differences: with eps = 1e-5 the truncation error of a central difference
# is ~eps² = 1e-10, and a solve accurate to tol = 1e-12 (y to ≤ 5e-12 for Lipschitz
# 0.8) adds at most 5e-12 / 2eps = 2.5e-7; atol 1e-6 covers both.
GRADCHECK = dict(eps=1e-5, atol=1e-6, rtol=1e-5)


def gradients(block: ImplicitResidualBlock, x: torch.Tensor, w: torch.Tensor):
    """``∇_x`` and ``∇_γ`` of ``L = Σ w · block(x)``."""
    params = list(block.F.parameters())
    y = block(x)
    grads = torch.autograd.grad((y * w).sum(), [x, *params])
    return y, grads[0], list(grads[1:])


def assert_grads_close(got, want, rtol, atol):
    (gx, gp), (rx, rp) = got, want
    torch.testing.assert_close(gx, rx, rtol=rtol, atol=atol)
    assert len(gp) == len(rp)
    for a, b in zip(gp, rp):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@solver_names
@linear_names
@thetas
@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU], ids=["tanh", "relu"])
def test_gradients_match_references(solver, linear, theta, activation):
    F = mlp(n=3, width=5, activation=activation)
    x = torch.randn(2, 3, dtype=DTYPE, requires_grad=True)
    w = torch.randn(2, 3, dtype=DTYPE)
    block = ImplicitResidualBlock(F, theta, SOLVERS[solver](), LINEAR_SOLVERS[linear]())
    y, gx, gp = gradients(block, x, w)

    assert (residual_norm(F, x, y, theta) <= block.solver.atol).all()
    stats = block.backward_stats
    assert stats is not None and stats.converged.all()
    assert (stats.residual <= block.linear_solver.rtol).all()

    # (b) dense IFT: the adjoint solve is accurate to a relative 1e-12 and y to ≤ 5e-12,
    # so the gradients agree to ~1e-11 relative (condition of I − θJ ≤ 1/(1 − 0.8)).
    assert_grads_close(
        (gx, gp), ift_gradients(F, x.detach(), y.detach(), theta, w), rtol=1e-9, atol=1e-10
    )

    # (c) unrolled: differentiating the iterations converges to the IFT gradient at the
    # solver's rate but lags the residual (the derivative recursion carries a factor
    # of the iteration count, and GD/CG's line searches add O(residual) terms);
    # measured worst 1.4e-9 relative on this table.
    unrolled = ImplicitResidualBlock(F, theta, SOLVERS[solver](), backward="unrolled")
    _, ux, up = gradients(unrolled, x, w)
    assert_grads_close((gx, gp), (ux, up), rtol=1e-7, atol=1e-8)

    # (a) finite differences (fast mode: random projections of the full Jacobian
    # w.r.t. the input and every parameter). F's parameters are passed as inputs so
    # gradcheck perturbs them in place and compares their gradients too. ReLU has kinks
    # where central differences are meaningless: tanh only.
    if activation is nn.Tanh:
        assert torch.autograd.gradcheck(
            lambda x, *params: block(x), (x, *F.parameters()), fast_mode=True, **GRADCHECK
        )


@solver_names
def test_unrolled_with_data_input_and_without_grad(solver):
    # The usual first layer: x is data (no grad), only F's parameters are trained.
    F = mlp()
    x = torch.randn(3, 3, dtype=DTYPE)
    w = torch.randn(3, 3, dtype=DTYPE)
    implicit = ImplicitResidualBlock(F, 0.5, SOLVERS[solver](), LINEAR_SOLVERS["gmres"]())
    unrolled = ImplicitResidualBlock(F, 0.5, SOLVERS[solver](), backward="unrolled")
    want = torch.autograd.grad((implicit(x) * w).sum(), list(F.parameters()))
    got = torch.autograd.grad((unrolled(x) * w).sum(), list(F.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)
    with torch.no_grad():  # evaluation of an unrolled block: no graph, same answer
        y = unrolled(x)
    assert not y.requires_grad
    torch.testing.assert_close(y, implicit(x).detach(), rtol=0, atol=1e-11)


@pytest.mark.parametrize(
    "solver, linear, theta",
    # Every solver, every linear solver and every θ at least once, with the full
    # (slow-mode) Jacobian comparison.
    [
        ("fixed_point", "neumann", 0.25),
        ("anderson", "gmres", 0.5),
        ("gradient_descent", "direct", 1.0),
        ("cg_fletcher_reeves", "neumann", 1.0),
        ("cg_polak_ribiere", "gmres", 0.25),
    ],
)
def test_gradcheck_full_jacobian(solver, linear, theta):
    F = mlp(n=2, width=4)
    x = torch.randn(2, 2, dtype=DTYPE, requires_grad=True)
    block = ImplicitResidualBlock(F, theta, SOLVERS[solver](), LINEAR_SOLVERS[linear]())
    assert torch.autograd.gradcheck(lambda x, *params: block(x), (x, *F.parameters()), **GRADCHECK)


@linear_names
@thetas
def test_linear_F_closed_form_gradient(linear, theta):
    # y = (I − θA)⁻¹((I + (1−θ)A)x + b); with g = (I − θA)⁻ᵀ w:
    # ∇_x = (I + (1−θ)A)ᵀ g,  ∇_b = Σ g,  ∇_A = Σ g (θy + (1−θ)x)ᵀ.
    n = 4
    A, b = contraction(n=n, radius=0.6), torch.randn(n, dtype=DTYPE)
    F = LinearF(A, b)
    x = torch.randn(3, n, dtype=DTYPE, requires_grad=True)
    w = torch.randn(3, n, dtype=DTYPE)
    block = ImplicitResidualBlock(
        F, theta, FixedPoint(atol=1e-13, max_iter=500), LINEAR_SOLVERS[linear]()
    )
    y, gx, (gA, gb) = gradients(block, x, w)
    eye = torch.eye(n, dtype=DTYPE)
    y_exact = linear_solution(A, b, x.detach(), theta)
    g = torch.linalg.solve((eye - theta * A).T, w.T).T
    torch.testing.assert_close(y, y_exact, rtol=0, atol=1e-12)
    torch.testing.assert_close(gx, g @ (eye + (1 - theta) * A), rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(gb, g.sum(0), rtol=1e-10, atol=1e-11)
    z = theta * y_exact + (1 - theta) * x.detach()
    torch.testing.assert_close(gA, g.T @ z, rtol=1e-10, atol=1e-11)


def test_theta_zero_gradient_is_explicit_autograd():
    F = mlp()
    x = torch.randn(4, 3, dtype=DTYPE, requires_grad=True)
    w = torch.randn(4, 3, dtype=DTYPE)
    block = ImplicitResidualBlock(F, 0.0)
    y, gx, gp = gradients(block, x, w)
    explicit = x + F(x)
    assert torch.equal(y, explicit)
    want = torch.autograd.grad((explicit * w).sum(), [x, *F.parameters()])
    assert_grads_close((gx, gp), (want[0], list(want[1:])), rtol=0, atol=0)
    assert block.backward_stats is None  # no adjoint solve at θ = 0


@pytest.mark.parametrize(
    "solver, linear",
    [("fixed_point", "gmres"), ("anderson", "neumann"), ("cg_polak_ribiere", "gmres")],
)
@pytest.mark.parametrize("theta", [0.5, 1.0])
def test_image_shaped_conv(solver, linear, theta):
    # (B, C, H, W) inputs through a small convolutional F: every solver works on
    # whole tensors, norms are per sample over C·H·W = 32 values.
    F = conv_f(channels=2)
    x = torch.randn(2, 2, 4, 4, dtype=DTYPE, requires_grad=True)
    w = torch.randn(2, 2, 4, 4, dtype=DTYPE)
    block = ImplicitResidualBlock(F, theta, SOLVERS[solver](), LINEAR_SOLVERS[linear]())
    y, gx, gp = gradients(block, x, w)
    assert y.shape == x.shape
    assert (residual_norm(F, x, y, theta) <= 1e-12).all()
    assert block.backward_stats.converged.all()
    assert_grads_close(
        (gx, gp), ift_gradients(F, x.detach(), y.detach(), theta, w), rtol=1e-9, atol=1e-10
    )


# -- memory: what the graph keeps is independent of the number of iterations --------------


def saved_bytes(block: ImplicitResidualBlock, x: torch.Tensor) -> tuple[int, int]:
    """Bytes saved for backward still alive after the forward pass, and iterations."""
    tracker = SavedTensors()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with tracker.track():
            y = block(x)
    alive = tracker.alive_bytes()
    assert alive > 0 and y.grad_fn is not None
    y.sum().backward()  # the graph is usable
    return alive, int(block.forward_stats.iterations.max())


MEMORY_SOLVERS = {
    "fixed_point": FixedPoint,
    "anderson": Anderson,
    "gradient_descent": GradientDescent,
    "nonlinear_cg": NonlinearCG,
}


@pytest.mark.parametrize("solver", list(MEMORY_SOLVERS))
def test_saved_tensors_do_not_grow_with_iterations(solver):
    # tol = 1e-300 cannot be met, so each solve runs exactly max_iter iterations.
    F = mlp(n=4, width=16, lipschitz=0.95)
    x = torch.randn(8, 4, dtype=DTYPE, requires_grad=True)
    cls = MEMORY_SOLVERS[solver]

    def measure(max_iter, backward):
        block = ImplicitResidualBlock(
            F, 1.0, cls(atol=1e-300, max_iter=max_iter), Neumann(rtol=1e-8), backward=backward
        )
        return saved_bytes(block, x)

    few, few_iters = measure(5, "implicit")
    many, many_iters = measure(80, "implicit")
    assert (few_iters, many_iters) == (5, 80)
    assert few == many, (few, many)
    # Sanity of the measurement itself: differentiating through the iterations keeps
    # every iterate, so the same count must grow.
    unrolled_few, _ = measure(5, "unrolled")
    unrolled_many, _ = measure(80, "unrolled")
    assert unrolled_many > 10 * unrolled_few > 10 * few


# -- dtypes -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("linear", list(LINEAR_SOLVERS))
def test_dtype_follows_input(dtype, linear):
    F = mlp(dtype=dtype)
    x = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    block = ImplicitResidualBlock(F, 0.5, FixedPoint(atol=1e-5), LINEAR_SOLVERS[linear](rtol=1e-5))
    y = block(x)
    y.square().sum().backward()
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert all(p.grad.dtype == dtype for p in F.parameters())
    assert block.forward_stats.residual.dtype == dtype
    assert block.forward_stats.converged.all() and block.backward_stats.converged.all()


def test_low_precision_input_solves_in_float32():
    F = mlp(dtype=torch.float32)
    x = torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True)
    block = ImplicitResidualBlock(F, 0.5, FixedPoint(atol=1e-5))
    y = block(x)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert block.forward_stats.residual.dtype == torch.float32
    assert block.forward_stats.converged.all()


def test_no_grad_returns_plain_solution():
    F = mlp()
    x = torch.randn(3, 3, dtype=DTYPE, requires_grad=True)
    block = ImplicitResidualBlock(F, 0.5, FixedPoint(atol=1e-12))
    with torch.no_grad():
        y = block(x)
    assert y.grad_fn is None and not y.requires_grad
    torch.testing.assert_close(y, block(x).detach(), rtol=0, atol=0)


# -- argument validation ------------------------------------------------------------------


@pytest.mark.parametrize("theta", [-0.1, 1.5, float("nan"), "0.5", None])
def test_rejects_theta_outside_unit_interval(theta):
    with pytest.raises(ValueError, match=r"\btheta\b"):
        ImplicitResidualBlock(mlp(), theta=theta)


@pytest.mark.parametrize("theta", [0.0, 0.5, 1.0])
def test_rejects_F_that_changes_shape(theta):
    F = nn.Linear(3, 2).to(DTYPE)
    block = ImplicitResidualBlock(F, theta)
    with pytest.raises(ValueError, match=r"\bF\b"):
        block(torch.randn(4, 3, dtype=DTYPE))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rejects_non_finite_input(bad):
    x = torch.randn(4, 3, dtype=DTYPE)
    x[2, 1] = bad
    if on_accelerator_path(
        x
    ):  # no host read there: the sample comes out NaN (the loss check names it)
        y = ImplicitResidualBlock(mlp())(x)
        assert y[2].isnan().all() and y[[0, 1, 3]].isfinite().all()
        return
    with pytest.raises(ValueError, match=r"\bx\b"):
        ImplicitResidualBlock(mlp())(x)


def test_rejects_empty_batch():
    with pytest.raises(ValueError, match=r"\bx\b"):
        ImplicitResidualBlock(mlp())(torch.zeros(0, 3, dtype=DTYPE))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"solver": Neumann()}, "solver"),
        ({"solver": "fixed_point"}, "solver"),
        ({"linear_solver": FixedPoint()}, "linear_solver"),
        ({"linear_solver": GMRES}, "linear_solver"),
        ({"backward": "adjoint"}, "backward"),
    ],
)
def test_rejects_wrong_components(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        ImplicitResidualBlock(mlp(), 0.5, **kwargs)


def test_defaults():
    block = ImplicitResidualBlock(mlp())
    assert isinstance(block.solver, FixedPoint) and isinstance(block.linear_solver, Neumann)
    assert block.theta == 0.5 and block.backward_mode == "implicit"
    assert "theta=0.5" in repr(block)
    assert block.forward_stats is None and block.backward_stats is None


# -- a plain callable F --------------------------------------------------------------------


@pytest.mark.parametrize("theta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("linear", list(LINEAR_SOLVERS))
def test_plain_callable_F_closed_form(theta, linear):
    """F(y) = a·y as a lambda: y = (1 + (1−θ)a)/(1 − θa)·x, and dy/dx the same factor."""
    a = -0.6
    block = ImplicitResidualBlock(
        lambda y: a * y, theta, FixedPoint(atol=1e-13, max_iter=200), LINEAR_SOLVERS[linear]()
    )
    x = torch.randn(4, 3, dtype=DTYPE, requires_grad=True)
    factor = (1 + (1 - theta) * a) / (1 - theta * a)
    y = block(x)
    torch.testing.assert_close(y, factor * x, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(x)
    (grad,) = torch.autograd.grad((y * w).sum(), x)
    torch.testing.assert_close(grad, factor * w, rtol=1e-10, atol=1e-12)


def test_plain_function_F_without_input_grad_returns_plain_solution():
    block = ImplicitResidualBlock(torch.cos, 1.0, FixedPoint(atol=1e-12, max_iter=200))
    y = block(torch.zeros(2, 1, dtype=DTYPE))
    assert not y.requires_grad
    torch.testing.assert_close(y, torch.full((2, 1), DOTTIE, dtype=DTYPE))


@pytest.mark.parametrize("F", [3, "tanh", None])
def test_rejects_F_that_is_not_callable(F):
    with pytest.raises(ValueError, match=r"\bF\b"):
        ImplicitResidualBlock(F)
