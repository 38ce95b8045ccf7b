"""The hypergradient of a module whose parameters are sharded across processes (FSDP2): Hessian-vector products as
central finite differences taken in place on each process's shards (double backward and ``jvp`` break on
``DTensor`` parameters), the implicit-differentiation rule and solvers of :mod:`hypergrad.approx_hypergrad` on top."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .approx_hypergrad import hypergrad_from_products
from .autodiff import finite_difference_step, one_at_a_time
from .distributed import DataParallel, all_reduce_sum, local_shard, reshard
from .utils import ParamsLike

__all__ = ["sharded_hypergrad"]


def sharded_hypergrad(
    module: nn.Module,
    inner_loss: Callable[[Mapping[str, Tensor]], Tensor],
    outer_loss: Callable[[Mapping[str, Tensor]], Tensor],
    out_params: Mapping[str, Tensor],
    solve: Callable[..., ParamsLike],
    group: Any = None,
    *,
    inner_outputs: Callable[[], Tensor] | None = None,
    mixed_from_directional: Callable[[Tensor, Tensor], Mapping[str, Tensor]] | None = None,
) -> dict[str, Tensor]:
    """Hypergradient for a module whose trainable parameters may be sharded (FSDP2).

    ``inner_loss(phi)`` and ``outer_loss(phi)`` compute this process's losses with the
    module's *current* parameters (call the sharded module as in training) and the outer
    parameters ``phi`` (a dict of replicated tensors). ``solve`` comes from
    :func:`hypergrad.approx_hypergrad.make_solver`; use the ``"gaussian"`` Nyström sketch, CG
    or Neumann (the ``"column"`` sketch samples coordinates per shard). The module must
    average first-order gradients over processes itself, as FSDP2 and DDP do; with
    ``DTensor`` (sharded) parameters, inner products are summed over the shards. Every Hessian-vector
    product is a central difference of two gradients with the shards perturbed in place by
    ``+-r v``; the error is ``O(u^(2/3))`` relative (about ``1e-4`` in float32). The module
    is left exactly as it was. Returns ``dg/dphi`` keyed like ``out_params``.

    ``inner_outputs`` and ``mixed_from_directional``: for an inner objective that reads values of its own as
    constants (a stop-gradient, e.g. example weights computed from detached losses), whose mixed product
    finite differences of ``grad_phi f`` get wrong (they differentiate through the stop-gradient too). When
    ``f = sum_i c_i(phi, sg(y)) y_i(theta)`` with ``y = inner_outputs()`` this process's per-example outputs
    (e.g. losses; no gradient needed), the mixed product is ``M v = sum_i (d c_i / d phi) (d y_i / d theta) v``:
    the directional derivatives ``dy = (y(theta + r v) - y(theta - r v)) / 2r`` take two forward passes on the
    perturbed shards, and ``mixed_from_directional(y, dy)`` returns ``sum_i (d c_i / d phi) dy_i`` keyed like
    ``out_params`` (averaged over processes here). Use it with a method without Hessian-vector products
    (``identity``): the Hessian of such an objective has the same problem.
    """
    if (inner_outputs is None) != (mixed_from_directional is None):
        raise ValueError("Pass both `inner_outputs` and `mixed_from_directional`, or neither.")
    reshard(module)
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError("`module` has no trainable parameters.")

    def current_shards() -> list[Tensor]:
        """The local shards, looked up again after resharding: FSDP2 swaps the registered
        parameters between sharded and unsharded tensors around forward passes."""
        reshard(module)
        return [local_shard(p) for p in module.parameters() if p.requires_grad]

    original = [s.detach().clone() for s in current_shards()]
    average = DataParallel(group).average
    sharded = any(hasattr(p, "to_local") for p in module.parameters() if p.requires_grad)

    def reduce(x: Tensor) -> Tensor:  # partial inner products over shards; replicas need none
        return all_reduce_sum(x, group) if sharded else x

    def gradients(loss_fn) -> tuple[list[Tensor], dict[str, Tensor]]:
        phi = {k: v.detach().clone().requires_grad_(True) for k, v in out_params.items()}
        module.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss_fn(phi).backward()
        reshard(module)
        params = [p for p in module.parameters() if p.requires_grad]
        theta_grads = [
            torch.zeros_like(x0) if p.grad is None else local_shard(p.grad).detach().clone()
            for p, x0 in zip(params, original)
        ]
        module.zero_grad(set_to_none=True)
        phi_grads = {k: torch.zeros_like(v) if v.grad is None else v.grad.detach() for k, v in phi.items()}
        return theta_grads, average(phi_grads)

    def at_perturbation(v: list[Tensor], r: Tensor, compute: Callable[[], Any]) -> Any:
        """``compute()`` with the shards moved to ``x0 + r v`` (restored after)."""
        with torch.no_grad():
            for s, x0, d in zip(current_shards(), original, v):
                s.copy_(x0 + r.to(s.dtype) * d)
        try:
            return compute()
        finally:
            with torch.no_grad():
                for s, x0 in zip(current_shards(), original):
                    s.copy_(x0)

    def central_difference(v: list[Tensor]):
        r = finite_difference_step(original, v, reduce=reduce)
        (t_plus, p_plus), (t_minus, p_minus) = (at_perturbation(v, r, lambda: gradients(inner_loss)),
                                                at_perturbation(v, -r, lambda: gradients(inner_loss)))
        theta_part = [(a - b) / (2 * r.to(a.dtype)) for a, b in zip(t_plus, t_minus)]
        phi_part = {k: (p_plus[k] - p_minus[k]) / (2 * r.to(p_plus[k].dtype)) for k in p_plus}
        return theta_part, phi_part

    def matvec(v):
        return tuple(central_difference(list(v))[0])

    def outputs() -> Tensor:
        with torch.no_grad():
            return inner_outputs().detach()

    def mixed(v):
        if inner_outputs is None:
            return central_difference(list(v))[1]
        v = list(v)
        r = finite_difference_step(original, v, reduce=reduce)
        y = outputs()
        directional = (at_perturbation(v, r, outputs) - at_perturbation(v, -r, outputs)) / (2 * r.to(y.dtype))
        reshard(module)
        with torch.enable_grad():
            grads = mixed_from_directional(y, directional)
        return average({k: grads[k].detach() if k in grads else torch.zeros_like(p) for k, p in out_params.items()})

    grad_in, grad_out = gradients(outer_loss)
    return hypergrad_from_products(tuple(grad_in), grad_out, matvec, one_at_a_time(matvec), mixed, solve, reduce)
