"""Approximate implicit hypergradients.

For an inner problem ``theta*(phi) = argmin_theta f(theta, phi)`` and an outer objective
``g(theta, phi)``, the implicit function theorem gives the hypergradient

    dg/dphi = grad_phi g - (d^2 f / dphi dtheta) H^{-1} grad_theta g,   H = d^2 f / dtheta^2.

:func:`implicit_hypergrad` is that rule: it builds the Hessian-vector product ``v -> H v``
at ``(theta, phi)``, hands it to a linear solver from :mod:`hypergrad.linear_solvers` to get
the inverse-Hessian-vector product (IHVP) ``H^{-1} grad_theta g``, and maps the result back
with one mixed second-derivative product. All products of one hypergradient share one
linearization of the inner objective (:mod:`hypergrad.products`). The public functions
(:func:`conjugate_gradient`, :func:`neumann`, :func:`nystrom`, :func:`nystrom_pcg`,
:func:`identity`, :func:`exact`) only choose the solver from the method table
(:mod:`hypergrad.methods`). They all share the
signature ``method(inner_obj, outer_obj, in_params, out_params, **options)`` where
``inner_obj(in_params, out_params)`` is ``f`` and ``outer_obj(in_params, out_params)`` is
``g``, both returning scalar tensors, and they return ``dg/dphi`` with the structure of
``out_params`` (tuple or dict).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from .autodiff import check_mode, gradient, scalar_objective
from .distributed import DataParallel
from .methods import DEFAULT_NYSTROM_SKETCH, check_problem_size, get_method, method_options
from .mode_probe import DEFAULT_MAX_MEMORY_RATIO, resolve_hvp_mode
from .products import linearize_inner
from .trees import check_params, tree_numel, tree_sub
from .utils import ParamsLike, check_positive_int
from .utils import identity as _no_op

__all__ = [
    "Objective",
    "implicit_hypergrad",
    "hypergrad_from_products",
    "make_solver",
    "conjugate_gradient",
    "neumann",
    "nystrom",
    "nystrom_pcg",
    "identity",
    "exact",
    "DEFAULT_NYSTROM_SKETCH",
    "HypergradHVPMode",
]

Objective = Callable[[ParamsLike, ParamsLike], Tensor]
HypergradHVPMode = Literal["auto", "fwd_rev", "rev_rev", "finite_diff"]
"""``hvp_mode`` of the functions here: a product mode of :mod:`hypergrad.autodiff`, or ``"auto"`` (the
default), which :func:`hypergrad.mode_probe.resolve_hvp_mode` turns into the first exact mode that runs correctly
within ``hvp_max_memory_ratio`` times one gradient's memory, else ``"finite_diff"``, once per objective and
shapes (deterministic: the same model and shapes always get the same mode)."""
Reduce = Callable[[Tensor], Tensor]
Solve = Callable[..., ParamsLike]
"""``solve(matvec, batched_matvec, b, reduce) -> x``, an approximation of ``H^{-1} b``."""


def hypergrad_from_products(
    grad_in: ParamsLike,
    grad_out: ParamsLike,
    matvec: Callable[[ParamsLike], ParamsLike],
    batched_matvec: Callable[[ParamsLike], ParamsLike],
    mixed: Callable[[ParamsLike], ParamsLike],
    solve: Solve,
    reduce: Reduce = _no_op,
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


def _data_parallel(data_parallel, dist):
    """``data_parallel``, or the deprecated ``dist`` keyword it replaces (one release)."""
    if dist is not None:
        warnings.warn("`dist=` is deprecated (it shadows the usual `torch.distributed as dist`); "
                      "pass `data_parallel=` instead.", FutureWarning, stacklevel=3)
        if data_parallel is None:
            return dist
    return data_parallel


def implicit_hypergrad(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: ParamsLike,
    out_params: ParamsLike,
    solve: Solve,
    hvp_mode: HypergradHVPMode = "auto",
    data_parallel: DataParallel | None = None,
    hvp_chunk_size: int | None = None,
    *,
    hvp_memory_budget: int | None = None,
    return_outer_value: bool = False,
    dist: DataParallel | None = None,
    hvp_max_memory_ratio: float | None = DEFAULT_MAX_MEMORY_RATIO,
) -> ParamsLike | tuple[ParamsLike, Tensor]:
    """The implicit-differentiation rule with a pluggable IHVP solver.

    The outer gradient ``(grad_theta g, grad_phi g)`` is taken first; then the inner
    objective is linearized once at ``(theta, phi)`` (:func:`hypergrad.products.linearize_inner`)
    and every product of the solve and the final mixed product reuse that linearization.

    ``solve(matvec, batched_matvec, b, reduce)`` must return an approximation of
    ``H^{-1} b`` given ``matvec(v) = H v`` and ``batched_matvec(V) = H V`` (``V`` with a
    leading batch dimension); see :func:`make_solver`.

    ``data_parallel``: under data parallelism (each process holds a replica of the
    parameters and a different batch) every gradient and product is averaged over the
    processes with ``data_parallel.average``, so all processes solve the same full-batch
    system and return the same hypergradient.

    ``hvp_chunk_size``: how many of a batch of products (Nyström's ``rank``, the dense
    solve's ``p``) are in flight at a time. ``hvp_memory_budget`` (bytes): when no chunk size
    is given, as many products as fit in it (``rev_rev``); without either, ``rev_rev`` takes
    one product at a time and ``fwd_rev`` vectorizes all.

    ``hvp_mode="auto"`` (the default): the first exact mode (``rev_rev``, then ``fwd_rev``) whose
    products run correctly and hold at most ``hvp_max_memory_ratio`` times the memory of one gradient
    of ``inner_obj`` (or at most :data:`hypergrad.mode_probe.CORE_FREE_BYTES`), else
    ``"finite_diff"`` (about one gradient's memory); probed once per objective and shapes
    (:func:`hypergrad.mode_probe.resolve_hvp_mode`), never by timing. Objectives holding a
    stop-gradient (a detached function of ``theta``) need an explicit exact mode.

    ``return_outer_value``: also return ``g(theta, phi)`` (detached), which the outer
    gradient computes anyway, as ``(hypergradient, value)``.
    """
    check_params(in_params, "in_params")
    check_params(out_params, "out_params")
    if hvp_mode != "auto":
        check_mode(hvp_mode)
    if hvp_max_memory_ratio is not None and not hvp_max_memory_ratio > 0:
        raise ValueError(f"`hvp_max_memory_ratio` must be > 0 or None, got {hvp_max_memory_ratio!r}.")
    for name, value in (("hvp_chunk_size", hvp_chunk_size), ("hvp_memory_budget", hvp_memory_budget)):
        if value is not None:
            check_positive_int(value, name)
    data_parallel = _data_parallel(data_parallel, dist)
    hvp_mode = resolve_hvp_mode(inner_obj, in_params, out_params, hvp_mode, hvp_max_memory_ratio, data_parallel)
    average = data_parallel.average if data_parallel is not None else _no_op

    def inner(i: ParamsLike, o: ParamsLike) -> Tensor:
        return scalar_objective(inner_obj(i, o), "inner_obj")

    def outer(i: ParamsLike, o: ParamsLike) -> Tensor:
        return scalar_objective(outer_obj(i, o), "outer_obj")

    (grad_in, grad_out), value = gradient(outer, (0, 1), hvp_mode, with_value=True)(in_params, out_params)
    products = linearize_inner(inner, in_params, out_params, hvp_mode, hvp_chunk_size, average, hvp_memory_budget)
    hypergradient = hypergrad_from_products(average(grad_in), average(grad_out), products.hvp, products.batched_hvp,
                                            products.mixed, solve)
    return (hypergradient, value.detach()) if return_outer_value else hypergradient


def make_solver(method: str, generator: torch.Generator | None = None, **options) -> Solve:
    """The IHVP solver of ``method`` (a name of :data:`hypergrad.methods.METHODS`: ``"cg"``,
    ``"neumann"``, ``"nystrom"``, ``"nystrom_pcg"``, ``"identity"``, ``"exact"``) with its
    options bound, as ``solve(matvec, batched_matvec, b, reduce) -> x``; options are
    validated here, before any product is computed. ``generator`` draws random sketches."""
    return _bind(method, method_options(method, **options), generator)


def _bind(method: str, options, generator: torch.Generator | None) -> Solve:
    return functools.partial(get_method(method).build(options), generator=generator)


def _solve_with(method: str, inner_obj, outer_obj, in_params, out_params, hvp_mode, data_parallel, dist,
                hvp_chunk_size=None, generator=None, hvp_max_memory_ratio=DEFAULT_MAX_MEMORY_RATIO,
                **options) -> ParamsLike:
    """Validate, then run the implicit rule with ``method``'s solver."""
    validated = method_options(method, **options)
    check_params(in_params, "in_params")
    check_problem_size(method, validated, tree_numel(in_params))
    return implicit_hypergrad(inner_obj, outer_obj, in_params, out_params, _bind(method, validated, generator),
                              hvp_mode, _data_parallel(data_parallel, dist), hvp_chunk_size,
                              hvp_max_memory_ratio=hvp_max_memory_ratio)


def conjugate_gradient(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: ParamsLike,
    out_params: ParamsLike,
    num_iters: int,
    lr: float = 1.0,
    tol: float = 0.0,
    hvp_mode: HypergradHVPMode = "auto",
    data_parallel: DataParallel | None = None,
    *,
    hvp_max_memory_ratio: float | None = DEFAULT_MAX_MEMORY_RATIO,
    dist: DataParallel | None = None,
) -> ParamsLike:
    """Hypergradient with the IHVP from ``num_iters`` steps of conjugate gradient.

    Exact after ``p`` iterations for a positive-definite Hessian (``p`` = number of inner
    parameters); ``lr`` rescales the Hessian (the solution does not depend on it) and
    ``tol`` stops early once the relative residual is below it.
    """
    return _solve_with("cg", inner_obj, outer_obj, in_params, out_params, hvp_mode, data_parallel, dist,
                       num_iters=num_iters, lr=lr, tol=tol, hvp_max_memory_ratio=hvp_max_memory_ratio)


def neumann(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: ParamsLike,
    out_params: ParamsLike,
    num_iters: int,
    lr: float,
    hvp_mode: HypergradHVPMode = "auto",
    data_parallel: DataParallel | None = None,
    *,
    hvp_max_memory_ratio: float | None = DEFAULT_MAX_MEMORY_RATIO,
    dist: DataParallel | None = None,
) -> ParamsLike:
    """Hypergradient with the IHVP from the truncated Neumann series
    ``lr * sum_{j<=num_iters} (I - lr H)^j b`` (Lorraine et al., 2020); needs
    ``lr < 2 / lambda_max(H)``."""
    return _solve_with("neumann", inner_obj, outer_obj, in_params, out_params, hvp_mode, data_parallel, dist,
                       num_iters=num_iters, lr=lr, hvp_max_memory_ratio=hvp_max_memory_ratio)


def nystrom(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: ParamsLike,
    out_params: ParamsLike,
    rank: int,
    rho: float,
    sketch: str = DEFAULT_NYSTROM_SKETCH,
    generator: torch.Generator | None = None,
    hvp_mode: HypergradHVPMode = "auto",
    data_parallel: DataParallel | None = None,
    hvp_chunk_size: int | None = None,
    *,
    hvp_max_memory_ratio: float | None = DEFAULT_MAX_MEMORY_RATIO,
    dist: DataParallel | None = None,
) -> ParamsLike:
    """Hypergradient with the Nyström IHVP ``(H_nys + rho I)^{-1} b`` (Hataya & Yamada, 2023).

    ``rank`` Hessian-vector products are computed in one batched call; ``sketch``
    chooses the test directions: ``"column"`` samples ``rank`` Hessian columns as in the
    paper, ``"gaussian"`` uses an orthonormal Gaussian sketch. ``rho > 0`` regularises the
    inverse. Memory is ``O(rank x p)`` plus the activations of ``hvp_chunk_size`` (default:
    ``rank``) products in flight. To reuse one sketch over several hypergradients, keep a
    :class:`hypergrad.methods.NystromSolver` with ``refresh_steps > 1`` and call
    :func:`implicit_hypergrad` with it.
    """
    return _solve_with("nystrom", inner_obj, outer_obj, in_params, out_params, hvp_mode, data_parallel, dist,
                       hvp_chunk_size, generator, hvp_max_memory_ratio, rank=rank, rho=rho, sketch=sketch)


def nystrom_pcg(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: ParamsLike,
    out_params: ParamsLike,
    rank: int,
    num_iters: int,
    rho: float = 0.1,
    sketch: str = DEFAULT_NYSTROM_SKETCH,
    tol: float = 0.0,
    generator: torch.Generator | None = None,
    hvp_mode: HypergradHVPMode = "auto",
    data_parallel: DataParallel | None = None,
    hvp_chunk_size: int | None = None,
    *,
    hvp_max_memory_ratio: float | None = DEFAULT_MAX_MEMORY_RATIO,
) -> ParamsLike:
    """Hypergradient with ``H^{-1} b`` by conjugate gradient preconditioned with a rank-``rank``
    Nyström approximation (Frangella, Tropp & Udell, 2023): ``rank`` batched products build
    the preconditioner ``P^{-1} = (lam_k + rho) U (Lam + rho I)^{-1} U^T + (I - U U^T)``,
    then ``num_iters`` CG products refine toward the undamped solution."""
    return _solve_with("nystrom_pcg", inner_obj, outer_obj, in_params, out_params, hvp_mode, data_parallel, None,
                       hvp_chunk_size, generator, hvp_max_memory_ratio, rank=rank, num_iters=num_iters, rho=rho,
                       sketch=sketch, tol=tol)


def identity(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: ParamsLike,
    out_params: ParamsLike,
    scale: float = 1.0,
    hvp_mode: HypergradHVPMode = "auto",
    data_parallel: DataParallel | None = None,
    *,
    hvp_max_memory_ratio: float | None = DEFAULT_MAX_MEMORY_RATIO,
) -> ParamsLike:
    """First-order hypergradient with ``H^{-1} ~ scale * I``: ``grad_phi g - scale * M grad_theta g``
    (the one-step / T1-T2 approximation; Luketina et al., 2016). No Hessian-vector product,
    one mixed product: the cheapest method, biased wherever ``H`` is far from a multiple of
    the identity (on ``H = A`` the error is ``M (scale I - A^{-1}) grad_theta g``)."""
    return _solve_with("identity", inner_obj, outer_obj, in_params, out_params, hvp_mode, data_parallel, None,
                       scale=scale, hvp_max_memory_ratio=hvp_max_memory_ratio)


def exact(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: ParamsLike,
    out_params: ParamsLike,
    hvp_mode: HypergradHVPMode = "auto",
    data_parallel: DataParallel | None = None,
    *,
    hvp_max_memory_ratio: float | None = DEFAULT_MAX_MEMORY_RATIO,
    dist: DataParallel | None = None,
) -> ParamsLike:
    """Hypergradient with a dense Hessian and an exact solve: ground truth for small
    problems (``p`` products, ``O(p^2)`` memory)."""
    return _solve_with("exact", inner_obj, outer_obj, in_params, out_params, hvp_mode, data_parallel, dist,
                       hvp_max_memory_ratio=hvp_max_memory_ratio)
