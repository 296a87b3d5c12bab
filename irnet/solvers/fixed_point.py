"""Plain fixed-point (Picard) iteration ``y ← x + (1−θ)F(x) + θF(y)``."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from irnet import progress as solve_progress
from irnet.device_path import on_accelerator_path
from irnet.per_sample import sample_norm
from irnet.progress import settle_one, start
from irnet.solvers.base import FixedPointProblem, NonlinearSolver
from irnet.solvers.picard_rows import picard_rows
from irnet.stats import SolverStats, diverged_samples
from irnet.validation import check_bool


class _State(NamedTuple):
    y: Tensor
    r: Tensor
    g: Tensor  # g(y), the next iterate


class FixedPoint(NonlinearSolver):
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
        return self.init(problem, state.g, out)  # g, the next step's iterate, goes straight to ``out``

    def _iterate(self, problem: FixedPointProblem, y0: Tensor) -> tuple[Tensor, SolverStats]:
        if self.fixed_count:
            return self._iterate_fixed_count(problem, y0)
        # Without a graph on the CPU the residual norms are computed several at a time from the
        # iterates (irnet.solvers.picard_rows); the shared loop serves unrolled solves (each
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
                progress, last_res = picard_rows(problem, state.g, taken + 1, progress, self.atol, self.max_iter,
                                                 rows)
                break
            state = self.step(problem, state)
            last_res = sample_norm(state.r)
            progress = settle_one(progress, state.y, last_res, self.atol)
            taken += 1
        converged = progress.best_res <= self.atol
        diverged = diverged_samples(converged, progress.iterations, self.max_iter, last_res)
        return progress.best, SolverStats(progress.iterations, progress.best_res.detach(), converged, diverged)

    def _iterate_fixed_count(self, problem: FixedPointProblem, y0: Tensor) -> tuple[Tensor, Optional[SolverStats]]:
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
        diverged = diverged_samples(converged, iterations, self.max_iter, res)  # a non-finite answer
        return SolverStats(iterations, res.detach(), converged, diverged)
