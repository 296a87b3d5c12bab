"""The Neumann series' loop with the norms of its terms computed a few terms at a time.

After ``k`` terms the residual of the partial sum is the next term, so per term the loop only
adds the term into a row of a scratch buffer and makes the next vector–Jacobian product (copied
into a row beside it). The norms of several terms come from one norm over their rows, looked at where
:class:`irnet.progress.CheckSchedule` predicts the series to meet its tolerance; the per-sample
bookkeeping (best partial sum, stalls, counts) is settled from them by
:func:`irnet.progress.settle`, exactly as if it were done after every term.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from irnet.per_sample import row_sample_norms
from irnet.progress import CheckSchedule, Progress, give_back_scratch, settle, take_scratch


class SeriesResult(NamedTuple):
    progress: Progress
    last_res: Tensor  # the norms of the last term computed


def neumann_rows(vjp: Callable[[Tensor], Tensor], g: Tensor, term: Tensor, index: int, progress: Progress,
                 tol: Tensor, max_iter: int, patience: int, rows_per_settlement: int) -> SeriesResult:
    """Sum the series ``b + P b + P² b + …`` (``P`` applied by ``vjp``) on from the partial sum ``g`` of
    ``index`` terms and its residual ``term`` (the next term), to at most ``max_iter`` terms.

    ``progress`` is the bookkeeping up to ``g``; ``tol`` the per-sample tolerance on the residual.
    At most ``rows_per_settlement`` (≥ 2) partial sums are kept before their bookkeeping is settled.
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


def _sum(vjp, base: int, progress: Progress, rows: Tensor, terms: Tensor, tol: Tensor, max_iter: int,
         patience: int) -> SeriesResult:
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
            norms.append(row_sample_norms(terms[normed:top + 1]))
            normed = top + 1
            excess = float((norms[-1][-1] / tol).amax())  # NaN compares false: a non-finite sample stops
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


__all__ = ["SeriesResult", "neumann_rows"]
