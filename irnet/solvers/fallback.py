"""A chain of forward solvers: each sample is handed on until one of them solves it.

Between two links the chain reads whether any sample is left unsolved (one host read). On the
accelerator path (:mod:`irnet.device_path`) it skips that read after a link whose loop ran to
its ``max_iter`` without looking (most often because it left samples unsolved): the next link
runs at once, samples already solved start inside tolerance and are frozen (their answers,
counts and finishing method stay as they were), and that link's own looks say when it is done.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from irnet._iterate import solve_key
from irnet._misc import per_sample
from irnet.device_path import on_accelerator_path
from irnet.solvers.base import FixedPointProblem, NonlinearSolver
from irnet.stats import SolverStats


class Fallback(NonlinearSolver):
    """Run ``solvers`` in turn; a sample moves on to the next one only if the last failed it.

    The first solver runs on the whole batch. A sample that it leaves unsolved
    goes on to the next solver: from its best iterate if it stalled (still
    above ``atol`` after ``max_iter``), from the solve's start ``y0`` if it
    diverged (non-finite iterates). Every solver runs on the whole batch, so a
    held dropout mask or any per-sample ``F`` sees the batch it was built for;
    samples already within ``atol`` start inside tolerance and are frozen by
    the shared loop at once (0 iterations, answer unchanged; they still ride
    along in the batch's evaluations of F). The chain stops
    as soon as every sample is solved (one host read per solver used; on the
    accelerator path none after a solver that ran to its ``max_iter``).

    Typical chain: ``FixedPoint`` (cheap, enough for contracting layers),
    then ``Anderson``, then ``Broyden`` (no contraction needed).

    Statistics: ``iterations`` is the sum over the solvers a sample went
    through; ``residual`` the lowest residual found by any of them (its
    iterate is the answer); ``method`` the index in ``solvers`` of the solver
    that finished the sample (the last one tried for a sample none solved).
    A sample solved at its start counts as finished by the first solver.

    Args:
        solvers: at least one forward solver, all with the same ``atol`` (the
            chain's tolerance: "solved" must mean the same thing at every link).
            ``max_iter`` of the chain is the sum of theirs.

    Example:
        >>> from irnet.solvers import Anderson, Broyden, Fallback, FixedPoint
        >>> solver = Fallback([FixedPoint(max_iter=30), Anderson(), Broyden()])
        >>> solver.max_iter
        130
    """

    def __init__(self, solvers: Sequence[NonlinearSolver]) -> None:
        self.solvers = self._check(solvers)
        super().__init__(self.solvers[0].atol, sum(s.max_iter for s in self.solvers))

    @staticmethod
    def _check(solvers: Sequence[NonlinearSolver]) -> list[NonlinearSolver]:
        if isinstance(solvers, NonlinearSolver) or not isinstance(solvers, (list, tuple)):
            raise ValueError(f"solvers must be a list of irnet.solvers solvers, got {solvers!r}")
        solvers = list(solvers)
        if not solvers:
            raise ValueError("solvers must hold at least one irnet.solvers solver, got []")
        for s in solvers:
            if not isinstance(s, NonlinearSolver) or isinstance(s, Fallback):
                raise ValueError(
                    "solvers must hold irnet.solvers solvers (not a Fallback), "
                    f"got {type(s).__name__}"
                )
        atols = [s.atol for s in solvers]
        if len(set(atols)) > 1:
            raise ValueError(
                f"solvers must all have the same atol (the chain's tolerance), got {atols}"
            )
        return solvers

    @property
    def method_names(self) -> list[str]:
        """One name per solver, for logs: its class name, or ``<name>_<index>`` if it repeats."""
        names = [type(s).__name__ for s in self.solvers]
        return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]

    def solve(self, problem: FixedPointProblem, y0: Tensor) -> tuple[Tensor, SolverStats]:
        """Solve with each solver in turn, handing on the samples the previous one left unsolved.

        Each solver handles inference mode itself (see ``uses_autograd``).

        Returns:
            The solution and its :class:`~irnet.stats.SolverStats`, with ``method`` set.
        """
        y, stats = self.solvers[0].solve(problem, y0)
        best_y, best_res, iterations = y, stats.residual, stats.iterations
        method = torch.zeros_like(stats.iterations)
        accelerator = on_accelerator_path(y0)
        for index, solver in enumerate(self.solvers[1:], start=1):
            unsolved = ~(best_res <= self.atol)
            # The one host read per link; on the accelerator path none after a link that ran to its
            # max_iter: the next link's own looks find out whether any sample is left.
            if accelerator and _solved_all(self.solvers[index - 1], problem, y0):
                # its last look saw every sample within the chain's tolerance (the links share it)
                break
            read = not (accelerator and _ran_to_the_end(self.solvers[index - 1], problem, y0))
            if read and not bool(unsolved.any()):
                break
            start = torch.where(per_sample(stats.diverged, y), y0, y)
            y, stats = solver.solve(problem, start)
            take = (stats.residual < best_res) | torch.isnan(best_res)
            best_y = torch.where(per_sample(take, best_y), y, best_y)
            best_res = torch.where(take, stats.residual, best_res)
            iterations = iterations + stats.iterations
            method = torch.where(unsolved, index, method)
        converged = best_res <= self.atol
        return best_y, SolverStats(
            iterations=iterations,
            residual=best_res,
            converged=converged,
            diverged=stats.diverged & ~converged,
            method=method,
        )

    def __repr__(self) -> str:
        return f"Fallback(solvers={self.solvers!r})"


def _solved_all(solver: NonlinearSolver, problem: FixedPointProblem, like: Tensor) -> bool:
    """Whether ``solver``'s last solve of ``problem`` (on the accelerator path) was seen by its last
    look to end with every sample within tolerance."""
    return solver.iteration_memory.solved_all(solve_key(problem.F, like))


def _ran_to_the_end(solver: NonlinearSolver, problem: FixedPointProblem, like: Tensor) -> bool:
    """Whether ``solver``'s last solve of ``problem`` (on the accelerator path) took its
    ``max_iter`` iterations, so that its loop ended without a look: what it remembered taking, or a
    fixed count."""
    if getattr(solver, "fixed_count", False):
        return True
    return solver.iteration_memory.ran_out(solve_key(problem.F, like))
