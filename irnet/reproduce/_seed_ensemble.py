"""Seeds trained as one ensemble (``reproduce seeds``, on where exact; ``--no-ensemble`` off).

Seeds s, s+1, …, s+E−1 of one config differ only in the networks' initial weights (the data
modules shuffle with their own seed, R_rnd and the other regularisers draw from their own
generators), so ``--model.net.init_args.ensemble E --seed_everything s`` trains every one of
them exactly as its own run would (docs/ensembles.md) in one process, at a fraction of the time.
:class:`EnsembleSeedRecorder` then writes one record per member, the same record a seed of its
own gets (:class:`~irnet.reproduce._seed_record.SeedRecorder`), from the members' logged metrics
and their rows of every forward solve.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from torch import Tensor

from irnet.nets.ensemble import rows_of
from irnet.reproduce._seed_record import METRICS, SeedRecorder, summary


def can_ensemble(module: Any) -> bool:
    """Whether the config's network trains its seeds exactly as an ensemble: an ODENet with
    the MLP right-hand side or a ConvODENet, without a spectral window, not already an
    ensemble."""
    from irnet.nets import ConvODENet, ODENet

    net = getattr(module, "net", None)
    return (
        (type(net) is ODENet and net.rhs == "mlp" or type(net) is ConvODENet)
        and net.stability_limits is None
        and net.members == 1
    )


def group_seeds(seeds: list[int], groups: int) -> list[list[int]]:
    """Consecutive seeds in ``groups`` ensembles of near-equal size (one per worker)."""
    groups = max(1, min(groups, len(seeds)))
    size = math.ceil(len(seeds) / groups)
    return [seeds[i : i + size] for i in range(0, len(seeds), size)]


class EnsembleSeedRecorder(SeedRecorder):
    """Every member's per-epoch losses and forward-solve statistics; :meth:`records` gives each
    member the record a seed of its own gets."""

    def __init__(self, seeds: list[int]) -> None:
        super().__init__()
        self.seeds = seeds
        self.member_series = [
            {k: [] for k in (*METRICS, "iterations", "unconverged", "diverged")} for _ in seeds
        ]
        self.member_val = [[0, 0] for _ in seeds]  # validation unconverged, diverged
        self._ids: list[int] = list(range(len(seeds)))
        self._members_epoch: list[Tensor] = []  # per step: (live members, 3)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._ids = list(pl_module.member_ids)  # before the step (a member may leave at its end)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._members_epoch = []

    def _step_counts(self) -> Optional[Tensor]:
        """Per live member: (mean iterations over layers, unconverged, diverged) of the step."""
        step = self._recorder.stop()
        stats = [s for s in step.forward if s is not None] if step is not None else []
        if not stats:
            return None
        members = len(self._ids)
        iterations = torch.stack(
            [rows_of(s.iterations.float(), members).mean(1) for s in stats]
        ).mean(0)
        unconverged = sum(rows_of(~s.converged, members).sum(1) for s in stats).float()
        diverged = sum(rows_of(s.diverged, members).sum(1) for s in stats).float()
        return torch.stack([iterations, unconverged, diverged], 1).detach().cpu()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        counts = self._step_counts()
        if counts is not None:
            self._members_epoch.append(self._by_member(counts))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dl=0) -> None:
        self._ids = list(pl_module.member_ids)
        super().on_validation_batch_start(trainer, pl_module, batch, batch_idx, dl)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dl=0) -> None:
        counts = self._step_counts()
        if counts is not None:
            for member, row in enumerate(self._by_member(counts)):
                self.member_val[member][0] += int(row[1]) if math.isfinite(row[1]) else 0
                self.member_val[member][1] += int(row[2]) if math.isfinite(row[2]) else 0

    def _by_member(self, counts: Tensor) -> Tensor:
        """Live members' rows placed at their original numbers; NaN for members gone."""
        full = torch.full((len(self.seeds), 3), math.nan)
        full[self._ids] = counts
        return full

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        steps = (
            torch.stack(self._members_epoch)
            if self._members_epoch
            else torch.full((1, len(self.seeds), 3), math.nan)
        )
        alone = pl_module.members == 1  # the module logs no per-member values for one member
        for member, series in enumerate(self.member_series):
            for key, name in METRICS.items():
                value = metrics.get(name if alone else f"{name}/member_{member}")
                live = member in pl_module.member_ids
                series[key].append(float(value) if value is not None and live else math.nan)
            series["iterations"].append(float(steps[:, member, 0].mean()))
            series["unconverged"].append(float(steps[:, member, 1].sum()))
            series["diverged"].append(float(steps[:, member, 2].sum()))

    def records(self, max_epochs: Optional[int]) -> list[dict]:
        """One record per member, as :meth:`SeedRecorder.record` makes for a seed of its own."""
        out = []
        for series, (val_unconverged, val_diverged) in zip(self.member_series, self.member_val):
            ran = [v for v in series["val_loss"] if math.isfinite(v)]
            trimmed = {k: v[: len(ran)] if ran else v for k, v in series.items()}
            out.append(summary(trimmed, max_epochs, val_unconverged, val_diverged))
        return out
