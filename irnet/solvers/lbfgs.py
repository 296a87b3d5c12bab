"""Limited-memory BFGS on ``½‖r(y)‖²``, each sample with its own curvature pairs.

The authors' forward solver (the paper's section 2.1, "Forward propagation"; their code runs
``torch.optim.LBFGS`` with a strong-Wolfe line search on the batch as one problem). Here every
sample is its own problem: its own history of steps and gradient changes, its own line search,
its own stopping, so a sample's answer and count do not depend on its batch mates. Minimising
``½‖r‖²`` instead of iterating the map needs no contraction: it solves layers where fixed-point
iteration diverges, at the price of a vector–Jacobian product per step.

Why a backtracking (Armijo) line search and not strong Wolfe: the Wolfe curvature condition is
there to make ``sᵀΔg > 0`` for the new pair, which keeps the BFGS matrix positive definite. Here a
pair without positive curvature is skipped instead (Nocedal & Wright, *Numerical Optimization*,
2nd ed., §6.1 and §7.2), so the matrix stays positive definite, every direction descends, and
Armijo backtracking along a descent direction gives sufficient decrease. A strong-Wolfe search
would need a vector–Jacobian product at every trial step and a zoom loop of data-dependent
length, so a host read per trial on the accelerator path; the shared backtracking search
(:mod:`irnet.solvers._line_search`) reads nothing there. Its first move is to the minimiser of
the quadratic through ``φ(0)``, ``φ'(0)`` and ``φ(1)``, which is the exact line minimiser when
``F`` is affine.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from irnet._misc import check_int, per_sample, sample_dot, sample_norm
from irnet.solvers._line_search import line_search
from irnet.solvers.base import FixedPointProblem, IterativeSolver


class _State(NamedTuple):
    y: Tensor
    r: Tensor
    grad: Tensor  # (I − θ ∂F/∂y)ᵀ r, the gradient of ½‖r‖²
    steps: Tensor  # s = y_new − y of the kept pairs, (batch, history, n), oldest first
    changes: Tensor  # Δg = grad_new − grad of the kept pairs, (batch, history, n)
    rho: Tensor  # 1 / sᵀΔg per pair, (batch, history); 0 marks an empty slot (s = Δg = 0)
    gamma: Tensor  # the initial inverse Hessian γI, γ = sᵀΔg / ΔgᵀΔg of the newest pair
    filled: int  # slots that may hold a pair (the newest ones): iterations so far, at most history


def _apply_inverse_hessian(state: _State, g: Tensor) -> Tensor:
    """``H g`` per sample, ``g`` of shape (batch, n), by the compact representation of the L-BFGS
    matrix (Byrd, Nocedal & Schnabel, Math. Prog. 1994, eq. 3.1): with ``S`` and ``Y`` the steps
    and gradient changes (oldest first), ``R`` the upper triangle of ``SᵀY`` and ``D`` its diagonal,

        ``H g = γ g + S p − γ Y u``, ``R u = Sᵀ g``, ``Rᵀ p = (D + γ YᵀY) u − γ Yᵀ g``.

    The same ``H`` as the two-loop recursion (Nocedal & Wright, Algorithm 7.4), in a fixed
    handful of batched products and two small triangular solves instead of ``4 · history``
    sequential dot products and updates. An empty slot (zero ``s`` and ``Δg``) gets 1 on the
    diagonal of ``R`` and adds nothing.
    """
    if state.filled == 0:
        return state.gamma[:, None] * g
    history = state.rho.shape[1]
    S = state.steps[:, history - state.filled :]  # (batch, k, n)
    Y = state.changes[:, history - state.filled :]
    empty = state.rho[:, history - state.filled :] == 0  # (batch, k)
    SY = S @ Y.transpose(1, 2)  # (batch, k, k): sᵢᵀyⱼ
    R = torch.triu(SY) + torch.diag_embed(empty.to(SY.dtype))
    gamma = state.gamma[:, None]
    Sg = (S @ g[:, :, None])[:, :, 0]
    Yg = (Y @ g[:, :, None])[:, :, 0]
    u = torch.linalg.solve_triangular(R, Sg[:, :, None], upper=True)
    middle = torch.diagonal(SY, dim1=1, dim2=2)[:, :, None] * u + gamma[:, :, None] * (
        Y @ (Y.transpose(1, 2) @ u)
    )
    p = torch.linalg.solve_triangular(
        R.transpose(1, 2), middle - gamma[:, :, None] * Yg[:, :, None], upper=False
    )
    return gamma * g + (S.transpose(1, 2) @ p)[:, :, 0] - gamma * (Y.transpose(1, 2) @ u)[:, :, 0]


class LBFGS(IterativeSolver):
    """L-BFGS ``y ← y − λ H ∇φ(y)`` on ``φ = ½‖r(y)‖²``, with a per-sample history and line search.

    ``∇φ = (I − θ ∂F/∂y)ᵀ r`` costs one vector–Jacobian product; ``H`` is each sample's
    limited-memory inverse-Hessian approximation from its last ``history`` pairs
    ``(s, Δg)`` (step, change of gradient), applied by the two-loop recursion with
    ``H₀ = γI``, ``γ = sᵀΔg / ΔgᵀΔg`` of the newest pair (1 before the first). The step
    ``λ`` comes from a per-sample backtracking line search started at 1. A pair with
    ``sᵀΔg ≤ ε‖s‖‖Δg‖`` (no positive curvature, ε the dtype's epsilon) is skipped, so ``H``
    stays positive definite; a sample whose line search finds no decrease, or whose
    direction is not a descent direction, drops its history and takes a gradient step.
    With the history full the oldest pair goes.

    Per iteration: one evaluation of ``F`` with its vector–Jacobian product, the line
    search's two or more evaluations of ``F``, and ``O(history · n)`` work; ``2 · history · n``
    numbers per sample. It needs no contraction (``θ·Lip F`` may exceed 1) but, like any
    descent on ``½‖r‖²``, can stop at a minimiser of ``‖r‖`` that is not a root.

    Args:
        atol: absolute tolerance on each sample's residual norm ``‖r(y)‖₂``.
        max_iter: the most iterations.
        history: the most curvature pairs kept per sample (≥ 1).
        max_backtracks: the most step halvings per line search.

    Example:
        ``F(y) = 3y`` at θ = ½ expands, so fixed-point iteration diverges; ``y = c + 1.5y``
        has the root ``y = −2c``:

        >>> import torch
        >>> from irnet.solvers import LBFGS, FixedPointProblem
        >>> c = torch.ones(2, 3, dtype=torch.float64)
        >>> y, stats = LBFGS(atol=1e-10).solve(FixedPointProblem(lambda y: 3 * y, c, 0.5), c)
        >>> bool(stats.converged.all()), bool(torch.allclose(y, -2 * c))
        (True, True)
    """

    uses_autograd = True

    def __init__(
        self,
        atol: float = 1e-5,
        max_iter: int = 50,
        history: int = 10,
        max_backtracks: int = 10,
    ) -> None:
        super().__init__(atol, max_iter)
        self.history = check_int("history", history, 1)
        self.max_backtracks = check_int("max_backtracks", max_backtracks, 0)

    def init(self, problem: FixedPointProblem, y0: Tensor) -> _State:
        r, grad = problem.residual_and_gradient(y0)
        batch, n = y0.shape[0], y0[0].numel()
        pairs = y0.new_zeros(batch, self.history, n)
        return _State(
            y=y0,
            r=r,
            grad=grad,
            steps=pairs,
            changes=pairs,
            rho=y0.new_zeros(batch, self.history),
            gamma=y0.new_ones(batch),
            filled=0,
        )

    def step(self, problem: FixedPointProblem, state: _State) -> _State:
        g = state.grad.flatten(1)
        direction = _apply_inverse_hessian(state, g)
        slope = sample_dot(g, direction)
        # H is positive definite, so only rounding (or overflow) makes a non-descent direction:
        # then the gradient itself, and a fresh start of that sample's history.
        descends = torch.isfinite(slope) & (slope > 0)
        direction = torch.where(descends[:, None], direction, g)
        slope = torch.where(descends, slope, sample_dot(g, g))
        step, y, _ = line_search(
            problem,
            state.y,
            state.r,
            direction.reshape(state.y.shape),
            slope,
            torch.ones_like(slope),
            max_backtracks=self.max_backtracks,
        )
        r, grad = problem.residual_and_gradient(y)
        return self._update(state, y, r, grad, keep=descends & (step > 0))

    def _update(self, state: _State, y: Tensor, r: Tensor, grad: Tensor, keep: Tensor) -> _State:
        """The state at the new iterate: the pair ``(s, Δg)`` joins each sample's history where it
        has positive curvature; a sample that did not ``keep`` its history (no descent, or no
        decrease found) starts a new one."""
        s = (y - state.y).flatten(1)
        change = (grad - state.grad).flatten(1)
        curvature = sample_dot(s, change)
        eps = torch.finfo(s.dtype).eps
        accept = (
            torch.isfinite(curvature)
            & (curvature > eps * sample_norm(s) * sample_norm(change))
            & torch.isfinite(s).all(1)
            & torch.isfinite(change).all(1)
        )
        # A sample that starts again empties its slots (zero pairs: they add nothing to H).
        kept = per_sample(keep, state.steps)
        steps = torch.where(kept, state.steps, 0)
        changes = torch.where(kept, state.changes, 0)
        rho = torch.where(keep[:, None], state.rho, 0)
        gamma = torch.where(keep, state.gamma, 1)
        # Guarded divisions: the rejected branch of a where must stay finite for unrolled graphs.
        safe = torch.where(accept, curvature, 1)
        new_rho = 1 / safe
        new_gamma = safe / torch.where(accept, sample_dot(change, change), 1)
        shifted = per_sample(accept, state.steps)
        return _State(
            y=y,
            r=r,
            grad=grad,
            steps=torch.where(shifted, _push(steps, s), steps),
            changes=torch.where(shifted, _push(changes, change), changes),
            rho=torch.where(accept[:, None], _push(rho, new_rho), rho),
            gamma=torch.where(accept, new_gamma, gamma),
            filled=min(state.filled + 1, self.history),
        )


def _push(slots: Tensor, new: Tensor) -> Tensor:
    """``slots`` (batch, history, …) with the oldest dropped and ``new`` (batch, …) appended."""
    return torch.cat([slots[:, 1:], new.unsqueeze(1)], 1)
