"""Per-sample line search along a descent direction of ``φ(y) = ½‖r(y)‖²``.

On the CPU the backtracking halves the step until every sample has accepted one, reading after
each halving whether they all have (free there). On the accelerator path each such read would wait
for the device, once per backtrack and so several times per solver iteration: there every halving
is tried at once instead, stacked along the batch into one evaluation of ``F`` (``F`` acts on each
sample separately, so a sample's trial steps are those it would have had in turn), and each sample
takes its first step that passes, as the CPU loop would. No read, and two evaluations of ``F`` per
search, as few as the CPU loop ever makes; the price is width: the second evaluation is
``max_backtracks + 1`` batches wide.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from irnet._misc import per_sample, sample_dot
from irnet._scope import has_active_dropout
from irnet.device_path import on_accelerator_path
from irnet.solvers.base import FixedPointProblem

#: on the accelerator path, the most bytes of trial iterates stacked into one evaluation of F
STACKED_AT_MOST_BYTES = 64 * 2**20


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
    if on_accelerator_path(y):
        return _backtrack_stacked(
            problem, y, r, direction, slope, step, phi0, armijo, max_backtracks
        )

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


def _backtrack_stacked(
    problem: FixedPointProblem,
    y: Tensor,
    r: Tensor,
    direction: Tensor,
    slope: Tensor,
    step: Tensor,
    phi0: Tensor,
    armijo: float,
    max_backtracks: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backtracking of :func:`line_search` without host reads: all ``max_backtracks + 1`` steps
    at once, each sample taking the first that satisfies the Armijo condition (λ = 0 if none does).

    The trial iterates go through F stacked along the batch, as many per evaluation as
    :data:`STACKED_AT_MOST_BYTES` allows, and one at a time when F holds dropout: its mask, held for
    the batch it was drawn for, does not extend to a longer one.
    """
    steps = [step]
    for _ in range(max_backtracks):
        steps.append(steps[-1] * 0.5)  # the CPU loop's halvings, bit for bit
    per_call = _trials_per_evaluation(problem, y, len(steps))
    accepted = torch.zeros_like(phi0, dtype=torch.bool)
    best_step, y_best, r_best = torch.zeros_like(step), y, r
    for first in range(0, len(steps), per_call):
        trial = torch.stack(steps[first : first + per_call])  # (k, batch)
        ys, rs, values = _evaluate_stacked(problem, y, direction, trial)
        ok = torch.isfinite(values) & (values <= phi0 - armijo * trial * slope)
        # Each sample's first passing step in this group, if it has none from an earlier group.
        pick = ok.to(torch.uint8).argmax(0)
        ok = ok.any(0) & ~accepted
        rows = torch.arange(y.shape[0], device=y.device)
        best_step = torch.where(ok, trial[pick, rows], best_step)
        y_best = torch.where(per_sample(ok, y), ys[pick, rows], y_best)
        r_best = torch.where(per_sample(ok, r), rs[pick, rows], r_best)
        accepted = accepted | ok
    return best_step, y_best, r_best


def _trials_per_evaluation(problem: FixedPointProblem, y: Tensor, trials: int) -> int:
    """How many of ``trials`` trial steps one evaluation of F takes (all of them, within memory)."""
    if isinstance(problem.F, nn.Module) and has_active_dropout(problem.F):
        return 1
    return max(1, min(trials, STACKED_AT_MOST_BYTES // max(1, y.numel() * y.element_size())))


def _evaluate_stacked(
    problem: FixedPointProblem, y: Tensor, direction: Tensor, trial: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The iterates ``y − λ s``, their residuals and ``φ`` for the ``k`` steps of ``trial``
    (k, batch), by one evaluation of F on the ``k`` batches stacked; shapes (k, batch, …),
    (k, batch, …), (k, batch)."""
    k, batch = trial.shape
    ys = y.unsqueeze(0) - trial.view(k, batch, *([1] * (y.dim() - 1))) * direction.unsqueeze(0)
    c = problem.c.unsqueeze(0).expand(k, *problem.c.shape).reshape(k * batch, *problem.c.shape[1:])
    rs = replace(problem, c=c).residual(ys.reshape(k * batch, *y.shape[1:]))
    return ys, rs.view(k, batch, *y.shape[1:]), 0.5 * sample_dot(rs, rs).view(k, batch)
