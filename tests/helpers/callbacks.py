"""Test helpers for the monitoring callbacks: a minimal module, tiny data, a fit, event files.

The real ``ImplicitNetModule`` and data modules are not used here, so the
callbacks are tested against the contract they rely on only: ``pl_module.net``
is an ImplicitODENet, optional ``pl_module.task``, ``(x, y)`` batches.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from irnet.nets import ODENet


class TinyModule(pl.LightningModule):
    """Wraps a network with an MSE or cross-entropy loss and Adam.

    Args:
        net: the network.
        task: ``"regression"`` or ``"classification"``, or None to leave the
            attribute out (the callbacks then guess from the network).
        classify: use the cross-entropy loss (default: ``task == "classification"``).
        lr: Adam's learning rate.
    """

    def __init__(
        self,
        net: nn.Module,
        task: Optional[str] = "regression",
        classify: Optional[bool] = None,
        lr: float = 1e-2,
    ) -> None:
        super().__init__()
        self.net = net
        if task is not None:
            self.task = task
        self.classify = task == "classification" if classify is None else classify
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        out = self.net(x)
        if self.classify:
            return nn.functional.cross_entropy(out, y)
        return nn.functional.mse_loss(out, y)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss = self.loss(*batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self.log("val_loss", self.loss(*batch))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def sine_data(n: int = 51) -> tuple[Tensor, Tensor]:
    """The paper's Example 1: ``f(x) = sin x + 0.1 cos 19x`` on n points of [−5, 5]."""
    x = torch.linspace(-5, 5, n).unsqueeze(1)
    return x, torch.sin(x) + 0.1 * torch.cos(19 * x)


def two_class_data(n: int = 40) -> tuple[Tensor, Tensor]:
    """Two noisy interleaved half circles in 2-D, labels 0/1."""
    g = torch.Generator().manual_seed(1)
    angle = torch.rand(n, generator=g) * math.pi
    label = torch.arange(n) % 2
    x = torch.stack([torch.cos(angle) + label, torch.sin(angle) * (1 - 2 * label) + 0.3 * label], 1)
    return x + 0.05 * torch.randn(n, 2, generator=g), label


def loader(x: Tensor, y: Tensor, batch_size: Optional[int] = None) -> DataLoader:
    """A non-shuffling loader (full batch by default)."""
    return DataLoader(TensorDataset(x, y), batch_size=batch_size or len(x))


def sine_module(
    layers: int = 3, theta: float | list[float] = 0.5, width: int = 16, **kwargs
) -> TinyModule:
    """A tiny ODENet on 1-D inputs (2-D state) for regression."""
    return TinyModule(
        ODENet(1, 1, layers=layers, T=2.0, width=width, theta=theta, **kwargs), "regression"
    )


def classifier_module(
    layers: int = 3, theta: float = 0.5, task: Optional[str] = "classification"
) -> TinyModule:
    """A tiny ODENet on 2-D inputs (4-D state) with a linear head and two classes."""
    net = ODENet(2, 2, layers=layers, T=2.0, width=16, theta=theta, readout="linear")
    return TinyModule(net, task, classify=True)


def fit(
    module: pl.LightningModule,
    callbacks: Sequence[pl.Callback],
    root: Path,
    train: DataLoader,
    val: Optional[DataLoader] = None,
    epochs: int = 3,
    logger: bool | pl.loggers.Logger = True,
    **trainer_kwargs,
) -> pl.Trainer:
    """Fit on the CPU with a TensorBoardLogger in ``root`` (unless ``logger`` says otherwise)."""
    if logger is True:
        logger = TensorBoardLogger(str(root), name="tb", version=0)
    trainer_kwargs.setdefault("devices", 1)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=list(callbacks),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
        limit_val_batches=None if val is not None else 0,
        **trainer_kwargs,
    )
    trainer.fit(module, train, val)
    return trainer


def events(log_dir: str | Path) -> EventAccumulator:
    """All scalars, histograms and images of the event files in ``log_dir``."""
    accumulator = EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0}
    )
    accumulator.Reload()
    return accumulator


def scalar(acc: EventAccumulator, tag: str) -> list[float]:
    """The values of a scalar tag, in order."""
    return [event.value for event in acc.Scalars(tag)]
