"""Loud failure: what stops a run whose numbers can no longer be trusted, and the one-line message.

:class:`~irnet.module.ImplicitNetModule` checks, on by default,

* the loss of every training step (NaN or Inf stops the fit before backward),
* the gradients before each optimizer step and the parameters after it, and those of a
  checkpoint being loaded,
* the fraction of unconverged forward solves of every implicit layer, which may
  not stay above ``failing_fraction`` for ``max_failing_steps`` steps in a row,

and raises :class:`TrainingFailure` with one line naming the statistic and the
layer or parameter. Lightning passes the exception through its callbacks'
``on_exception`` and re-raises it; no checkpoint is written on the way out, so
the newest checkpoint is the last good one. The command line prints the line
and exits with status 2 (``TrainingFailure`` is a
:class:`~irnet.cli_errors.CliError`).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from irnet.cli_errors import CliError

SHOWN = 3  # names listed in a message before "and k more"


class TrainingFailure(CliError, RuntimeError):
    """A run stopped because its numbers are broken (non-finite, or solves that keep failing)."""


def listing(names: list[str]) -> str:
    """The first few names, then how many more: one readable line however many there are."""
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def nonfinite_tensors(named: Iterable[tuple[str, Optional[Tensor]]]) -> list[str]:
    """Names of the tensors holding NaN or Inf, with the count: ``"w (3 of 100 values)"``.

    One host read for all of them; the counts are read only when something is wrong.
    """
    named = [(name, t) for name, t in named if t is not None and t.is_floating_point()]
    if not named:
        return []
    if _all_finite([t for _, t in named]):
        return []
    flags = torch.stack([torch.isfinite(t).all() for _, t in named])
    return [f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)"
            for (name, t), ok in zip(named, flags.tolist()) if not ok]


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every value is finite, with one host read: a fused max-norm per tensor (NaN and ±Inf
    give a non-finite norm), a quarter of the time of ``isfinite(t).all()`` per tensor on small networks."""
    try:
        flags = torch.stack([n.float().reshape(()) for n in torch._foreach_norm(tensors, float("inf"))])
    except (AttributeError, RuntimeError, TypeError):  # another torch, or tensors on several devices
        return all(bool(torch.isfinite(t).all()) for t in tensors)
    return bool(torch.isfinite(flags).all())


def nonfinite_parameters(module: nn.Module) -> list[str]:
    """:func:`nonfinite_tensors` of the module's parameters."""
    return nonfinite_tensors((name, p.detach()) for name, p in module.named_parameters())


def nonfinite_gradients(module: nn.Module) -> list[str]:
    """:func:`nonfinite_tensors` of the module's parameters' gradients."""
    return nonfinite_tensors((name, p.grad) for name, p in module.named_parameters())


def diverged_layers(blocks: Iterable[nn.Module]) -> list[str]:
    """``"layer i (k of n samples)"`` for each block whose last forward solve diverged."""
    found = []
    for i, block in enumerate(blocks):
        stats = getattr(block, "forward_stats", None)
        if stats is None:
            continue
        count = int(stats.diverged.sum())
        if count:
            found.append(f"layer {i} ({count} of {stats.diverged.numel()} samples)")
    return found


def diagnosis(module: nn.Module, blocks: Iterable[nn.Module]) -> str:
    """Where a non-finite value came from: non-finite parameters, else diverged forward solves."""
    params = nonfinite_parameters(module)
    if params:
        return f"non-finite parameters: {listing(params)}"
    blocks = list(blocks)
    layers = diverged_layers(blocks)
    if layers:
        return f"forward solve diverged (non-finite iterates, stats.diverged) in {listing(layers)}"
    failing = unconverged_layers(blocks)
    if failing:
        return f"parameters finite; forward solves unconverged (stats.converged) in {listing(failing)}"
    return "parameters finite and every forward solve converged"


def unconverged_layers(blocks: Iterable[nn.Module]) -> list[str]:
    """``"layer i (k of n samples, largest residual r)"`` for each block whose last forward solve failed."""
    found = []
    for i, block in enumerate(blocks):
        stats = getattr(block, "forward_stats", None)
        if stats is None or bool(stats.converged.all()):
            continue
        found.append(f"layer {i} ({int(stats.num_failed)} of {stats.converged.numel()} samples, "
                     f"largest residual {float(stats.residual.max()):.3g})")
    return found


def check_args(max_failing_steps: Optional[int], failing_fraction: float) -> tuple[Optional[int], float]:
    """Validated ``(max_failing_steps, failing_fraction)``."""
    if max_failing_steps is not None and (isinstance(max_failing_steps, bool)
                                          or not isinstance(max_failing_steps, int) or max_failing_steps < 1):
        raise ValueError(f"max_failing_steps must be an integer >= 1 or None (off), got {max_failing_steps!r}")
    if (isinstance(failing_fraction, bool) or not isinstance(failing_fraction, (int, float))
            or not 0 <= failing_fraction < 1):
        raise ValueError(f"failing_fraction must be a number in [0, 1), got {failing_fraction!r}")
    return max_failing_steps, float(failing_fraction)


class FailingStreaks:
    """Consecutive training steps in which each layer's unconverged fraction exceeded a threshold.

    Args:
        max_steps: the streak that stops the fit (``None``: never).
        fraction: the threshold on the fraction of a batch's forward solves that
            did not converge.
    """

    def __init__(self, max_steps: Optional[int], fraction: float) -> None:
        self.max_steps, self.fraction = check_args(max_steps, fraction)
        self.streaks: dict[int, int] = {}

    def reset(self) -> None:
        self.streaks = {}

    def update(self, fractions: dict[int, float], where: str) -> None:
        """Count this step's fractions (layer index → unconverged fraction); raise at ``max_steps``."""
        if self.max_steps is None:
            return
        for layer, value in fractions.items():
            self.streaks[layer] = self.streaks.get(layer, 0) + 1 if value > self.fraction else 0
            if self.streaks[layer] >= self.max_steps:
                raise TrainingFailure(
                    f"{where}: layer {layer}'s forward solves keep failing: unconverged fraction "
                    f"(stats.converged) above failing_fraction={self.fraction:g} for {self.streaks[layer]} "
                    f"consecutive training steps (max_failing_steps), {value:.3g} in the last; raise the "
                    "solver's max_iter, loosen atol, lower theta, choose another solver or a contraction "
                    "bound, or set max_failing_steps: null")


__all__ = ["FailingStreaks", "TrainingFailure", "check_args", "diagnosis", "diverged_layers", "listing",
           "nonfinite_gradients", "nonfinite_parameters", "nonfinite_tensors", "unconverged_layers"]
