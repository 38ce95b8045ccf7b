"""Autodiff products of an objective ``f(theta, phi)``: gradients, Hessian-vector products ``H v`` (reverse over
reverse, forward over reverse or central finite differences), batched products and the mixed product
``(d^2 f / dphi dtheta) v``; one point at a time (:mod:`hypergrad.products` shares a linearization between many)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jvp, vjp, vmap

from .trees import tree_axpy, tree_leaves, tree_map, tree_unflatten
from .utils import ParamsLike, check_positive_int, identity

__all__ = ["HVPMode", "HVP_MODES", "DEFAULT_HVP_MODE", "scalar_objective", "finite_difference_step", "gradient",
           "check_mode", "hvp", "one_at_a_time", "batched_hvp", "mixed_vjp"]

HVPMode = Literal["fwd_rev", "rev_rev", "finite_diff"]
HVP_MODES: tuple[str, ...] = ("fwd_rev", "rev_rev", "finite_diff")
# The default product mode of the single-point functions here (reverse over reverse lets a whole solve share one
# gradient graph, hypergrad.products); the hypergradient functions of hypergrad.approx_hypergrad default to "auto"
# (hypergrad.mode_probe.resolve_hvp_mode), measurements in docs/ihvp-methods.md.
DEFAULT_HVP_MODE: HVPMode = "rev_rev"


def scalar_objective(value: Tensor, name: str) -> Tensor:
    """Return ``value`` if it is a real scalar tensor, else raise naming the objective."""
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must return a scalar tensor, got {type(value).__name__}.")
    if value.numel() != 1:
        raise ValueError(
            f"`{name}` must return a scalar loss, got a tensor of shape {tuple(value.shape)}; "
            f"reduce it (e.g. `.mean()`) first."
        )
    return value.reshape(())


def finite_difference_step(primal: ParamsLike, tangent: ParamsLike, one_sided: bool = False,
                           reduce: Callable[[Tensor], Tensor] = identity) -> Tensor:
    """Step size ``r`` for the central difference ``(g(x + r v) - g(x - r v)) / 2r`` or, with
    ``one_sided``, the forward difference ``(g(x + r v) - g(x)) / r``.

    The truncation error of the central difference is ``O(r^2 |v|^3 f''')`` and the
    round-off error ``O(u |g| / r)`` with ``u`` the unit round-off; balancing them gives
    ``r ~ u^(1/3)`` (forward difference: truncation ``O(r |v|^2 f''')``, so ``r ~ u^(1/2)``).
    We scale it by ``(1 + |x|) / |v|`` so the perturbation is relative to the size of the
    parameters and independent of the scale of ``v``. ``reduce`` sums the squared norms over
    shards (FSDP), so every process takes the same step.
    """
    leaves = tree_leaves(primal)
    u = torch.finfo(leaves[0].dtype).eps

    def norm(tree: ParamsLike) -> Tensor:
        return torch.sqrt(reduce(sum((x.detach().double() ** 2).sum() for x in tree_leaves(tree))))

    x_norm = norm(primal)
    v_norm = norm(tangent)
    v_norm = torch.where(v_norm > 0, v_norm, torch.ones_like(v_norm))
    return ((u ** (0.5 if one_sided else 1.0 / 3.0)) * (1.0 + x_norm) / v_norm).to(leaves[0].dtype)


def _autograd_grad(f: Callable[..., Tensor], argnums: int | tuple[int, ...] = 0,
                   with_value: bool = False) -> Callable[..., ParamsLike]:
    """``torch.func.grad`` (``grad_and_value`` with ``with_value``) computed with plain
    ``torch.autograd`` instead of a function transform, so it also works with ops that
    ``torch.func`` cannot trace (custom ``autograd.Function``s without ``setup_context``,
    gradient checkpointing, sharded parameters)."""
    index = (argnums,) if isinstance(argnums, int) else tuple(argnums)

    def wrapper(*args: ParamsLike):
        args = list(args)
        for i in index:
            args[i] = tree_map(lambda x: x.detach().requires_grad_(True), args[i])
        leaves = [leaf for i in index for leaf in tree_leaves(args[i])]
        with torch.enable_grad():
            value = f(*args)
            grads = torch.autograd.grad(value, leaves, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
        out, offset = [], 0
        for i in index:
            n = len(tree_leaves(args[i]))
            out.append(tree_unflatten(args[i], grads[offset : offset + n]))
            offset += n
        result = out[0] if isinstance(argnums, int) else tuple(out)
        return (result, value.detach()) if with_value else result

    return wrapper


def gradient(
    f: Callable[..., Tensor], argnums: int | tuple[int, ...] = 0, mode: HVPMode = DEFAULT_HVP_MODE,
    with_value: bool = False,
) -> Callable[..., ParamsLike]:
    """The first-order gradient that goes with an HVP ``mode``: ``torch.func.grad`` for
    ``"fwd_rev"`` (composable with ``jvp``), plain autograd for ``"rev_rev"`` and
    ``"finite_diff"``, whose products are plain backward passes and so also run where function
    transforms cannot (custom ``autograd.Function``s without ``setup_context``, gradient
    checkpointing). ``with_value``: return ``(gradient, f(...))``."""
    check_mode(mode)
    if mode == "fwd_rev":
        return grad_and_value(f, argnums=argnums) if with_value else grad(f, argnums=argnums)
    return _autograd_grad(f, argnums, with_value)


def check_mode(mode: str) -> None:
    if mode not in HVP_MODES:
        raise ValueError(f"`hvp_mode` must be one of {HVP_MODES}, got {mode!r}.")


def hvp(
    f: Callable[[ParamsLike], Tensor],
    primal: ParamsLike,
    tangent: ParamsLike,
    mode: HVPMode = DEFAULT_HVP_MODE,
) -> ParamsLike:
    """Hessian-vector product ``(d^2 f / dx^2)(primal) @ tangent`` of a scalar function.

    Modes:
      * ``"fwd_rev"``: ``jvp`` of ``grad`` (forward-over-reverse), the cheapest exact mode;
      * ``"rev_rev"``: ``vjp`` of ``grad`` (reverse-over-reverse), exact, works where a
        kernel has a double backward but no forward-mode rule;
      * ``"finite_diff"``: ``(grad f(x + r v) - grad f(x - r v)) / 2r`` with ``r`` from
        :func:`finite_difference_step`; needs only first-order gradients, computed with
        plain autograd (no function transform), so it works with fused attention kernels,
        gradient checkpointing, custom autograd functions and sharded parameters. Its relative
        error is about ``u^(2/3)`` (``~1e-5`` in float32, ``~1e-11`` in float64) times a
        constant depending on the third derivative.
    """
    g = gradient(f, 0, mode)
    if mode == "fwd_rev":
        return jvp(g, (primal,), (tangent,))[1]
    if mode == "rev_rev":
        _, pullback = vjp(grad(f), primal)
        return pullback(tangent)[0]
    r = finite_difference_step(primal, tangent)
    plus = g(tree_axpy(r, tangent, primal))
    minus = g(tree_axpy(-r, tangent, primal))
    return tree_map(lambda a, b: (a - b) / (2 * r), plus, minus)


def one_at_a_time(fn: Callable[[ParamsLike], ParamsLike]) -> Callable[[ParamsLike], ParamsLike]:
    """The batched form of a tree-to-tree ``fn`` (a leading dimension on every leaf), applied
    row by row in a loop: for kernels without batching rules, or to keep one row in flight."""
    def batched(vs: ParamsLike) -> ParamsLike:
        leaves = tree_leaves(vs)
        rows = [tree_leaves(fn(tree_unflatten(vs, [x[i] for x in leaves]))) for i in range(leaves[0].shape[0])]
        return tree_unflatten(vs, [torch.stack(xs) for xs in zip(*rows)])

    return batched


def batched_hvp(
    f: Callable[[ParamsLike], Tensor],
    primal: ParamsLike,
    tangents: ParamsLike,
    mode: HVPMode = DEFAULT_HVP_MODE,
    vectorize: bool = True,
    chunk_size: int | None = None,
) -> ParamsLike:
    """``k`` Hessian-vector products at once: every leaf of ``tangents`` has a leading
    dimension ``k`` and so has every leaf of the result.

    With ``vectorize=True`` the products are computed in one ``vmap``-ed pass, which is
    much faster than a Python loop for small and medium models, at ``k`` times the
    activation memory of one product; ``chunk_size`` bounds that by vectorizing ``chunk_size``
    products at a time. ``vectorize=False`` loops, for kernels without batching rules (some
    fused or sharded ops). ``"finite_diff"`` always loops: its plain-autograd gradients
    cannot run under ``vmap``.
    """
    check_mode(mode)
    if chunk_size is not None:
        check_positive_int(chunk_size, "chunk_size")
    if vectorize and mode != "finite_diff":
        return vmap(lambda t: hvp(f, primal, t, mode), in_dims=(0,), chunk_size=chunk_size)(tangents)
    return one_at_a_time(lambda t: hvp(f, primal, t, mode))(tangents)


def mixed_vjp(
    f: Callable[[ParamsLike, ParamsLike], Tensor],
    in_params: ParamsLike,
    out_params: ParamsLike,
    v: ParamsLike,
    mode: HVPMode = DEFAULT_HVP_MODE,
) -> ParamsLike:
    """Mixed second derivative ``(d^2 f / d out d in) @ v``: how the inner gradient
    ``grad_in f`` changes along ``v``, seen as a gradient with respect to ``out_params``.

    Equals ``grad_out <grad_in f(in, out), v>``; computed as a ``jvp`` of ``grad_out f`` in
    the direction ``v`` (``fwd_rev``), a ``vjp`` of ``grad_in f`` (``rev_rev``) or a central
    difference of ``grad_out f`` along ``v`` (``finite_diff``).
    """
    grad_out = gradient(f, 1, mode)
    if mode == "fwd_rev":
        return jvp(lambda i: grad_out(i, out_params), (in_params,), (v,))[1]
    if mode == "rev_rev":
        _, pullback = vjp(lambda o: grad(f, argnums=0)(in_params, o), out_params)
        return pullback(v)[0]
    r = finite_difference_step(in_params, v)
    plus = grad_out(tree_axpy(r, v, in_params), out_params)
    minus = grad_out(tree_axpy(-r, v, in_params), out_params)
    return tree_map(lambda a, b: (a - b) / (2 * r), plus, minus)
