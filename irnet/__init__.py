"""irnet: implicit residual networks.

A framework for the networks of Reshniak & Webster, "Robust learning with implicit residual
networks". The block and its statistics are here; the rest is in packages by concept:

* :mod:`irnet.solvers` and :mod:`irnet.linear`: the forward (fixed-point) and adjoint (linear)
  solvers;
* :mod:`irnet.nets`: residual functions and the networks built from blocks;
* :mod:`irnet.module`, :mod:`irnet.regularizers`, :mod:`irnet.perturbations`, :mod:`irnet.failure`:
  training with Lightning;
* :mod:`irnet.callbacks` and :mod:`irnet.datamodules`: monitoring and the toy data sets;
* :mod:`irnet.analysis`: stability, attacks, gradient fidelity and plots, without Lightning;
* :mod:`irnet.cli` and :mod:`irnet.reproduce`: the command line and the paper's studies.

>>> import torch
>>> from irnet import ImplicitResidualBlock
>>> block = ImplicitResidualBlock(torch.nn.Linear(3, 3), theta=1.0)
>>> block(torch.zeros(2, 3)).shape
torch.Size([2, 3])
"""

from irnet import _moved
from irnet.layer import ImplicitResidualBlock
from irnet.stats import ConvergenceWarning, SolverStats

_moved.install()

__all__ = ["ConvergenceWarning", "ImplicitResidualBlock", "SolverStats"]
__version__ = "0.1.0"
