"""scikit-learn's 8×8 handwritten digits (1797 images shipped with the package, no download)."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits

from irnet.datamodules.base import Split, TensorDataModule, check_fraction, random_splits


class Digits(TensorDataModule):
    """The UCI 8×8 digits, 10 classes, split at random into train/val/test.

    Pixels (0–16) are standardised with the mean and standard deviation of the
    training split (one scalar each, so the blank border pixels stay constant).

    Args:
        flatten: ``True`` gives vectors ``(N, 64)``; ``False`` images ``(N, 1, 8, 8)``.
        val_fraction: share of the images used for validation.
        test_fraction: share of the images used for testing.
        batch_size: samples per batch (``None`` for full batch).
        seed: seed of the split and of shuffling.
        num_workers: DataLoader workers.
    """

    num_classes = 10
    image_shape = (1, 8, 8)

    def __init__(
        self,
        flatten: bool = True,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        batch_size: int | None = 128,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        if not isinstance(flatten, bool):
            raise ValueError(f"flatten must be True or False, got {flatten!r}")
        self.flatten = flatten
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        self.test_fraction = check_fraction("test_fraction", test_fraction)

    @property
    def in_features(self) -> int:
        """64 (the flat vector's size)."""
        return 64

    def build(self) -> dict[str, Split]:
        data = load_digits()
        x = torch.as_tensor(data.data, dtype=torch.float32)
        y = torch.as_tensor(data.target, dtype=torch.long)
        splits = random_splits(x, y, self.val_fraction, self.test_fraction, self.seed)
        train_x = splits["train"][0]
        mean, std = train_x.mean(), train_x.std()
        shape = (-1, 64) if self.flatten else (-1, *self.image_shape)
        return {name: (((sx - mean) / std).reshape(shape), sy) for name, (sx, sy) in splits.items()}
