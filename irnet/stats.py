"""Per-sample statistics of a nonlinear or linear solve, and the warning for failed solves."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor


class ConvergenceWarning(UserWarning):
    """A solve stopped at ``max_iter`` (or diverged) before reaching its tolerance."""


@dataclass
class SolverStats:
    """What one batched solve did, sample by sample.

    All fields are tensors of shape ``(batch,)`` on the device of the solve, so
    collecting them never forces a host synchronisation.

    Attributes:
        iterations: iterations each sample took until it converged, diverged or
            hit ``max_iter`` (for a linear solve: operator applications).
        residual: final residual norm of the returned solution (forward: absolute
            ``‖r(y)‖₂``; linear: relative ``‖A g − b‖₂ / ‖b‖₂``).
        converged: whether the sample met its tolerance.
        diverged: whether the solver gave up on the sample early because its
            iterates stalled, grew or became non-finite.
    """

    iterations: Tensor
    residual: Tensor
    converged: Tensor
    diverged: Tensor

    @classmethod
    def trivial(cls, batch: int, device: torch.device, dtype: torch.dtype) -> "SolverStats":
        """Stats of a solve that needed no iteration (e.g. an explicit layer, θ = 0)."""
        return cls(
            iterations=torch.zeros(batch, dtype=torch.long, device=device),
            residual=torch.zeros(batch, dtype=dtype, device=device),
            converged=torch.ones(batch, dtype=torch.bool, device=device),
            diverged=torch.zeros(batch, dtype=torch.bool, device=device),
        )

    @property
    def num_failed(self) -> Tensor:
        """Number of samples that did not converge (0 when all is well)."""
        return (~self.converged).sum()

    def summary(self) -> dict[str, Tensor]:
        """Batch summaries as 0-d tensors: mean/max iterations, max residual, failures."""
        iters = self.iterations.to(self.residual.dtype)
        return {
            "iterations_mean": iters.mean(),
            "iterations_max": iters.max(),
            "residual_max": self.residual.max(),
            "not_converged": self.num_failed.to(self.residual.dtype),
        }


def warn_if_failed(stats: SolverStats, what: str, solver: object) -> None:
    """Warn once per ``solver`` object when some samples did not converge.

    A network usually shares one solver among its blocks, so a failing network
    warns once, not once per layer; the statistics keep every failure. Reading
    ``converged`` is the one host synchronisation of a solve, after its loop.
    """
    if getattr(solver, "_warned", False) or bool(stats.converged.all()):
        return
    solver._warned = True
    failed = int(stats.num_failed)
    worst = float(stats.residual.max())
    warnings.warn(
        f"{what} did not converge for {failed} of {stats.converged.numel()} samples "
        f"(largest residual {worst:.3g}); returning the best iterate found. "
        "Raise max_iter, loosen tol, lower theta or choose another solver. "
        "(Shown once per solver; the block's stats record every failure.)",
        ConvergenceWarning,
        stacklevel=3,
    )
