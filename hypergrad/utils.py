"""Types and argument checks shared by the whole library: parameter trees as types (``Params``, ``ParamsLike``),
positive-number checks, the identity reduction.

A *parameter tree* (``Params``) is either a tuple/list of tensors, as returned by
``tuple(module.parameters())``, or a dict of named tensors, as used by
``torch.func.functional_call``; :mod:`hypergrad.trees` operates on them and :mod:`hypergrad.autodiff` takes their
Hessian-vector products.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Union

from torch import Tensor

__all__ = ["Params", "ParamsLike", "identity", "check_positive_int", "check_positive_float"]

Params = tuple[Tensor, ...]  # parameters as a tuple of tensors (the form the seed API uses)


ParamsLike = Union[Sequence[Tensor], Mapping[str, Tensor]]  # a tuple/list of tensors or a dict of named tensors


def identity(x):
    """``x`` unchanged: the default ``reduce`` (no shards) and ``average`` (one process)."""
    return x


def check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def check_positive_float(value: float, name: str, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value!r}.")
