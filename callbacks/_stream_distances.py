"""Distances between clean and perturbed hidden states: ‖y_t − ỹ_t^(p)‖ over P perturbation streams.

Shared by :class:`PerturbationStreams` in both of its modes: measuring the
streams itself, and reading what R_rnd measured in a training step (where the
input distance ‖y_0 − ỹ_0‖ is caught by a hook on the first block).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from irnet._misc import sample_norm


def stream_distance(clean: Tensor, noisy: Tensor, streams: int) -> Tensor:
    """Mean over samples and streams of ``‖noisy − clean‖`` (per-sample Euclidean norms).

    Args:
        clean: states of the batch, ``(batch, …)``.
        noisy: states of its P perturbed copies stacked along the batch,
            ``(streams · batch, …)`` (the layout of
            :meth:`~irnet.regularizers.PerturbationRegularizer.perturb`).
        streams: P.

    Returns:
        A 0-d float32 tensor.
    """
    repeated = clean.repeat(streams, *([1] * (clean.dim() - 1)))
    return sample_norm((noisy - repeated).float()).mean()


def depth_distances(clean: list[Tensor], noisy: list[Tensor], streams: int) -> Tensor:
    """:func:`stream_distance` at every depth t = 0…T of two trajectories, shape ``(T+1,)``."""
    return torch.stack([stream_distance(c, n, streams) for c, n in zip(clean, noisy)])


def amplification(distances: Tensor) -> Optional[float]:
    """``‖y_T − ỹ_T‖ / ‖y_0 − ỹ_0‖`` (> 1: perturbations grow across depth); None if undefined."""
    first, last = float(distances[0]), float(distances[-1])
    if not (first > 0 and torch.isfinite(distances[[0, -1]]).all()):
        return None
    return last / first


class InputDistanceHook:
    """Catches ``‖y_0 − ỹ_0‖`` of R_rnd's streams at the input of the network's first block.

    In a training step with R_rnd the first block is called on the clean
    states ``y_0`` (batch B) and then on the perturbed ones (batch P·B, the
    regulariser's batched pass). A forward pre-hook keeps the first call's
    input and measures the first later call whose batch is P·B.
    """

    def __init__(self) -> None:
        self._handle: Optional[RemovableHandle] = None
        self._recording = False
        self._streams = 1
        self._clean: Optional[Tensor] = None
        self._value: Optional[Tensor] = None

    def attach(self, block: nn.Module) -> None:
        """Hook ``block`` (replacing any earlier one)."""
        self.detach()
        self._handle = block.register_forward_pre_hook(self._hook)

    def detach(self) -> None:
        """Remove the hook."""
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._recording, self._clean = None, False, None

    def start(self, streams: int) -> None:
        """Begin a training step whose regulariser runs ``streams`` perturbed copies."""
        self._streams, self._clean, self._value, self._recording = streams, None, None, True

    def stop(self) -> Optional[Tensor]:
        """End the step: the input distance, or None if no perturbed pass was seen."""
        value, self._recording, self._clean, self._value = self._value, False, None, None
        return value

    def _hook(self, block: nn.Module, args: tuple) -> None:
        if not self._recording or not args or not isinstance(args[0], Tensor):
            return
        y = args[0].detach()
        if self._clean is None:
            self._clean = y
        elif (
            self._value is None
            and y.shape[0] == self._streams * self._clean.shape[0]
            and y.shape[1:] == self._clean.shape[1:]
        ):
            self._value = stream_distance(self._clean, y, self._streams)
