"""irnet: implicit residual networks (Reshniak & Webster, "Robust learning with implicit residual networks")."""

from irnet.layer import ImplicitResidualBlock
from irnet.stats import ConvergenceWarning, SolverStats

__all__ = ["ConvergenceWarning", "ImplicitResidualBlock", "SolverStats"]
__version__ = "0.1.0"
