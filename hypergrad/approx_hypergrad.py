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
from .distributed import DataParallel
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
    "hypergrad_from_products",
    "make_solver",
    "conjugate_gradient",
    "neumann",
    "nystrom",
    "exact",
    "DEFAULT_NYSTROM_SKETCH",
]

Objective = Callable[[ParamsLike, ParamsLike], Tensor]
Reduce = Callable[[Tensor], Tensor]
Solve = Callable[..., ParamsLike]
"""``solve(matvec, batched_matvec, b, reduce) -> x``, an approximation of ``H^{-1} b``."""


def _identity(x):
    return x

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


def hypergrad_from_products(
    grad_in: ParamsLike,
    grad_out: ParamsLike,
    matvec: Callable[[ParamsLike], ParamsLike],
    batched_matvec: Callable[[ParamsLike], ParamsLike],
    mixed: Callable[[ParamsLike], ParamsLike],
    solve: Solve,
    reduce: Reduce = _identity,
) -> ParamsLike:
    """The implicit-differentiation rule on given products:
    ``grad_out - mixed(solve(H, grad_in))``, with ``grad_in = grad_theta g``,
    ``grad_out = grad_phi g``, ``matvec(v) = H v`` and ``mixed(v) = (d^2 f / dphi dtheta) v``.

    Callers that cannot use :func:`torch.func` (e.g. parameters sharded by FSDP, where the
    products are finite differences taken in place) build the products themselves and reuse
    the rule and the solvers from here; ``reduce`` sums partial inner products over shards.
    """
    ihvp = solve(matvec, batched_matvec, grad_in, reduce)
    return tree_sub(grad_out, mixed(ihvp))


def implicit_hypergrad(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: ParamsLike,
    out_params: ParamsLike,
    solve: Solve,
    hvp_mode: HVPMode = "fwd_rev",
    dist: DataParallel | None = None,
    hvp_chunk_size: int | None = None,
) -> ParamsLike:
    """The implicit-differentiation rule with a pluggable IHVP solver, products by
    :mod:`torch.func` (or plain autograd for ``hvp_mode="finite_diff"``).

    ``solve(matvec, batched_matvec, b, reduce)`` must return an approximation of
    ``H^{-1} b`` given ``matvec(v) = H v`` and ``batched_matvec(V) = H V`` (``V`` with a
    leading batch dimension); see :func:`make_solver`.

    ``dist``: under data parallelism (each process holds a replica of the parameters and a
    different batch) every gradient and product is averaged over the processes with
    ``dist.average``, so all processes solve the same full-batch system and return the same
    hypergradient.

    ``hvp_chunk_size``: how many of a batch of products (Nyström's ``rank``, the dense
    solve's ``p``) are vectorized at a time; ``None`` = all, the fastest and most memory.
    """
    _check_problem(in_params, out_params, hvp_mode)
    average = dist.average if dist is not None else _identity

    def inner(i: ParamsLike, o: ParamsLike) -> Tensor:
        return scalar_objective(inner_obj(i, o), "inner_obj")

    def outer(i: ParamsLike, o: ParamsLike) -> Tensor:
        return scalar_objective(outer_obj(i, o), "outer_obj")

    grad_in, grad_out = gradient(outer, (0, 1), hvp_mode)(in_params, out_params)

    def inner_at_phi(i: ParamsLike) -> Tensor:
        return inner(i, out_params)

    return hypergrad_from_products(
        average(grad_in),
        average(grad_out),
        lambda v: average(hvp(inner_at_phi, in_params, v, hvp_mode)),
        lambda v: average(batched_hvp(inner_at_phi, in_params, v, hvp_mode, chunk_size=hvp_chunk_size)),
        lambda v: average(mixed_vjp(inner, in_params, out_params, v, hvp_mode)),
        solve,
    )


def make_solver(method: str, **options) -> Solve:
    """The IHVP solver of ``method`` (``"cg"``, ``"neumann"``, ``"nystrom"``, ``"exact"``) with
    its options bound, as ``solve(matvec, batched_matvec, b, reduce) -> x``; options are
    validated here, before any product is computed."""
    if method == "cg":
        num_iters, lr, tol = options["num_iters"], options.get("lr", 1.0), options.get("tol", 0.0)
        check_positive_int(num_iters, "num_iters")
        check_positive_float(lr, "lr")
        check_positive_float(tol, "tol", allow_zero=True)
        return lambda mv, _, b, reduce=_identity: solve_cg(mv, b, num_iters, lr, tol, reduce)
    if method == "neumann":
        num_iters, lr = options["num_iters"], options["lr"]
        check_positive_int(num_iters, "num_iters")
        check_positive_float(lr, "lr")
        return lambda mv, _, b, reduce=_identity: solve_neumann(mv, b, num_iters, lr)
    if method == "nystrom":
        rank, rho = options["rank"], options["rho"]
        sketch, generator = options.get("sketch", DEFAULT_NYSTROM_SKETCH), options.get("generator")
        check_positive_int(rank, "rank")
        check_positive_float(rho, "rho")
        if sketch not in NYSTROM_SKETCHES:
            raise ValueError(f"`sketch` must be one of {NYSTROM_SKETCHES}, got {sketch!r}.")
        return lambda _, bmv, b, reduce=_identity: solve_nystrom(bmv, b, rank, rho, sketch, generator, reduce)
    if method == "exact":
        return lambda _, bmv, b, reduce=_identity: solve_dense(bmv, b)
    raise ValueError(f"unknown IHVP method {method!r}; use 'cg', 'neumann', 'nystrom' or 'exact'.")


def conjugate_gradient(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: ParamsLike,
    out_params: ParamsLike,
    num_iters: int,
    lr: float = 1.0,
    tol: float = 0.0,
    hvp_mode: HVPMode = "fwd_rev",
    dist: DataParallel | None = None,
) -> ParamsLike:
    """Hypergradient with the IHVP from ``num_iters`` steps of conjugate gradient.

    Exact after ``p`` iterations for a positive-definite Hessian (``p`` = number of inner
    parameters); ``lr`` rescales the Hessian (the solution does not depend on it) and
    ``tol`` stops early once the relative residual is below it.
    """
    solve = make_solver("cg", num_iters=num_iters, lr=lr, tol=tol)
    return implicit_hypergrad(inner_obj, outer_obj, in_params, out_params, solve, hvp_mode, dist)


def neumann(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: ParamsLike,
    out_params: ParamsLike,
    num_iters: int,
    lr: float,
    hvp_mode: HVPMode = "fwd_rev",
    dist: DataParallel | None = None,
) -> ParamsLike:
    """Hypergradient with the IHVP from the truncated Neumann series
    ``lr * sum_{j<=num_iters} (I - lr H)^j b`` (Lorraine et al., 2020); needs
    ``lr < 2 / lambda_max(H)``."""
    solve = make_solver("neumann", num_iters=num_iters, lr=lr)
    return implicit_hypergrad(inner_obj, outer_obj, in_params, out_params, solve, hvp_mode, dist)


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
    dist: DataParallel | None = None,
    hvp_chunk_size: int | None = None,
) -> ParamsLike:
    """Hypergradient with the Nyström IHVP ``(H_nys + rho I)^{-1} b`` (Hataya & Yamada, 2023).

    ``rank`` Hessian-vector products are computed in one ``vmap``-ed batch; ``sketch``
    chooses the test directions: ``"column"`` samples ``rank`` Hessian columns as in the
    paper, ``"gaussian"`` uses an orthonormal Gaussian sketch. ``rho > 0`` regularises the
    inverse. Memory is ``O(rank x p)`` plus the activations of ``hvp_chunk_size`` (default:
    ``rank``) products in flight.
    """
    solve = make_solver("nystrom", rank=rank, rho=rho, sketch=sketch, generator=generator)
    if hvp_chunk_size is not None:
        check_positive_int(hvp_chunk_size, "hvp_chunk_size")
    check_params(in_params, "in_params")
    p = tree_numel(in_params)
    if rank > p:
        raise ValueError(
            f"`rank` ({rank}) must not exceed the number of inner parameters ({p}); "
            f"use rank <= {p}."
        )
    return implicit_hypergrad(inner_obj, outer_obj, in_params, out_params, solve, hvp_mode, dist, hvp_chunk_size)


def exact(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: ParamsLike,
    out_params: ParamsLike,
    hvp_mode: HVPMode = "fwd_rev",
    dist: DataParallel | None = None,
) -> ParamsLike:
    """Hypergradient with a dense Hessian and an exact solve: ground truth for small
    problems (``p`` products, ``O(p^2)`` memory)."""
    return implicit_hypergrad(inner_obj, outer_obj, in_params, out_params, make_solver("exact"), hvp_mode, dist)
