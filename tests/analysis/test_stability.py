"""Linear stability of θ-schemes (paper Fig. 2) and spectral radii of layer Jacobians."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from irnet import ImplicitResidualBlock
from irnet.analysis.stability import (
    LayerJacobian,
    layer_spectral_radii,
    matrix_spectral_radius,
    spectral_radius,
    theta_method_matrix,
    verlet_matrix,
)
from irnet.linear import Direct
from irnet.nets import ConvResidual, MLPResidual
from irnet.solvers import FixedPoint

DTYPE = torch.float64


# -- paper Fig. 2 ------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("h_omega", [0.1, 1.0, 5.0])
def test_theta_method_radius_matches_closed_form(theta: float, h_omega: float) -> None:
    # Eigenvalues (1 ± i(1−θ)hω) / (1 ∓ iθhω), so |λ|² = (1 + (1−θ)²z²) / (1 + θ²z²).
    omega = 50.0
    rho = float(matrix_spectral_radius(theta_method_matrix(h_omega / omega, omega, theta)))
    expected = math.sqrt((1 + (1 - theta) ** 2 * h_omega**2) / (1 + theta**2 * h_omega**2))
    assert rho == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("h_omega", [0.01, 0.5, 3.0])
def test_euler_expands_backward_euler_contracts_trapezoid_preserves(h_omega: float) -> None:
    h, omega = h_omega / 50, 50.0
    forward = torch.linalg.eigvals(theta_method_matrix(h, omega, 0.0))
    # Forward Euler's eigenvalues are exactly 1 ± i hω (paper section 2).
    assert sorted(forward.imag.tolist()) == pytest.approx([-h_omega, h_omega], rel=1e-12)
    assert forward.real.tolist() == pytest.approx([1.0, 1.0], rel=1e-12)
    assert float(matrix_spectral_radius(theta_method_matrix(h, omega, 0.0))) > 1
    assert float(matrix_spectral_radius(theta_method_matrix(h, omega, 1.0))) < 1
    assert float(matrix_spectral_radius(theta_method_matrix(h, omega, 0.5))) == pytest.approx(
        1.0, abs=1e-13
    )


def test_verlet_is_stable_only_for_small_steps() -> None:
    omega = 50.0
    for h_omega in (0.5, 1.9):
        matrix = verlet_matrix(h_omega / omega, omega)
        # Characteristic polynomial λ² − (2 − h²ω²)λ + 1 (paper section 2).
        assert float(torch.trace(matrix)) == pytest.approx(2 - h_omega**2, rel=1e-12)
        assert float(torch.linalg.det(matrix)) == pytest.approx(1.0, rel=1e-12)
        assert float(matrix_spectral_radius(matrix)) == pytest.approx(1.0, abs=1e-12)
    # hω = 2.5: λ² + 4.25λ + 1 has the roots −0.25 and −4.
    assert float(matrix_spectral_radius(verlet_matrix(2.5 / omega, omega))) == pytest.approx(
        4.0, rel=1e-12
    )


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: theta_method_matrix(0.0, 1.0, 0.5), "h"),
        (lambda: theta_method_matrix(0.1, -1.0, 0.5), "omega"),
        (lambda: theta_method_matrix(0.1, 1.0, 1.5), "theta"),
        (lambda: verlet_matrix(-0.1, 1.0), "h"),
        (lambda: spectral_radius(lambda v: v, torch.ones(1, 2), krylov_dim=0), "krylov_dim"),
        (lambda: LayerJacobian(lambda v: v, 0.5, torch.ones(1, 2), torch.ones(1, 3)), "x and y"),
        (lambda: LayerJacobian(lambda v: v, 2.0, torch.ones(1, 2), torch.ones(1, 2)), "theta"),
    ],
)
def test_invalid_arguments_name_the_argument(call, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        call()


# -- Arnoldi spectral radius -----------------------------------------------------------------


def _batched(matrices: torch.Tensor):
    return lambda v: (matrices @ v.unsqueeze(-1)).squeeze(-1)


def test_spectral_radius_is_exact_with_a_full_krylov_space() -> None:
    matrices = torch.randn(5, 7, 7, dtype=DTYPE)
    # A rotation-dominated sample: its largest eigenvalues are a complex pair 3e^{±iπ/4},
    # where plain power iteration never settles.
    rotation = 3 * torch.tensor(
        [[math.cos(0.785), -math.sin(0.785)], [math.sin(0.785), math.cos(0.785)]]
    )
    matrices[0] = 0.1 * matrices[0]
    matrices[0, :2, :2] += rotation.to(DTYPE)
    estimate = spectral_radius(_batched(matrices), torch.randn(5, 7, dtype=DTYPE), krylov_dim=50)
    assert torch.allclose(estimate, matrix_spectral_radius(matrices), rtol=1e-10)


def test_spectral_radius_survives_an_early_invariant_subspace() -> None:
    # Start vector e_1 is an eigenvector: Arnoldi breaks down after one step.
    matrix = torch.diag(torch.tensor([5.0, 1.0, -0.5, 0.2], dtype=DTYPE))
    start = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=DTYPE)
    estimate = spectral_radius(_batched(matrix[None]), start, krylov_dim=4)
    assert torch.isfinite(estimate).all()
    assert float(estimate) == pytest.approx(5.0, rel=1e-14)


def test_spectral_radius_finds_a_dominant_eigenvalue_with_few_steps() -> None:
    n = 60
    basis = torch.randn(n, n, dtype=DTYPE) + 4 * torch.eye(n, dtype=DTYPE)
    eigenvalues = torch.rand(n, dtype=DTYPE) * 2 - 1  # in (−1, 1)
    eigenvalues[7] = -3.0
    matrix = basis @ torch.diag(eigenvalues) @ torch.linalg.inv(basis)
    estimate = spectral_radius(
        _batched(matrix[None]), torch.randn(1, n, dtype=DTYPE), krylov_dim=20
    )
    assert float(estimate) == pytest.approx(3.0, rel=1e-6)


# -- layer Jacobians against dense references built from F alone -----------------------------


def _solved_layer(F: torch.nn.Module, theta: float, x: torch.Tensor, scheme: str = "linear"):
    block = ImplicitResidualBlock(
        F, theta, FixedPoint(atol=1e-13, max_iter=5000), Direct(rtol=1e-12), scheme=scheme
    )
    y = block(x).detach()
    assert bool(block.forward_stats.converged.all())
    return block, y


def _mlp(dim: int = 2) -> MLPResidual:
    F = MLPResidual(dim, 12, step=0.6).to(DTYPE)
    with torch.no_grad():
        F.bias.normal_()  # kinks away from the origin, so samples differ
    return F


def _dense_F_jacobians(F, y: torch.Tensor) -> torch.Tensor:
    """Per-sample J_F(y), column by column from autograd on F alone."""
    n = y[0].numel()
    return torch.stack([jacobian(F, y[i : i + 1]).reshape(n, n) for i in range(len(y))])


def _ift_layer_jacobians(F, theta: float, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample ∂y/∂x = (I − θJ_F(y))⁻¹(I + (1−θ)J_F(x)) (implicit function theorem on eq. 7)."""
    eye = torch.eye(x[0].numel(), dtype=x.dtype)
    return torch.linalg.solve(
        eye - theta * _dense_F_jacobians(F, y), eye + (1 - theta) * _dense_F_jacobians(F, x)
    )


def _finite_difference_layer_jacobians(
    block: ImplicitResidualBlock, x: torch.Tensor, eps: float = 1e-5
):
    """Per-sample ∂y/∂x by central differences of the solved layer (tol 1e-13), no autograd."""
    n = x[0].numel()
    columns = []
    with torch.no_grad():
        for j in range(n):
            step = torch.zeros(n, dtype=x.dtype)
            step[j] = eps
            step = step.reshape(x[0].shape)
            columns.append(((block(x + step) - block(x - step)) / (2 * eps)).reshape(len(x), n))
    return torch.stack(columns, dim=2)


@pytest.mark.parametrize("theta", [0.0, 0.5, 1.0])
def test_layer_jacobian_operator_equals_the_layer_derivative(theta: float) -> None:
    F = _mlp()
    x = 2 * torch.randn(6, 2, dtype=DTYPE)
    block, y = _solved_layer(F, theta, x)
    operator = LayerJacobian(F, theta, x, y)
    basis = torch.eye(2, dtype=DTYPE)
    columns = torch.stack([operator(basis[i].expand(6, 2)) for i in range(2)], dim=2)
    assert torch.allclose(columns, _ift_layer_jacobians(F, theta, x, y), atol=1e-10)
    assert torch.allclose(columns, _finite_difference_layer_jacobians(block, x), atol=1e-6)
    assert operator.solve_residual < 1e-10


@pytest.mark.parametrize("theta", [0.0, 0.5, 1.0])
def test_layer_spectral_radii_match_dense_eigenvalues(theta: float) -> None:
    F = _mlp()
    x = 2 * torch.randn(6, 2, dtype=DTYPE)
    _, y = _solved_layer(F, theta, x)
    rho_layer, rho_neumann = layer_spectral_radii(F, theta, x, y, krylov_dim=20)
    expected_layer = matrix_spectral_radius(_ift_layer_jacobians(F, theta, x, y))
    expected_neumann = theta * matrix_spectral_radius(_dense_F_jacobians(F, y))
    assert torch.allclose(rho_layer, expected_layer, rtol=1e-9)
    assert torch.allclose(rho_neumann, expected_neumann, rtol=1e-9, atol=1e-15)
    assert (
        len(set(rho_layer.round(decimals=6).tolist())) > 1
    )  # samples really have their own Jacobians


def test_layer_spectral_radii_of_a_convolutional_layer() -> None:
    # Tiny: convolutions off the oneDNN path (forward-mode AD, float64) are slow on CPUs.
    F = ConvResidual(1, 2, step=0.3).to(DTYPE)
    x = torch.randn(2, 1, 2, 2, dtype=DTYPE)  # 4 states per sample, image-shaped
    block, y = _solved_layer(F, 0.5, x)
    rho_layer, rho_neumann = layer_spectral_radii(F, 0.5, x, y, krylov_dim=4)
    dense = _ift_layer_jacobians(F, 0.5, x, y)
    assert torch.allclose(dense, _finite_difference_layer_jacobians(block, x), atol=1e-6)
    assert torch.allclose(rho_layer, matrix_spectral_radius(dense), rtol=1e-9)
    assert torch.allclose(
        rho_neumann, 0.5 * matrix_spectral_radius(_dense_F_jacobians(F, y)), rtol=1e-9
    )


def test_layer_spectral_radii_leave_the_global_rng_alone() -> None:
    F = _mlp()
    x = torch.randn(4, 2, dtype=DTYPE)
    _, y = _solved_layer(F, 0.5, x)
    state = torch.get_rng_state()
    first = layer_spectral_radii(F, 0.5, x, y, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    second = layer_spectral_radii(F, 0.5, x, y, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# -- one-leg layers: Jacobians at the stage (1−θ)x + θy -----------------------------------------


def _one_leg_layer_jacobians(F, theta: float, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample ∂y/∂x = (I − θJ)⁻¹(I + (1−θ)J), J = J_F((1−θ)x + θy), for y = x + F(z)."""
    eye = torch.eye(x[0].numel(), dtype=x.dtype)
    J = _dense_F_jacobians(F, (1 - theta) * x + theta * y)
    return torch.linalg.solve(eye - theta * J, eye + (1 - theta) * J)


@pytest.mark.parametrize("theta", [0.25, 0.5, 0.75])
def test_one_leg_layer_jacobian_and_radii(theta: float) -> None:
    F = _mlp()
    x = 2 * torch.randn(6, 2, dtype=DTYPE)
    block, y = _solved_layer(F, theta, x, scheme="one_leg")
    dense = _one_leg_layer_jacobians(F, theta, x, y)
    assert torch.allclose(dense, _finite_difference_layer_jacobians(block, x), atol=1e-6)
    # The linear step's formula at the same x and y is another matrix: the scheme matters.
    assert not torch.allclose(dense, _ift_layer_jacobians(F, theta, x, y), atol=1e-3)
    operator = LayerJacobian(F, theta, x, y, scheme="one_leg")
    basis = torch.eye(2, dtype=DTYPE)
    columns = torch.stack([operator(basis[i].expand(6, 2)) for i in range(2)], dim=2)
    assert torch.allclose(columns, dense, atol=1e-10)
    rho_layer, rho_neumann = layer_spectral_radii(F, theta, x, y, scheme="one_leg")
    stage = (1 - theta) * x + theta * y
    assert torch.allclose(rho_layer, matrix_spectral_radius(dense), rtol=1e-9)
    expected = theta * matrix_spectral_radius(_dense_F_jacobians(F, stage))
    assert torch.allclose(rho_neumann, expected, rtol=1e-9)


def test_layer_jacobian_refuses_an_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="scheme must be one of"):
        LayerJacobian(lambda v: v, 0.5, torch.ones(1, 2), torch.ones(1, 2), scheme="midpoint")
