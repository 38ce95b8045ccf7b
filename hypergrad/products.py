"""Second-order products of the inner objective at one point, linearized once.

Every IHVP method needs, at a fixed ``(theta, phi)`` and batch, many products with the
Hessian ``H = d^2 f / dtheta^2`` and one with the mixed derivative
``M = d^2 f / dphi dtheta``. :func:`linearize_inner` returns an :class:`InnerProducts`
holding whatever can be shared between them:

* ``"rev_rev"``: the gradient graph ``g(theta, phi) = grad_theta f`` is built **once**
  (one forward and one ``create_graph`` backward); then ``H v = d<g, v>/dtheta`` and
  ``M v = d<g, v>/dphi`` are each a single backward pass through that graph, with no new
  forward pass. This is what makes a 10-product CG cost 1 linearization + 10 backward passes
  instead of 10 linearizations.
* ``"fwd_rev"``: each product is a ``jvp`` of ``grad`` (forward over reverse). PyTorch can
  only reuse a forward-mode linearization through ``torch.func.linearize``, which traces the
  function with ``make_fx``; on a 50k-parameter MLP that trace cost 13x as much as the ten
  products it would save, so products are taken one by one (the mode stays for kernels that
  have forward-mode rules but no double backward).
* ``"finite_diff"``: central differences of two plain-autograd gradients per product, the
  memory-lean form (about one training step's memory; nothing is kept between products); a
  batch of ``k`` products takes forward differences from one shared gradient (``k + 1``
  gradients).

Batched products ``H V`` (``V`` with a leading dimension ``k``) are computed ``chunk_size``
at a time: vectorized through the shared graph (``is_grads_batched``) for ``rev_rev``, by
``vmap`` for ``fwd_rev``, by a loop for finite differences. For ``rev_rev`` the default is
as many as a ``memory_budget`` allows (every product in flight needs about the memory of the
tensors the graph saved, measured while it is built); without a budget, all at once for
problems of at most :data:`VECTORIZE_MAX_PARAMS` inner parameters, whose products are
dominated by per-call overhead (a 33-parameter logistic regression: rank-10 Nyström 1.6x
faster vectorized), and one at a time above it, where each product is compute-bound (a
50k-parameter MLP: the loop was as fast as the vectorized backward, 9.6 ms vs 12.0 ms for 5
products, at a fifth of the activation memory).

:func:`probe_hvp_mode` picks an exact mode that is right for a given objective and fits a memory limit
(deterministically: the same model and batch shapes always give the same mode).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .autodiff import HVPMode, batched_hvp, check_mode, finite_difference_step, gradient, hvp, mixed_vjp, one_at_a_time
from .trees import tree_leaves, tree_map, tree_numel, tree_unflatten
from .utils import ParamsLike, check_positive_int, identity

logger = logging.getLogger(__name__)

__all__ = ["InnerProducts", "linearize_inner", "mixed_reverse_over_forward", "count_saved_bytes",
           "SavedBytesLimitExceeded", "EXACT_MODES"]

EXACT_MODES: tuple[str, ...] = ("rev_rev", "fwd_rev")
"""The exact modes, in the order ``auto`` tries them when their timings tie."""

Objective = Callable[[ParamsLike, ParamsLike], Tensor]


def mixed_reverse_over_forward(inner: Objective, in_params: ParamsLike, out_params: ParamsLike,
                               v: ParamsLike) -> ParamsLike:
    """``M v = grad_phi <grad_theta f, v> = grad_phi (d/de) f(theta + e v, phi)``: the
    directional derivative by forward mode (dual tensors, ``theta + e v``), then its gradient in
    ``phi`` by one backward pass. Only the part of the tangent's computation that ``phi`` reaches is
    recorded for that backward pass (for data weights: the per-example losses' tangents), so no
    graph of ``grad_theta f`` is ever built. Dual tensors of ``torch.autograd.forward_ad`` rather
    than ``torch.func.jvp`` inside ``torch.func.grad``: the same numbers at half the per-call
    overhead (a 50k-parameter MLP, side by side: 4.4 ms vs 8.4 ms)."""
    phi = tree_map(lambda x: x.detach().requires_grad_(True), out_params)
    with torch.enable_grad(), forward_ad.dual_level():
        theta = tree_map(lambda x, t: forward_ad.make_dual(x.detach(), t.to(x.dtype)), in_params, v)
        tangent = forward_ad.unpack_dual(inner(theta, phi)).tangent
    leaves = tree_leaves(phi)
    if tangent is None or not tangent.requires_grad:  # f's slope along v does not depend on phi
        return tree_map(torch.zeros_like, phi)
    grads = torch.autograd.grad(tangent, leaves, allow_unused=True)
    return tree_unflatten(phi, [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)])


class InnerProducts:
    """``H v``, ``H V`` (batched) and ``M v`` of an inner objective at one point.

    ``average`` is applied to every product (data parallelism: the mean over processes of
    each process's local product, see :class:`hypergrad.distributed.DataParallel`)."""

    def __init__(self, average: Callable[[ParamsLike], ParamsLike] | None = None) -> None:
        self._average = average if average is not None else identity

    def hvp(self, v: ParamsLike) -> ParamsLike:
        """``H v``."""
        return self._average(self._hvp(v))

    def batched_hvp(self, vs: ParamsLike) -> ParamsLike:
        """``H V`` for a batched tree ``V`` (leading dimension ``k`` on every leaf)."""
        return self._average(self._batched_hvp(vs))

    def mixed(self, v: ParamsLike) -> ParamsLike:
        """``M v = (d^2 f / dphi dtheta) v``, shaped like ``phi``."""
        return self._average(self._mixed(v))

    def _hvp(self, v: ParamsLike) -> ParamsLike:  # pragma: no cover - abstract
        raise NotImplementedError

    def _batched_hvp(self, vs: ParamsLike) -> ParamsLike:  # pragma: no cover - abstract
        raise NotImplementedError

    def _mixed(self, v: ParamsLike) -> ParamsLike:  # pragma: no cover - abstract
        raise NotImplementedError


class _PerProduct(InnerProducts):
    """``fwd_rev`` and ``finite_diff``: every product is computed from scratch by
    :func:`hypergrad.utils.hvp` / :func:`~hypergrad.utils.mixed_vjp`."""

    def __init__(self, inner: Objective, in_params: ParamsLike, out_params: ParamsLike, mode: HVPMode,
                 chunk_size: int | None, average) -> None:
        super().__init__(average)
        self._inner, self._theta, self._phi = inner, in_params, out_params
        self._mode, self._chunk_size = mode, chunk_size

    def _at_phi(self, theta: ParamsLike) -> Tensor:
        return self._inner(theta, self._phi)

    def _hvp(self, v):
        return hvp(self._at_phi, self._theta, v, self._mode)

    def _batched_hvp(self, vs):
        return batched_hvp(self._at_phi, self._theta, vs, self._mode, chunk_size=self._chunk_size)

    def _mixed(self, v):
        return mixed_vjp(self._inner, self._theta, self._phi, v, self._mode)


class _FiniteDifferences(_PerProduct):
    """``finite_diff``: single products by central differences (2 gradients each, error
    ``~u^(2/3)``); a batch of ``k`` products (a Nyström sketch) by forward differences from one
    shared gradient at ``theta``: ``k + 1`` gradients instead of ``2k``, error ``~u^(1/2)``
    (``~3e-4`` relative in float32), far below a rank-``k`` sketch's own approximation error.
    Only one gradient's activations are alive at a time."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._base: ParamsLike | None = None

    def _batched_hvp(self, vs):
        grad_at = gradient(self._at_phi, 0, "finite_diff")
        if self._base is None:
            self._base = grad_at(self._theta)

        def forward_difference(v: ParamsLike) -> ParamsLike:
            r = finite_difference_step(self._theta, v, one_sided=True)
            moved = grad_at(tree_map(lambda x, d: x + r.to(x.dtype) * d, self._theta, v))
            return tree_map(lambda a, b: (a - b) / r.to(a.dtype), moved, self._base)

        return one_at_a_time(forward_difference)(vs)


VECTORIZE_MAX_PARAMS = 10_000
"""``rev_rev`` without a chunk size or memory budget vectorizes the products of a batch when
the inner parameters number at most this many (overhead-bound products, negligible memory)."""


class _ReverseLinearization(InnerProducts):
    """``rev_rev``: one ``create_graph`` gradient, then one backward pass per product.

    The graph is built lazily, at the first product, and lives as long as this object."""

    def __init__(self, inner: Objective, in_params: ParamsLike, out_params: ParamsLike,
                 chunk_size: int | None, memory_budget: int | None, average,
                 saved_bytes_limit: float | None = None) -> None:
        super().__init__(average)
        self._inner, self._chunk_size, self._memory_budget = inner, chunk_size, memory_budget
        self._saved_bytes_limit = saved_bytes_limit
        self.graph_bytes = 0
        self._theta_in, self._phi_in = in_params, out_params
        self._forward_mixed = True
        self._theta = tree_map(lambda x: x.detach().requires_grad_(True), in_params)
        self._phi = tree_map(lambda x: x.detach().requires_grad_(True), out_params)
        self._grads: list[Tensor] | None = None
        self._vectorize = True

    def _graph(self) -> list[Tensor]:
        """``grad_theta f`` with its graph (built on first use)."""
        if self._grads is None:
            theta = tree_leaves(self._theta)
            with torch.enable_grad(), count_saved_bytes(self._saved_bytes_limit) as saved:
                value = self._inner(self._theta, self._phi)
                if not saved[1]:  # the forward's tensors were all kept: its backward can run
                    grads = torch.autograd.grad(value, theta, create_graph=True, allow_unused=True)
            self.graph_bytes = saved[0]
            if saved[1]:
                raise SavedBytesLimitExceeded(f"the gradient graph saved more than {self._saved_bytes_limit:.0f} "
                                              f"bytes ({saved[0]})")
            self._grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, theta)]
        return self._grads

    def _backward(self, v_leaves: list[Tensor], wrt: ParamsLike, batched: bool) -> ParamsLike:
        """``d <grad_theta f, v> / d wrt`` (for each row of ``v`` when ``batched``)."""
        grads = self._graph()
        targets = tree_leaves(wrt)
        live = [(g, v) for g, v in zip(grads, v_leaves) if g.requires_grad]
        batch = (v_leaves[0].shape[0],) if batched else ()
        if live:
            with torch.enable_grad():
                out = torch.autograd.grad([g for g, _ in live], targets, [v.to(g.dtype) for g, v in live],
                                          retain_graph=True, allow_unused=True, is_grads_batched=batched)
        else:  # f is at most linear in theta: every second derivative vanishes
            out = [None] * len(targets)
        return tree_unflatten(wrt, [torch.zeros(*batch, *x.shape, dtype=x.dtype, device=x.device) if o is None
                                    else o.detach() for o, x in zip(out, targets)])

    def _hvp(self, v):
        return tree_unflatten(v, tree_leaves(self._backward(tree_leaves(v), self._theta, False)))

    def _batched_hvp(self, vs):
        leaves = tree_leaves(vs)
        k = leaves[0].shape[0]
        step = self._products_in_flight(k)
        parts = []
        for start in range(0, k, step):
            chunk = [x[start:start + step] for x in leaves]
            parts.append(tree_leaves(self._batched_chunk(chunk)))
        return tree_unflatten(vs, [torch.cat(xs) for xs in zip(*parts)])

    def _products_in_flight(self, k: int) -> int:
        """``chunk_size``; else as many as ``memory_budget`` bytes hold at ``graph_bytes``
        each; else all ``k`` for a small problem (at most :data:`VECTORIZE_MAX_PARAMS` inner
        parameters) and one for a large one."""
        if self._chunk_size is not None:
            return self._chunk_size
        if self._memory_budget is not None:
            self._graph()
            return max(1, min(k, self._memory_budget // max(self.graph_bytes, 1)))
        return k if self._overhead_bound() else 1

    def _overhead_bound(self) -> bool:
        """At most :data:`VECTORIZE_MAX_PARAMS` inner parameters: per-call overhead, not compute or memory,
        sets the cost of a product here."""
        return tree_numel(self._theta) <= VECTORIZE_MAX_PARAMS

    def _batched_chunk(self, chunk: list[Tensor]) -> ParamsLike:
        """One vectorized backward for the rows of ``chunk``; a loop when some kernel of the
        graph has no batching rule (remembered for the next calls)."""
        if self._vectorize and chunk[0].shape[0] > 1:
            try:
                return self._backward(chunk, self._theta, True)
            except RuntimeError:
                self._vectorize = False
        batched = tree_unflatten(self._theta, chunk)
        return one_at_a_time(lambda v: self._backward(tree_leaves(v), self._theta, False))(batched)

    def _mixed(self, v):
        """Through the shared graph when the solve built it or the problem is small (at most
        :data:`VECTORIZE_MAX_PARAMS` inner parameters: overhead-bound, the graph costs
        negligible memory and was 3x faster on a 33-parameter logistic regression); otherwise
        (a reused Nyström factor, a Hessian-free method) reverse over forward,
        ``grad_phi jvp_theta f``: one forward pass with tangents and a backward pass that only
        reaches ``phi`` (shallow for data weights and penalty strengths), instead of a
        ``create_graph`` gradient and a double backward through the model. Falls back to the
        graph where forward-mode AD cannot run."""
        if self._grads is None and self._forward_mixed and not self._overhead_bound():
            try:
                return mixed_reverse_over_forward(self._inner, self._theta_in, self._phi_in, v)
            except Exception as err:  # a kernel without a forward-mode rule
                logger.info("reverse-over-forward mixed product unavailable (%s); using the graph.",
                            type(err).__name__)
                self._forward_mixed = False
        return self._backward(tree_leaves(v), self._phi, False)


def linearize_inner(
    inner: Objective,
    in_params: ParamsLike,
    out_params: ParamsLike,
    mode: HVPMode = "rev_rev",
    chunk_size: int | None = None,
    average: Callable[[ParamsLike], ParamsLike] | None = None,
    memory_budget: int | None = None,
    saved_bytes_limit: float | None = None,
) -> InnerProducts:
    """The products of ``inner(theta, phi)`` at ``(in_params, out_params)`` in ``mode``.

    ``chunk_size`` bounds how many products of a batched call are in flight at once (the
    activation memory of a batched product grows linearly with it). When it is ``None``,
    ``rev_rev`` fits as many as ``memory_budget`` (bytes) allows, one without a budget;
    ``fwd_rev`` vectorizes all. ``saved_bytes_limit`` (``rev_rev``): once the gradient graph has saved more bytes than this,
    it keeps no more of them, and the first product raises :class:`SavedBytesLimitExceeded` when
    autograd is done, so that finding a graph too large never holds all of it."""
    check_mode(mode)
    for name, value in (("chunk_size", chunk_size), ("memory_budget", memory_budget)):
        if value is not None:
            check_positive_int(value, name)
    if mode == "rev_rev":
        return _ReverseLinearization(inner, in_params, out_params, chunk_size, memory_budget, average,
                                     saved_bytes_limit)
    if mode == "finite_diff":
        return _FiniteDifferences(inner, in_params, out_params, mode, chunk_size, average)
    return _PerProduct(inner, in_params, out_params, mode, chunk_size, average)


class SavedBytesLimitExceeded(RuntimeError):
    """Autograd saved more bytes than the ``limit`` of :func:`count_saved_bytes`."""


@contextlib.contextmanager
def count_saved_bytes(limit: float | None = None):
    """Count the bytes of the tensors autograd saves for backward inside the block:
    ``with count_saved_bytes() as saved: ...; saved[0]``. Tensors saved several times count
    several times and parameters count too, so this is an upper bound of the activation memory
    a backward pass will hold (the same bound for every mode it compares).

    ``limit``: once the count passes it, tensors are counted but no longer kept (``saved[1]`` turns
    true), so that measuring a graph too large never holds it; the graph built in the block can then
    never be differentiated, and the block must discard it (raising inside autograd's hooks instead
    would leak the graph)."""
    total = [0, False]

    def pack(x: Tensor) -> Tensor | None:
        total[0] += x.numel() * x.element_size()
        if limit is not None and total[0] > limit:
            total[1] = True
            return None
        return x.detach()  # not x itself: a saved output holding its own grad_fn is a cycle that leaks the graph

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        yield total
