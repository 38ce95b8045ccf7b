"""Which Hessian-vector-product mode to use for a model: :func:`probe_hvp_mode` checks each exact mode's product
against an independent one and weighs the memory its products hold against one gradient's, without timing."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from .autodiff import check_mode, hvp
from .products import EXACT_MODES, count_saved_bytes, linearize_inner
from .trees import tree_map, tree_norm
from .utils import ParamsLike

logger = logging.getLogger(__name__)

__all__ = ["probe_hvp_mode"]


def probe_hvp_mode(
    f: Callable[[ParamsLike], Tensor],
    primal: ParamsLike,
    requested: str = "auto",
    low_precision: bool = False,
    generator: torch.Generator | None = None,
    max_memory_ratio: float | None = None,
    exact_only: bool = False,
) -> str:
    """The HVP mode to use for ``f`` at ``primal`` (call it on a small batch).

    Each candidate exact mode (both for ``requested="auto"``, else the requested one) takes one
    product on a random direction through the same path the solves use, checked against an
    independent product (finite differences; for bf16/fp16 forward passes, whose finite
    differences are too noisy, the other exact mode). This matters: plain-autograd ``rev_rev``
    silently drops what an op marked ``once_differentiable`` contributes to the Hessian, and only
    the comparison shows it. An explicit mode that fails to run or disagrees raises here, before
    training, naming the mode. For ``auto``, the memory of a correct mode is estimated as the bytes
    autograd saves for its products, relative to those of one gradient (an inner step), and the first
    correct mode of :data:`EXACT_MODES` within ``max_memory_ratio`` wins (``rev_rev``, whose products
    share one linearization and cost one backward pass each, before ``fwd_rev``, whose every product is
    a forward-mode pass through a gradient), else ``"finite_diff"`` (about one gradient's memory). The
    choice depends only on the model, the batch's shapes and the limit, never on wall-clock timing, so
    two runs of the same seed (and a resumed run) choose the same mode.

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
    candidates = EXACT_MODES if auto else (requested,)
    products: dict[str, object] = {}
    memory: dict[str, float] = {}
    for mode in candidates:
        try:
            linear = linearize_inner(lambda t, _: f(t), primal, {}, mode)
            products[mode] = linear.hvp(tangent)  # warm-up and the value checked
            # rev_rev: the bytes its shared graph saved. fwd_rev cannot be measured this way
            # (torch.func refuses saved-tensor hooks): a jvp of a gradient carries a tangent
            # for every saved activation, about twice a gradient's memory.
            memory[mode] = linear.graph_bytes / max(step_bytes[0], 1) if mode == "rev_rev" else 2.0
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
        if isinstance(products[mode], Exception):
            continue
        ref, tolerance = reference(mode)
        if ref is None:  # exact_only and no second exact mode: nothing independent to compare with
            logger.warning("hvp_mode %s taken without an independent check (no other exact mode runs here).", mode)
            correct.append(mode)
            continue
        error = float(tree_norm(tree_map(torch.sub, products[mode], ref))) / max(float(tree_norm(ref)), 1e-30)
        if error < tolerance:
            correct.append(mode)
        elif not auto:
            raise ValueError(f"hvp_mode={mode!r} cannot run on this model correctly: its products disagree with an "
                             f"independent product (relative difference {error:.2e}). Use hvp_mode='finite_diff'.")
        else:
            logger.warning("hvp_mode %s disagrees with an independent product (relative difference %.2e).",
                           mode, error)
    if not auto:
        return requested
    fitting = [m for m in correct if max_memory_ratio is None or memory[m] <= max_memory_ratio]
    for mode in set(correct) - set(fitting):
        logger.info("hvp_mode %s needs ~%.1fx a gradient's memory (limit %.1fx).", mode, memory[mode],
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
        f"{m} ~{memory[m]:.1f}x a gradient's memory" for m in fitting), best)
    return best
