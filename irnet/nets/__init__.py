"""Networks of implicit residual blocks, and what they are built from.

* :mod:`~irnet.nets.residual`: residual functions F (``MLPResidual``, ``ConvResidual``);
* :mod:`~irnet.nets.rhs`: structured residual functions (``HamiltonianResidual``,
  ``ParabolicResidual``, ``HollowResidual``), chosen by ``ODENet(rhs=…)``;
* :mod:`~irnet.nets.spectral_window`: the spectral window (``stability_limits``) that keeps each
  layer's Jacobian's eigenvalues in a chosen disc;
* :mod:`~irnet.nets.ode_net`: the paper's ODE-style networks (``ODENet``, ``ConvODENet``);
* :mod:`~irnet.nets.trajectory`: a network that learns an ODE's flow from trajectories
  (``FlowNet``);
* :mod:`~irnet.nets.staged`: the authors' three-stage MNIST network (``StagedConvODENet``);
* :mod:`~irnet.nets.contraction`: the Lipschitz bound that makes every layer a contraction;
* :mod:`~irnet.nets.ensemble` and :mod:`~irnet.nets.memberwise`: seed ensembles, E networks
  trained as one (``ODENet(ensemble=E)``), and their member-wise layers;
* :mod:`~irnet.nets.warm_start` and :mod:`~irnet.nets.warm_start_merge`: solves that start
  from each sample's last fixed points, and their merge across processes;
* :mod:`~irnet.nets.protocol`: what training and callbacks rely on in a network.
"""

from irnet.nets.contraction import LipschitzConstraint, NormGroup
from irnet.nets.ode_net import ConvODENet, ImplicitODENet, ODENet
from irnet.nets.protocol import ImplicitNetwork, TrajectoryNetwork, auxiliary_pass, find_blocks
from irnet.nets.residual import (
    ACTIVATIONS,
    BOUNDED_INIT_LIPSCHITZ,
    CONV_INITS,
    INITS,
    READOUTS,
    ConvResidual,
    MLPResidual,
    make_activation,
)
from irnet.nets.rhs import (
    RHS,
    HamiltonianResidual,
    HollowResidual,
    ParabolicResidual,
    make_residual,
)
from irnet.nets.spectral_window import SpectralWindow
from irnet.nets.staged import StagedConvODENet
from irnet.nets.trajectory import FlowNet
from irnet.nets.warm_start import WarmStartCache

__all__ = [
    "ACTIVATIONS",
    "BOUNDED_INIT_LIPSCHITZ",
    "CONV_INITS",
    "INITS",
    "READOUTS",
    "RHS",
    "ConvODENet",
    "ConvResidual",
    "FlowNet",
    "HamiltonianResidual",
    "HollowResidual",
    "ImplicitNetwork",
    "ImplicitODENet",
    "LipschitzConstraint",
    "MLPResidual",
    "NormGroup",
    "ODENet",
    "ParabolicResidual",
    "SpectralWindow",
    "StagedConvODENet",
    "TrajectoryNetwork",
    "WarmStartCache",
    "auxiliary_pass",
    "find_blocks",
    "make_activation",
    "make_residual",
]
