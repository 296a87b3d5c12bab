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

    ``forward(y_graph, y_leaf, f_star, theta, …)`` returns ``y*``'s values (``y_leaf``).
    ``f_star`` must be built with autograd from the detached leaf ``y_leaf = y*``,
    and ``y_graph`` from ``f_star`` so that it is the step's right-hand side at
    ``y*`` with ``y*`` held fixed; the step's linearisation in ``y`` is then
    ``I − theta · ∂f_star/∂y``. Backward solves ``(I − theta ∂f_star/∂y)ᵀ g = ∇_y L``
    with vector–Jacobian products on ``f_star``'s graph (so F is evaluated at the
    solution once per layer, in the forward pass) and hands ``g`` to ``y_graph``,
    whose graph then yields ``∇_x L`` and ``∇_γ L``. No forward iterate is kept.

    * Linear θ-step: ``f_star = F(y_leaf)``, ``y_graph = x + (1−θ)F(x) + θ f_star``,
      ``theta = θ``: ``∇_x L = (I + (1−θ)∂F(x)/∂x)ᵀ g`` and
      ``∇_γ L = ((1−θ)∂F(x)/∂γ + θ∂F(y*)/∂γ)ᵀ g``.
    * One-leg θ-step: ``f_star = F(z)`` with ``z = (1−θ)x + θ y_leaf``,
      ``y_graph = x + f_star``, ``theta = 1`` (``∂f_star/∂y = θJ_F(z)`` carries θ):
      ``∇_x L = (I + (1−θ)J_F(z))ᵀ g`` and ``∇_γ L = (∂F(z)/∂γ)ᵀ g``.
    """

    @staticmethod
    def forward(
        ctx,
        y_graph: Tensor,
        y_leaf: Tensor,
        f_star: Tensor,
        theta: float,
        linear_solver: LinearSolver,
        on_stats: Callable[[SolverStats], None],
        owner: object = None,
    ) -> Tensor:
        # f_star's graph is kept on ctx (not save_for_backward: it is an intermediate
        # with its own graph, which the products below walk again and again).
        ctx.y_leaf, ctx.f_star = y_leaf, f_star
        ctx.theta, ctx.linear_solver, ctx.on_stats, ctx.owner = (
            theta,
            linear_solver,
            on_stats,
            owner,
        )
        return y_leaf.detach().clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        operator = AdjointOperator.from_graph(ctx.y_leaf, ctx.f_star, ctx.theta, ctx.owner)
        g, stats = ctx.linear_solver.solve(operator, grad)
        ctx.on_stats(stats)
        return g, None, None, None, None, None, None
