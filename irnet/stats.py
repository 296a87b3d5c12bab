"""Per-sample statistics of a nonlinear or linear solve, the warning for failed solves, and
saving the blocks' statistics around auxiliary passes."""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn


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
        method: for a solve by several methods in turn
            (:class:`~irnet.solvers.Fallback`), the index of the method that
            finished each sample (long); ``None`` for a single solver.

    Example:
        Two samples, the second stopped at ``max_iter = 50`` short of its tolerance:

        >>> stats = SolverStats(
        ...     iterations=torch.tensor([12, 50]),
        ...     residual=torch.tensor([8e-6, 3e-2]),
        ...     converged=torch.tensor([True, False]),
        ...     diverged=torch.tensor([False, False]),
        ... )
        >>> stats.num_failed.item()
        1
        >>> stats.summary()["iterations_mean"].item()
        31.0
    """

    iterations: Tensor
    residual: Tensor
    converged: Tensor
    diverged: Tensor
    method: Optional[Tensor] = None

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
        """0-d float32 summaries: mean/max iterations and residual, failure and divergence counts.

        The keys are those of the monitoring callbacks' tags (``iterations_mean``,
        ``iterations_max``, ``residual_mean``, ``residual_max``, ``not_converged``,
        ``diverged``).
        """
        iters = self.iterations.float()
        residual = self.residual.float()
        return {
            "iterations_mean": iters.mean(),
            "iterations_max": iters.max(),
            "residual_mean": residual.mean(),
            "residual_max": residual.max(),
            "not_converged": self.num_failed.float(),
            "diverged": self.diverged.sum().float(),
        }


@contextmanager
def preserved_stats(blocks: Iterable[nn.Module]) -> Iterator[None]:
    """Keep the blocks' ``forward_stats`` and ``backward_stats`` through an auxiliary pass.

    Monitoring callbacks and the module read a block's statistics of the main
    pass after a step; an extra pass (R_rnd's perturbed copies, a callback's
    measurement) would overwrite them. Run it inside this context and they are
    put back on exit, also when the pass raises.

    Args:
        blocks: the implicit blocks (anything with the two attributes).
    """
    blocks = list(blocks)
    saved = [(b.forward_stats, b.backward_stats) for b in blocks]
    try:
        yield
    finally:
        for block, (forward, backward) in zip(blocks, saved):
            block.forward_stats, block.backward_stats = forward, backward


class _WarnedSolvers:
    """The solver objects that have warned in the current period (held weakly where possible)."""

    def __init__(self) -> None:
        self._seen: dict[int, Callable[[], Any]] = {}

    def first(self, solver: object) -> bool:
        """Whether ``solver`` has not warned yet in this period (and mark it as having warned)."""
        ref = self._seen.get(id(solver))
        if ref is not None and ref() is solver:  # an id can be reused after garbage collection
            return False
        try:
            self._seen[id(solver)] = weakref.ref(solver)
        except TypeError:  # no weak references (``__slots__``): keep it alive instead
            self._seen[id(solver)] = lambda: solver
        return True

    def reset(self) -> None:
        self._seen.clear()


_WARNED = _WarnedSolvers()


def reset_convergence_warnings() -> None:
    """Start a new warning period: every solver may warn once more.

    :class:`~irnet.module.ImplicitNetModule` calls it when a Trainer starts a
    fit, validate, test or predict run, and again when training starts after
    the sanity check, so a failure there does not silence training's warnings.
    """
    _WARNED.reset()


def diverged_samples(
    converged: Tensor, iterations: Tensor, max_iter: int, last_res: Tensor
) -> Tensor:
    """Samples a solve gave up on: stopped before ``max_iter`` unconverged, or ended non-finite.

    In irnet's loops a sample leaves early only by converging or by a failure
    test (a non-finite residual; for Neumann also a stall); one that ran all
    ``max_iter`` iterations diverged if its last residual (its own: it was
    active to the end) is not finite.
    """
    return ~converged & ((iterations < max_iter) | ~(last_res < float("inf")))


def report_failures(stats: SolverStats, what: str, solver: object, deferred: bool) -> None:
    """:func:`warn_if_failed` now, or (``deferred``, the accelerator path) at the next
    :func:`flush_failure_warnings`, which reads the flags of every solve since the last with one
    host read. The module flushes once per step; at most :data:`DEFERRED_AT_MOST` solves wait."""
    if not deferred:
        warn_if_failed(stats, what, solver)
        return
    _DEFERRED.append((stats.converged.all(), stats, what, solver))
    if len(_DEFERRED) >= DEFERRED_AT_MOST:
        flush_failure_warnings()


def flush_failure_warnings() -> None:
    """Warn for the deferred solves that failed (:func:`report_failures`), with one host read."""
    if not _DEFERRED:
        return
    pending = list(_DEFERRED)
    _DEFERRED.clear()
    flags = torch.stack([ok.to(device=pending[0][0].device) for ok, *_ in pending]).tolist()
    for ok, (_, stats, what, solver) in zip(flags, pending):
        if not ok:
            warn_if_failed(stats, what, solver)


#: deferred solves kept before a flush is forced (a user who never flushes holds this many)
DEFERRED_AT_MOST = 1024
_DEFERRED: list = []


def warn_if_failed(stats: SolverStats, what: str, solver: object) -> None:
    """Warn once per ``solver`` object and period when some samples did not converge.

    A network usually shares one solver among its blocks, so a failing network
    warns once, not once per layer; the statistics keep every failure. A period
    ends at :func:`reset_convergence_warnings` (the module calls it at the start
    of each Trainer run and of training). Reading ``converged`` is the one host
    synchronisation of a solve, after its loop.
    """
    if bool(stats.converged.all()) or not _WARNED.first(solver):
        return
    failed = int(stats.num_failed)
    worst = float(stats.residual.max())
    warnings.warn(
        f"{what} did not converge for {failed} of {stats.converged.numel()} samples "
        f"(largest residual {worst:.3g}); returning the best iterate found. "
        "Raise max_iter, loosen the tolerance (atol or rtol), lower theta or choose another "
        "solver. "
        "(Shown once per solver and run; the block's stats record every failure.)",
        ConvergenceWarning,
        stacklevel=3,
    )
