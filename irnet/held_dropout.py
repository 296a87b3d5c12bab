"""Dropout and batch statistics inside the residual function F of an implicit layer.

A fixed point exists only for a fixed map: a dropout mask redrawn at every
evaluation of F, or batch statistics that change with every iterate, give each
solver iteration (and the adjoint solve) a different F. Following torchdeq's
variational dropout, the layer holds one draw of randomness per forward:
:class:`HeldRandomness` replays the random-number generator's state of F's
first call before every later call, so every evaluation of F in one block
forward — the solve, the graph at the solution, and the adjoint solve in
backward — sees the same dropout masks. BatchNorm in training mode couples the
samples of a batch and updates its running statistics at every evaluation; it
is refused (:func:`check_batch_statistics`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd


def is_active_dropout(m: nn.Module) -> bool:
    """Whether ``m`` is a dropout module (any ``nn.Dropout*``) that is training with ``p > 0``."""
    return isinstance(m, _DropoutNd) and m.training and m.p > 0


def has_active_dropout(F: nn.Module) -> bool:
    """Whether F holds an active dropout module (see :func:`is_active_dropout`)."""
    return any(is_active_dropout(m) for m in F.modules())


def refuse_batch_statistics(m: nn.Module, name: str = "") -> None:
    """Raise ``ValueError`` if ``m`` (called ``F.<name>``) is a BatchNorm using batch statistics."""
    if isinstance(m, _BatchNorm) and (m.training or not m.track_running_stats):
        where = f"F.{name}" if name else "F"
        raise ValueError(
            f"{where} is a {type(m).__name__} that normalises with batch statistics "
            f"(training={m.training}, track_running_stats={m.track_running_stats}): they couple "
            "the samples and change at every solver iteration, so the implicit layer has no "
            "fixed point. Use a per-sample normalisation (GroupNorm, LayerNorm, InstanceNorm), "
            "or put it in eval mode with running statistics"
        )


def check_batch_statistics(F: nn.Module) -> None:
    """Refuse BatchNorm modules in F that would normalise with batch statistics.

    A BatchNorm in eval mode with running statistics is a fixed per-sample
    affine map and is accepted. GroupNorm, LayerNorm and InstanceNorm act on
    each sample alone and are always accepted.

    Raises:
        ValueError: a BatchNorm in F is in training mode, or has
            ``track_running_stats=False`` (batch statistics in every mode).
    """
    for name, m in F.named_modules():
        refuse_batch_statistics(m, name)


def _rng_state(device: torch.device) -> Tensor:
    if device.type == "cpu":
        return torch.get_rng_state()
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return getattr(torch, device.type).get_rng_state()


def _set_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    elif device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        getattr(torch, device.type).set_rng_state(state)


class HeldRandomness:
    """Give every evaluation of F within one block forward the random draws of its first.

    Call :meth:`enter` before and :meth:`exit` after each evaluation. The first
    evaluation draws from the default generator of ``device`` as usual and
    leaves it advanced (as a single call of F would); every later one starts
    from the same generator state, so draws of the same shape (a dropout mask
    for the same batch) repeat, and restores the generator afterwards.

    Args:
        device: the device F computes on (its default generator is held).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._start: Optional[Tensor] = None
        self._restore: list[Optional[Tensor]] = []

    def enter(self) -> None:
        """Before an evaluation of F."""
        if self._start is None:
            self._start = _rng_state(self.device)
            self._restore.append(None)
        else:
            self._restore.append(_rng_state(self.device))
            _set_rng_state(self.device, self._start)

    def exit(self) -> None:
        """After an evaluation of F (also when it raised)."""
        state = self._restore.pop() if self._restore else None
        if state is not None:
            _set_rng_state(self.device, state)


__all__ = ["HeldRandomness", "check_batch_statistics", "has_active_dropout", "is_active_dropout",
           "refuse_batch_statistics"]
