"""Dense adjoint solve for small layers: build ``(I − θ J)ᵀ`` and call ``torch.linalg.solve``."""

from __future__ import annotations

import torch
from torch import Tensor

from irnet._misc import check_int, check_positive, sample_norm
from irnet.linear.base import AdjointOperator, LinearSolver, safe_norm
from irnet.stats import SolverStats


class Direct(LinearSolver):
    """Exact solve with the dense per-sample Jacobian (n vector–Jacobian products, O(n³)).

    Meant for small state sizes (the paper's networks have 2–4 states per
    sample) and as a reference; iterative solvers suit images.

    Args:
        rtol: relative residual below which the solve counts as converged
            (only reported: a singular system is the usual reason it fails).
        max_size: the largest per-sample state size accepted.
    """

    def __init__(self, rtol: float = 1e-5, max_size: int = 4096) -> None:
        # No iteration count: the base initialiser (which takes max_iter) is skipped.
        self.rtol = check_positive("rtol", rtol)
        self.max_size = check_int("max_size", max_size, 1)

    def solve(self, operator: AdjointOperator, b: Tensor) -> tuple[Tensor, SolverStats]:
        n = b[0].numel()
        if n > self.max_size:
            raise ValueError(
                f"Direct builds a dense {n}x{n} Jacobian per sample, above max_size="
                f"{self.max_size}; use GMRES or Neumann for this layer, or raise max_size"
            )
        matrix = operator.dense()  # (batch, n, n)
        rhs = b.reshape(b.shape[0], n, 1)
        g, _ = torch.linalg.solve_ex(matrix, rhs)
        # A singular system falls back to b, flagged below (|g| < ∞ is false for NaN too).
        g = torch.where(g.abs() < float("inf"), g, rhs)
        # The residual with the dense matrix itself: exact, without another product through F.
        res = sample_norm(torch.bmm(matrix, g) - rhs) / safe_norm(b)
        iterations = torch.full_like(res, n, dtype=torch.long)
        converged = res <= self.rtol
        return g.view_as(b), SolverStats(iterations, res, converged, ~(res < float("inf")))
