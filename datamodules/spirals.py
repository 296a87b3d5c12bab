"""Example 2 of the paper: two interleaved spirals (Haber & Ruthotto), binary labels."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from irnet._misc import check_int, check_positive
from irnet.datamodules.base import Split, TensorDataModule


def two_spirals(
    num_points: int = 200,
    turns: float = 1.5,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Points along two spirals, ordered along each arm and interleaved by class.

    Spiral 0 runs at radius ``0.1 + 0.9 s`` and angle ``2π · turns · s`` for
    ``s ∈ [0, 1]``; spiral 1 is spiral 0 rotated by π. Point ``2i`` is the
    i-th point of spiral 0 and point ``2i + 1`` the i-th of spiral 1.

    Returns:
        Inputs ``(num_points, 2)`` (float32) and labels ``(num_points,)`` (long).
    """
    per_arm = num_points // 2
    s = torch.linspace(0, 1, per_arm, dtype=torch.float64)
    radius, angle = 0.1 + 0.9 * s, 2 * math.pi * turns * s
    arm = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    x = torch.stack([arm, -arm], dim=1).reshape(-1, 2)  # interleave the two arms
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    y = torch.arange(2).repeat(per_arm)
    return x.float(), y


class TwoSpirals(TensorDataModule):
    """200 points on two labelled spirals; every other point of each arm is held out.

    Along each arm, points 0, 2, 4, … train and points 1, 3, 5, … validate (the
    paper's "every other point was removed to be used as the validation
    dataset"); the test split is the validation split.

    Args:
        num_points: total number of points (even; 200 in the paper).
        turns: turns of each spiral.
        noise: standard deviation of Gaussian jitter added to the points.
        batch_size: ``None`` for full batch.
        seed: seed of the jitter and of shuffling.
        num_workers: DataLoader workers.

    Example:
        >>> spirals = TwoSpirals()
        >>> [len(spirals.dataset(split)) for split in ("train", "val", "test")]
        [100, 100, 100]
        >>> x, y = spirals.tensors("train")
        >>> x.shape, y[:4].tolist()
        (torch.Size([100, 2]), [0, 1, 0, 1])
    """

    in_features = 2
    num_classes = 2

    def __init__(
        self,
        num_points: int = 200,
        turns: float = 1.5,
        noise: float = 0.0,
        batch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        if check_int("num_points", num_points, 8) % 4:
            raise ValueError(
                f"num_points must be a multiple of 4 (two arms, every other point "
                f"held out), got {num_points}"
            )
        self.num_points = num_points
        self.turns = check_positive("turns", turns)
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0, got {noise!r}")
        self.noise = float(noise)

    def build(self) -> dict[str, Split]:
        x, y = two_spirals(
            self.num_points, self.turns, self.noise, torch.Generator().manual_seed(self.seed)
        )
        # rows 4i, 4i+1 are point 2i of each arm (train); rows 4i+2, 4i+3 point 2i+1 (val)
        held_out = (torch.arange(self.num_points) // 2) % 2 == 1
        val = (x[held_out], y[held_out])
        return {"train": (x[~held_out], y[~held_out]), "val": val, "test": val}
