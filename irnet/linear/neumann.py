"""The Neumann series for the adjoint, ``(I − P)⁻¹ b = Σᵢ Pⁱ b``, and its loop over rows.

:class:`Neumann` solves the adjoint system with ``P = θ J_F(y)ᵀ`` (paper section 2.1). After
``k`` terms the residual of the partial sum is the next term, so on the CPU path without a
graph (:func:`neumann_rows`) the loop only adds each term into a row of a scratch buffer and
makes the next vector–Jacobian product (copied into a row beside it). The norms of several
terms come from one norm over their rows, looked at where :class:`irnet._iterate.CheckSchedule`
predicts the series to meet its tolerance; the per-sample bookkeeping (best partial sum,
stalls, counts) is settled from them by :func:`irnet._iterate.settle`, exactly as if it were
done after every term.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from irnet import _iterate as solve_progress
from irnet._iterate import (
    CheckSchedule,
    Progress,
    Record,
    give_back_scratch,
    settle,
    settle_one,
    start,
    take_scratch,
)
from irnet._misc import check_bool, check_int, row_sample_norms, sample_norm
from irnet.device_path import on_accelerator_path
from irnet.linear.base import AdjointOperator, LinearSolver, safe_norm
from irnet.stats import SolverStats, diverged_samples


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

    Example:
        For ``F(y) = A y`` the adjoint system is ``(I − θA)ᵀ g = b``:

        >>> from irnet.linear import AdjointOperator, Neumann
        >>> A = torch.tensor([[0.5, 0.2], [-0.1, 0.3]])  # spectral radius ≈ 0.41
        >>> operator = AdjointOperator(lambda y: y @ A.T, torch.zeros(1, 2), theta=1.0)
        >>> b = torch.tensor([[1.0, -1.0]])
        >>> g, stats = Neumann(rtol=1e-6, max_iter=100).solve(operator, b)
        >>> exact = torch.linalg.solve((torch.eye(2) - A).T, b.T).T
        >>> torch.allclose(g, exact, atol=1e-5)
        True
        >>> stats.converged
        tensor([True])
    """

    def __init__(
        self, rtol: float = 1e-5, max_iter: int = 50, patience: int = 10, fixed_count: bool = False
    ) -> None:
        super().__init__(rtol, max_iter)
        self.patience = check_int("patience", patience, 1)
        self.fixed_count = check_bool("fixed_count", fixed_count)

    def solve(self, operator: AdjointOperator, b: Tensor) -> tuple[Tensor, SolverStats]:
        # As in the forward loop: per term only the product, the partial sum and the term's
        # norm; the bookkeeping (best partial sum, stalls, counts) is settled a few terms at
        # a time (irnet._iterate). Absolute norms against ``rtol·‖b‖``; NaN fails every
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
        return progress.best, SolverStats(
            progress.iterations, progress.best_res / b_norm, converged, diverged
        )

    def _sum_on_cpu(
        self, operator: AdjointOperator, b: Tensor, tol: Tensor, rows: int
    ) -> tuple[Progress, Tensor]:
        # The first terms one by one (most adjoint solves of a trained network end within them,
        # where the rows' setup and replay would cost more than they save), then the terms'
        # norms a few at a time (neumann_rows, below).
        g, term = b, operator.vjp(b)
        res = sample_norm(term)
        progress = start(b, res, tol)._replace(iterations=torch.ones_like(res, dtype=torch.long))
        index = 0  # g is the partial sum of index + 1 terms
        while index + 1 < self.max_iter and bool(progress.active.any()):
            if index == solve_progress.ONE_BY_ONE_FIRST:
                return neumann_rows(
                    operator.vjp,
                    g,
                    term,
                    index + 1,
                    progress,
                    tol,
                    self.max_iter,
                    self.patience,
                    rows,
                )
            g = g + term
            term = operator.vjp(term)
            res = sample_norm(term)
            progress = settle_one(progress, g, res, tol, self.patience)
            index += 1
        return progress, res

    def _sum_fixed_count(
        self, operator: AdjointOperator, b: Tensor, tol: Tensor
    ) -> tuple[Progress, Tensor]:
        g, term = b, operator.vjp(b)
        for _ in range(1, self.max_iter):
            g = g + term
            term = operator.vjp(term)
        res = sample_norm(term)  # the residual of the partial sum of max_iter terms
        iterations = torch.full_like(res, self.max_iter, dtype=torch.long)
        return Progress(g, res, res > tol, iterations, torch.zeros_like(iterations)), res

    def _sum_term_by_term(
        self, operator: AdjointOperator, b: Tensor, tol: Tensor
    ) -> tuple[Progress, Tensor]:
        # Double backward (a graph through the adjoint), accelerators and states too large for
        # rows: each term's norm as it comes.
        g, term = b, operator.vjp(b)
        res = sample_norm(term)
        checks = self.stop_checks(getattr(operator, "owner", None), b)
        # the first product served every sample
        progress = start(g, res, tol)._replace(iterations=torch.ones_like(res, dtype=torch.long))
        record = Record(progress, tol, self.patience, checks)
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


class SeriesResult(NamedTuple):
    progress: Progress
    last_res: Tensor  # the norms of the last term computed


def neumann_rows(
    vjp: Callable[[Tensor], Tensor],
    g: Tensor,
    term: Tensor,
    index: int,
    progress: Progress,
    tol: Tensor,
    max_iter: int,
    patience: int,
    rows_per_settlement: int,
) -> SeriesResult:
    """Sum the series ``b + P b + P² b + …`` (``P`` applied by ``vjp``) on from the partial sum
    ``g`` of ``index`` terms and its residual ``term`` (the next term), to at most ``max_iter``
    terms.

    ``progress`` is the bookkeeping up to ``g``; ``tol`` the per-sample tolerance on the residual.
    At most ``rows_per_settlement`` (≥ 2) partial sums are kept before their bookkeeping is
    settled.
    """
    # Partial sums and terms both live in scratch rows: a product's fresh tensor is freed at
    # once, so the heap does not grow and shrink by a solve's worth of terms (page faults).
    rows = take_scratch(g, 2 * (rows_per_settlement + 1))
    try:
        sums, terms = rows.chunk(2)
        torch.add(g, term, out=sums[0])
        terms[0].copy_(vjp(term))
        return _sum(vjp, index, progress, sums, terms, tol, max_iter, patience)
    finally:
        give_back_scratch(rows)


def _sum(
    vjp,
    base: int,
    progress: Progress,
    rows: Tensor,
    terms: Tensor,
    tol: Tensor,
    max_iter: int,
    patience: int,
) -> SeriesResult:
    # rows[i] holds the partial sum of base + i + 1 terms and terms[i] its residual, the next
    # term; the norms of terms[:normed] are known. The last partial sum that may be an answer
    # has max_iter terms.
    capacity = rows.shape[0]
    top, normed = 0, 0
    norms: list[Tensor] = []
    schedule = CheckSchedule(first=base)
    while True:
        newest = base + top
        last, full = newest + 1 == max_iter, top + 1 == capacity
        if schedule.due(newest) or last or full:
            norms.append(row_sample_norms(terms[normed : top + 1]))
            normed = top + 1
            # NaN compares false: a non-finite sample stops
            excess = float((norms[-1][-1] / tol).amax())
            schedule.seen(newest, excess)
            if not excess > 1 or last or full:
                progress = settle(progress, rows[:normed], torch.cat(norms), tol, patience)
                if last or not bool(progress.active.any()):
                    return SeriesResult(progress, norms[-1][-1])
                # The next partial sum starts the next settlement.
                torch.add(rows[top], terms[top], out=rows[0])
                terms[0].copy_(vjp(terms[top]))
                base, top, normed, norms = newest + 1, 0, 0, []
                continue
        torch.add(rows[top], terms[top], out=rows[top + 1])
        terms[top + 1].copy_(vjp(terms[top]))
        top += 1
