"""Non-contracting test problems: ``F(y) = A y + tanh(y + b)`` with ``ρ(A)`` above 1.

With θ = 1 the map ``y ↦ c + θF(y)`` expands (fixed-point iteration diverges),
but ``r(y) = y − c − θF(y)`` has an isolated root with an invertible
Jacobian ``I − θ(A + diag(sech²(y + b)))``, which Broyden and Anderson find.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from helpers.problems import DTYPE, matrix_with_spectrum


class TanhLinear(nn.Module):
    """``F(y) = A y + tanh(y + b)`` per sample (``y`` of shape (batch, n))."""

    def __init__(self, A: Tensor, b: Tensor) -> None:
        super().__init__()
        self.A = nn.Parameter(A.clone())
        self.b = nn.Parameter(b.clone())

    def forward(self, y: Tensor) -> Tensor:
        return y @ self.A.T + torch.tanh(y + self.b)


def expansive_tanh(n: int = 6, radius: float = 3.0, seed: int = 1) -> TanhLinear:
    """``TanhLinear`` whose ``A`` has real eigenvalues spread evenly over ``[−radius, radius]``."""
    A = matrix_with_spectrum(torch.linspace(-radius, radius, n).tolist(), seed=seed)
    b = torch.randn(n, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))
    return TanhLinear(A, b)


def spectral_radius(M: Tensor) -> float:
    """Largest eigenvalue modulus of a square matrix."""
    return float(torch.linalg.eigvals(M).abs().max())


def residual_jacobian(F: TanhLinear, y: Tensor, theta: float) -> Tensor:
    """``∂r/∂y = I − θ(A + diag(sech²(y + b)))`` of one sample ``y`` (shape (n,))."""
    with torch.no_grad():
        J = F.A + torch.diag(1 - torch.tanh(y + F.b) ** 2)
        return torch.eye(len(y), dtype=y.dtype) - theta * J
