"""Linear solvers for the adjoint system ``(I − θ ∂F/∂y)ᵀ g = ∇_y L``."""

from irnet.linear.base import AdjointOperator, LinearSolver
from irnet.linear.direct import Direct
from irnet.linear.gmres import GMRES
from irnet.linear.neumann import Neumann
from irnet.linear.phantom import JacobianFree, Phantom

__all__ = [
    "AdjointOperator",
    "Direct",
    "GMRES",
    "JacobianFree",
    "LinearSolver",
    "Neumann",
    "Phantom",
]
