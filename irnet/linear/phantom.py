"""Cheap approximate adjoints: Jacobian-free and phantom gradients.

Both replace the exact solve of ``(I − θ J)ᵀ g = b`` by a few steps that cost
little and keep a descent direction in practice:

* Jacobian-free backpropagation (Fung et al., "JFB: Jacobian-free
  backpropagation for implicit networks", AAAI 2022) takes ``g = b``, i.e.
  drops the inverse: zero vector–Jacobian products.
* Phantom gradients (Geng et al., "On training implicit models", NeurIPS 2021)
  take ``steps`` damped fixed-point steps on the adjoint,
  ``g ← (1 − λ) g + λ (b + θ Jᵀ g)`` from ``g = b``: with ``λ = 1`` this is the
  Neumann series truncated after ``steps`` terms, and it approaches the exact
  adjoint as ``steps`` grows wherever the Neumann series converges.

Their statistics report the relative residual ``‖A g − b‖ / ‖b‖`` of the
approximate answer (one more product) and count it as converged only if it
meets ``rtol``; they never warn, since missing the exact answer is their point.
:func:`irnet.analysis.fidelity.gradient_cosine` measures what the shortcut costs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from irnet._misc import check_int, check_positive
from irnet.linear.base import AdjointOperator, LinearSolver, relative_residual
from irnet.stats import SolverStats


class _Approximate(LinearSolver):
    """Shared: statistics of an approximate adjoint, and no convergence warnings."""

    approximate = True

    def _stats(self, operator: AdjointOperator, g: Tensor, b: Tensor, products: int) -> SolverStats:
        if self.report_residual:
            res = relative_residual(operator, g, b)
        else:
            res = torch.full((b.shape[0],), float("nan"), dtype=b.dtype, device=b.device)
        iterations = torch.full((b.shape[0],), products, dtype=torch.long, device=b.device)
        return SolverStats(iterations, res, res <= self.rtol, ~torch.isfinite(g.flatten(1)).all(1))


class JacobianFree(_Approximate):
    """``g = b``: the adjoint without its inverse (Fung et al. 2022); no products at all.

    Args:
        rtol: relative residual reported as "converged" (only reported).
        report_residual: compute ``‖A g − b‖/‖b‖`` for the statistics (one more
            product); without it the residual reads NaN ("not measured").
    """

    def __init__(self, rtol: float = 1e-5, report_residual: bool = True) -> None:
        self.rtol = check_positive("rtol", rtol)
        self.report_residual = bool(report_residual)

    def solve(self, operator: AdjointOperator, b: Tensor) -> tuple[Tensor, SolverStats]:
        return b, self._stats(operator, b, b, 0)


class Phantom(_Approximate):
    """``steps`` damped fixed-point steps on the adjoint from ``g = b`` (Geng et al. 2021).

    Args:
        steps: vector–Jacobian products (k ≥ 1).
        damping: λ in (0, 1]; 1 gives the Neumann series truncated after ``steps`` terms.
        rtol: relative residual reported as "converged" (only reported).
        report_residual: compute ``‖A g − b‖/‖b‖`` for the statistics (one more
            product); without it the residual reads NaN ("not measured").
    """

    def __init__(
        self, steps: int = 5, damping: float = 0.5, rtol: float = 1e-5, report_residual: bool = True
    ) -> None:
        self.steps = check_int("steps", steps, 1)
        if (
            isinstance(damping, bool)
            or not isinstance(damping, (int, float))
            or not 0 < damping <= 1
        ):
            raise ValueError(f"damping must be a number in (0, 1], got {damping!r}")
        self.damping = float(damping)
        self.rtol = check_positive("rtol", rtol)
        self.report_residual = bool(report_residual)

    def solve(self, operator: AdjointOperator, b: Tensor) -> tuple[Tensor, SolverStats]:
        g = b
        for _ in range(self.steps):
            g = (1 - self.damping) * g + self.damping * (b + operator.vjp(g))
        return g, self._stats(operator, g, b, self.steps)
