"""Plain fixed-point (Picard) iteration ``y ← x + (1−θ)F(x) + θF(y)``, and its loop over rows.

:class:`FixedPoint` is the forward solver. Without an autograd graph on the CPU path, its loop
(:func:`picard_rows`) computes the residual norms a few iterations at a time. A Picard step's
residual is the step itself, ``r(yₖ) = yₖ − yₖ₊₁``, so the loop only evaluates the map, each
iterate straight into a row of a scratch buffer, and computes the residual norms of several
iterations at once from the differences of consecutive rows: one subtraction and one norm for
the lot instead of two small operations, a host read and the bookkeeping's Python per
iteration. The per-sample bookkeeping (freezing, best iterate, counts) is settled from those
norms by :func:`irnet._iterate.settle`, so answers and statistics are exactly those of checking
after every iteration. The cost is that the loop learns that every sample has converged only at
a check, which :class:`irnet._iterate.CheckSchedule` places where the residuals are predicted to
meet the tolerance.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from irnet import _iterate as solve_progress
from irnet._iterate import (
    CheckSchedule,
    Progress,
    give_back_scratch,
    settle,
    settle_one,
    start,
    take_scratch,
)
from irnet._misc import check_bool, row_sample_norms, sample_norm
from irnet.device_path import on_accelerator_path
from irnet.solvers.base import FixedPointProblem, IterativeSolver
from irnet.stats import SolverStats, diverged_samples


class _State(NamedTuple):
    y: Tensor
    r: Tensor
    g: Tensor  # g(y), the next iterate


class FixedPoint(IterativeSolver):
    """Fixed-point iteration from ``y⁰ = x``, so its first iterate is the explicit layer.

    Converges when ``θF`` is a contraction; one evaluation of ``F`` per iteration.

    Args:
        atol: absolute tolerance on each sample's residual norm ``‖r(y)‖₂``.
        max_iter: the most iterations.
        fixed_count: take exactly ``max_iter`` iterations and return the last iterate, with no
            stopping test, per-sample freezing or best-iterate tracking on the way (a fixed-depth
            solve). Only the answer's residual is computed, by one more evaluation of ``F``;
            the statistics report it, ``converged`` where it meets ``atol``. A solve costs the
            same whatever the data, and needs no host read.

    Example:
        The fixed point of ``y = c + A y`` for a contraction ``A`` is ``(I − A)⁻¹ c``:

        >>> from irnet.solvers import FixedPoint, FixedPointProblem
        >>> A = torch.tensor([[0.5, 0.2], [-0.1, 0.3]])
        >>> c = torch.tensor([[1.0, 2.0], [0.0, -1.0]])  # two samples
        >>> problem = FixedPointProblem(F=lambda y: y @ A.T, c=c, theta=1.0)
        >>> y, stats = FixedPoint(atol=1e-6, max_iter=100).solve(problem, c)
        >>> exact = torch.linalg.solve(torch.eye(2) - A, c.T).T
        >>> torch.allclose(y, exact, atol=1e-5)
        True
        >>> stats.converged
        tensor([True, True])
    """

    def __init__(self, atol: float = 1e-5, max_iter: int = 50, fixed_count: bool = False) -> None:
        super().__init__(atol, max_iter)
        self.fixed_count = check_bool("fixed_count", fixed_count)

    def init(self, problem: FixedPointProblem, y0: Tensor, out: Optional[Tensor] = None) -> _State:
        g = problem.map(y0, out)
        return _State(y=y0, r=y0 - g, g=g)

    def step(self, problem: FixedPointProblem, state: _State) -> _State:
        return self.init(problem, state.g)

    def step_into(self, problem: FixedPointProblem, state: _State, out: Optional[Tensor]) -> _State:
        # g, the next step's iterate, goes straight to ``out``
        return self.init(problem, state.g, out)

    def _iterate(self, problem: FixedPointProblem, y0: Tensor) -> tuple[Tensor, SolverStats]:
        if self.fixed_count:
            return self._iterate_fixed_count(problem, y0)
        # Without a graph on the CPU the residual norms are computed several at a time from the
        # iterates (picard_rows, below); the shared loop serves unrolled solves (each
        # iterate keeps its graph) and accelerators (whose own schedule avoids host reads).
        rows, _ = solve_progress.settle_schedule(y0)
        if problem.differentiable or y0.requires_grad or on_accelerator_path(y0) or rows < 2:
            return super()._iterate(problem, y0)
        # The first iterations one by one, as the shared loop takes them: most solves of a trained
        # network end within them, where the rows' setup and replay would cost more than they save.
        state = self.init(problem, y0)
        last_res = sample_norm(state.r)
        progress = start(y0, last_res, self.atol)
        taken = 0
        while taken < self.max_iter and bool(progress.active.any()):
            if taken == solve_progress.ONE_BY_ONE_FIRST:
                progress, last_res = picard_rows(
                    problem, state.g, taken + 1, progress, self.atol, self.max_iter, rows
                )
                break
            state = self.step(problem, state)
            last_res = sample_norm(state.r)
            progress = settle_one(progress, state.y, last_res, self.atol)
            taken += 1
        converged = progress.best_res <= self.atol
        diverged = diverged_samples(converged, progress.iterations, self.max_iter, last_res)
        return progress.best, SolverStats(
            progress.iterations, progress.best_res.detach(), converged, diverged
        )

    def _iterate_fixed_count(
        self, problem: FixedPointProblem, y0: Tensor
    ) -> tuple[Tensor, Optional[SolverStats]]:
        y = y0
        for _ in range(self.max_iter):
            y = problem.map(y)
        if not problem.measure_answer:  # the caller measures it (and makes the statistics)
            return y, None
        return y, self.answer_stats(sample_norm(y - problem.map(y)))

    def answer_stats(self, res: Tensor) -> SolverStats:
        """The statistics of a fixed-count solve whose answer has residual norms ``res``."""
        iterations = torch.full_like(res, self.max_iter, dtype=torch.long)
        converged = res <= self.atol
        diverged = diverged_samples(converged, iterations, self.max_iter, res)  # non-finite answer
        return SolverStats(iterations, res.detach(), converged, diverged)


class PicardResult(NamedTuple):
    progress: Progress
    last_res: Tensor  # the residual norms of the last iterate whose residual was computed


def picard_rows(
    problem,
    y: Tensor,
    index: int,
    progress: Progress,
    atol: float,
    max_iter: int,
    rows_per_settlement: int,
) -> PicardResult:
    """Iterate ``y ← problem.map(y)`` (no autograd graph) on from the iterate ``y`` of number
    ``index`` (≥ 1, ≤ ``max_iter``), whose residual is not yet known, to at most iterate
    ``max_iter``.

    ``progress`` is the bookkeeping of the iterates before it. At most ``rows_per_settlement``
    (≥ 2) iterates are kept before their bookkeeping is settled.
    """
    rows = take_scratch(y, rows_per_settlement + 1)
    try:
        rows[0].copy_(y)
        return _iterate(problem, index, progress, rows, atol, max_iter)
    finally:
        give_back_scratch(rows)


def _iterate(
    problem, base: int, progress: Progress, rows: Tensor, atol: float, max_iter: int
) -> PicardResult:
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
        # r(yₖ) = yₖ − yₖ₊₁
        norms.append(row_sample_norms(rows[normed:top] - rows[normed + 1 : top + 1]))
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
