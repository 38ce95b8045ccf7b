"""Which Hessian-vector-product mode to use for a model: :func:`probe_hvp_mode` checks each exact mode's product
against an independent one and weighs the memory its products hold against one gradient's, without timing;
:func:`resolve_hvp_mode` is the core functions' ``hvp_mode="auto"``: the probe, once per objective and shapes."""

from __future__ import annotations

import functools
import inspect
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .autodiff import HVP_MODES, check_mode, hvp, scalar_objective
from .distributed import all_reduce_sum, is_distributed
from .products import EXACT_MODES, SavedBytesLimitExceeded, count_saved_bytes, linearize_inner
from .trees import tree_leaves, tree_map, tree_norm
from .utils import ParamsLike

logger = logging.getLogger(__name__)

__all__ = ["probe_hvp_mode", "resolve_hvp_mode", "DEFAULT_MAX_MEMORY_RATIO", "CORE_FREE_BYTES"]

DEFAULT_MAX_MEMORY_RATIO = 1.5
"""``hvp_mode="auto"`` takes an exact mode only if its products hold at most this multiple of the memory of one
gradient of the inner objective (the trainer's ``hvp_max_memory_ratio`` and the core functions' default)."""

CORE_FREE_BYTES = 32 * 2**20
"""The core functions' ``auto`` also takes an exact mode whose products hold at most this many bytes, whatever
the ratio: on a problem that small (a logistic regression, a small MLP) exact products cost nothing worth saving
and are exact, while finite differences carry a ``~u^(1/2)`` error."""

FWD_REV_MEMORY_RATIO = 2.0
"""``fwd_rev``'s memory relative to a gradient, estimated (``torch.func`` refuses the saved-tensor hooks that
measure ``rev_rev``): a ``jvp`` of a gradient carries a tangent for every saved activation."""


def probe_hvp_mode(
    f: Callable[[ParamsLike], Tensor],
    primal: ParamsLike,
    requested: str = "auto",
    low_precision: bool = False,
    generator: torch.Generator | None = None,
    max_memory_ratio: float | None = None,
    exact_only: bool = False,
    free_bytes: float = 0,
) -> str:
    """The HVP mode to use for ``f`` at ``primal`` (call it on a small batch).

    Each candidate exact mode (both for ``requested="auto"``, else the requested one) takes one
    product on a random direction through the same path the solves use, checked against an
    independent product (finite differences; for bf16/fp16 forward passes, whose finite
    differences are too noisy, the other exact mode). This matters: plain-autograd ``rev_rev``
    silently drops what an op marked ``once_differentiable`` contributes to the Hessian, and only
    the comparison shows it. An explicit mode that fails to run or disagrees raises here, before
    training, naming the mode. For ``auto``, the memory of a mode is estimated as the bytes
    autograd saves for its products, relative to those of one gradient (an inner step), and the first
    correct mode of :data:`EXACT_MODES` within ``max_memory_ratio`` (or within ``free_bytes``) wins
    (``rev_rev``, whose products share one linearization and cost one backward pass each, before
    ``fwd_rev``, whose every product is a forward-mode pass through a gradient), else ``"finite_diff"``
    (about one gradient's memory). A mode that cannot fit is not run: ``fwd_rev`` (estimated at
    :data:`FWD_REV_MEMORY_RATIO`) is skipped, and building ``rev_rev``'s graph stops as soon as it passes
    the limit, so the probe itself stays near the limit. The choice depends only on the model, the batch's
    shapes and the limit, never on wall-clock timing, so two runs of the same seed (and a resumed run)
    choose the same mode.

    ``exact_only``: ``f`` holds a stop-gradient (its Hessian treats that value as a constant, which
    finite differences of gradients cannot), so ``"finite_diff"`` is refused, exact modes are checked
    against each other (a single runnable one is taken as it is), and ``auto`` never falls back to
    finite differences: the memory limit is then ignored with a warning.
    """
    if exact_only and requested == "finite_diff":
        raise ValueError("hvp_mode='finite_diff' cannot compute this objective's Hessian: it holds a stop-gradient "
                         "(e.g. LossWeights' weights), which finite differences of gradients differentiate too. "
                         "Use hvp_mode='rev_rev', 'fwd_rev' or 'auto'.")
    if requested == "finite_diff":
        return requested
    auto = requested == "auto"
    if not auto:
        check_mode(requested)
    tangent = tree_map(lambda x: torch.randn(x.shape, generator=generator).to(x), primal)
    with count_saved_bytes() as step_bytes, torch.enable_grad():
        f(tree_map(lambda x: x.detach().requires_grad_(True), primal))
    step = max(step_bytes[0], 1)
    bound = max(max_memory_ratio * step, free_bytes) if max_memory_ratio is not None else None  # bytes
    # auto with a limit (and a finite-difference fallback): what cannot fit is not run
    limit = bound if auto and not exact_only else None
    candidates = EXACT_MODES if auto else (requested,)
    products: dict[str, object] = {}  # a product, the error that stopped it, or None: over the limit, not run
    memory: dict[str, float] = {}  # bytes
    for mode in candidates:
        if mode == "fwd_rev":
            memory[mode] = FWD_REV_MEMORY_RATIO * step
            if limit is not None and memory[mode] > limit:
                products[mode] = None
                continue
        try:
            linear = linearize_inner(lambda t, _: f(t), primal, {}, mode,
                                     saved_bytes_limit=limit if mode == "rev_rev" else None)
            products[mode] = linear.hvp(tangent)  # warm-up and the value checked
            if mode == "rev_rev":  # the bytes its shared graph saved
                memory[mode] = linear.graph_bytes
            del linear
        except SavedBytesLimitExceeded:
            products[mode], memory[mode] = None, float("inf")
        except Exception as err:  # a kernel without the needed derivative
            if not auto:
                raise ValueError(f"hvp_mode={mode!r} cannot run on this model ({type(err).__name__}: {err}). "
                                 f"Use hvp_mode='auto' or 'finite_diff'.") from err
            logger.info("hvp_mode %s unavailable (%s: %s).", mode, type(err).__name__, err)
            products[mode] = err
    finite_difference: list = []

    def reference(mode: str):
        other = products.get(EXACT_MODES[1 - EXACT_MODES.index(mode)])
        if exact_only and (other is None or isinstance(other, Exception)):
            if not auto:  # only the requested mode was taken: the other one is the exact reference
                try:
                    other = linearize_inner(lambda t, _: f(t), primal, {},
                                            EXACT_MODES[1 - EXACT_MODES.index(mode)]).hvp(tangent)
                except Exception:  # noqa: BLE001 - no second exact mode on this model
                    other = None
        usable = other is not None and not isinstance(other, Exception)
        if exact_only:
            return (other, 2e-2 if low_precision else 1e-4) if usable else (None, None)
        if low_precision and usable:
            return other, 2e-2
        if not finite_difference:
            finite_difference.append(hvp(f, primal, tangent, "finite_diff"))
        return finite_difference[0], 2e-1 if low_precision else 1e-2

    correct = []
    for mode in candidates:
        if products[mode] is None or isinstance(products[mode], Exception):
            continue
        ref, tolerance = reference(mode)
        if ref is None:  # exact_only and no second exact mode: nothing independent to compare with
            logger.warning("hvp_mode %s taken without an independent check (no other exact mode runs here).", mode)
            correct.append(mode)
            continue
        error = float(tree_norm(tree_map(torch.sub, products[mode], ref))) / max(float(tree_norm(ref)), 1e-30)
        if error < tolerance:
            correct.append(mode)
            if limit is not None:  # the first correct mode within the limit wins: no need to check the next
                break
        elif not auto:
            raise ValueError(f"hvp_mode={mode!r} cannot run on this model correctly: its products disagree with an "
                             f"independent product (relative difference {error:.2e}). Use hvp_mode='finite_diff'.")
        else:
            logger.warning("hvp_mode %s disagrees with an independent product (relative difference %.2e).",
                           mode, error)
    if not auto:
        return requested
    fitting = [m for m in correct if bound is None or memory[m] <= bound]
    for mode, needed in memory.items():
        if bound is not None and needed > bound:
            logger.info("hvp_mode %s needs %s a gradient's memory (limit %.1fx).", mode,
                        f"~{needed / step:.1f}x" if needed < float("inf") else "more than the limit of",
                        max_memory_ratio)
    if not fitting and exact_only and correct:
        logger.warning("no exact hvp_mode fits hvp_max_memory_ratio=%s, and finite differences cannot compute this "
                       "objective's Hessian: using the leanest exact mode.", max_memory_ratio)
        fitting = [min(correct, key=lambda m: memory[m])]
    if not fitting:
        if exact_only:
            raise ValueError("no exact hvp_mode runs correctly on this model, and finite differences cannot compute "
                             "this objective's Hessian (it holds a stop-gradient): use ihvp_method='identity'.")
        return "finite_diff"
    best = fitting[0]  # candidates keep the order of EXACT_MODES
    logger.info("hvp_mode probe: %s; using %s.", ", ".join(
        f"{m} ~{memory[m] / step:.1f}x a gradient's memory" for m in fitting), best)
    return best


_RESOLVED: OrderedDict[tuple, str] = OrderedDict()
_RESOLVED_MAX = 256


def resolve_hvp_mode(
    inner_obj: Callable[[ParamsLike, ParamsLike], Tensor],
    in_params: ParamsLike,
    out_params: ParamsLike,
    hvp_mode: str = "auto",
    max_memory_ratio: float | None = DEFAULT_MAX_MEMORY_RATIO,
    data_parallel: Any = None,
) -> str:
    """The concrete HVP mode of a core hypergradient call: ``hvp_mode`` itself unless it is ``"auto"``, which
    runs :func:`probe_hvp_mode` on ``inner_obj(., out_params)`` at ``in_params`` with ``max_memory_ratio``
    (and :data:`CORE_FREE_BYTES`), a fixed-seed direction (the global random state is left alone) and the
    bf16/fp16 tolerances when ``in_params`` are low precision.

    The answer is kept per objective and shapes, so a training loop probes once: the key is the objective's
    code with what its closure holds (tensors by shape, dtype and device, other objects by identity),
    ``functools.partial`` arguments and bound methods' instances alike, and every leaf's shape, dtype and
    device of ``in_params`` and ``out_params``. With ``data_parallel`` in a process group, the processes
    take the leanest mode any of them chose (``finite_diff`` over ``fwd_rev`` over ``rev_rev``), so all
    run the same products.
    """
    if hvp_mode != "auto":
        check_mode(hvp_mode)
        return hvp_mode
    key = (_callable_key(inner_obj), _value_key(in_params), _value_key(out_params), max_memory_ratio)
    try:
        hash(key)
    except TypeError:  # something in the closure does not hash: probe every call rather than guess
        key = None
    if key is not None and key in _RESOLVED:
        _RESOLVED.move_to_end(key)
        return _RESOLVED[key]
    leaves = tree_leaves(in_params)
    low_precision = any(x.dtype in (torch.float16, torch.bfloat16) for x in leaves)
    mode = probe_hvp_mode(lambda t: scalar_objective(inner_obj(t, out_params), "inner_obj"), in_params, "auto",
                          low_precision, torch.Generator().manual_seed(0), max_memory_ratio,
                          free_bytes=CORE_FREE_BYTES)
    if data_parallel is not None and is_distributed():
        chosen = torch.zeros(len(HVP_MODES), device=leaves[0].device)
        chosen[HVP_MODES.index(mode)] = 1
        chosen = all_reduce_sum(chosen)
        mode = next(m for m in ("finite_diff", "fwd_rev", "rev_rev") if chosen[HVP_MODES.index(m)] > 0)
    logger.info("hvp_mode='auto' chose %s for %s.", mode, getattr(inner_obj, "__qualname__", type(inner_obj).__name__))
    if key is not None:
        _RESOLVED[key] = mode
        while len(_RESOLVED) > _RESOLVED_MAX:
            _RESOLVED.popitem(last=False)
    return mode


def _callable_key(fn: Any, depth: int = 0) -> tuple:
    """What identifies an objective for :func:`resolve_hvp_mode`: its code and what its closure holds."""
    if depth > 4:
        return ("id", id(fn))
    if isinstance(fn, functools.partial):
        return ("partial", _callable_key(fn.func, depth + 1), _value_key(fn.args, depth + 1),
                _value_key(fn.keywords, depth + 1))
    if inspect.ismethod(fn):
        return ("method", _callable_key(fn.__func__, depth + 1), id(fn.__self__))
    code = getattr(fn, "__code__", None)
    if code is None:
        return ("object", type(fn), id(fn))
    cells = tuple(_value_key(c.cell_contents, depth + 1) if _filled(c) else None for c in fn.__closure__ or ())
    return ("function", code, cells)


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _value_key(value: Any, depth: int = 0) -> Any:
    """Tensors by shape, dtype and device; containers by their items; functions by :func:`_callable_key`;
    numbers and strings by type; anything else by type and identity."""
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype, str(value.device))
    if isinstance(value, (bool, int, float, complex, str, bytes, type(None))):
        return ("scalar", type(value))
    if depth > 4:
        return ("id", type(value), id(value))
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_value_key(v, depth + 1) for v in value))
    if isinstance(value, dict):
        return (type(value), tuple((k, _value_key(v, depth + 1)) for k, v in value.items()))
    if callable(value) and (hasattr(value, "__code__") or isinstance(value, functools.partial)
                            or inspect.ismethod(value)):
        return _callable_key(value, depth + 1)
    return ("id", type(value), id(value))
