"""Plain fixed-point (Picard) iteration ``y ← x + (1−θ)F(x) + θF(y)``."""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

from irnet.solvers.base import FixedPointProblem, NonlinearSolver


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
    """

    def init(self, problem: FixedPointProblem, y0: Tensor, out: Optional[Tensor] = None) -> _State:
        g = problem.map(y0, out)
        return _State(y=y0, r=y0 - g, g=g)

    def step(self, problem: FixedPointProblem, state: _State) -> _State:
        return self.init(problem, state.g)

    def step_into(self, problem: FixedPointProblem, state: _State, out: Optional[Tensor]) -> _State:
        return self.init(problem, state.g, out)  # g, the next step's iterate, goes straight to ``out``
