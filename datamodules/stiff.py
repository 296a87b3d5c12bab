"""The authors' stiff example: trajectories of y′ = −20(y − cos t), from its closed-form solution.

A scalar linear ODE whose decay rate λ = −20 makes it stiff on the grid the network learns on:
with T = 2 and 20 steps, hλ = −2, the edge of forward Euler's stability region. Implicit steps
learn it where explicit ones are on the brink (docs/REPORT.md). The solution is known exactly,

    y(t) = y_p(t) + (y(0) − y_p(0)) e^{−20t},   y_p(t) = (400 cos t + 20 sin t) / 401,

so the data carry no integrator error. Batches are (initial value, values at the observation
steps), as for every :class:`~irnet.datamodules.trajectory.TrajectoryDataModule`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from irnet.datamodules.trajectory import TrajectoryDataModule

DECAY = 20.0  # the rate of y′ = −DECAY (y − cos t)


def stiff_solution(y0: Tensor, t: Tensor) -> Tensor:
    """The exact solution of y′ = −20(y − cos t) from ``y0`` at times ``t``.

    Args:
        y0: initial values, shape ``(batch, 1)``.
        t: times, shape ``(n,)``.

    Returns:
        ``(batch, n, 1)``, in ``y0``'s dtype.

    Example:
        >>> y = stiff_solution(torch.tensor([[0.0]], dtype=torch.float64), torch.zeros(1))
        >>> float(y[0, 0, 0])
        0.0
    """
    t = t.to(y0.dtype)
    scale = DECAY**2 + 1
    particular = (DECAY**2 * torch.cos(t) + DECAY * torch.sin(t)) / scale  # (n,)
    start = DECAY**2 / scale
    transient = (y0 - start)[:, None, :] * torch.exp(-DECAY * t)[None, :, None]
    return particular[None, :, None] + transient


class StiffODE(TrajectoryDataModule):
    """Trajectories of the stiff ODE y′ = −20(y − cos t) on [0, T] (the authors' ex_stiff).

    Initial values are drawn uniformly from ``[low, high]`` (the authors': [−0.5, 1.5]); the states
    are the exact solution (:func:`stiff_solution`). With the defaults (T = 2, 20 steps) the
    step's hλ is −2.

    Args:
        T: final time.
        steps: steps over [0, T].
        observe_every: steps between observations (10, 4 or 2 in the study); divides ``steps``.
        samples: initial values in the train, val and test splits.
        low: smallest initial value.
        high: largest initial value.
        batch_size: ``None`` for full batch.
        seed: seed of the initial values and of shuffling.
        num_workers: DataLoader workers.

    Example:
        >>> data = StiffODE(observe_every=10, samples=[4, 2, 2])
        >>> x, y = data.tensors("train")
        >>> tuple(x.shape), tuple(y.shape)
        ((4, 1), (4, 2, 1))
    """

    features = 1

    def __init__(
        self,
        T: float = 2.0,
        steps: int = 20,
        observe_every: int = 2,
        samples: list[int] = (16, 8, 8),
        low: float = -0.5,
        high: float = 1.5,
        batch_size: Optional[int] = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(T, steps, observe_every, samples, batch_size, seed, num_workers)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"low must be < high, got low={low!r}, high={high!r}")
        self.low, self.high = float(low), float(high)

    def initial_states(self, count: int, generator: torch.Generator) -> Tensor:
        u = torch.rand(count, 1, generator=generator, dtype=torch.float64)
        return self.low + (self.high - self.low) * u

    def solve(self, y0: Tensor) -> Tensor:
        return stiff_solution(y0.to(torch.float64), self.times())
