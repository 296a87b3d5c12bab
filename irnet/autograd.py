"""Implicit backward of a solved layer, by the implicit function theorem (paper section 2.1)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from irnet.linear.base import AdjointOperator, LinearSolver
from irnet.stats import SolverStats


class ImplicitAdjoint(torch.autograd.Function):
    """Identity in the forward pass onto the solution ``y*``; adjoint solve in the backward.

    ``forward(y_graph, y_star, …)`` returns ``y*``'s values. ``y_graph`` must be
    ``x + (1−θ)F(x) + θF(y*)`` built with autograd and ``y*`` detached: backward
    solves ``(I − θ ∂F/∂y)ᵀ g = ∇_y L`` and hands ``g`` to ``y_graph``, whose own
    graph then yields ``∇_x L = (I + (1−θ)∂F(x)/∂x)ᵀ g`` and
    ``∇_γ L = ((1−θ)∂F(x)/∂γ + θ∂F(y*)/∂γ)ᵀ g``. Only ``y*`` is saved here; no
    forward iterate is kept.
    """

    @staticmethod
    def forward(
        ctx,
        y_graph: Tensor,
        y_star: Tensor,
        F: Callable[[Tensor], Tensor],
        theta: float,
        linear_solver: LinearSolver,
        on_stats: Callable[[SolverStats], None],
    ) -> Tensor:
        ctx.F, ctx.theta, ctx.linear_solver, ctx.on_stats = F, theta, linear_solver, on_stats
        ctx.save_for_backward(y_star)
        return y_star.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (y_star,) = ctx.saved_tensors
        operator = AdjointOperator(ctx.F, y_star, ctx.theta)
        g, stats = ctx.linear_solver.solve(operator, grad)
        ctx.on_stats(stats)
        return g, None, None, None, None, None
