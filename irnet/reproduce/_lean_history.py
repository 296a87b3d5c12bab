"""A study's per-epoch record without Lightning's logging: for runs of thousands of epochs.

:class:`~irnet.reproduce._runner.History` reads what the monitoring callbacks
(:class:`~irnet.callbacks.SolverStatistics`, :class:`~irnet.callbacks.GradientMagnitudes`)
log. Those log a dozen tags per step through ``LightningModule.log``, which costs
about 0.5 ms a call: on Example 1 (one full-batch step per epoch) that is a large
part of an epoch. :class:`LeanHistory` records the same
:data:`~irnet.reproduce._runner.HISTORY_KEYS` values directly from the blocks'
statistics and gradient hooks, as plain floats, with no logging at all. With
validation every 10th epoch (``runner.train(lean=True)``) an Example 1 epoch
(10 layers, θ = ½) took 0.48× the time of one with the callbacks and validation
every epoch (70 against 147 ms, one thread, side by side:
``benchmarks/bench_study_epoch.py``; docs/benchmarks.md).

An ensemble (``ODENet(ensemble=E)``, :mod:`irnet.nets.ensemble`) trains E seeds at once:
``LeanHistory(members=E)`` then also keeps each member's own record in :attr:`member_values`
(its logged ``…/member_<k>`` losses, and its rows of every solve's iterations and of every
gradient), the record the member's own run would have made.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from irnet._misc import sample_norm
from irnet.callbacks.solver_recorder import SolverStatsRecorder
from irnet.nets import find_blocks
from irnet.nets.ensemble import rows_of

# History keys read from the module's own epoch metrics (the rest are measured here).
LOGGED = {
    "train_loss": "train/loss",
    "val_loss": "val/loss",
    "train_acc": "train/acc",
    "val_acc": "val/acc",
}
MEASURED = (
    "forward_iterations",
    "backward_iterations",
    "gradient_mean",
    "gradient_first",
    "gradient_last",
)


class LeanHistory(Callback):
    """Per epoch: losses (and accuracies) from the module's epoch metrics; mean fixed-point and
    adjoint iterations over layers and steps; mean per-sample ‖∂L/∂y_t‖ over layers, and at the
    first and last layer (the output of each block, as
    :class:`~irnet.callbacks.GradientMagnitudes` takes it).

    ``values`` has the keys of :class:`~irnet.reproduce._runner.History`; NaN where a value does not
    apply (no implicit layer, no validation that epoch: validation may run every few epochs).

    Args:
        members: the ensemble's size E (1: an ordinary network). With E > 1, ``values`` is the
            members' mean and ``member_values[k]`` member k's own record (NaN from the epoch it
            stopped in; :attr:`member_stopped` maps k to that epoch).
    """

    def __init__(self, members: int = 1) -> None:
        self.values: dict[str, list[float]] = {key: [] for key in (*LOGGED, *MEASURED)}
        self.members = members
        self.member_values = [{key: [] for key in self.values} for _ in range(members)]
        self.member_stopped: dict[int, float] = {}
        self._recorder = SolverStatsRecorder()
        self._handles: list = []
        self._sums: dict[str, list[float]] = {}
        self._grads: list[list[Tensor]] = []
        self._capturing, self._seen = False, []
        self._ids: list[int] = list(range(members))  # live members' numbers, by position
        self._member_sums: dict[str, list[Tensor]] = {}
        self._member_grads: list[list[Tensor]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        blocks = find_blocks(pl_module)
        self._recorder.attach(blocks)
        self._handles = [
            block.register_forward_hook(partial(self._capture, i)) for i, block in enumerate(blocks)
        ]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._recorder.detach()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _capture(self, index: int, block: Any, inputs: Any, output: Any) -> None:
        """Hook the main pass's output of each block once a step (not R_rnd's extra passes)."""
        if (
            self._capturing
            and not self._seen[index]
            and isinstance(output, Tensor)
            and output.requires_grad
        ):
            self._seen[index] = True
            output.register_hook(partial(self._record_gradient, index, len(self._ids)))

    def _record_gradient(self, index: int, live: int, grad: Tensor) -> None:
        norms = sample_norm(grad.detach().float())
        self._grads[index].append(norms.mean())
        if self.members > 1:  # each member's mean over its own rows
            self._member_grads[index].append(self._by_member(rows_of(norms, live).mean(1), live))

    def _by_member(self, values: Tensor, live: int) -> Tensor:
        """Live members' values (by position) at their original numbers; NaN for members gone."""
        full = torch.full((self.members,), math.nan, dtype=values.dtype)
        full[self._ids[:live]] = values.cpu()
        return full

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sums = {"forward": [], "backward": []}
        self._grads = [[] for _ in self._recorder.blocks]
        self._member_sums = {"forward": [], "backward": []}
        self._member_grads = [[] for _ in self._recorder.blocks]

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._recorder.start()
        self._capturing, self._seen = True, [False] * len(self._recorder.blocks)
        # before the step: a member that breaks in it leaves the ensemble at its end
        self._ids = list(getattr(pl_module, "member_ids", [0]))

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._capturing = False
        step = self._recorder.stop()
        if step is None:
            return
        for direction in ("forward", "backward"):
            iterations = [
                s.iterations.float().mean() for s in getattr(step, direction) if s is not None
            ]
            if iterations:
                self._sums[direction].append(float(torch.stack(iterations).mean()))
            if self.members > 1:
                self._record_member_iterations(direction, getattr(step, direction))

    def _record_member_iterations(self, direction: str, stats: list) -> None:
        """Each live member's mean iterations over its rows and the layers, at its number."""
        live = len(self._ids)
        per_layer = [rows_of(s.iterations.float(), live).mean(1) for s in stats if s is not None]
        if per_layer:
            means = torch.stack(per_layer).mean(0).detach()
            self._member_sums[direction].append(self._by_member(means, live))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        fresh_validation = _validated_this_epoch(trainer)
        for key, name in LOGGED.items():
            stale = key.startswith("val") and not fresh_validation
            self.values[key].append(
                float(metrics[name]) if name in metrics and not stale else math.nan
            )
        self.values["forward_iterations"].append(_mean(self._sums["forward"]))
        self.values["backward_iterations"].append(_mean(self._sums["backward"]))
        layers = [_mean([float(g) for g in grads]) for grads in self._grads]
        self.values["gradient_mean"].append(_mean([g for g in layers if not math.isnan(g)]))
        self.values["gradient_first"].append(layers[0] if layers else math.nan)
        self.values["gradient_last"].append(layers[-1] if layers else math.nan)
        if self.members > 1:
            self._record_members(trainer, pl_module, fresh_validation)

    def _record_members(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, fresh_validation: bool
    ) -> None:
        """Each member's epoch, as its own run records it: NaN from the epoch it stopped in (its
        own run would have ended there)."""
        metrics, live = trainer.callback_metrics, set(pl_module.member_ids)
        forward = _member_means(self._member_sums["forward"], self.members)
        backward = _member_means(self._member_sums["backward"], self.members)
        layers = [_member_means(grads, self.members) for grads in self._member_grads]
        for k, values in enumerate(self.member_values):
            if k not in live:
                self.member_stopped.setdefault(k, float(trainer.current_epoch))
                for series in values.values():
                    series.append(math.nan)
                continue
            for key, name in LOGGED.items():
                # the last member left is logged as the run itself (a mean over one)
                tag = name if len(live) == 1 else f"{name}/member_{k}"
                stale = key.startswith("val") and not fresh_validation
                values[key].append(
                    float(metrics[tag]) if tag in metrics and not stale else math.nan
                )
            values["forward_iterations"].append(float(forward[k]))
            values["backward_iterations"].append(float(backward[k]))
            own = [float(g[k]) for g in layers]
            values["gradient_mean"].append(_mean([g for g in own if not math.isnan(g)]))
            values["gradient_first"].append(own[0] if own else math.nan)
            values["gradient_last"].append(own[-1] if own else math.nan)


def _validated_this_epoch(trainer: pl.Trainer) -> bool:
    """Whether validation ran at the end of this epoch (``check_val_every_n_epoch``)."""
    every = trainer.check_val_every_n_epoch or 1
    return (trainer.current_epoch + 1) % every == 0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _member_means(rows: list[Tensor], members: int) -> Tensor:
    """The mean over steps of per-member values ``(members,)`` (NaN where none)."""
    return torch.stack(rows).mean(0) if rows else torch.full((members,), math.nan)
