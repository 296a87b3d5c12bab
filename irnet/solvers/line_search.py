"""Per-sample line search along a descent direction of ``φ(y) = ½‖r(y)‖²``."""

from __future__ import annotations

import torch
from torch import Tensor

from irnet.solvers.base import FixedPointProblem
from irnet.per_sample import per_sample, sample_dot


def line_search(
    problem: FixedPointProblem,
    y: Tensor,
    r: Tensor,
    direction: Tensor,
    slope: Tensor,
    step0: Tensor,
    armijo: float = 1e-4,
    max_backtracks: int = 10,
) -> tuple[Tensor, Tensor, Tensor]:
    """Approximately minimise ``λ ↦ ½‖r(y − λ s)‖²`` for each sample.

    Evaluates a trial step ``step0``, jumps to the minimiser of the quadratic
    through ``φ(0)``, ``φ'(0)`` and ``φ(step0)`` (exact when ``r`` is affine),
    then halves the step until the Armijo condition holds. A sample that finds no
    decrease keeps ``λ = 0`` (its iterate does not move).

    Args:
        problem: the fixed-point problem.
        y: current iterates.
        r: residuals at ``y``.
        direction: ``s``; the update is ``y − λ s``.
        slope: ``⟨∇φ(y), s⟩ > 0`` per sample (so ``φ'(0) = −slope``).
        step0: first trial step per sample.
        armijo: sufficient-decrease constant.
        max_backtracks: the most halvings.

    Returns:
        Step sizes ``λ``, new iterates and their residuals.
    """
    phi0 = 0.5 * sample_dot(r, r)

    def phi(step: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        y_new = y - per_sample(step, y) * direction
        r_new = problem.residual(y_new)
        return 0.5 * sample_dot(r_new, r_new), y_new, r_new

    phi_trial, _, _ = phi(step0)
    # Minimiser of q(λ) = φ0 − slope·λ + a·λ² with q(step0) = φ(step0).
    curvature = (phi_trial - phi0 + slope * step0) / step0.square()
    step = torch.where(curvature > 0, slope / (2 * curvature.clamp_min(1e-300)), step0)
    step = torch.where(torch.isfinite(step) & (step > 0), step, step0)

    accepted = torch.zeros_like(phi0, dtype=torch.bool)
    best_step, y_best, r_best = torch.zeros_like(step), y, r
    for _ in range(max_backtracks + 1):
        value, y_new, r_new = phi(step)
        ok = ~accepted & torch.isfinite(value) & (value <= phi0 - armijo * step * slope)
        best_step = torch.where(ok, step, best_step)
        y_best = torch.where(per_sample(ok, y), y_new, y_best)
        r_best = torch.where(per_sample(ok, r), r_new, r_best)
        accepted = accepted | ok
        if bool(accepted.all()):
            break
        step = step * 0.5
    return best_step, y_best, r_best
