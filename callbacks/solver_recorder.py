"""Per-layer solver statistics of one step: capture (forward hooks) and reduction.

Shared by :class:`SolverStatistics` and :class:`Figures` (Fig. 5), each with its
own recorder; the epoch accumulators (per layer, and per member of an ensemble) serve
every callback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from irnet.layer import ImplicitResidualBlock
from irnet.stats import SolverStats

# Summary name (of SolverStats.summary) → how to reduce it over layers and over an epoch's steps.
REDUCTIONS = {
    "iterations_mean": "mean",
    "iterations_max": "max",
    "residual_mean": "mean",
    "residual_max": "max",
    "not_converged": "sum",
    "diverged": "sum",
}


@dataclass
class StepStats:
    """What every block solved during one step; None where a block solved nothing.

    Attributes:
        forward: per layer, the first forward solve of the step (the main pass).
        backward: per layer, the last adjoint solve of the step (explicit θ = 0
            layers and untrained blocks have none).
    """

    forward: list[Optional[SolverStats]]
    backward: list[Optional[SolverStats]]


def over_layers(summaries: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Reduce per-layer summaries with :data:`REDUCTIONS` (mean, max or sum over layers)."""
    if not summaries:
        return {}
    reduce = {"mean": torch.mean, "max": torch.amax, "sum": torch.sum}
    return {
        key: reduce[how](torch.stack([s[key] for s in summaries]))
        for key, how in REDUCTIONS.items()
    }


def layer_vectors(stats: list[Optional[SolverStats]]) -> dict[str, Tensor]:
    """Every summary per layer as a ``(layers,)`` tensor, NaN where a layer has no stats."""
    present = [s for s in stats if s is not None]
    if not present:
        return {key: torch.full((len(stats),), float("nan")) for key in REDUCTIONS}
    nan = torch.tensor(float("nan"), device=present[0].residual.device)
    summaries = [s.summary() if s is not None else None for s in stats]
    return {
        key: torch.stack([s[key] if s is not None else nan for s in summaries])
        for key in REDUCTIONS
    }


def finished_by(stats: Sequence[Optional[SolverStats]], blocks: Sequence) -> dict[str, Tensor]:
    """Fraction of the samples of a step that each method of a chained solver finished.

    Over every layer whose solver names its methods (:class:`~irnet.solvers.Fallback`'s
    ``method_names``) and whose stats carry ``method``; layers of the same method
    name are pooled. The names depend only on the network's solvers, never on
    the values, so every DDP rank logs the same tags.

    Returns:
        ``{method name: 0-d float32 fraction}``; empty when no layer has a chain.
    """
    counts: dict[str, Tensor] = {}
    total = 0
    for block, s in zip(blocks, stats):
        names = getattr(getattr(block, "solver", None), "method_names", None)
        if names is None or s is None or s.method is None:
            continue
        per_method = torch.bincount(s.method, minlength=len(names)).float()
        for name, count in zip(names, per_method):
            counts[name] = counts[name] + count if name in counts else count
        total += s.method.numel()
    return {name: count / total for name, count in counts.items()}


class SolverStatsRecorder:
    """Collects the forward and backward solver statistics of each block during a step.

    Forward statistics are captured by a forward hook at the first call of each
    block in the step: the main pass, which a module runs before any extra
    passes (perturbation streams of R_rnd), so the numbers match the module's
    own ``iters`` and the paper's Fig. 5 and are not overwritten by those
    passes. Backward statistics are the blocks' ``backward_stats`` at the end
    of the step, counted only when the step produced new ones.
    """

    def __init__(self) -> None:
        self.blocks: list[ImplicitResidualBlock] = []
        self._handles: list[RemovableHandle] = []
        self._forward: list[Optional[SolverStats]] = []
        self._backward_before: list[Optional[SolverStats]] = []
        self._recording = False

    def attach(self, blocks: list[ImplicitResidualBlock]) -> None:
        """Hook ``blocks`` (replacing any earlier ones)."""
        self.detach()
        self.blocks = list(blocks)
        self._handles = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(self.blocks)]

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.blocks, self._recording = [], [], False

    def _hook(self, index: int):
        def hook(block: ImplicitResidualBlock, inputs, output) -> None:
            if self._recording and self._forward[index] is None:
                self._forward[index] = block.forward_stats

        return hook

    def start(self) -> None:
        """Begin a step."""
        self._forward = [None] * len(self.blocks)
        self._backward_before = [b.backward_stats for b in self.blocks]
        self._recording = True

    def stop(self) -> Optional[StepStats]:
        """End the step; None if no block ran (or recording never started)."""
        if not self._recording:
            return None
        self._recording = False
        if all(stats is None for stats in self._forward):
            return None
        forward = list(self._forward)
        backward = [
            b.backward_stats if b.backward_stats is not before else None
            for b, before in zip(self.blocks, self._backward_before)
        ]
        return StepStats(forward, backward)


class LayerAccumulator:
    """Running per-layer means over the steps of an epoch (NaN-aware)."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, Tensor] = {}

    def add(self, name: str, values: Tensor) -> None:
        """Add one step's ``(layers,)`` values; NaN entries do not count."""
        values = values.detach().float()
        if name not in self._sums:
            self._sums[name] = torch.zeros_like(values)
            self._counts[name] = torch.zeros_like(values)
        values = values.to(self._sums[name].device)  # an all-NaN step is built on the CPU
        finite = torch.isfinite(values)
        self._sums[name] += torch.where(finite, values, 0)
        self._counts[name] += finite.float()

    def mean(self, name: str) -> Optional[Tensor]:
        """Per-layer mean of ``name`` (NaN where no step had a value), or None if never added."""
        if name not in self._sums:
            return None
        return self._sums[name] / self._counts[name]  # 0/0 = NaN marks an empty layer

    def reset(self) -> None:
        """Forget everything."""
        self._sums.clear()
        self._counts.clear()


class MemberAccumulator:
    """Running, weighted per-member means over an epoch's steps, by name.

    Each step adds an ``(E,)`` vector with a weight (its batch size), so an epoch value is the
    same weighted mean of the steps that Lightning's ``_epoch`` values are.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._weights: dict[str, float] = {}

    def add(self, name: str, values: Tensor, weight: float = 1.0) -> None:
        """Add one step's ``(E,)`` values with ``weight``."""
        values = values.detach().float() * weight
        previous = self._sums.get(name)
        self._sums[name] = values if previous is None else previous + values.to(previous.device)
        self._weights[name] = self._weights.get(name, 0.0) + weight

    def mean(self, name: str) -> Optional[Tensor]:
        """The weighted mean of ``name`` per member, or None if never added."""
        if name not in self._sums or not self._weights[name]:
            return None
        return self._sums[name] / self._weights[name]

    def total(self, name: str) -> Optional[Tensor]:
        """The weighted sum of ``name`` per member (counts), or None if never added."""
        return self._sums.get(name)

    def names(self) -> list[str]:
        """The names added so far, in order."""
        return list(self._sums)

    def reset(self) -> None:
        """Forget everything."""
        self._sums.clear()
        self._weights.clear()


def stacked_rows(stats: list, field: str) -> Optional[Tensor]:
    """One per-row field (``"iterations"``, ``"converged"``…) of every layer's solver
    statistics that has one, ``(layers', rows)``, or None without any."""
    present = [getattr(s, field) for s in stats if s is not None]
    if not present:
        return None
    return torch.stack([p.float() for p in present])
