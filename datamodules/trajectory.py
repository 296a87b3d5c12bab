"""Learning an ODE's flow from trajectories: the data modules' base.

:class:`TrajectoryDataModule` holds what :class:`~irnet.datamodules.stiff.StiffODE` and
:class:`~irnet.datamodules.lotka.LotkaVolterra` share: initial states drawn per split, the states
at every step of a grid, and batches of (initial state, states at the observation steps).
:class:`~irnet.module.TrajectoryModule` trains a network that maps an initial state to those
states (:class:`~irnet.nets.FlowNet`) with the mean squared error, optionally on a growing
horizon: fitting a long oscillating trajectory from the start (Lotka–Volterra over more than a
period) tends to settle on a flow that spirals into the data's mean; fitting the first few
observations first and adding the later ones over the first epochs avoids that (a curriculum
over the horizon).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from irnet._misc import check_int, check_positive
from irnet.datamodules.base import SPLITS, Split, TensorDataModule


class TrajectoryDataModule(TensorDataModule):
    """Trajectories of an ODE on ``steps`` equal steps over [0, T], observed every few steps.

    Each split draws its own initial states (seeded by ``seed`` and the split). A sample's input
    is its initial state, shape ``(features,)``; its target the states at steps
    ``observe_every, 2·observe_every, …, steps``, shape ``(steps // observe_every, features)``.
    Subclasses give :meth:`initial_states` and :meth:`solve`.

    Args:
        T: final time.
        steps: steps of the grid over [0, T] (the network's layers: h = T / steps).
        observe_every: steps between observations; must divide ``steps``.
        samples: initial states in the train, val and test splits (three integers).
        batch_size: ``None`` for full batch.
        seed: seed of the initial states and of shuffling.
        num_workers: DataLoader workers.
    """

    features = 1

    def __init__(
        self,
        T: float,
        steps: int,
        observe_every: int,
        samples: list[int],
        batch_size: Optional[int] = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        self.T = check_positive("T", T)
        self.steps = check_int("steps", steps, 1)
        self.observe_every = check_int("observe_every", observe_every, 1)
        if self.steps % self.observe_every:
            raise ValueError(
                f"observe_every must divide steps={self.steps}, got {self.observe_every}"
            )
        samples = list(samples) if isinstance(samples, (list, tuple)) else samples
        if not isinstance(samples, list) or len(samples) != len(SPLITS):
            raise ValueError(
                f"samples must be a list of {len(SPLITS)} integers (train, val, test), "
                f"got {samples!r}"
            )
        self.samples = [check_int(f"samples[{i}]", n, 1) for i, n in enumerate(samples)]

    @property
    def step(self) -> float:
        """The step h = T / steps."""
        return self.T / self.steps

    def times(self) -> Tensor:
        """The ``steps + 1`` grid times ``0, h, …, T`` (float64)."""
        return torch.linspace(0.0, self.T, self.steps + 1, dtype=torch.float64)

    def observed_steps(self) -> Tensor:
        """Indices into :meth:`times` of the observations: ``observe_every, …, steps``."""
        return torch.arange(self.observe_every, self.steps + 1, self.observe_every)

    def initial_states(self, count: int, generator: torch.Generator) -> Tensor:
        """``count`` initial states, shape ``(count, features)``, float64."""
        raise NotImplementedError

    def solve(self, y0: Tensor) -> Tensor:
        """The states at every grid time, shape ``(batch, steps + 1, features)``, float64."""
        raise NotImplementedError

    def build(self) -> dict[str, Split]:
        built = {}
        observed = self.observed_steps()
        for index, (split, count) in enumerate(zip(SPLITS, self.samples)):
            generator = torch.Generator().manual_seed(self.seed * len(SPLITS) + index)
            y0 = self.initial_states(count, generator)
            states = self.solve(y0)
            built[split] = (y0.float(), states[:, observed].float())
        return built
