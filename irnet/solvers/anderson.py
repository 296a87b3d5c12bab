"""Anderson acceleration of the fixed-point map (Walker & Ni, SIAM J. Numer. Anal. 2011)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from irnet._misc import check_int
from irnet.device_path import on_accelerator_path
from irnet.solvers.base import FixedPointProblem, IterativeSolver


class _State(NamedTuple):
    y: Tensor
    r: Tensor
    ys: list[Tensor]  # last ``history`` iterates, flattened per sample
    gs: list[Tensor]  # their map values g(y)


class Anderson(IterativeSolver):
    """Anderson acceleration: mix the last ``history`` map values to minimise the residual.

    Each step solves, per sample, ``min ‖Σ αᵢ rᵢ‖² + λ‖α‖²`` subject to ``Σ αᵢ = 1``
    with ``λ = regularization · max_i ‖rᵢ‖²`` (scale-free), then sets
    ``y ← β Σ αᵢ g(yᵢ) + (1 − β) Σ αᵢ yᵢ``. With ``history = 1`` and ``mixing = 1``
    it is plain fixed-point iteration. One evaluation of ``F`` per iteration.

    Args:
        atol: absolute tolerance on each sample's residual norm ``‖r(y)‖₂``.
        max_iter: the most iterations.
        history: how many past iterates to mix (m ≥ 1).
        regularization: relative Tikhonov weight λ of the mixing problem (≥ 0).
        mixing: damping β in (0, 1].
    """

    def __init__(
        self,
        atol: float = 1e-5,
        max_iter: int = 50,
        history: int = 5,
        regularization: float = 1e-6,
        mixing: float = 1.0,
    ) -> None:
        super().__init__(atol, max_iter)
        self.history = check_int("history", history, 1)
        if not regularization >= 0:
            raise ValueError(f"regularization must be a number >= 0, got {regularization!r}")
        if not 0 < mixing <= 1:
            raise ValueError(f"mixing must be a number in (0, 1], got {mixing!r}")
        self.regularization = float(regularization)
        self.mixing = float(mixing)

    def init(self, problem: FixedPointProblem, y0: Tensor) -> _State:
        g = problem.map(y0)
        return _State(y=y0, r=y0 - g, ys=[y0.flatten(1)], gs=[g.flatten(1)])

    def step(self, problem: FixedPointProblem, state: _State) -> _State:
        if len(state.ys) == 1:
            # One iterate: the weights are α = (1), a plain (damped) fixed-point step.
            y = self._mix(state.gs[0], state.ys[0]).view_as(state.y)
        else:
            Y = torch.stack(state.ys, dim=1)  # (batch, m, n)
            G = torch.stack(state.gs, dim=1)
            alpha = self._weights(G - Y)[:, None]  # (batch, 1, m)
            mixed_y = torch.bmm(alpha, Y).squeeze(1) if self.mixing < 1 else None
            y = self._mix(torch.bmm(alpha, G).squeeze(1), mixed_y).view_as(state.y)
        g = problem.map(y)
        keep = self.history - 1
        ys = state.ys[-keep:] if keep else []  # the newest ``history − 1``, fewer while filling
        gs = state.gs[-keep:] if keep else []
        return _State(y=y, r=y - g, ys=ys + [y.flatten(1)], gs=gs + [g.flatten(1)])

    def _mix(self, mixed_g: Tensor, mixed_y) -> Tensor:
        """``β Σ αᵢ g(yᵢ) + (1 − β) Σ αᵢ yᵢ`` (just the first sum when β = 1)."""
        if self.mixing == 1:
            return mixed_g
        return self.mixing * mixed_g + (1 - self.mixing) * mixed_y

    def _weights(self, R: Tensor) -> Tensor:
        """Constrained least-squares weights from residual history ``R`` of shape (batch, m, n)."""
        H = R @ R.transpose(1, 2)  # (batch, m, m)
        m = H.shape[1]
        scale = H.diagonal(dim1=1, dim2=2).amax(dim=1).clamp_min(torch.finfo(R.dtype).tiny)
        H = H + torch.diag_embed((self.regularization * scale)[:, None].expand(-1, m))
        z, _ = torch.linalg.solve_ex(H, H.new_ones(H.shape[:2]))
        alpha = z / z.sum(dim=1, keepdim=True)
        # A singular or non-finite system falls back to the newest map value
        # (NaN fails every comparison, so ``|α| < ∞`` is the finiteness test).
        ok = (alpha.abs() < float("inf")).all(dim=1, keepdim=True)
        if not on_accelerator_path(R) and bool(ok.all()):
            return alpha  # reading the flag is free on the CPU; skip the fallback
        newest = torch.zeros_like(alpha)
        newest[:, -1] = 1
        return torch.where(ok, alpha, newest)
