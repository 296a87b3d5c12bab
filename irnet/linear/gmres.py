"""Batched, restarted, matrix-free GMRES (Saad & Schultz 1986) for the adjoint system."""

from __future__ import annotations

import torch
from torch import Tensor

from irnet.linear.base import AdjointOperator, LinearSolver, safe_norm
from irnet.per_sample import sample_dot, sample_norm
from irnet.stats import SolverStats
from irnet.validation import check_int


class GMRES(LinearSolver):
    """Restarted GMRES(m) with modified Gram–Schmidt and Givens rotations, per sample.

    Needs only products with ``A = I − θ J_Fᵀ``, so it suits large states
    (convolutional layers) and works where the Neumann series diverges. All
    samples share the Arnoldi loop; each sample's correction uses only the
    Krylov columns built until it met its tolerance, so its answer and its
    count are its own.

    Args:
        rtol: relative tolerance ``‖A g − b‖₂ ≤ rtol · ‖b‖₂`` per sample.
        max_iter: the most Krylov steps (operator applications) in all cycles.
        restart: Krylov steps per cycle before restarting.
    """

    def __init__(self, rtol: float = 1e-5, max_iter: int = 50, restart: int = 20) -> None:
        super().__init__(rtol, max_iter)
        self.restart = check_int("restart", restart, 1)

    def solve(self, operator: AdjointOperator, b: Tensor) -> tuple[Tensor, SolverStats]:
        shape = b.shape
        flat_b = b.flatten(1)
        b_norm = safe_norm(b)

        def apply(v: Tensor) -> Tensor:
            return operator(v.view(shape)).flatten(1)

        x = torch.zeros_like(flat_b)
        r = flat_b
        res = sample_norm(r) / b_norm
        iterations = torch.zeros_like(res, dtype=torch.long)
        used = 0
        while used < self.max_iter and not bool((res <= self.rtol).all()):
            steps = min(self.restart, self.max_iter - used)
            dx, taken = self._cycle(apply, r, b_norm, res > self.rtol, steps)
            candidate = x + dx
            new_r = flat_b - apply(candidate)
            new_res = sample_norm(new_r) / b_norm
            better = torch.isfinite(new_res) & (new_res <= res)
            x = torch.where(better[:, None], candidate, x)
            r = torch.where(better[:, None], new_r, r)
            res = torch.where(better, new_res, res)
            iterations = iterations + taken
            used += steps
        converged = res <= self.rtol
        diverged = ~converged & ~torch.isfinite(res)
        return x.view(shape), SolverStats(iterations, res, converged, diverged)

    def _cycle(self, apply, r: Tensor, b_norm: Tensor, active: Tensor, steps: int):
        """One Arnoldi cycle of at most ``steps`` columns from residual ``r``.

        Returns the correction to the iterate and the steps each sample used.
        """
        batch, dtype = r.shape[0], r.dtype
        tiny = torch.finfo(dtype).tiny
        beta = sample_norm(r)
        basis = [r / beta.clamp_min(tiny)[:, None]]
        H = r.new_zeros(batch, steps + 1, steps)
        cos, sin = r.new_zeros(batch, steps), r.new_zeros(batch, steps)
        rhs = r.new_zeros(batch, steps + 1)
        rhs[:, 0] = beta
        used = torch.zeros(batch, dtype=torch.long, device=r.device)
        for j in range(steps):
            w = apply(basis[j])
            for i in range(j + 1):  # modified Gram–Schmidt
                H[:, i, j] = sample_dot(w, basis[i])
                w = w - H[:, i, j, None] * basis[i]
            H[:, j + 1, j] = sample_norm(w)
            basis.append(torch.where(H[:, j + 1, j, None] > tiny, w / H[:, j + 1, j, None].clamp_min(tiny), 0))
            for i in range(j):  # earlier rotations on the new column
                top = cos[:, i] * H[:, i, j] + sin[:, i] * H[:, i + 1, j]
                H[:, i + 1, j] = -sin[:, i] * H[:, i, j] + cos[:, i] * H[:, i + 1, j]
                H[:, i, j] = top
            radius = torch.hypot(H[:, j, j], H[:, j + 1, j])
            nonzero = radius > tiny
            cos[:, j] = torch.where(nonzero, H[:, j, j] / radius.clamp_min(tiny), 1)
            sin[:, j] = torch.where(nonzero, H[:, j + 1, j] / radius.clamp_min(tiny), 0)
            H[:, j, j] = radius
            H[:, j + 1, j] = 0
            rhs[:, j + 1] = -sin[:, j] * rhs[:, j]
            rhs[:, j] = cos[:, j] * rhs[:, j]
            used = torch.where(active, j + 1, used)
            active = active & (rhs[:, j + 1].abs() / b_norm > self.rtol)
            if not bool(active.any()):
                break
        return self._correction(H, rhs, basis, used), used

    @staticmethod
    def _correction(H: Tensor, rhs: Tensor, basis: list[Tensor], used: Tensor) -> Tensor:
        """``V y`` with ``R y = g`` solved on each sample's own leading columns."""
        k = int(used.max())
        if k == 0:
            return torch.zeros_like(basis[0])
        keep = torch.arange(k, device=used.device)[None, :] < used[:, None]  # (batch, k)
        both = keep[:, :, None] & keep[:, None, :]
        eye = torch.eye(k, dtype=H.dtype, device=H.device)
        R = torch.where(both, H[:, :k, :k], eye)
        # A breakdown that leaves a zero pivot gives a non-finite correction,
        # which solve() rejects for that sample.
        y = torch.linalg.solve_triangular(R, (rhs[:, :k] * keep)[:, :, None], upper=True)[:, :, 0]
        return torch.einsum("bk,kbn->bn", y, torch.stack(basis[:k]))
