"""Shared plumbing of the data modules: tensors in, train/val/test/predict loaders out."""

from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from irnet._misc import check_int
from irnet.datamodules.sampler import GlobalBatchSlices

SPLITS = ("train", "val", "test")
Split = tuple[Tensor, Tensor]


def check_fraction(name: str, value: float) -> float:
    """A number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def random_splits(
    x: Tensor, y: Tensor, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, Split]:
    """Split ``(x, y)`` at random (seeded) into train, val and test parts."""
    n = x.shape[0]
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    if n - n_val - n_test < 1:
        raise ValueError(f"val_fraction + test_fraction leave no training samples out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = torch.split(order, [n - n_val - n_test, n_val, n_test])
    return {name: (x[idx], y[idx]) for name, idx in zip(SPLITS, parts)}


class TensorDataModule(pl.LightningDataModule):
    """A data module over in-memory tensors; subclasses implement :meth:`build`.

    Under distributed training (a Trainer with world size W > 1) each loader
    forms the batches one process would and gives every process its part of
    each (:class:`~irnet.datamodules.sampler.GlobalBatchSlices`): no sample is
    repeated, so a run on W processes takes the steps of a one-process run
    with ``batch_size`` as the global batch.

    Args:
        batch_size: samples per batch; ``None`` trains full batch (one
            optimiser step per epoch, as in the paper's toy examples).
        seed: seed of data generation, splits and shuffling.
        num_workers: DataLoader worker processes (0: load in the main process).
    """

    def __init__(
        self, batch_size: Optional[int] = None, seed: int = 0, num_workers: int = 0
    ) -> None:
        super().__init__()
        self.batch_size = None if batch_size is None else check_int("batch_size", batch_size, 1)
        self.seed = check_int("seed", seed, 0)
        self.num_workers = check_int("num_workers", num_workers, 0)
        self.splits: Optional[dict[str, TensorDataset]] = None

    def build(self) -> dict[str, Split]:
        """The ``(inputs, targets)`` of the splits ``"train"``, ``"val"`` and ``"test"``."""
        raise NotImplementedError

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits is None:
            built = self.build()
            missing = [s for s in SPLITS if s not in built]
            if missing:
                raise ValueError(
                    f"{type(self).__name__}.build() must return the splits {SPLITS}, "
                    f"missing {missing}"
                )
            self.splits = {name: TensorDataset(*built[name]) for name in SPLITS}

    def dataset(self, split: str) -> TensorDataset:
        """The ``TensorDataset`` of ``split`` (built on first use)."""
        self.setup()
        return self.splits[split]

    def tensors(self, split: str) -> Split:
        """The ``(inputs, targets)`` tensors of ``split``."""
        return tuple(self.dataset(split).tensors)

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        data = self.dataset(split)
        size = len(data) if self.batch_size is None else min(self.batch_size, len(data))
        shuffle = shuffle and size < len(data)  # shuffling a full batch changes nothing
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        workers = dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        world, rank = self._distributed()
        if world == 1:
            return DataLoader(
                data, batch_size=size, shuffle=shuffle, generator=generator, **workers
            )
        # Under DDP every process takes its part of the batches one process would see,
        # without padding; a DistributedSampler subclass, so Lightning keeps it.
        slices = GlobalBatchSlices(
            len(data), size, world, rank, shuffle=shuffle, generator=generator
        )
        return DataLoader(data, sampler=slices, batch_size=None, generator=generator, **workers)

    def _distributed(self) -> tuple[int, int]:
        """``(world_size, global_rank)`` of the attached Trainer, ``(1, 0)`` without one."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Predictions over the test split."""
        return self._loader("test")
