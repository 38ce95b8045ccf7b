"""Parameter-tree operations: flatten, unflatten, map, inner products and norms, checked structure. Every function
accepts a tuple/list of tensors or a dict of named tensors and returns the kind it was given."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .utils import ParamsLike

__all__ = ["check_params", "tree_leaves", "tree_unflatten", "check_same_structure", "tree_map", "tree_dot",
           "tree_norm", "tree_sub", "tree_scale", "tree_axpy", "tree_numel", "tree_flatten_vector",
           "tree_unflatten_vector"]


def check_params(params: ParamsLike, name: str = "params") -> None:
    """Raise a ``TypeError``/``ValueError`` naming ``name`` unless ``params`` is a non-empty
    tuple/list/dict of floating-point tensors."""
    if isinstance(params, Mapping):
        leaves = list(params.values())
        if not all(isinstance(k, str) for k in params):
            raise TypeError(f"`{name}` must be a dict with string keys (parameter names).")
    elif isinstance(params, (tuple, list)):
        leaves = list(params)
    else:
        raise TypeError(
            f"`{name}` must be a tuple/list of tensors or a dict of named tensors, "
            f"got {type(params).__name__}. Use `tuple(module.parameters())` or "
            f"`dict(module.named_parameters())`."
        )
    if not leaves:
        raise ValueError(f"`{name}` is empty: at least one tensor is needed.")
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor):
            raise TypeError(f"`{name}` entry {i} is a {type(leaf).__name__}, not a tensor.")
        if not (leaf.is_floating_point() or leaf.is_complex()):
            raise TypeError(
                f"`{name}` entry {i} has dtype {leaf.dtype}; hypergradients need floating-point "
                f"tensors."
            )


def tree_leaves(tree: ParamsLike) -> list[Tensor]:
    """The tensors of ``tree`` in a fixed order (insertion order for dicts)."""
    if isinstance(tree, Mapping):
        return list(tree.values())
    if isinstance(tree, (tuple, list)):
        return list(tree)
    raise TypeError(f"expected a tuple/list/dict of tensors, got {type(tree).__name__}")


def tree_unflatten(like: ParamsLike, leaves: Sequence[Tensor]) -> ParamsLike:
    """Rebuild a tree with the structure of ``like`` from ``leaves``."""
    if isinstance(like, Mapping):
        return dict(zip(like.keys(), leaves))
    if isinstance(like, list):
        return list(leaves)
    return tuple(leaves)


def check_same_structure(a: ParamsLike, b: ParamsLike, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have the same kind, keys/length and shapes."""
    if isinstance(a, Mapping) != isinstance(b, Mapping):
        raise ValueError(
            f"`{name_a}` and `{name_b}` must both be dicts or both be tuples, got "
            f"{type(a).__name__} and {type(b).__name__}."
        )
    if isinstance(a, Mapping):
        if list(a.keys()) != list(b.keys()):
            missing = sorted(set(a) ^ set(b))
            raise ValueError(
                f"`{name_a}` and `{name_b}` have different keys (differing: {missing[:5]})."
            )
    la, lb = tree_leaves(a), tree_leaves(b)
    if len(la) != len(lb):
        raise ValueError(
            f"`{name_a}` has {len(la)} tensors but `{name_b}` has {len(lb)}; they must match "
            f"one to one."
        )
    for i, (x, y) in enumerate(zip(la, lb)):
        if x.shape != y.shape:
            raise ValueError(
                f"tensor {i}: `{name_a}` has shape {tuple(x.shape)} but `{name_b}` has shape "
                f"{tuple(y.shape)}."
            )


def tree_map(fn: Callable[..., Tensor], tree: ParamsLike, *rest: ParamsLike) -> ParamsLike:
    """Apply ``fn`` leaf-wise over one or more trees of the same structure."""
    leaves = [tree_leaves(t) for t in (tree, *rest)]
    return tree_unflatten(tree, [fn(*xs) for xs in zip(*leaves)])


def tree_dot(a: ParamsLike, b: ParamsLike) -> Tensor:
    """Sum over leaves of the elementwise products: the Euclidean inner product."""
    return sum((x * y).sum() for x, y in zip(tree_leaves(a), tree_leaves(b)))


def tree_norm(tree: ParamsLike) -> Tensor:
    """Euclidean norm of all leaves together."""
    return torch.sqrt(sum(x.pow(2).sum() for x in tree_leaves(tree)))


def tree_sub(a: ParamsLike, b: ParamsLike) -> ParamsLike:
    return tree_map(torch.sub, a, b)


def tree_scale(tree: ParamsLike, alpha: float | Tensor) -> ParamsLike:
    return tree_map(lambda x: x * alpha, tree)


def tree_axpy(alpha: float | Tensor, x: ParamsLike, y: ParamsLike) -> ParamsLike:
    """``alpha * x + y`` leaf-wise."""
    return tree_map(lambda xi, yi: yi + alpha * xi, x, y)


def tree_numel(tree: ParamsLike) -> int:
    return sum(x.numel() for x in tree_leaves(tree))


def tree_flatten_vector(tree: ParamsLike) -> Tensor:
    """Concatenate all leaves into one flat vector (only for small problems and tests)."""
    return torch.cat([x.reshape(-1) for x in tree_leaves(tree)])


def tree_unflatten_vector(vec: Tensor, like: ParamsLike) -> ParamsLike:
    """Split a flat vector (last dimension) back into a tree shaped like ``like``.

    Leading dimensions of ``vec`` are kept, so a ``(k, p)`` matrix becomes a tree whose
    leaves have shape ``(k, *leaf.shape)``.
    """
    leaves, offset = [], 0
    batch = vec.shape[:-1]
    for x in tree_leaves(like):
        n = x.numel()
        leaves.append(vec[..., offset : offset + n].reshape((*batch, *x.shape)))
        offset += n
    if offset != vec.shape[-1]:
        raise ValueError(f"vector has {vec.shape[-1]} entries but the tree has {offset}.")
    return tree_unflatten(like, leaves)
