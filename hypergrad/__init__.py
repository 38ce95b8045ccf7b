"""hypergrad: gradient-based bilevel optimization for PyTorch.

Submodules:
  * :mod:`hypergrad.approx_hypergrad`: implicit hypergradients (CG, Neumann, Nyström,
    Nyström-preconditioned CG, the first-order identity approximation, exact);
  * :mod:`hypergrad.methods`: the table of IHVP methods, their options and solvers;
  * :mod:`hypergrad.products`: Hessian and mixed products, linearized once per hypergradient;
    :mod:`hypergrad.mode_probe`: which product mode a model runs correctly and leanly;
  * :mod:`hypergrad.distributed`: process collectives; :mod:`hypergrad.sharded`: the hypergradient on FSDP2 shards;
  * :mod:`hypergrad.linear_solvers`: the matrix-free linear solvers behind them;
  * :mod:`hypergrad.optimizers`: differentiable functional optimizers;
  * :mod:`hypergrad.solver`: ``BaseSolver``/``BaseImplicitSolver`` and their schedule;
  * :mod:`hypergrad.trees`: parameter-tree operations; :mod:`hypergrad.autodiff`: gradients and Hessian-vector
    products; :mod:`hypergrad.utils`: shared types and checks.
"""

from . import approx_hypergrad, linear_solvers, methods, optimizers, products, solver, utils
from .approx_hypergrad import conjugate_gradient, exact, identity, implicit_hypergrad, neumann, nystrom, nystrom_pcg
from .autodiff import hvp
from .optimizers import diff_adam, diff_adamw, diff_sgd
from .solver import BaseImplicitSolver, BaseSolver
from .utils import Params

__version__ = "0.1.0"

__all__ = [
    "approx_hypergrad", "linear_solvers", "methods", "optimizers", "products", "solver", "utils",
    "conjugate_gradient", "exact", "identity", "implicit_hypergrad", "neumann", "nystrom", "nystrom_pcg",
    "diff_adam", "diff_adamw", "diff_sgd", "BaseImplicitSolver", "BaseSolver", "Params", "hvp",
]
