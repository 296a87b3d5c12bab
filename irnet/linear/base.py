"""The adjoint operator of an implicit layer and the interface of the linear solvers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import Tensor

from irnet._iterate import RemembersIterations
from irnet._misc import ArgsRepr, check_int, check_positive, sample_norm
from irnet.stats import SolverStats


class AdjointOperator:
    """``v ↦ v − θ J_F(y)ᵀ v`` for each sample, by vector–Jacobian products.

    The graph of ``F(y)`` is built once and reused by every product
    (``retain_graph=True``); products ask only for the gradient w.r.t. ``y``, so
    they never touch parameter gradients (or DDP's gradient hooks).

    Args:
        F: the residual function; it must act on each sample separately.
        y: the point of linearisation (the layer's output).
        theta: the implicitness θ.

    Attributes:
        owner: what makes "the same solve" from one step to the next (the block's F), by which an
            iterative solver on the accelerator path places its first look
            (:mod:`irnet._iterate`).
    """

    owner: object = None

    def __init__(self, F: Callable[[Tensor], Tensor], y: Tensor, theta: float) -> None:
        self.owner = F
        with torch.enable_grad():
            y_leaf = y.detach().requires_grad_()
            self._set_graph(y_leaf, F(y_leaf), theta)

    @classmethod
    def from_graph(
        cls, y: Tensor, fy: Tensor, theta: float, owner: object = None
    ) -> "AdjointOperator":
        """The operator on an existing graph ``fy = F(y)`` (``y`` a leaf), without evaluating F
        again."""
        operator = cls.__new__(cls)
        operator.owner = owner
        operator._set_graph(y, fy, theta)
        return operator

    def _set_graph(self, y: Tensor, fy: Tensor, theta: float) -> None:
        self.theta = theta
        self.shape = y.shape
        self._y, self._fy = y, fy

    def vjp(self, v: Tensor) -> Tensor:
        """``θ J_F(y)ᵀ v``."""
        jtv = graph_vjp(self._fy, self._y, v)
        return jtv if self.theta == 1 else self.theta * jtv

    def __call__(self, v: Tensor) -> Tensor:
        return v - self.vjp(v)

    def dense(self) -> Tensor:
        """Per-sample matrices ``(I − θ J)ᵀ`` of shape (batch, n, n), by n products."""
        batch, n = self.shape[0], self._y[0].numel()
        basis = torch.eye(n, dtype=self._y.dtype, device=self._y.device)
        columns = [
            self(basis[i].expand(batch, n).reshape(self.shape)).reshape(batch, n) for i in range(n)
        ]
        return torch.stack(columns, dim=2)


def graph_vjp(output: Tensor, point: Tensor, v: Tensor) -> Tensor:
    """``vᵀ ∂output/∂point`` on a retained graph, as
    ``torch.autograd.grad(output, point, v, retain_graph=True)``.

    An adjoint solve makes dozens of these products on one small graph, where the argument
    checks of ``torch.autograd.grad`` cost a fifth of each product; with ``v`` already matching
    ``output`` they are skipped and the autograd engine is called directly.
    """
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    if (
        engine is None
        or v.shape != output.shape
        or v.dtype != output.dtype
        or v.device != output.device
        or torch.is_grad_enabled()
        and v.requires_grad
    ):
        return torch.autograd.grad(output, point, v, retain_graph=True)[0]
    return engine.run_backward((output,), (v,), True, False, (point,), False, False)[0]


class LinearSolver(ArgsRepr, RemembersIterations, ABC):
    """Base class of the adjoint solvers: solve ``A g = b`` for the operator ``A``.

    Attributes:
        approximate: whether the answer is an approximation by design (a Jacobian-free
            or phantom gradient) rather than a solve to ``rtol``: such solvers raise no
            convergence warnings, and the monitors check their gradients' fidelity.

    Args:
        rtol: relative tolerance, per sample: ``‖A g − b‖₂ ≤ rtol · ‖b‖₂``.
        max_iter: the most applications of the operator.
    """

    def __init__(self, rtol: float = 1e-5, max_iter: int = 50) -> None:
        self.rtol = check_positive("rtol", rtol)
        self.max_iter = check_int("max_iter", max_iter, 1)

    approximate: bool = False

    @abstractmethod
    def solve(self, operator: AdjointOperator, b: Tensor) -> tuple[Tensor, SolverStats]:
        """Return ``g`` with ``A g ≈ b`` and the per-sample statistics."""


def relative_residual(operator: Callable[[Tensor], Tensor], g: Tensor, b: Tensor) -> Tensor:
    """``‖A g − b‖₂ / ‖b‖₂`` per sample (0 where ``b = 0`` and ``g = 0``)."""
    return sample_norm(operator(g) - b) / safe_norm(b)


def safe_norm(b: Tensor) -> Tensor:
    """Per-sample norm, with zeros replaced by the smallest positive number."""
    return sample_norm(b).clamp_min(torch.finfo(b.dtype).tiny)
