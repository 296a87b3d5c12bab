"""The fixed-point problem of an implicit layer and the iteration loop every solver shares.

:class:`NonlinearSolver` is what a block needs of a forward solver: ``solve``.
Most solvers are an :class:`IterativeSolver`: they only say how to start
(``init``) and how to take one step (``step``); its :meth:`IterativeSolver.solve`
owns stopping, per-sample freezing, keeping the best iterate and the statistics,
so all solvers report the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from irnet._iterate import Record, RemembersIterations, start
from irnet._misc import ArgsRepr, check_int, check_positive, sample_norm
from irnet.stats import SolverStats, diverged_samples


@dataclass
class FixedPointProblem:
    """Find y with ``y = c + θ F(y)``, i.e. ``r(y) = y − c − θ F(y) = 0``.

    For an implicit residual layer's linear θ-step ``c = x + (1 − θ) F(x)`` (paper eq. 7).
    With ``one_leg=True`` the problem is the one-leg θ-step ``y = c + F((1 − θ)c + θy)``
    with ``c = x``: again ``y = c + θ G(y)``, for ``G(y) = F((1 − θ)c + θy) / θ``, so every
    solver serves both. Keeping ``x`` in ``c`` (not inside a closure G) lets a copy of the
    problem with other rows of ``c`` (the line search's stacked trial steps) stay one.

    Attributes:
        F: the residual function.
        c: the explicit part, fixed during the solve (the input ``x`` of a one-leg step).
        theta: the implicitness θ.
        differentiable: build graphs through every operation (unrolled mode).
        measure_answer: whether a fixed-count solve measures its answer's residual (one more
            evaluation of F); ``False`` where the caller evaluates F at the answer anyway and
            measures it there (:meth:`irnet.solvers.FixedPoint.answer_stats`).
        one_leg: the one-leg form ``y = c + F((1 − θ)c + θy)`` (docs/schemes.md).

    Example:
        The one-leg midpoint step (θ = ½) of ``F(y) = −y`` from ``c = 3``: ``y = 3 − (3 + y)/2``,
        so ``y = 1``; its map at the answer gives it back:

        >>> problem = FixedPointProblem(lambda y: -y, torch.tensor([[3.0]]), 0.5, one_leg=True)
        >>> problem.map(torch.tensor([[1.0]]))
        tensor([[1.]])
    """

    F: Callable[[Tensor], Tensor]
    c: Tensor
    theta: float
    differentiable: bool = False
    measure_answer: bool = True
    one_leg: bool = False

    def map(self, y: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """The fixed-point map ``g(y) = c + θ F(y)``, or ``c + F((1 − θ)c + θy)`` for a one-leg
        problem (one fused add; into ``out`` if given)."""
        if self.one_leg:
            f = self.F(self.stage(y))
            return torch.add(self.c, f) if out is None else torch.add(self.c, f, out=out)
        if out is None:
            return torch.add(self.c, self.F(y), alpha=self.theta)
        return torch.add(self.c, self.F(y), alpha=self.theta, out=out)

    def stage(self, y: Tensor) -> Tensor:
        """Where a one-leg step evaluates F: ``(1 − θ)c + θy`` (``y`` itself at θ = 1)."""
        return y if self.theta == 1 else torch.lerp(self.c, y, self.theta)

    def residual(self, y: Tensor) -> Tensor:
        """``r(y) = y − g(y)``."""
        return y - self.map(y)

    def outside_inference(self) -> "FixedPointProblem":
        """A copy whose ``c`` is an ordinary tensor, for use under ``inference_mode(False)``.

        Tensors made under ``torch.inference_mode()`` cannot enter an autograd
        graph; a clone made outside inference mode can.
        """
        return replace(self, c=self.c.clone())

    def residual_and_gradient(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``r(y)`` and ``∇ ½‖r(y)‖² = (I − θ ∂F/∂y)ᵀ r(y)`` by one vector–Jacobian product.

        (For a one-leg problem ``∂F/∂y`` is taken at the stage ``(1 − θ)c + θy``.)

        Works under ``torch.inference_mode()`` too (on fresh copies outside it),
        though :meth:`NonlinearSolver.solve` leaves inference mode once per solve.
        """
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                return self.outside_inference().residual_and_gradient(y.clone())
        # Unrolled mode builds graphs only where the caller records them (not under no_grad).
        graph = self.differentiable and torch.is_grad_enabled()
        with torch.enable_grad():
            # With a graph: a fresh node ``y.view_as(y)`` so the product only follows
            # paths through this use of y — not through c, which shares y's history
            # when y⁰ = x — and ``r`` itself as the vector, so the graph keeps the
            # Gauss–Newton term (I − θJ)ᵀ(I − θJ). A y outside any graph (data, a
            # frozen F) is a constant: a detached leaf serves both modes.
            if graph and y.requires_grad:
                leaf = y.view_as(y)
            else:
                leaf = y.detach().requires_grad_()
            r = self.residual(leaf)
            (grad,) = torch.autograd.grad(r, leaf, r if graph else r.detach(), create_graph=graph)
        # ∂(r·v)/∂y = v − θ Jᵀv with v = r: the gradient of ½‖r‖².
        if not graph:
            r = r.detach()
        return r, grad


class IterState(NamedTuple):
    """What the shared loop reads from any solver's state: the iterate and its residual."""

    y: Tensor
    r: Tensor


class NonlinearSolver(ArgsRepr, RemembersIterations, ABC):
    """Base class of the forward solvers: :meth:`solve` finds the fixed point of a problem.

    A solver that differentiates ``½‖r‖²`` sets ``uses_autograd = True``; its
    solve then leaves ``torch.inference_mode()`` (in which Lightning runs the
    sanity check, validate, test and predict), on fresh copies of its inputs,
    with the caller's grad mode. The answer is the same as outside inference mode.

    Args:
        atol: absolute tolerance on the Euclidean norm of each sample's residual,
            ``‖y − x − (1−θ)F(x) − θF(y)‖₂ ≤ atol`` (one-leg: ``‖y − x − F((1−θ)x + θy)‖₂``).
        max_iter: the most iterations per solve.
    """

    uses_autograd: bool = False

    def __init__(self, atol: float = 1e-5, max_iter: int = 50) -> None:
        self.atol = check_positive("atol", atol)
        self.max_iter = check_int("max_iter", max_iter, 1)

    @abstractmethod
    def solve(self, problem: FixedPointProblem, y0: Tensor) -> tuple[Tensor, SolverStats]:
        """The fixed point of ``problem`` from the initial guess ``y0``; per-sample statistics."""


class IterativeSolver(NonlinearSolver):
    """A forward solver that iterates ``init`` and ``step`` in the loop all solvers share."""

    # -- what a solver provides ------------------------------------------------
    @abstractmethod
    def init(self, problem: FixedPointProblem, y0: Tensor):
        """Solver state at the initial guess; must expose ``y`` and ``r`` (residual at y)."""

    @abstractmethod
    def step(self, problem: FixedPointProblem, state):
        """One iteration; returns the next state."""

    def step_into(self, problem: FixedPointProblem, state, out: Optional[Tensor]):
        """:meth:`step`, with the iterate after next computed into ``out`` where the solver can
        (saving the loop's copy of it); by default ``out`` is ignored."""
        return self.step(problem, state)

    # -- the shared loop -------------------------------------------------------
    def solve(self, problem: FixedPointProblem, y0: Tensor) -> tuple[Tensor, SolverStats]:
        """Iterate from ``y0`` until every sample meets ``atol`` or ``max_iter`` is reached.

        Each sample is frozen at its first iterate within tolerance (later steps,
        taken for the rest of the batch, do not change its answer or its stats).
        A sample that never converges returns its lowest-residual iterate, which
        is finite whenever ``y0`` is; a sample whose iterates become non-finite
        stops early and is marked diverged.

        Returns:
            The solution and its :class:`~irnet.stats.SolverStats`.
        """
        if self.uses_autograd and torch.is_inference_mode_enabled():
            # inference_mode(False) turns grad mode on: restore the caller's (off).
            grad = torch.is_grad_enabled()
            with torch.inference_mode(False), torch.set_grad_enabled(grad):
                return self._iterate(problem.outside_inference(), y0.clone())
        return self._iterate(problem, y0)

    def _iterate(self, problem: FixedPointProblem, y0: Tensor) -> tuple[Tensor, SolverStats]:
        # Per iteration only the step and its residual norms; the per-sample bookkeeping
        # (freezing, best iterate, counts) is settled a few iterations at a time
        # (irnet._iterate), with the same answers as after every iteration. Comparisons
        # with NaN are false, so no separate finiteness test: a non-finite sample stops.
        state = self.init(problem, y0)
        res = sample_norm(state.r)
        checks = self.stop_checks(problem.F, y0)
        record = Record(start(state.y, res, self.atol), self.atol, checks=checks)
        # An unrolled solve's iterates carry a graph (through c) even from a constant start: no
        # slots.
        graph = problem.differentiable and torch.is_grad_enabled()
        if not record.done_at_start():
            for k in range(self.max_iter):
                state = self.step_into(
                    problem, state, None if graph else record.slot(state.y, ahead=1)
                )
                res = sample_norm(state.r)
                if record.add(state.y, res, last=k + 1 == self.max_iter):
                    break
        self.remember(problem.F, y0, record.taken, checks)
        progress = record.close()
        converged = progress.best_res <= self.atol
        stats = SolverStats(
            iterations=progress.iterations,
            residual=progress.best_res.detach(),
            converged=converged,
            diverged=diverged_samples(converged, progress.iterations, self.max_iter, res),
        )
        return progress.best, stats
