"""Gradient descent on ``½‖r(y)‖²`` (paper section 2.1, "Forward propagation")."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from irnet._misc import check_int, sample_dot
from irnet.solvers._line_search import line_search
from irnet.solvers.base import FixedPointProblem, IterativeSolver


class _State(NamedTuple):
    y: Tensor
    r: Tensor
    grad: Tensor  # (I − θ ∂F/∂y)ᵀ r
    step: Tensor  # last accepted step, per sample


class GradientDescent(IterativeSolver):
    """Steepest descent ``y ← y − λ (I − θ ∂F/∂y)ᵀ r(y)`` with a per-sample line search.

    The gradient costs one vector–Jacobian product; the step comes from
    :func:`~irnet.solvers._line_search.line_search`, started from twice the last
    accepted step. Works where fixed-point iteration diverges (θF expansive),
    at the price of a few more evaluations of ``F`` per iteration.

    Args:
        atol: absolute tolerance on each sample's residual norm ``‖r(y)‖₂``.
        max_iter: the most iterations.
        max_backtracks: the most step halvings per line search.
    """

    uses_autograd = True

    def __init__(self, atol: float = 1e-5, max_iter: int = 50, max_backtracks: int = 10) -> None:
        super().__init__(atol, max_iter)
        self.max_backtracks = check_int("max_backtracks", max_backtracks, 0)

    def init(self, problem: FixedPointProblem, y0: Tensor) -> _State:
        r, grad = problem.residual_and_gradient(y0)
        step = torch.full((y0.shape[0],), 0.5, dtype=y0.dtype, device=y0.device)
        return _State(y=y0, r=r, grad=grad, step=step)

    def step(self, problem: FixedPointProblem, state: _State) -> _State:
        slope = sample_dot(state.grad, state.grad)
        trial = (2 * state.step).clamp(1e-8, 1e8)
        step, y, _ = line_search(
            problem, state.y, state.r, state.grad, slope, trial, max_backtracks=self.max_backtracks
        )
        r, grad = problem.residual_and_gradient(y)
        return _State(y=y, r=r, grad=grad, step=torch.where(step > 0, step, state.step))
