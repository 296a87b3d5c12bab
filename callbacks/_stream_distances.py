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


def member_stream_distance(clean: Tensor, noisy: Tensor, streams: int, members: int) -> Tensor:
    """:func:`stream_distance` of each member of an ensemble, ``(E,)`` float32.

    ``clean`` holds the ensemble's sample-major rows (``batch · E``), ``noisy`` its P
    perturbed copies stacked along the rows (``streams · batch · E``): row ``b · E + k`` of
    each copy is member k's, so the distances of member k are those of its own network. Their
    mean over members is :func:`stream_distance`.
    """
    repeated = clean.repeat(streams, *([1] * (clean.dim() - 1)))
    distances = sample_norm((noisy - repeated).float())  # (P · batch · E,), sample-major
    return distances.view(streams, -1, members).mean((0, 1))


def member_depth_distances(
    clean: list[Tensor], noisy: list[Tensor], streams: int, members: int
) -> Tensor:
    """:func:`member_stream_distance` at every depth t = 0…T, shape ``(E, T+1)``."""
    return torch.stack(
        [member_stream_distance(c, n, streams, members) for c, n in zip(clean, noisy)], 1
    )


def amplification(distances: Tensor) -> Optional[float]:
    """``‖y_T − ỹ_T‖ / ‖y_0 − ỹ_0‖`` (> 1: perturbations grow across depth); None if undefined."""
    first, last = float(distances[0]), float(distances[-1])
    if not (first > 0 and torch.isfinite(distances[[0, -1]]).all()):
        return None
    return last / first


class MemberDistanceHooks:
    """Each member's ``‖y_t − ỹ_t‖`` at every depth t = 0…T of R_rnd's streams in a training step.

    R_rnd reports the mean over the ensemble's rows only; hooks on the blocks measure each
    member's. Every block is called first on the clean states (``batch · E`` rows), then on
    the P perturbed copies (the regulariser's batched pass): a pre-hook on the first block
    catches ``y_0`` and ``ỹ_0``, a forward hook on every block ``y_t`` and ``ỹ_t``.
    """

    def __init__(self, members: int) -> None:
        self.members = members
        self._handles: list[RemovableHandle] = []
        self._recording = False
        self._streams = 1
        self._clean: list[Optional[Tensor]] = []
        self._values: list[Optional[Tensor]] = []

    def attach(self, blocks: list[nn.Module]) -> None:
        """Hook ``blocks`` (replacing any earlier ones)."""
        self.detach()
        if not blocks:
            return
        self._handles.append(
            blocks[0].register_forward_pre_hook(lambda block, args: self._see(0, args))
        )
        for t, block in enumerate(blocks, start=1):
            self._handles.append(
                block.register_forward_hook(
                    lambda block, args, output, t=t: self._see(t, (output,))
                )
            )
        self._clean = [None] * (len(blocks) + 1)
        self._values = [None] * (len(blocks) + 1)

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._recording = [], False

    def start(self, streams: int) -> None:
        """Begin a training step whose regulariser runs ``streams`` perturbed copies."""
        self._streams, self._recording = streams, True
        self._clean = [None] * len(self._clean)
        self._values = [None] * len(self._clean)

    def stop(self) -> Optional[Tensor]:
        """End the step: the distances ``(E, T+1)`` (NaN where a depth was not seen), or None if
        no perturbed pass was seen."""
        self._recording = False
        values, self._values = self._values, [None] * len(self._values)
        self._clean = [None] * len(self._clean)
        present = [v for v in values if v is not None]
        if not present:
            return None
        nan = torch.full_like(present[0], float("nan"))
        return torch.stack([nan if v is None else v for v in values], 1)

    def _see(self, depth: int, args: tuple) -> None:
        if not self._recording or not args or not isinstance(args[0], Tensor):
            return
        y, clean = args[0].detach(), self._clean[depth]
        if clean is None:
            self._clean[depth] = y
        elif (
            self._values[depth] is None
            and y.shape[0] == self._streams * clean.shape[0]
            and y.shape[1:] == clean.shape[1:]
        ):
            self._values[depth] = member_stream_distance(clean, y, self._streams, self.members)


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
