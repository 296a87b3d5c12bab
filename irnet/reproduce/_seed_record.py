"""SeedRecorder: what one seed's fit did, epoch by epoch (for :mod:`irnet.reproduce.seeds`).

Losses and accuracy are read from the Trainer's epoch metrics (the numbers
TensorBoard gets); forward-solve statistics from each block's ``forward_stats``
at its first call in a training step (the main pass, as
:class:`~irnet.callbacks.SolverStatistics` reads them), without logging anything.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning import Callback
from torch import Tensor

from irnet.callbacks.solver_recorder import SolverStatsRecorder
from irnet.nets import find_blocks

LAST_FRACTION = 0.1  # the "late" iteration count: the last 10 % of the epochs run
METRICS = {"train_loss": "train/loss", "val_loss": "val/loss", "val_acc": "val/acc"}


class SeedRecorder(Callback):
    """Per-epoch losses and forward-solve statistics of training; :meth:`record` sums them up.

    Per training step: the mean over layers of each layer's mean iterations
    over the batch, and the numbers of samples × layers whose forward solve did
    not converge (``not converged``) or was given up as diverged. Validation
    solves are counted separately (``val_unconverged``, ``val_diverged``;
    the sanity check is left out).
    """

    def __init__(self) -> None:
        self._recorder = SolverStatsRecorder()
        self.series: dict[str, list[float]] = {
            k: [] for k in (*METRICS, "iterations", "unconverged", "diverged")
        }
        self.val_unconverged = 0
        self.val_diverged = 0
        self._epoch: list[Tensor] = []  # per step: (iterations mean, unconverged, diverged)
        self._flushed = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._recorder.attach(find_blocks(pl_module))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._recorder.detach()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch = []
        self._flushed = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._recorder.start()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        counts = self._step_counts()
        if counts is not None:
            self._epoch.append(counts)

    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._recorder.start()

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        counts = self._step_counts()
        if counts is not None:
            self.val_unconverged += int(counts[1])
            self.val_diverged += int(counts[2])

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # a training step that raised (a NaN stop): its forward solves count too
        counts = self._step_counts()
        if counts is not None:
            self._epoch.append(counts)

    def _step_counts(self) -> Optional[Tensor]:
        """(mean iterations over layers, unconverged, diverged) of the step just ended, or None."""
        step = self._recorder.stop()
        stats = [s for s in step.forward if s is not None] if step is not None else []
        if not stats:
            return None
        return (
            torch.stack(
                [
                    torch.stack([s.iterations.float().mean() for s in stats]).mean(),
                    sum((~s.converged).sum() for s in stats).float(),
                    sum(s.diverged.sum() for s in stats).float(),
                ]
            )
            .detach()
            .cpu()
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning validates before this hook, so val/loss is this epoch's.
        metrics = trainer.callback_metrics
        for key, name in METRICS.items():
            self.series[key].append(float(metrics[name]) if name in metrics else math.nan)
        steps = torch.stack(self._epoch) if self._epoch else torch.full((1, 3), math.nan)
        self.series["iterations"].append(float(steps[:, 0].mean()))
        self.series["unconverged"].append(float(steps[:, 1].sum()))
        self.series["diverged"].append(float(steps[:, 2].sum()))
        self._flushed = True

    def _unflushed(self) -> bool:
        """Whether steps of an unfinished epoch (the fit raised in it) are still uncounted."""
        return bool(self._epoch) and not self._flushed

    def record(self, max_epochs: Optional[int]) -> dict:
        """The seed's summary numbers and per-epoch series (NaN / None where they do not apply)."""
        partial = (
            torch.stack(self._epoch)[:, 1:].sum(0).tolist() if self._unflushed() else [0.0, 0.0]
        )
        return summary(self.series, max_epochs, self.val_unconverged, self.val_diverged, partial)


def summary(
    s: dict[str, list[float]],
    max_epochs: Optional[int],
    val_unconverged: int,
    val_diverged: int,
    partial: Sequence[float] = (0.0, 0.0),
) -> dict:
    """A seed's record from its per-epoch series (``partial``: the unconverged and diverged
    solves of an epoch the fit raised in)."""
    runs = len(s["val_loss"])
    late = max(1, math.ceil(LAST_FRACTION * runs))
    best = _argbest(s["val_loss"], min)
    return {
        "max_epochs": max_epochs,
        "epochs_run": runs,
        "final_val_loss": _last(s["val_loss"]),
        "best_val_loss": _at(s["val_loss"], best),
        "best_epoch": best + 1 if best is not None else None,
        "final_val_acc": _last(s["val_acc"]),
        "best_val_acc": _at(s["val_acc"], _argbest(s["val_acc"], max)),
        "final_train_loss": _last(s["train_loss"]),
        "final_val_acc_drop": _difference(
            _at(s["val_acc"], _argbest(s["val_acc"], max)), _last(s["val_acc"])
        ),
        "final_val_loss_rise": _rise(_last(s["val_loss"]), _at(s["val_loss"], best)),
        "iterations_mean": _nanmean(s["iterations"]),
        "iterations_last10": _nanmean(s["iterations"][-late:]),
        "unconverged": int(_nansum(s["unconverged"]) + partial[0]),
        "diverged": int(_nansum(s["diverged"]) + partial[1]),
        "val_unconverged": val_unconverged,
        "val_diverged": val_diverged,
        "history": {k: list(v) for k, v in s.items()},
    }


def _last(values: list[float]) -> Optional[float]:
    return values[-1] if values else None


def _at(values: list[float], index: Optional[int]) -> Optional[float]:
    return values[index] if index is not None else None


def _argbest(values: list[float], pick: Any) -> Optional[int]:
    """Index of the smallest (``min``) or largest (``max``) finite value, or None."""
    finite = [(v, i) for i, v in enumerate(values) if math.isfinite(v)]
    return pick(finite)[1] if finite else None


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _nansum(values: list[float]) -> float:
    return sum(v for v in values if math.isfinite(v))


def _difference(best: Optional[float], final: Optional[float]) -> Optional[float]:
    return None if best is None or final is None else best - final


def _rise(final: Optional[float], best: Optional[float]) -> Optional[float]:
    """``final / best − 1`` (how far above its best a loss ended), or None."""
    if final is None or best is None or not best > 0:
        return None
    return final / best - 1
