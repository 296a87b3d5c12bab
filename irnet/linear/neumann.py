"""Neumann series ``(I − P)⁻¹ b = Σᵢ Pⁱ b`` with ``P = θ J_F(y)ᵀ`` (paper section 2.1)."""

from __future__ import annotations

import torch
from torch import Tensor

from irnet.device_path import on_accelerator_path
from irnet.linear.base import AdjointOperator, LinearSolver, safe_norm
from irnet.per_sample import sample_norm
from irnet.linear.neumann_rows import neumann_rows
from irnet import progress as solve_progress
from irnet.progress import Progress, Record, settle_one, start
from irnet.stats import SolverStats, diverged_samples
from irnet.validation import check_bool, check_int


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
        fixed_count: sum exactly ``max_iter`` terms, with no stopping test, stall test or
            best-partial-sum tracking on the way; only the answer's residual (the next term)
            is measured, and ``converged`` says whether it meets ``rtol``. A solve costs the
            same whatever the data, and needs no host read.
    """

    def __init__(self, rtol: float = 1e-5, max_iter: int = 50, patience: int = 10,
                 fixed_count: bool = False) -> None:
        super().__init__(rtol, max_iter)
        self.patience = check_int("patience", patience, 1)
        self.fixed_count = check_bool("fixed_count", fixed_count)

    def solve(self, operator: AdjointOperator, b: Tensor) -> tuple[Tensor, SolverStats]:
        # As in the forward loop: per term only the product, the partial sum and the term's
        # norm; the bookkeeping (best partial sum, stalls, counts) is settled a few terms at
        # a time (irnet.progress). Absolute norms against ``rtol·‖b‖``; NaN fails every
        # comparison, so a non-finite sample stops.
        b_norm = safe_norm(b)
        tol = self.rtol * b_norm
        rows, _ = solve_progress.settle_schedule(b)
        if self.fixed_count:
            progress, res = self._sum_fixed_count(operator, b, tol)
        elif b.requires_grad or on_accelerator_path(b) or rows < 2:
            progress, res = self._sum_term_by_term(operator, b, tol)
        else:
            progress, res = self._sum_on_cpu(operator, b, tol, rows)
        converged = progress.best_res <= tol
        diverged = diverged_samples(converged, progress.iterations, self.max_iter, res)
        return progress.best, SolverStats(progress.iterations, progress.best_res / b_norm, converged, diverged)

    def _sum_on_cpu(self, operator: AdjointOperator, b: Tensor, tol: Tensor, rows: int) -> tuple[Progress, Tensor]:
        # The first terms one by one (most adjoint solves of a trained network end within them,
        # where the rows' setup and replay would cost more than they save), then the terms'
        # norms a few at a time (irnet.linear.neumann_rows).
        g, term = b, operator.vjp(b)
        res = sample_norm(term)
        progress = start(b, res, tol)._replace(iterations=torch.ones_like(res, dtype=torch.long))
        index = 0  # g is the partial sum of index + 1 terms
        while index + 1 < self.max_iter and bool(progress.active.any()):
            if index == solve_progress.ONE_BY_ONE_FIRST:
                return neumann_rows(operator.vjp, g, term, index + 1, progress, tol, self.max_iter, self.patience,
                                    rows)
            g = g + term
            term = operator.vjp(term)
            res = sample_norm(term)
            progress = settle_one(progress, g, res, tol, self.patience)
            index += 1
        return progress, res

    def _sum_fixed_count(self, operator: AdjointOperator, b: Tensor, tol: Tensor) -> tuple[Progress, Tensor]:
        g, term = b, operator.vjp(b)
        for _ in range(1, self.max_iter):
            g = g + term
            term = operator.vjp(term)
        res = sample_norm(term)  # the residual of the partial sum of max_iter terms
        iterations = torch.full_like(res, self.max_iter, dtype=torch.long)
        return Progress(g, res, res > tol, iterations, torch.zeros_like(iterations)), res

    def _sum_term_by_term(self, operator: AdjointOperator, b: Tensor, tol: Tensor) -> tuple[Progress, Tensor]:
        # Double backward (a graph through the adjoint), accelerators and states too large for rows:
        # each term's norm as it comes.
        g, term = b, operator.vjp(b)
        res = sample_norm(term)
        checks = self.stop_checks(getattr(operator, "owner", None), b)
        record = Record(start(g, res, tol)._replace(iterations=torch.ones_like(res, dtype=torch.long)), tol,
                        self.patience, checks)  # the first product served every sample
        if not record.done_at_start():
            for k in range(1, self.max_iter):
                slot = record.slot(g, ahead=0)  # the partial sum goes straight into the record
                g = g + term if slot is None else torch.add(g, term, out=slot)
                term = operator.vjp(term)
                res = sample_norm(term)
                if record.add(g, res, last=k + 1 == self.max_iter):
                    break
        self.remember(getattr(operator, "owner", None), b, record.taken, checks)
        return record.close(), res
