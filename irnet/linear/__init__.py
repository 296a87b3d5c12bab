"""Linear solvers for the adjoint system ``(I − θ ∂F/∂y)ᵀ g = ∇_y L``."""

from irnet.linear.base import AdjointOperator, LinearSolver
from irnet.linear.direct import Direct
from irnet.linear.gmres import GMRES
from irnet.linear.neumann import Neumann

__all__ = ["AdjointOperator", "Direct", "GMRES", "LinearSolver", "Neumann"]
