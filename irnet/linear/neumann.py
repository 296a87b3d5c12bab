"""Neumann series ``(I − P)⁻¹ b = Σᵢ Pⁱ b`` with ``P = θ J_F(y)ᵀ`` (paper section 2.1)."""

from __future__ import annotations

import torch
from torch import Tensor

from irnet.linear.base import AdjointOperator, LinearSolver, safe_norm
from irnet.per_sample import per_sample, sample_norm
from irnet.stats import SolverStats, count_served, diverged_samples
from irnet.validation import check_int


class Neumann(LinearSolver):
    """Truncated Neumann series; converges when the spectral radius of ``θ ∂F/∂y`` is below 1.

    After k terms the residual is exactly the next term, ``A gₖ − b = −P^{k+1} b``,
    so each step costs one vector–Jacobian product and the stopping test is free.
    A sample whose residual has not reached a new low for ``patience`` products
    in a row is stopped and marked ``diverged`` (stalling or divergence),
    returning its best partial sum.

    Args:
        rtol: relative tolerance ``‖A g − b‖₂ ≤ rtol · ‖b‖₂`` per sample.
        max_iter: the most terms (vector–Jacobian products).
        patience: how many products in a row without a new lowest residual mean
            divergence (a non-normal Jacobian can grow for a few terms and still
            converge).
    """

    def __init__(self, rtol: float = 1e-5, max_iter: int = 50, patience: int = 10) -> None:
        super().__init__(rtol, max_iter)
        self.patience = check_int("patience", patience, 1)

    def solve(self, operator: AdjointOperator, b: Tensor) -> tuple[Tensor, SolverStats]:
        # As in the forward loop: few operations per term (NaN fails every comparison,
        # so no finiteness tests; absolute norms against ``rtol·‖b‖``; divergence and
        # the counts read off once at the end).
        b_norm = safe_norm(b)
        tol = self.rtol * b_norm
        g, term = b, operator.vjp(b)
        res = sample_norm(term)
        best_g, best_res = g, res
        stalled = torch.zeros_like(res, dtype=torch.long)  # products since the last new low
        active = res > tol
        served = [torch.ones_like(active)]  # the first product serves every sample
        for _ in range(1, self.max_iter):
            if not bool(active.any()):
                break
            served.append(active)
            g = g + term
            term = operator.vjp(term)
            new_res = sample_norm(term)
            take = active & (new_res < best_res)
            best_g = torch.where(per_sample(take, g), g, best_g)
            best_res = torch.where(take, new_res, best_res)
            stalled = torch.where(take, 0, stalled + 1)
            active = active & (new_res > tol) & (stalled < self.patience)
            res = new_res
        iterations = count_served(served, b.shape[0], b.device)
        converged = best_res <= tol
        diverged = diverged_samples(converged, iterations, self.max_iter, res)
        return best_g, SolverStats(iterations, best_res / b_norm, converged, diverged)
