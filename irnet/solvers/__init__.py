"""Forward solvers for ``y = x + (1 − θ)F(x) + θF(y)``; see :class:`NonlinearSolver`."""

from irnet.solvers.anderson import Anderson
from irnet.solvers.base import FixedPointProblem, IterativeSolver, NonlinearSolver
from irnet.solvers.broyden import Broyden
from irnet.solvers.fallback import Fallback
from irnet.solvers.fixed_point import FixedPoint
from irnet.solvers.gradient_descent import GradientDescent
from irnet.solvers.lbfgs import LBFGS
from irnet.solvers.nonlinear_cg import NonlinearCG

__all__ = [
    "Anderson",
    "Broyden",
    "Fallback",
    "FixedPoint",
    "FixedPointProblem",
    "GradientDescent",
    "IterativeSolver",
    "LBFGS",
    "NonlinearCG",
    "NonlinearSolver",
]
