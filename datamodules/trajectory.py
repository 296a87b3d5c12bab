"""Learning an ODE's flow from trajectories: the data modules' base and the module that fits them.

:class:`TrajectoryDataModule` holds what :class:`~irnet.datamodules.stiff.StiffODE` and
:class:`~irnet.datamodules.lotka.LotkaVolterra` share: initial states drawn per split, the states
at every step of a grid, and batches of (initial state, states at the observation steps).
:class:`TrajectoryModule` trains a network that maps an initial state to those states
(:class:`~irnet.nets.FlowNet`) with the mean squared error, optionally on a growing horizon: fitting
a long oscillating trajectory from the start (Lotka–Volterra over more than a period) tends to
settle on a flow that spirals into the data's mean; fitting the first few observations first and
adding the later ones over the first epochs avoids that (a curriculum over the horizon).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from irnet._misc import check_int, check_positive
from irnet.datamodules.base import SPLITS, Split, TensorDataModule
from irnet.module import ImplicitNetModule


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


class TrajectoryModule(ImplicitNetModule):
    """:class:`~irnet.module.ImplicitNetModule` with the mean squared error over the observed
    states, and a curriculum over the horizon.

    In training epoch e (from 0) the loss counts the first
    ``H(e) = min(n, horizon_start + ⌈(n − horizon_start) · e / horizon_epochs⌉)`` of the n
    observations (all of them from epoch ``horizon_epochs`` on); validation, test and the
    logged metrics always count all of them, so ``val/loss`` is the full trajectories' mean
    squared error throughout.

    Args:
        net: a network whose output is the observed states, shape ``(batch, n, features)``
            (e.g. :class:`~irnet.nets.FlowNet`).
        horizon_start: observations counted in the first epoch.
        horizon_epochs: epochs over which the horizon grows to all observations; ``0`` counts
            all of them from the start (no curriculum).
        loss: ``"mse"`` (the only one).
        **kwargs: the other arguments of :class:`~irnet.module.ImplicitNetModule`.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        horizon_start: int = 1,
        horizon_epochs: int = 0,
        loss: str = "mse",
        **kwargs: Any,
    ) -> None:
        if loss != "mse":
            raise ValueError(f"TrajectoryModule trains with loss 'mse', got {loss!r}")
        super().__init__(net, loss=loss, **kwargs)
        self.horizon_start = check_int("horizon_start", horizon_start, 1)
        self.horizon_epochs = check_int("horizon_epochs", horizon_epochs, 0)

    def horizon(self, observations: int, epoch: int) -> int:
        """The observations counted by the training loss in ``epoch`` (of ``observations``).

        Example:
            >>> from irnet.nets import FlowNet
            >>> module = TrajectoryModule(FlowNet(layers=4), horizon_start=2, horizon_epochs=4)
            >>> [module.horizon(10, e) for e in range(6)]
            [2, 4, 6, 8, 10, 10]
        """
        if self.horizon_epochs == 0 or epoch >= self.horizon_epochs:
            return observations
        grown = math.ceil((observations - self.horizon_start) * epoch / self.horizon_epochs)
        return max(1, min(observations, self.horizon_start + grown))

    def compute_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """The mean squared error over the first :meth:`horizon` observations in training, over
        all of them otherwise."""
        if pred.shape != target.shape:
            raise ValueError(
                f"the network's output has shape {tuple(pred.shape)} but the observed states "
                f"{tuple(target.shape)}: do the network's layers and observe_every match the "
                f"data's steps and observe_every?"
            )
        if self.training and pred.dim() > 1:
            count = self.horizon(pred.shape[1], self.current_epoch)
            pred, target = pred[:, :count], target[:, :count]
        return super().compute_loss(pred, target)
