"""Example 1 of the paper: regression of f(x) = sin(x) + 0.1 cos(19x) on [−5, 5]."""

from __future__ import annotations

import torch
from torch import Tensor

from irnet._misc import check_int
from irnet.datamodules.base import Split, TensorDataModule


def sine_target(x: Tensor) -> Tensor:
    """f(x) = sin(x) + 0.1 cos(19x)."""
    return torch.sin(x) + 0.1 * torch.cos(19 * x)


class SineRegression(TensorDataModule):
    """``num_points`` equally spaced training points on [low, high]; validation at the midpoints.

    Inputs and targets have shape ``(N, 1)``. The test split is the validation
    split (the midpoints). Nothing is random: ``seed`` only seeds shuffling when
    ``batch_size`` is set.

    Args:
        num_points: training points (51 in the paper).
        low: left end of the interval.
        high: right end of the interval.
        batch_size: ``None`` for full batch.
        seed: seed of shuffling.
        num_workers: DataLoader workers.
    """

    in_features = 1
    out_features = 1

    def __init__(
        self,
        num_points: int = 51,
        low: float = -5.0,
        high: float = 5.0,
        batch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        self.num_points = check_int("num_points", num_points, 2)
        if not low < high:
            raise ValueError(f"low must be < high, got low={low!r}, high={high!r}")
        self.low, self.high = float(low), float(high)

    def target(self, x: Tensor) -> Tensor:
        """The target function f(x) = sin(x) + 0.1 cos(19x) (e.g. to draw it on a fine grid)."""
        return sine_target(x)

    def build(self) -> dict[str, Split]:
        # float64 grid, then float32: midpoints exactly between training points
        x = torch.linspace(self.low, self.high, self.num_points, dtype=torch.float64)
        mid = (x[1:] + x[:-1]) / 2
        train = (x[:, None].float(), sine_target(x)[:, None].float())
        val = (mid[:, None].float(), sine_target(mid)[:, None].float())
        return {"train": train, "val": val, "test": val}
