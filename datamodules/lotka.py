"""The authors' Lotka–Volterra example: predator–prey trajectories from an accurate integrator.

x′ = αx − βxy (prey), y′ = δxy − γy (predators), with α = 2/3, β = 4/3, γ = δ = 1, on T = 10
in 50 steps. The system has no closed-form solution; the data come from the classical
Runge–Kutta method in float64 with many substeps per data step (error far below float32's
resolution). Its first integral V = δx − γ ln x + βy − α ln y is constant along every exact
trajectory, which the tests use to check the integrator.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from irnet._misc import check_int
from irnet.datamodules.trajectory import TrajectoryDataModule

ALPHA, BETA, GAMMA, DELTA = 2.0 / 3.0, 4.0 / 3.0, 1.0, 1.0


def lotka_rhs(z: Tensor) -> Tensor:
    """The vector field (αx − βxy, δxy − γy) at states ``z`` of shape ``(..., 2)``."""
    x, y = z[..., 0], z[..., 1]
    return torch.stack([ALPHA * x - BETA * x * y, DELTA * x * y - GAMMA * y], dim=-1)


def lotka_invariant(z: Tensor) -> Tensor:
    """V(x, y) = δx − γ ln x + βy − α ln y, constant along exact trajectories (shape ``z[..., 0]``).

    Example:
        >>> float(lotka_invariant(torch.tensor([1.0, 0.5])))  # the minimum, at the equilibrium
        2.128...
    """
    x, y = z[..., 0], z[..., 1]
    return DELTA * x - GAMMA * torch.log(x) + BETA * y - ALPHA * torch.log(y)


def rk4(z: Tensor, step: float, substeps: int) -> Tensor:
    """``substeps`` classical Runge–Kutta steps of size ``step / substeps`` of :func:`lotka_rhs`."""
    h = step / substeps
    for _ in range(substeps):
        k1 = lotka_rhs(z)
        k2 = lotka_rhs(z + h / 2 * k1)
        k3 = lotka_rhs(z + h / 2 * k2)
        k4 = lotka_rhs(z + h * k3)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return z


class LotkaVolterra(TrajectoryDataModule):
    """Lotka–Volterra trajectories (α = 2/3, β = 4/3, γ = δ = 1) from seeded initial populations.

    Initial populations (x, y) are drawn uniformly from the box ``[low[0], high[0]] × [low[1],
    high[1]]`` around the equilibrium (γ/δ, α/β) = (1, 0.5); each trajectory is integrated in
    float64 by :func:`rk4` with ``substeps`` substeps per grid step.

    Args:
        T: final time.
        steps: steps over [0, T].
        observe_every: steps between observations; divides ``steps``.
        samples: initial populations in the train, val and test splits.
        low: the box's lower corner (x, y).
        high: the box's upper corner (x, y).
        substeps: Runge–Kutta substeps per grid step.
        batch_size: ``None`` for full batch.
        seed: seed of the initial populations and of shuffling.
        num_workers: DataLoader workers.

    Example:
        >>> data = LotkaVolterra(observe_every=5, samples=[3, 2, 2], substeps=4)
        >>> x, y = data.tensors("train")
        >>> tuple(x.shape), tuple(y.shape)
        ((3, 2), (3, 10, 2))
    """

    features = 2

    def __init__(
        self,
        T: float = 10.0,
        steps: int = 50,
        observe_every: int = 1,
        samples: list[int] = (16, 8, 8),
        low: list[float] = (0.5, 0.25),
        high: list[float] = (1.5, 1.0),
        substeps: int = 20,
        batch_size: Optional[int] = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(T, steps, observe_every, samples, batch_size, seed, num_workers)
        low, high = list(low), list(high)
        if len(low) != 2 or len(high) != 2:
            raise ValueError(f"low and high must be two numbers (x, y), got {low!r}, {high!r}")
        if not all(0 < a < b for a, b in zip(low, high)):
            raise ValueError(
                f"low and high must be positive with low < high, got low={low!r}, high={high!r}"
            )
        self.low, self.high = [float(a) for a in low], [float(b) for b in high]
        self.substeps = check_int("substeps", substeps, 1)

    def initial_states(self, count: int, generator: torch.Generator) -> Tensor:
        u = torch.rand(count, 2, generator=generator, dtype=torch.float64)
        low = torch.tensor(self.low, dtype=torch.float64)
        high = torch.tensor(self.high, dtype=torch.float64)
        return low + (high - low) * u

    def solve(self, y0: Tensor) -> Tensor:
        states = [y0.to(torch.float64)]
        for _ in range(self.steps):
            states.append(rk4(states[-1], self.step, self.substeps))
        return torch.stack(states, dim=1)
