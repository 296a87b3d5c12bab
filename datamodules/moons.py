"""Two interleaving half circles (scikit-learn's ``make_moons``) with Gaussian noise."""

from __future__ import annotations

import torch
from sklearn.datasets import make_moons

from irnet._misc import check_int
from irnet.datamodules.base import Split, TensorDataModule, check_fraction, random_splits


class Moons(TensorDataModule):
    """``num_samples`` 2-D points in two moons, labels 0/1, split at random into train/val/test.

    Args:
        num_samples: total number of points.
        noise: standard deviation of the Gaussian noise.
        val_fraction: share of the points used for validation.
        test_fraction: share of the points used for testing.
        batch_size: ``None`` for full batch.
        seed: seed of generation, split and shuffling.
        num_workers: DataLoader workers.
    """

    in_features = 2
    num_classes = 2

    def __init__(
        self,
        num_samples: int = 400,
        noise: float = 0.1,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        batch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        self.num_samples = check_int("num_samples", num_samples, 4)
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0, got {noise!r}")
        self.noise = float(noise)
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        self.test_fraction = check_fraction("test_fraction", test_fraction)

    def build(self) -> dict[str, Split]:
        x, y = make_moons(self.num_samples, noise=self.noise, random_state=self.seed)
        return random_splits(
            torch.as_tensor(x, dtype=torch.float32),
            torch.as_tensor(y, dtype=torch.long),
            self.val_fraction,
            self.test_fraction,
            self.seed,
        )
