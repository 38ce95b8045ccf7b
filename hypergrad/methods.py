"""The IHVP methods, one table entry each.

An entry (:class:`IHVPMethod`) names a method, its options (a frozen dataclass validated on
construction) and the factory that turns the options into a solver
``solve(matvec, batched_matvec, b, reduce=identity, generator=None) -> x ~ H^{-1} b``.
:func:`hypergrad.approx_hypergrad.make_solver`, ``BilevelTrainingArguments``, the trainer
and the saved metadata all read this table: adding a method is one options class, one
solver and one entry in :data:`METHODS`.

Each option field may carry two metadata keys: ``"argument"``, the name of the
``BilevelTrainingArguments`` field it is read from, and ``"key"``, its name in saved
metadata.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .autodiff import one_at_a_time
from .linear_solvers import (NYSTROM_SKETCHES, NystromFactor, check_positive_float, check_positive_int, solve_cg,
                             solve_dense, solve_neumann, solve_pcg)
from .trees import tree_leaves, tree_scale, tree_unflatten
from .utils import ParamsLike, identity

__all__ = [
    "IHVPMethod",
    "METHODS",
    "DEFAULT_NYSTROM_SKETCH",
    "CGOptions",
    "NeumannOptions",
    "NystromOptions",
    "NystromPCGOptions",
    "ExactOptions",
    "IdentityOptions",
    "NystromSolver",
    "CGSolver",
    "WarmStart",
    "get_method",
    "method_options",
    "options_from_arguments",
    "options_metadata",
    "check_problem_size",
    "methods_reading",
    "argument_default",
    "DEFAULT_REFRESH_STEPS",
]

DEFAULT_NYSTROM_SKETCH = "gaussian"
"""Default Nyström sketch: an orthonormal Gaussian sketch, at the cost of column sampling and never less accurate
on the problems of ``benchmarks/ihvp_accuracy.py`` (docs/ihvp-methods.md)."""

EXACT_MAX_PARAMS = 20_000
"""``exact`` builds a dense ``p x p`` Hessian; above this many inner parameters it is refused."""

DEFAULT_REFRESH_STEPS = 10
"""A Nyström sketch serves this many consecutive hypergradients (1 sketches anew every time); how close a reused
sketch stays to a fresh one: docs/ihvp-methods.md."""


def _arg(argument: str, key: str | None = None) -> dict[str, str]:
    return {"argument": argument, "key": key or argument}


@dataclass(frozen=True)
class CGOptions:
    """Conjugate gradient: ``num_iters`` products; ``lr`` rescales ``H`` (not the solution);
    stop early once ``|r| <= tol |b|``; ``warm_start``: start from the previous call's
    solution (see :class:`WarmStart`)."""

    num_iters: int = field(default=10, metadata=_arg("ihvp_iters", "iters"))
    lr: float = 1.0
    tol: float = 0.0
    warm_start: bool = field(default=False, metadata=_arg("ihvp_warm_start", "warm_start"))

    def __post_init__(self) -> None:
        check_positive_int(self.num_iters, "num_iters")
        check_positive_float(self.lr, "lr")
        check_positive_float(self.tol, "tol", allow_zero=True)
        _check_flag(self.warm_start, "warm_start")


@dataclass(frozen=True)
class NeumannOptions:
    """Truncated Neumann series: ``num_iters`` products, step ``lr < 2 / lambda_max(H)``."""

    num_iters: int = field(default=10, metadata=_arg("ihvp_iters", "iters"))
    lr: float = field(default=0.01, metadata=_arg("neumann_lr", "lr"))

    def __post_init__(self) -> None:
        check_positive_int(self.num_iters, "num_iters")
        check_positive_float(self.lr, "lr")


def _check_flag(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")


def _check_sketch(sketch: str) -> None:
    if sketch not in NYSTROM_SKETCHES:
        raise ValueError(f"`sketch` must be one of {NYSTROM_SKETCHES}, got {sketch!r}.")


@dataclass(frozen=True)
class NystromOptions:
    """Nyström: ``rank`` batched products, damping ``rho``; the factor is reused for
    ``refresh_steps`` consecutive hypergradients (1 = a fresh sketch every time)."""

    rank: int = field(default=5, metadata=_arg("nystrom_rank", "rank"))
    rho: float = field(default=0.1, metadata=_arg("nystrom_rho", "rho"))
    sketch: str = field(default=DEFAULT_NYSTROM_SKETCH, metadata=_arg("nystrom_sketch", "sketch"))
    refresh_steps: int = field(default=DEFAULT_REFRESH_STEPS, metadata=_arg("nystrom_refresh_steps", "refresh_steps"))

    def __post_init__(self) -> None:
        check_positive_int(self.rank, "rank")
        check_positive_float(self.rho, "rho")
        _check_sketch(self.sketch)
        check_positive_int(self.refresh_steps, "refresh_steps")


@dataclass(frozen=True)
class NystromPCGOptions:
    """Nyström-preconditioned CG: a rank-``rank`` sketch (damping ``rho``) as preconditioner,
    then ``num_iters`` CG products on ``H x = b``; ``rank + num_iters`` products when the
    preconditioner is sketched, ``num_iters`` when it is reused. The preconditioner is reused
    for ``refresh_steps`` consecutive hypergradients: a stale one only slows CG, it does not
    bias the solution (PCG converges to ``H^{-1} b`` for any SPD preconditioner).
    ``warm_start``: start from the previous call's solution (see :class:`WarmStart`)."""

    rank: int = field(default=5, metadata=_arg("nystrom_rank", "rank"))
    rho: float = field(default=0.1, metadata=_arg("nystrom_rho", "rho"))
    num_iters: int = field(default=10, metadata=_arg("ihvp_iters", "iters"))
    sketch: str = field(default=DEFAULT_NYSTROM_SKETCH, metadata=_arg("nystrom_sketch", "sketch"))
    tol: float = 0.0
    refresh_steps: int = field(default=DEFAULT_REFRESH_STEPS, metadata=_arg("nystrom_refresh_steps", "refresh_steps"))
    warm_start: bool = field(default=False, metadata=_arg("ihvp_warm_start", "warm_start"))

    def __post_init__(self) -> None:
        check_positive_int(self.rank, "rank")
        check_positive_float(self.rho, "rho")
        check_positive_int(self.num_iters, "num_iters")
        _check_sketch(self.sketch)
        check_positive_float(self.tol, "tol", allow_zero=True)
        check_positive_int(self.refresh_steps, "refresh_steps")
        _check_flag(self.warm_start, "warm_start")


@dataclass(frozen=True)
class ExactOptions:
    """Dense Hessian and an exact solve (``p`` products, ``O(p^2)`` memory)."""


@dataclass(frozen=True)
class IdentityOptions:
    """First-order, Hessian-free: ``H^{-1} ~ scale * I``, no Hessian-vector product at all."""

    scale: float = field(default=1.0, metadata=_arg("identity_scale", "scale"))

    def __post_init__(self) -> None:
        check_positive_float(self.scale, "scale")


class WarmStart:
    """The last solution of ``H x = b``, kept to start the next solve from it.

    Consecutive hypergradients of a run solve nearby systems (``theta`` and ``phi`` move a little
    per outer step), so the previous ``x`` starts CG much closer to the new solution than 0 does
    and its products go to the change (warm-started CG, as in HOAG, Pedregosa 2016, and amortized
    implicit differentiation, Arbel & Mairal 2022). The solver starts at the multiple of it closest
    to the new solution in the H-norm (:func:`hypergrad.linear_solvers.solve_cg`), whose residual
    costs one product of the budget. Disabled, it keeps nothing. A non-finite solution is never kept; a stored one of
    other shapes is ignored."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.previous: list[Tensor] | None = None

    def start(self, b: ParamsLike) -> ParamsLike | None:
        """The first iterate for right-hand side ``b``: the previous solution, or ``None`` (start at 0)."""
        leaves = tree_leaves(b)
        if self.previous is None or [x.shape for x in self.previous] != [x.shape for x in leaves]:
            return None
        return tree_unflatten(b, [x.to(device=y.device, dtype=y.dtype) for x, y in zip(self.previous, leaves)])

    def remember(self, x: ParamsLike) -> None:
        if self.enabled:
            leaves = [t.detach() for t in tree_leaves(x)]
            self.previous = leaves if all(bool(torch.isfinite(t).all()) for t in leaves) else None

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.previous is None else {f"warm_start.{i}": x for i, x in enumerate(self.previous)}

    def load_state_dict(self, state: Mapping[str, Tensor], like: ParamsLike | None = None) -> None:
        """Restore from :meth:`state_dict` (other entries of a solver's state are ignored); with ``like``, a
        parameter tree of the inner parameters, a solution of other shapes is refused."""
        count = sum(1 for key in state if key.startswith("warm_start."))
        previous = [state[f"warm_start.{i}"] for i in range(count)] if count and self.enabled else None
        if previous is not None and like is not None:
            shapes = [tuple(x.shape) for x in tree_leaves(like)]
            if [tuple(x.shape) for x in previous] != shapes:
                raise ValueError(f"warm-start state has tensors of shapes {[tuple(x.shape) for x in previous]} where "
                                 f"the parameters have {shapes}: it belongs to another model.")
        self.previous = previous


class CGSolver:
    """Conjugate gradient (:func:`solve_cg`) as a solver; with ``warm_start`` each call starts
    from the previous call's solution, carried by ``state_dict`` for an exact resume."""

    def __init__(self, num_iters: int, lr: float = 1.0, tol: float = 0.0, warm_start: bool = False) -> None:
        self.num_iters, self.lr, self.tol = num_iters, lr, tol
        self.warm = WarmStart(warm_start)

    def __call__(self, matvec, batched_matvec, b: ParamsLike, reduce=identity,
                 generator: torch.Generator | None = None) -> ParamsLike:
        x = solve_cg(matvec, b, self.num_iters, self.lr, self.tol, reduce, x0=self.warm.start(b))
        self.warm.remember(x)
        return x

    def state_dict(self) -> dict[str, Tensor]:
        return self.warm.state_dict()

    def load_state_dict(self, state: Mapping[str, Tensor], like: ParamsLike | None = None, reduce=identity) -> None:
        """Restore from :meth:`state_dict`; ``like``: a parameter tree of the inner parameters (shape check)."""
        self.warm.load_state_dict(state, like)


class NystromSolver:
    """Nyström IHVP ``(H_nys + rho I)^{-1} b`` whose factor is reused for
    ``refresh_steps`` calls: call ``n`` sketches anew when ``n % refresh_steps == 0`` and
    otherwise only applies the stored factor (no Hessian-vector product), so between
    refreshes a hypergradient costs one outer gradient and one mixed product. With
    ``pcg_iters``, the factor preconditions ``pcg_iters`` CG steps on ``H x = b`` instead
    (Frangella, Tropp & Udell, 2023), on the same refresh schedule: a reused preconditioner
    costs no product and leaves the CG solution unbiased.

    ``state_dict``/``load_state_dict`` carry the factor and the call count (and the last PCG
    solution with ``warm_start``), so a resumed run continues the refresh schedule exactly."""

    def __init__(self, rank: int, rho: float, sketch: str = DEFAULT_NYSTROM_SKETCH,
                 refresh_steps: int = DEFAULT_REFRESH_STEPS,
                 pcg_iters: int | None = None, tol: float = 0.0, warm_start: bool = False) -> None:
        self.rank, self.rho, self.sketch = rank, rho, sketch
        self.refresh_steps, self.pcg_iters, self.tol = refresh_steps, pcg_iters, tol
        self.factor: NystromFactor | None = None
        self.calls = 0
        self.warm = WarmStart(warm_start and pcg_iters is not None)

    @property
    def refresh_due(self) -> bool:
        """Whether the next call sketches anew (and so needs Hessian-vector products)."""
        return self.factor is None or self.calls % self.refresh_steps == 0

    def __call__(self, matvec, batched_matvec, b: ParamsLike, reduce=identity,
                 generator: torch.Generator | None = None) -> ParamsLike:
        if self.refresh_due:
            self.factor = NystromFactor.sketch(batched_matvec, b, self.rank, self.rho, self.sketch, generator, reduce)
        self.calls += 1
        factor = self.factor
        if not all(bool(torch.isfinite(x).all()) for x in tree_leaves(factor.y)):
            self.factor = None  # never reuse a poisoned factor: sketch anew at the next call
        if self.pcg_iters is None:
            return factor.solve(b)
        x = solve_pcg(matvec, b, self.pcg_iters, factor.precondition, self.tol, reduce, x0=self.warm.start(b))
        self.warm.remember(x)
        return x

    def state_dict(self) -> dict[str, Tensor]:
        state = {"calls": torch.tensor(self.calls, dtype=torch.int64), **self.warm.state_dict()}
        if self.factor is not None:
            state.update(self.factor.state_dict())
        return state

    def load_state_dict(self, state: Mapping[str, Tensor], like: ParamsLike, reduce=identity) -> None:
        """Restore from :meth:`state_dict`; ``like`` is a parameter tree of the inner
        parameters (for the factor's structure)."""
        if "calls" not in state:
            raise ValueError("Nyström solver state has no 'calls' entry.")
        self.calls = int(state["calls"])
        self.warm.load_state_dict(state, like)
        factor_state = {k: v for k, v in state.items() if k != "calls" and not k.startswith("warm_start.")}
        self.factor = NystromFactor.from_state_dict(factor_state, like, self.rho, reduce) if factor_state else None


Solve = Callable[..., ParamsLike]


def _cg(o: CGOptions) -> Solve:
    return CGSolver(o.num_iters, o.lr, o.tol, o.warm_start)


def _neumann(o: NeumannOptions) -> Solve:
    return lambda mv, bmv, b, reduce=identity, generator=None: solve_neumann(mv, b, o.num_iters, o.lr)  # no inner products: nothing to reduce


def _nystrom(o: NystromOptions) -> Solve:
    return NystromSolver(o.rank, o.rho, o.sketch, o.refresh_steps)


def _nystrom_pcg(o: NystromPCGOptions) -> Solve:
    return NystromSolver(o.rank, o.rho, o.sketch, o.refresh_steps, pcg_iters=o.num_iters, tol=o.tol,
                         warm_start=o.warm_start)


def _exact(o: ExactOptions) -> Solve:
    # single products, one per column: the ground-truth method takes the most accurate form of
    # each (batched finite-difference products share a base gradient and are less accurate)
    return lambda mv, bmv, b, reduce=identity, generator=None: solve_dense(one_at_a_time(mv), b)


def _identity_solve(o: IdentityOptions) -> Solve:
    return lambda mv, bmv, b, reduce=identity, generator=None: tree_scale(b, o.scale)


@dataclass(frozen=True)
class IHVPMethod:
    """One IHVP method: its options class, its solver factory, a one-line summary (shown in
    ``--help``) and its capabilities, which the trainer and the arguments read instead of method names:

    * ``shardable``: runs on FSDP-sharded parameters (its products and inner products reduce across ranks);
    * ``hessian_free``: computes no Hessian-vector product (runs where exact products cannot, e.g. under FSDP
      for an outer module that needs them);
    * ``max_params``: the largest number of inner parameters it accepts (``None``: no limit).

    Which shared arguments a method reads (``ihvp_iters``, ``ihvp_warm_start``, ...) follows from its options
    class's fields (:func:`methods_reading`)."""

    name: str
    options: type
    build: Callable[[Any], Solve]
    summary: str
    shardable: bool = True
    hessian_free: bool = False
    max_params: int | None = None


METHODS: dict[str, IHVPMethod] = {
    m.name: m
    for m in (
        IHVPMethod("nystrom", NystromOptions, _nystrom, "rank-k Nyström approximation, k batched products"),
        IHVPMethod("nystrom_pcg", NystromPCGOptions, _nystrom_pcg, "Nyström-preconditioned conjugate gradient"),
        IHVPMethod("cg", CGOptions, _cg, "conjugate gradient"),
        IHVPMethod("neumann", NeumannOptions, _neumann, "truncated Neumann series"),
        IHVPMethod("identity", IdentityOptions, _identity_solve, "first-order: H^-1 ~ scale * I (no HVP)",
                   hessian_free=True),
        IHVPMethod("exact", ExactOptions, _exact, "dense Hessian, exact solve (small problems)", shardable=False,
                   max_params=EXACT_MAX_PARAMS),
    )
}


def get_method(name: str) -> IHVPMethod:
    if name not in METHODS:
        raise ValueError(f"unknown IHVP method {name!r}; use one of {tuple(METHODS)}.")
    return METHODS[name]


def method_options(name: str, **options: Any):
    """The validated options of method ``name`` (unknown option names are refused)."""
    cls = get_method(name).options
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"IHVP method {name!r} has no option(s) {unknown}; it takes {sorted(known)}.")
    return cls(**options)


def methods_reading(argument: str) -> tuple[str, ...]:
    """The methods whose options read the ``BilevelTrainingArguments`` field ``argument``."""
    return tuple(m.name for m in METHODS.values()
                 if any(f.metadata.get("argument") == argument for f in dataclasses.fields(m.options)))


def argument_default(argument: str) -> Any:
    """The one default of the ``BilevelTrainingArguments`` field ``argument``: that of every option reading it
    (the options classes are the single place where a default is set; methods that share an argument agree)."""
    defaults = {f.default for m in METHODS.values() for f in dataclasses.fields(m.options)
                if f.metadata.get("argument") == argument}
    if len(defaults) != 1:
        raise ValueError(f"the options reading argument {argument!r} have defaults {sorted(map(str, defaults))}; "
                         "they must agree on one")
    return defaults.pop()


def options_from_arguments(name: str, arguments: Any):
    """The options of method ``name`` read from an object with the ``"argument"`` fields
    (``BilevelTrainingArguments``), validated; errors name those fields."""
    fields = [f for f in dataclasses.fields(get_method(name).options) if "argument" in f.metadata]
    try:
        return get_method(name).options(**{f.name: getattr(arguments, f.metadata["argument"]) for f in fields})
    except (TypeError, ValueError) as err:  # name the argument the user set, not the option
        message = str(err)
        for f in fields:
            message = message.replace(f"`{f.name}`", f"`{f.metadata['argument']}`")
        raise type(err)(message) from None


def options_metadata(name: str, options: Any) -> dict[str, str]:
    """``{"method": name, <key>: str(value), ...}`` for saved metadata."""
    meta = {"method": name}
    for f in dataclasses.fields(options):
        meta[f.metadata.get("key", f.name)] = str(getattr(options, f.name))
    return meta


def check_problem_size(name: str, options: Any, num_params: int, argument_names: bool = False) -> None:
    """Refuse options that cannot work with ``num_params`` inner parameters (checked once,
    before any product). ``argument_names``: name options by their
    ``BilevelTrainingArguments`` field in the message."""
    fields = {f.name: f for f in dataclasses.fields(options)}
    rank = getattr(options, "rank", None)
    if rank is not None and rank > num_params:
        label = fields["rank"].metadata["argument"] if argument_names else "rank"
        raise ValueError(f"`{label}` ({rank}) must not exceed the number of inner parameters ({num_params}); "
                         f"use `{label}` <= {num_params}.")
    limit = get_method(name).max_params
    if limit is not None and num_params > limit:
        raise ValueError(f"ihvp_method={name!r} accepts at most {limit} inner parameters (got {num_params}); "
                         f"use one of {tuple(m for m, method in METHODS.items() if method.max_params is None)}.")
