"""Approximate implicit hypergradients.

For an inner problem ``theta*(phi) = argmin_theta f(theta, phi)`` and an outer objective
``g(theta, phi)``, the implicit function theorem gives the hypergradient

    dg/dphi = grad_phi g - (d^2 f / dphi dtheta) H^{-1} grad_theta g,   H = d^2 f / dtheta^2.

:func:`implicit_hypergrad` is that rule: it builds the Hessian-vector product ``v -> H v``
at ``(theta, phi)``, hands it to a linear solver from :mod:`hypergrad.linear_solvers` to get
the inverse-Hessian-vector product (IHVP) ``H^{-1} grad_theta g``, and maps the result back
with one mixed second-derivative product. The public functions (:func:`conjugate_gradient`,
:func:`neumann`, :func:`nystrom`, :func:`exact`) only choose the solver. They all share the
signature ``method(inner_obj, outer_obj, in_params, out_params, **options)`` where
``inner_obj(in_params, out_params)`` is ``f`` and ``outer_obj(in_params, out_params)`` is
``g``, both returning scalar tensors, and they return ``dg/dphi`` with the structure of
``out_params`` (tuple or dict).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .linear_solvers import (
    NYSTROM_SKETCHES,
    check_positive_float,
    check_positive_int,
    solve_cg,
    solve_dense,
    solve_neumann,
    solve_nystrom,
)
from .utils import (
    HVPMode,
    HVP_MODES,
    ParamsLike,
    batched_hvp,
    check_params,
    gradient,
    hvp,
    mixed_vjp,
    scalar_objective,
    tree_numel,
    tree_sub,
)

__all__ = [
    "Objective",
    "implicit_hypergrad",
    "conjugate_gradient",
    "neumann",
    "nystrom",
    "exact",
    "DEFAULT_NYSTROM_SKETCH",
]

Objective = Callable[[ParamsLike, ParamsLike], Tensor]
Solve = Callable[[Callable[[ParamsLike], ParamsLike], Callable[[ParamsLike], ParamsLike], ParamsLike], ParamsLike]

DEFAULT_NYSTROM_SKETCH = "gaussian"
"""Default sketch of :func:`nystrom`. On the four problems of ``benchmarks/ihvp_accuracy.py``
(ridge, logistic regression, an MLP, dataset distillation) the orthonormal Gaussian sketch was
never less accurate than column sampling at the same rank and rho, and 5-10% more accurate on
the three with non-isotropic Hessians, at the same cost; see the README's accuracy table."""


def _check_problem(in_params: ParamsLike, out_params: ParamsLike, hvp_mode: str) -> None:
    check_params(in_params, "in_params")
    check_params(out_params, "out_params")
    if hvp_mode not in HVP_MODES:
        raise ValueError(f"`hvp_mode` must be one of {HVP_MODES}, got {hvp_mode!r}.")


def implicit_hypergrad(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: ParamsLike,
    out_params: ParamsLike,
    solve: Solve,
    hvp_mode: HVPMode = "fwd_rev",
) -> ParamsLike:
    """The implicit-differentiation rule with a pluggable IHVP solver.

    ``solve(matvec, batched_matvec, b)`` must return an approximation of ``H^{-1} b`` given
    ``matvec(v) = H v`` and ``batched_matvec(V) = H V`` (``V`` with a leading batch dim).
    """
    _check_problem(in_params, out_params, hvp_mode)

    def inner(i: ParamsLike, o: ParamsLike) -> Tensor:
        return scalar_objective(inner_obj(i, o), "inner_obj")

    def outer(i: ParamsLike, o: ParamsLike) -> Tensor:
        return scalar_objective(outer_obj(i, o), "outer_obj")

    grad_in, grad_out = gradient(outer, (0, 1), hvp_mode)(in_params, out_params)

    def inner_at_phi(i: ParamsLike) -> Tensor:
        return inner(i, out_params)

    def matvec(v: ParamsLike) -> ParamsLike:
        return hvp(inner_at_phi, in_params, v, hvp_mode)

    def batched_matvec(v: ParamsLike) -> ParamsLike:
        return batched_hvp(inner_at_phi, in_params, v, hvp_mode)

    ihvp = solve(matvec, batched_matvec, grad_in)
    return tree_sub(grad_out, mixed_vjp(inner, in_params, out_params, ihvp, hvp_mode))


def conjugate_gradient(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: ParamsLike,
    out_params: ParamsLike,
    num_iters: int,
    lr: float = 1.0,
    tol: float = 0.0,
    hvp_mode: HVPMode = "fwd_rev",
) -> ParamsLike:
    """Hypergradient with the IHVP from ``num_iters`` steps of conjugate gradient.

    Exact after ``p`` iterations for a positive-definite Hessian (``p`` = number of inner
    parameters); ``lr`` rescales the Hessian (the solution does not depend on it) and
    ``tol`` stops early once the relative residual is below it.
    """
    check_positive_int(num_iters, "num_iters")
    check_positive_float(lr, "lr")
    check_positive_float(tol, "tol", allow_zero=True)
    return implicit_hypergrad(
        inner_obj, outer_obj, in_params, out_params,
        lambda mv, _, b: solve_cg(mv, b, num_iters, lr, tol), hvp_mode,
    )


def neumann(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: ParamsLike,
    out_params: ParamsLike,
    num_iters: int,
    lr: float,
    hvp_mode: HVPMode = "fwd_rev",
) -> ParamsLike:
    """Hypergradient with the IHVP from the truncated Neumann series
    ``lr * sum_{j<=num_iters} (I - lr H)^j b`` (Lorraine et al., 2020); needs
    ``lr < 2 / lambda_max(H)``."""
    check_positive_int(num_iters, "num_iters")
    check_positive_float(lr, "lr")
    return implicit_hypergrad(
        inner_obj, outer_obj, in_params, out_params,
        lambda mv, _, b: solve_neumann(mv, b, num_iters, lr), hvp_mode,
    )


def nystrom(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: ParamsLike,
    out_params: ParamsLike,
    rank: int,
    rho: float,
    sketch: str = DEFAULT_NYSTROM_SKETCH,
    generator: torch.Generator | None = None,
    hvp_mode: HVPMode = "fwd_rev",
) -> ParamsLike:
    """Hypergradient with the Nyström IHVP ``(H_nys + rho I)^{-1} b`` (Hataya & Yamada, 2023).

    ``rank`` Hessian-vector products are computed in one ``vmap``-ed batch; ``sketch``
    chooses the test directions: ``"column"`` samples ``rank`` Hessian columns as in the
    paper, ``"gaussian"`` uses an orthonormal Gaussian sketch. ``rho > 0`` regularises the
    inverse. Memory is ``O(rank x p)``.
    """
    check_positive_int(rank, "rank")
    check_positive_float(rho, "rho")
    if sketch not in NYSTROM_SKETCHES:
        raise ValueError(f"`sketch` must be one of {NYSTROM_SKETCHES}, got {sketch!r}.")
    check_params(in_params, "in_params")
    p = tree_numel(in_params)
    if rank > p:
        raise ValueError(
            f"`rank` ({rank}) must not exceed the number of inner parameters ({p}); "
            f"use rank <= {p}."
        )
    return implicit_hypergrad(
        inner_obj, outer_obj, in_params, out_params,
        lambda _, bmv, b: solve_nystrom(bmv, b, rank, rho, sketch, generator), hvp_mode,
    )


def exact(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: ParamsLike,
    out_params: ParamsLike,
    hvp_mode: HVPMode = "fwd_rev",
) -> ParamsLike:
    """Hypergradient with a dense Hessian and an exact solve: ground truth for small
    problems (``p`` products, ``O(p^2)`` memory)."""
    return implicit_hypergrad(
        inner_obj, outer_obj, in_params, out_params,
        lambda _, bmv, b: solve_dense(bmv, b), hvp_mode,
    )
