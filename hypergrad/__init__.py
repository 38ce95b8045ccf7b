"""hypergrad: gradient-based bilevel optimization for PyTorch.

Submodules:
  * :mod:`hypergrad.approx_hypergrad`: implicit hypergradients (CG, Neumann, Nyström, exact);
  * :mod:`hypergrad.linear_solvers`: the matrix-free linear solvers behind them;
  * :mod:`hypergrad.optimizers`: differentiable functional optimizers;
  * :mod:`hypergrad.solver`: ``BaseSolver``/``BaseImplicitSolver`` and their schedule;
  * :mod:`hypergrad.utils`: parameter trees and Hessian-vector products.
"""

from . import approx_hypergrad, linear_solvers, optimizers, solver, utils
from .approx_hypergrad import conjugate_gradient, exact, implicit_hypergrad, neumann, nystrom
from .optimizers import diff_adam, diff_adamw, diff_sgd
from .solver import BaseImplicitSolver, BaseSolver
from .utils import Params, hvp

__version__ = "0.1.0"

__all__ = [
    "approx_hypergrad", "linear_solvers", "optimizers", "solver", "utils",
    "conjugate_gradient", "exact", "implicit_hypergrad", "neumann", "nystrom",
    "diff_adam", "diff_adamw", "diff_sgd", "BaseImplicitSolver", "BaseSolver", "Params", "hvp",
]
