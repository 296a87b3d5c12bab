"""Fixtures shared by the attack tests."""

from __future__ import annotations

import pytest

from helpers.classification import disk_and_ring, train_mlp


@pytest.fixture(scope="module")
def trained(single_thread):
    """A tiny MLP trained on :func:`disk_and_ring` (seeded) and its data; left in training mode."""
    x, target = disk_and_ring()
    return train_mlp(x, target, seed=0), x, target
