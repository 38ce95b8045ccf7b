"""Differentiable functional optimizers.

Each optimizer is a pure function ``(params, grads, state, **hyperparameters) ->
(new_params, new_state)`` built from out-of-place tensor ops, so gradients flow through
the update (to the hyperparameters too, when they are tensors) and the inputs are never
mutated. ``state`` is ``None`` on the first call. The arithmetic follows ``torch.optim``'s
single-tensor implementations step for step, so results match ``torch.optim.SGD``,
``Adam`` and ``AdamW`` on the same inputs.

Partial application gives the ``inner_optimizer`` the solver expects::

    inner_optimizer = functools.partial(diff_sgd, momentum=0.9, weight_decay=0, lr=0.1)
    params, state = inner_optimizer(params, grads, state)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .trees import check_same_structure, tree_leaves, tree_unflatten
from .utils import ParamsLike

__all__ = ["diff_sgd", "diff_adam", "diff_adamw", "OptimizerState"]

OptimizerState = dict[str, Any]


def _check_inputs(params: ParamsLike, grads: ParamsLike, name: str) -> None:
    # Checked before the structure, which reads every gradient's shape.
    for g in tree_leaves(grads):
        if g is None:
            raise ValueError(f"{name}: a gradient is None; every parameter needs a gradient.")
    check_same_structure(params, grads, "params", "grads")


def _check_hparam(value: float | Tensor, name: str, low: float = 0.0, high: float | None = None) -> None:
    if isinstance(value, Tensor):
        return  # learned hyperparameters are not range-checked (they may pass through bounds)
    if value < low or (high is not None and value >= high):
        upper = f" and < {high}" if high is not None else ""
        raise ValueError(f"`{name}` must be >= {low}{upper}, got {value!r}.")


def diff_sgd(
    params: ParamsLike,
    grads: ParamsLike,
    state: OptimizerState | None,
    weight_decay: float | Tensor = 0.0,
    momentum: float | Tensor = 0.0,
    lr: float | Tensor = 1e-3,
    dampening: float | Tensor = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> tuple[ParamsLike, OptimizerState]:
    """One step of SGD with momentum, as ``torch.optim.SGD``.

    ``d = g + weight_decay * theta``; with momentum, ``buf = momentum * buf + (1 -
    dampening) * d`` (``buf = d`` on the first step) and ``d = d + momentum * buf``
    (Nesterov) or ``d = buf``; then ``theta <- theta - lr * d``. State:
    ``{"momentum_buffer": tree or None}``.
    """
    _check_inputs(params, grads, "diff_sgd")
    _check_hparam(lr, "lr")
    _check_hparam(momentum, "momentum")
    _check_hparam(weight_decay, "weight_decay")
    if nesterov and (not isinstance(momentum, Tensor) and momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires `momentum` > 0 and `dampening` = 0.")
    use_momentum = isinstance(momentum, Tensor) or momentum != 0
    buffers = None if state is None else state.get("momentum_buffer")
    old_bufs = tree_leaves(buffers) if buffers is not None else None
    new_params, new_bufs = [], []
    for i, (p, g) in enumerate(zip(tree_leaves(params), tree_leaves(grads))):
        d = -g if maximize else g
        if isinstance(weight_decay, Tensor) or weight_decay != 0:
            d = d + weight_decay * p
        if use_momentum:
            buf = d if old_bufs is None else momentum * old_bufs[i] + (1 - dampening) * d
            new_bufs.append(buf)
            d = d + momentum * buf if nesterov else buf
        new_params.append(p - lr * d)
    new_state = {"momentum_buffer": tree_unflatten(params, new_bufs) if use_momentum else None}
    return tree_unflatten(params, new_params), new_state


def _adam(
    params: ParamsLike,
    grads: ParamsLike,
    state: OptimizerState | None,
    lr: float | Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float | Tensor,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
    name: str,
) -> tuple[ParamsLike, OptimizerState]:
    """Shared Adam/AdamW step; ``decoupled`` selects AdamW's weight decay."""
    _check_inputs(params, grads, name)
    _check_hparam(lr, "lr")
    _check_hparam(eps, "eps")
    _check_hparam(weight_decay, "weight_decay")
    beta1, beta2 = betas
    _check_hparam(beta1, "betas[0]", 0.0, 1.0)
    _check_hparam(beta2, "betas[1]", 0.0, 1.0)
    leaves = tree_leaves(params)
    if state is None:
        step = 0
        exp_avg = [torch.zeros_like(p) for p in leaves]
        exp_avg_sq = [torch.zeros_like(p) for p in leaves]
        max_sq = [torch.zeros_like(p) for p in leaves] if amsgrad else None
    else:
        if amsgrad and state.get("max_exp_avg_sq") is None:
            raise ValueError(f"{name}: `state` was created with amsgrad=False.")
        step = state["step"]
        exp_avg = tree_leaves(state["exp_avg"])
        exp_avg_sq = tree_leaves(state["exp_avg_sq"])
        max_sq = tree_leaves(state["max_exp_avg_sq"]) if amsgrad else None
    step += 1
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    step_size = lr / bias_correction1
    out_p, out_m, out_v, out_max = [], [], [], []
    for i, (p, g) in enumerate(zip(leaves, tree_leaves(grads))):
        g = -g if maximize else g
        if decoupled:
            p = p * (1 - lr * weight_decay)
        elif isinstance(weight_decay, Tensor) or weight_decay != 0:
            g = g + weight_decay * p
        m = exp_avg[i] + (g - exp_avg[i]) * (1 - beta1)  # lerp, as torch.optim
        v = exp_avg_sq[i] * beta2 + (1 - beta2) * g * g
        if amsgrad:
            vmax = torch.maximum(max_sq[i], v)
            out_max.append(vmax)
            denom = vmax.sqrt() / bias_correction2_sqrt + eps
        else:
            denom = v.sqrt() / bias_correction2_sqrt + eps
        out_p.append(p - step_size * m / denom)
        out_m.append(m)
        out_v.append(v)
    new_state = {
        "step": step,
        "exp_avg": tree_unflatten(params, out_m),
        "exp_avg_sq": tree_unflatten(params, out_v),
        "max_exp_avg_sq": tree_unflatten(params, out_max) if amsgrad else None,
    }
    return tree_unflatten(params, out_p), new_state


def diff_adam(
    params: ParamsLike,
    grads: ParamsLike,
    state: OptimizerState | None,
    lr: float | Tensor = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float | Tensor = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
) -> tuple[ParamsLike, OptimizerState]:
    """One step of Adam, as ``torch.optim.Adam`` (L2 weight decay added to the gradient).
    State: ``{"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}``."""
    return _adam(params, grads, state, lr, betas, eps, weight_decay, amsgrad, maximize,
                 decoupled=False, name="diff_adam")


def diff_adamw(
    params: ParamsLike,
    grads: ParamsLike,
    state: OptimizerState | None,
    lr: float | Tensor = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float | Tensor = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
) -> tuple[ParamsLike, OptimizerState]:
    """One step of AdamW, as ``torch.optim.AdamW`` (decoupled weight decay
    ``theta <- theta (1 - lr * weight_decay)`` before the Adam step)."""
    return _adam(params, grads, state, lr, betas, eps, weight_decay, amsgrad, maximize,
                 decoupled=True, name="diff_adamw")
