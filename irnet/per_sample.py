"""Per-sample reductions of a batch: every dimension but the first belongs to one sample.

Solvers, linear solvers, losses and monitors all stop, weigh and report each
sample on its own; these are the few helpers they share.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_norm(v: Tensor) -> Tensor:
    """Euclidean norm of each sample, shape ``(batch,)``."""
    return torch.linalg.vector_norm(v if v.dim() == 2 else v.flatten(1), dim=1)


def row_sample_norms(rows: Tensor) -> Tensor:
    """Euclidean norm of each sample of each row of stacked batches ``(rows, batch, …)``, shape ``(rows, batch)``."""
    return torch.linalg.vector_norm(rows.flatten(2), dim=2)


def sample_dot(a: Tensor, b: Tensor) -> Tensor:
    """Inner product of each pair of samples, shape ``(batch,)``."""
    return (a * b).flatten(1).sum(1)


def per_sample(s: Tensor, like: Tensor) -> Tensor:
    """Reshape a ``(batch,)`` tensor so it broadcasts against ``like``."""
    return s.view(-1, *([1] * (like.dim() - 1)))


__all__ = ["per_sample", "row_sample_norms", "sample_dot", "sample_norm"]
