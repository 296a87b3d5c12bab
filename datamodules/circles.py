"""Two concentric circles (scikit-learn's ``make_circles``) with Gaussian noise."""

from __future__ import annotations

import torch
from sklearn.datasets import make_circles

from irnet._misc import check_int
from irnet.datamodules.base import Split, TensorDataModule, check_fraction, random_splits


class Circles(TensorDataModule):
    """``num_samples`` 2-D points on two circles, labels 0 (outer) / 1 (inner), random splits.

    Args:
        num_samples: total number of points.
        noise: standard deviation of the Gaussian noise.
        factor: radius of the inner circle relative to the outer one, in (0, 1).
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
        noise: float = 0.05,
        factor: float = 0.5,
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
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {factor!r}")
        self.noise, self.factor = float(noise), float(factor)
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        self.test_fraction = check_fraction("test_fraction", test_fraction)

    def build(self) -> dict[str, Split]:
        x, y = make_circles(
            self.num_samples, noise=self.noise, factor=self.factor, random_state=self.seed
        )
        return random_splits(
            torch.as_tensor(x, dtype=torch.float32),
            torch.as_tensor(y, dtype=torch.long),
            self.val_fraction,
            self.test_fraction,
            self.seed,
        )
