"""Lightning callbacks for monitoring implicit networks (imported as irnet.callbacks).

* :class:`SolverStatistics`: forward iterations, residuals, failures and
  adjoint-solve depth per layer (scalars, histograms).
* :class:`GradientMagnitudes`: loss-gradient norms w.r.t. each layer's
  parameters and hidden state (paper Fig. 6).
* :class:`StabilityMonitor`: spectral radii of each layer's Jacobian and of
  θ∂F/∂y.
* :class:`PerturbationStreams`: owns the perturbation streams of R_rnd (the
  noise model) and logs ‖y_t − ỹ_t‖ per depth t: whether perturbations grow
  or damp across the network.
* :class:`Figures`: the paper's figures (outputs, trajectories, vector fields,
  decision regions, iterations per layer) as TensorBoard images and PNGs.

All work under DDP (rank 0 writes; no collective is called on one rank only)
and on any device, and with seed ensembles (``ODENet(ensemble=E)``): the usual tags
pool the members (means over members, maxima over members), each member's values
follow under ``<tag>/member_<k>`` with their spread ``<tag>/std``, and the figures
draw every member's output curve and decision boundary. See ``docs/monitoring.md``.
"""

from .figures import Figures
from .gradient_magnitudes import GradientMagnitudes
from .perturbation_streams import PerturbationStreams
from .solver_statistics import SolverStatistics
from .stability_monitor import StabilityMonitor

__all__ = [
    "Figures",
    "GradientMagnitudes",
    "PerturbationStreams",
    "SolverStatistics",
    "StabilityMonitor",
]
