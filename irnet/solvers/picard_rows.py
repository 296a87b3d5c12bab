"""The fixed-point iteration's loop with its residual norms computed a few iterations at a time.

A Picard step's residual is the step itself, ``r(yₖ) = yₖ − yₖ₊₁``. So the loop only evaluates
the map, each iterate straight into a row of a scratch buffer, and computes the residual norms
of several iterations at once from the differences of consecutive rows: one subtraction and
one norm for the lot instead of two small operations, a host read and the bookkeeping's Python
per iteration. The per-sample bookkeeping (freezing, best iterate, counts) is settled from
those norms by :func:`irnet.progress.settle`, so answers and statistics are exactly those of
checking after every iteration.

The cost is that the loop learns that every sample has converged only at a check, which
:class:`irnet.progress.CheckSchedule` places where the residuals are predicted to meet the
tolerance.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from irnet.per_sample import row_sample_norms
from irnet.progress import CheckSchedule, Progress, give_back_scratch, settle, take_scratch


class PicardResult(NamedTuple):
    progress: Progress
    last_res: Tensor  # the residual norms of the last iterate whose residual was computed


def picard_rows(problem, y: Tensor, index: int, progress: Progress, atol: float, max_iter: int,
                rows_per_settlement: int) -> PicardResult:
    """Iterate ``y ← problem.map(y)`` (no autograd graph) on from the iterate ``y`` of number ``index``
    (≥ 1, ≤ ``max_iter``), whose residual is not yet known, to at most iterate ``max_iter``.

    ``progress`` is the bookkeeping of the iterates before it. At most ``rows_per_settlement`` (≥ 2)
    iterates are kept before their bookkeeping is settled.
    """
    rows = take_scratch(y, rows_per_settlement + 1)
    try:
        rows[0].copy_(y)
        return _iterate(problem, index, progress, rows, atol, max_iter)
    finally:
        give_back_scratch(rows)


def _iterate(problem, base: int, progress: Progress, rows: Tensor, atol: float, max_iter: int) -> PicardResult:
    # rows[i] holds the iterate of index base + i; rows[:normed] have known residual norms,
    # rows[:top + 1] are computed. Index max_iter is the last iterate that may be an answer;
    # its residual needs one more evaluation.
    capacity = rows.shape[0] - 1
    top, normed = 0, 0
    norms: list[Tensor] = []
    schedule = CheckSchedule(first=base)
    while True:
        problem.map(rows[top], out=rows[top + 1])
        top += 1
        newest = base + top - 1  # the newest iterate whose residual is now computable
        if not (schedule.due(newest) or newest == max_iter or top == capacity):
            continue
        norms.append(row_sample_norms(rows[normed:top] - rows[normed + 1:top + 1]))  # r(yₖ) = yₖ − yₖ₊₁
        normed = top
        largest = float(norms[-1][-1].amax())  # NaN compares false: a non-finite sample stops
        schedule.seen(newest, largest / atol)
        if largest > atol and newest < max_iter and top < capacity:
            continue
        progress = settle(progress, rows[:normed], torch.cat(norms), atol)
        if newest == max_iter or not bool(progress.active.any()):
            return PicardResult(progress, norms[-1][-1])
        # Start the next settlement from the one computed iterate whose residual is unknown.
        rows[0].copy_(rows[top])
        base, top, normed, norms = base + top, 0, 0, []


__all__ = ["PicardResult", "picard_rows"]
