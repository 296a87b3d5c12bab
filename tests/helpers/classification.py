"""A two-class problem in the plane and a tiny MLP fitted to it, for the attack tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as functional
from torch import nn


def disk_and_ring(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 fills the disk r < 1.2, class 1 the ring 2.3 < r < 2.7: separable, not linearly."""
    g = torch.Generator().manual_seed(seed)
    target = torch.arange(n) % 2
    u = torch.rand(n, generator=g)
    radius = torch.where(target == 0, 1.2 * u.sqrt(), 2.5 + 0.4 * (u - 0.5))
    angle = 2 * torch.pi * torch.rand(n, generator=g)
    return torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1), target


def train_mlp(x: torch.Tensor, target: torch.Tensor, seed: int) -> nn.Module:
    """A tiny tanh MLP fitted to (x, target) by 300 full-batch Adam steps (seeded)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        functional.cross_entropy(model(x), target).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model


@pytest.fixture(scope="module")
def trained(single_thread):
    """A tiny MLP trained on :func:`disk_and_ring` (seeded) and its data; left in training mode."""
    x, target = disk_and_ring()
    return train_mlp(x, target, seed=0), x, target
