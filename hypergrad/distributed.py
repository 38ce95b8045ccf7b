"""Process collectives for hypergradients when the inner model is trained by several processes.

Two layouts, two strategies (measured on torch 2.13 with gloo and NCCL):

* **Data parallel (DDP)**: every process holds all parameters and a different batch. DDP
  only all-reduces first-order gradients: ``autograd.grad``/double backward through the DDP
  wrapper return the *local* rank's second-order result without any error, and ``jvp``
  through it fails. So products are taken on the unwrapped module with the local batch and
  averaged explicitly with :class:`DataParallel` (``dist=DataParallel()`` in
  :mod:`hypergrad.approx_hypergrad`): every process then solves the same full-batch system.
* **Sharded (FSDP2 ``fully_shard``)**: parameters are ``DTensor`` shards, and double backward
  and ``jvp`` break. :func:`hypergrad.sharded.sharded_hypergrad` takes central finite-difference HVPs *in
  place*: it perturbs each process's local shards, runs two ordinary forward/backward passes
  (FSDP gathers the shards and reduce-scatters the gradients), and restores the shards. Every
  IHVP vector and the Nyström sketch live as local shards, so memory per process is
  ``O(rank x p / world_size)``; inner products are partial sums all-reduced across processes.

Outer parameters are replicated: their gradients are averaged over processes, so every
process applies the same update (:func:`broadcast_tree` re-synchronises them if needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .trees import tree_leaves, tree_unflatten
from .utils import ParamsLike

__all__ = [
    "DataParallel",
    "is_distributed",
    "any_process",
    "all_reduce_sum",
    "broadcast_tree",
    "local_shard",
    "reshard",
    "is_fully_sharded",
]


def is_distributed() -> bool:
    """Whether a default process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def any_process(flag: bool, device: Any = None) -> bool:
    """``flag`` OR-ed over the processes (itself without a process group): one verdict for all, so that no
    process goes on alone and waits forever for the others."""
    if not is_distributed():
        return bool(flag)
    return bool(all_reduce_sum(torch.tensor(float(flag), device=device)) > 0)


def all_reduce_sum(x: Tensor, group: Any = None) -> Tensor:
    """Sum of ``x`` over the processes (a new tensor; identity without a process group)."""
    if not is_distributed():
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


@dataclass(frozen=True)
class DataParallel:
    """Average gradient-like trees over data-parallel processes.

    Pass as ``dist=DataParallel()`` to the functions of :mod:`hypergrad.approx_hypergrad`.
    All leaves are flattened into one buffer per dtype, so each call is a single all-reduce.
    """

    group: Any = None

    def average(self, tree: ParamsLike) -> ParamsLike:
        if not is_distributed():
            return tree
        world = dist.get_world_size(self.group)
        leaves = tree_leaves(tree)
        out: list[Tensor | None] = [None] * len(leaves)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, leaf in enumerate(leaves):
            by_dtype.setdefault(leaf.dtype, []).append(i)
        for indices in by_dtype.values():
            flat = torch.cat([leaves[i].detach().reshape(-1) for i in indices])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            flat /= world
            offset = 0
            for i in indices:
                n = leaves[i].numel()
                out[i] = flat[offset : offset + n].view_as(leaves[i])
                offset += n
        return tree_unflatten(tree, out)


def broadcast_tree(tree: ParamsLike, src: int = 0, group: Any = None) -> None:
    """Overwrite every leaf of ``tree`` in place with process ``src``'s values."""
    if not is_distributed():
        return
    with torch.no_grad():
        for leaf in tree_leaves(tree):
            dist.broadcast(leaf.data, src=src, group=group)


def is_fully_sharded(module: nn.Module) -> bool:
    """Whether FSDP2's ``fully_shard`` was applied to ``module`` or to one of its submodules (its
    parameters, or some of them, are ``DTensor`` shards)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return any(isinstance(sub, FSDPModule) for sub in module.modules())


def reshard(module: nn.Module) -> None:
    """Return every FSDP2 unit of ``module`` to its sharded state. FSDP2 leaves the root's
    parameters unsharded after a forward without backward (e.g. an evaluation), and those
    unsharded tensors are freed at the next forward: in-place work must use the shards."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def local_shard(param: Tensor) -> Tensor:
    """This process's part of a parameter: the local tensor of a ``DTensor`` (a view that
    shares its storage), or the tensor itself."""
    return param.to_local() if hasattr(param, "to_local") else param
