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
and exits with status 2, as it does for a mistake in the config.

Under distributed training a rank that raised alone would leave the others
waiting in the next collective (NCCL: until the process-group timeout), so every
rank raises the same failure at the same step: the module agrees on it with the
all-reduce it makes anyway, gathers the ranks' messages (:func:`first_failure`)
or diagnoses (:func:`merged_diagnosis`), and :func:`stop_together` keeps
Lightning's launcher from killing rank 0 while the other ranks exit with the
same status.
"""

from __future__ import annotations

import atexit
import subprocess
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from irnet.nets.ensemble import prune_members

SHOWN = 3  # names listed in a message before "and k more"


class TrainingFailure(RuntimeError):
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
    return [
        f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)"
        for (name, t), ok in zip(named, flags.tolist())
        if not ok
    ]


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every value is finite, with one host read: a fused max-norm per tensor (NaN and ±Inf
    give a non-finite norm), a quarter of the time of ``isfinite(t).all()`` per tensor on small
    networks."""
    try:
        flags = torch.stack(
            [n.float().reshape(()) for n in torch._foreach_norm(tensors, float("inf"))]
        )
    except (AttributeError, RuntimeError, TypeError):
        # another torch, or tensors on several devices
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


@dataclass(frozen=True)
class Finding:
    """What :func:`find` saw on one process: how bad, and the words around where the rank goes.

    Attributes:
        severity: 3 non-finite parameters, 2 diverged forward solves, 1 unconverged ones, 0 nothing.
        lead: the finding (``"non-finite parameters"``).
        detail: what follows the rank, if named (``": w (1 of 8 values)"``).
    """

    severity: int
    lead: str
    detail: str = ""

    def text(self, on: str = "") -> str:
        """The finding as one phrase; ``on`` (``" on rank 1 of 2"``) goes after its lead."""
        return f"{self.lead}{on}{self.detail}"


def find(module: nn.Module, blocks: Iterable[nn.Module]) -> Finding:
    """Where a non-finite value came from: non-finite parameters, else diverged forward solves."""
    params = nonfinite_parameters(module)
    if params:
        return Finding(3, "non-finite parameters", f": {listing(params)}")
    blocks = list(blocks)
    layers = diverged_layers(blocks)
    if layers:
        return Finding(
            2,
            "forward solve diverged",
            f" (non-finite iterates, stats.diverged) in {listing(layers)}",
        )
    failing = unconverged_layers(blocks)
    if failing:
        return Finding(
            1,
            "parameters finite; forward solves unconverged",
            f" (stats.converged) in {listing(failing)}",
        )
    return Finding(0, "parameters finite and every forward solve converged")


def diagnosis(module: nn.Module, blocks: Iterable[nn.Module]) -> str:
    """:func:`find` as a phrase for a message."""
    return find(module, blocks).text()


def merged_diagnosis(findings: Sequence[Finding]) -> str:
    """One diagnosis for every rank (``findings[r]`` is rank r's): the worst, naming its rank.

    A non-finite loss is seen by every rank (its mean is global), but its cause
    (a bad parameter, a diverged solve) by the rank that had it.
    """
    worst = max(range(len(findings)), key=lambda r: (findings[r].severity, -r))
    if findings[worst].severity == 0:
        return findings[worst].text(" on every rank")
    return findings[worst].text(rank_note(worst, len(findings)))


def rank_note(rank: int, world: int) -> str:
    """``" on rank r of W"`` under distributed training, nothing in one process."""
    return f" on rank {rank} of {world}" if world > 1 else ""


def first_failure(messages: Sequence[Optional[str]]) -> str:
    """The one message every rank raises (``messages[r]``: rank r's failure, or ``None``).

    The lowest failing rank's message, then which other ranks failed.
    """
    failed = [r for r, m in enumerate(messages) if m is not None]
    others = failed[1:]
    also = (
        f" (and on rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))})"
        if others
        else ""
    )
    return f"{messages[failed[0]]}{also}"


def stop_together(trainer: Any) -> None:
    """Every rank is about to raise the same failure: let each exit with its own status.

    Under ``strategy=ddp`` rank 0 started the other processes of its node, and
    a thread of Lightning's launcher kills every process of the node (rank 0
    included, with SIGKILL) as soon as one of them exits with a non-zero
    status; rank 0, still printing its message, would then end killed instead
    of with status 2. The launcher watches the list ``launcher.procs``, which
    is emptied here; rank 0 instead waits for those processes when it exits
    (at most ``STOP_WAIT`` seconds, then kills what is left). Does nothing
    elsewhere (other ranks, other launchers).
    """
    procs = getattr(getattr(getattr(trainer, "strategy", None), "launcher", None), "procs", None)
    if (
        not isinstance(procs, list)
        or not procs
        or not all(isinstance(p, subprocess.Popen) for p in procs)
    ):
        return  # not rank 0 of a node under strategy=ddp (ddp_spawn's workers hold no processes)
    children = list(procs)
    procs.clear()
    atexit.register(_wait_for, children, STOP_WAIT)


#: seconds rank 0 waits at exit for the processes it started, after a failure of every rank
STOP_WAIT = 30.0


def _wait_for(children: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in children:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


def unconverged_layers(blocks: Iterable[nn.Module]) -> list[str]:
    """``"layer i (k of n samples, largest residual r)"`` for each block whose last forward solve
    failed."""
    found = []
    for i, block in enumerate(blocks):
        stats = getattr(block, "forward_stats", None)
        if stats is None or bool(stats.converged.all()):
            continue
        found.append(
            f"layer {i} ({int(stats.num_failed)} of {stats.converged.numel()} samples, "
            f"largest residual {float(stats.residual.max()):.3g})"
        )
    return found


def check_args(
    max_failing_steps: Optional[int], failing_fraction: float
) -> tuple[Optional[int], float]:
    """Validated ``(max_failing_steps, failing_fraction)``."""
    if max_failing_steps is not None and (
        isinstance(max_failing_steps, bool)
        or not isinstance(max_failing_steps, int)
        or max_failing_steps < 1
    ):
        raise ValueError(
            f"max_failing_steps must be an integer >= 1 or None (off), got {max_failing_steps!r}"
        )
    if (
        isinstance(failing_fraction, bool)
        or not isinstance(failing_fraction, (int, float))
        or not 0 <= failing_fraction < 1
    ):
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
        """Count this step's fractions (layer → unconverged fraction); raise at ``max_steps``."""
        if self.max_steps is None:
            return
        for layer, value in fractions.items():
            self.streaks[layer] = self.streaks.get(layer, 0) + 1 if value > self.fraction else 0
            if self.streaks[layer] >= self.max_steps:
                raise TrainingFailure(
                    f"{where}: layer {layer}'s forward solves keep failing: unconverged fraction "
                    f"(stats.converged) above failing_fraction={self.fraction:g} for "
                    f"{self.streaks[layer]} consecutive training steps (max_failing_steps), "
                    f"{value:.3g} in the last; raise the solver's max_iter, loosen atol, lower "
                    "theta, choose another solver or a contraction bound, or set "
                    "max_failing_steps: null"
                )


class StoppedMembers:
    """An ensemble's members whose numbers broke: each is named, then leaves the ensemble, while
    the others train on (:mod:`irnet.nets.ensemble`).

    A member breaks when its training loss is not finite (before backward), its gradients are not
    (before the optimizer step) or its weights are not (after it). Its rows are its own in every
    operation, so its NaN reaches only its own gradients: those are zeroed, the step is taken for
    the others, and the member is then dropped from every parameter, the optimizer's state and
    the warm-start cache. Only when every member has broken does the run stop, with a
    :class:`TrainingFailure`. Members keep their original numbers in logs and messages.

    Args:
        members: E, the ensemble's members at the start.
    """

    def __init__(self, members: int) -> None:
        self.ids = list(range(members))  # each live member's original number, by position
        self.stopped: dict[int, str] = {}  # original number → why it stopped
        self._breaking: dict[int, str] = {}  # positions that broke this step → why

    def mark(self, positions: Iterable[int], why: str) -> None:
        """Members (by position) that broke this step; the run fails if none would be left."""
        for position in positions:
            self._breaking.setdefault(position, why)
        if len(self._breaking) == len(self.ids):
            reasons = "; ".join(f"member {self.ids[p]}: {w}" for p, w in self._breaking.items())
            raise TrainingFailure(f"every member of the ensemble broke ({reasons})")

    @property
    def breaking(self) -> list[int]:
        """Positions of the members that broke this step (dropped after its update)."""
        return sorted(self._breaking)

    def zero_gradients(self, net: nn.Module) -> None:
        """Zero the breaking members' gradient slices, so the step is the others' alone."""
        for p in net.parameters():
            if p.grad is not None and self._breaking:
                p.grad[self.breaking] = 0

    @staticmethod
    def nonfinite_members(net: nn.Module, of: str = "grad") -> list[int]:
        """Positions of members with a non-finite entry in their gradients (``of="grad"``) or
        weights (``"data"``); one host read."""
        tensors = [getattr(p, of) for p in net.parameters()]
        rows = [t.detach().reshape(t.shape[0], -1) for t in tensors if t is not None]
        if not rows:
            return []
        finite = torch.stack([torch.isfinite(r).all(1) for r in rows]).all(0)
        return [i for i, ok in enumerate(finite.tolist()) if not ok]

    def drop(self, net: nn.Module, optimizer: Optional[torch.optim.Optimizer], where: str) -> None:
        """Take the members that broke this step out of the ensemble, with a warning naming each."""
        if not self._breaking:
            return
        seeds = list(net.member_seeds)
        for position, why in sorted(self._breaking.items()):
            member = self.ids[position]
            self.stopped[member] = f"{where}: {why}"
            warnings.warn(
                f"{where}: member {member} (seed {seeds[position]}) stopped: {why}; it leaves the "
                f"ensemble and the other {len(self.ids) - len(self._breaking)} train on",
                MemberStoppedWarning,
                stacklevel=2,
            )
        keep = [p for p in range(len(self.ids)) if p not in self._breaking]
        prune_members(net, keep, optimizer)
        self.ids = [self.ids[p] for p in keep]
        self._breaking = {}

    def state_dict(self) -> dict:
        return {"ids": list(self.ids), "stopped": dict(self.stopped)}

    def load_state_dict(self, state: dict, net: nn.Module) -> None:
        """Restore after a resume: the network, built with every member, loses the stopped ones
        (before its weights are loaded)."""
        self.stopped = {int(k): v for k, v in state["stopped"].items()}
        keep = [self.ids.index(i) for i in state["ids"]]
        if len(keep) < len(self.ids):
            prune_members(net, keep)
        self.ids = list(state["ids"])


class MemberStoppedWarning(UserWarning):
    """A member of an ensemble stopped (its numbers broke); the others train on."""
