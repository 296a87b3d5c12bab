"""Nonlinear conjugate gradient on ``½‖r(y)‖²`` (paper section 2.1, "Forward propagation")."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from irnet._misc import check_choice, check_int, per_sample, sample_dot
from irnet.solvers._line_search import line_search
from irnet.solvers.base import FixedPointProblem, IterativeSolver

BETAS = ("fletcher-reeves", "polak-ribiere")


class _State(NamedTuple):
    y: Tensor
    r: Tensor
    grad: Tensor  # (I − θ ∂F/∂y)ᵀ r
    direction: Tensor  # s; the update is y − λ s
    step: Tensor


class NonlinearCG(IterativeSolver):
    """Nonlinear conjugate gradient ``y ← y − λ s``, ``s = ∇φ + β s_prev``, ``φ = ½‖r‖²``.

    (The paper prints ``− β s``; with the update ``y − λ s`` the standard
    conjugate direction of Nocedal & Wright, eq. 5.41, carries ``+ β s``.)

    ``λ ≈ argmin ‖r(y − λ s)‖²`` by a per-sample line search (exact for affine
    ``r``). β follows Fletcher–Reeves ``‖∇φₖ‖²/‖∇φₖ₋₁‖²`` or Polak–Ribière
    ``⟨∇φₖ, ∇φₖ − ∇φₖ₋₁⟩/‖∇φₖ₋₁‖²`` clipped at 0 (Nocedal & Wright, ch. 5). A sample
    whose direction stops being a descent direction restarts with ``s = ∇φ``.

    Args:
        atol: absolute tolerance on each sample's residual norm ``‖r(y)‖₂``.
        max_iter: the most iterations.
        beta: ``"fletcher-reeves"`` or ``"polak-ribiere"``.
        max_backtracks: the most step halvings per line search.
    """

    uses_autograd = True

    def __init__(
        self,
        atol: float = 1e-5,
        max_iter: int = 50,
        beta: str = "polak-ribiere",
        max_backtracks: int = 10,
    ) -> None:
        super().__init__(atol, max_iter)
        self.beta = check_choice("beta", beta, BETAS)
        self.max_backtracks = check_int("max_backtracks", max_backtracks, 0)

    def init(self, problem: FixedPointProblem, y0: Tensor) -> _State:
        r, grad = problem.residual_and_gradient(y0)
        step = torch.ones(y0.shape[0], dtype=y0.dtype, device=y0.device)
        return _State(y=y0, r=r, grad=grad, direction=grad, step=step)

    def step(self, problem: FixedPointProblem, state: _State) -> _State:
        slope = sample_dot(state.grad, state.direction)
        step, y, _ = line_search(
            problem,
            state.y,
            state.r,
            state.direction,
            slope,
            state.step,
            max_backtracks=self.max_backtracks,
        )
        r, grad = problem.residual_and_gradient(y)
        direction = grad + per_sample(self._beta(grad, state.grad), grad) * state.direction
        descent = sample_dot(grad, direction) > 0
        direction = torch.where(per_sample(descent, grad), direction, grad)
        return _State(
            y=y, r=r, grad=grad, direction=direction, step=torch.where(step > 0, step, state.step)
        )

    def _beta(self, grad: Tensor, grad_prev: Tensor) -> Tensor:
        denom = sample_dot(grad_prev, grad_prev).clamp_min(torch.finfo(grad.dtype).tiny)
        if self.beta == "fletcher-reeves":
            return sample_dot(grad, grad) / denom
        return (sample_dot(grad, grad - grad_prev) / denom).clamp_min(0)
