"""Optimizer state dicts in safetensors files, without pickle.

A torch optimizer (or LR-scheduler) state dict is a nested structure of tensors and JSON scalars with ``int``
keys and tuples; JSON alone cannot round-trip it. :func:`save_optimizer_state` stores the tensors as
safetensors tensors and the structure as tagged JSON in the header, so loading a downloaded file never runs
code; :func:`load_optimizer_state` returns an equal structure.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import save_file

from .atomic_files import atomic_write
from .serialization import check_finite, check_format_version, load_tensors, read_safetensors_metadata

__all__ = ["save_optimizer_state", "load_optimizer_state"]

_OPTIMIZER_PREFIX = "hypergrad.optimizer_state.v"
_OPTIMIZER_VERSION = 1
_OPTIMIZER_FORMAT = f"{_OPTIMIZER_PREFIX}{_OPTIMIZER_VERSION}"


class _Encoder:
    """Tagged-JSON encoding of a nested state dict; tensors go to a flat ``{key: tensor}`` dict.

    JSON alone cannot round-trip a torch optimizer state dict exactly: ``state`` has ``int`` keys, ``betas``
    is a tuple, ``step`` is a tensor. Dicts are therefore encoded as ``{"__dict__": [[key, value], ...]}``
    (keys keep their type), tuples as ``{"__tuple__": [...]}``, tensors as ``{"__tensor__": "t0"}``, and
    non-finite floats as ``{"__float__": "nan" | "inf" | "-inf"}`` (strict JSON has no NaN/Infinity).
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def encode(self, obj: Any, where: str = "state_dict") -> Any:
        if isinstance(obj, torch.Tensor):
            key = f"t{len(self.tensors)}"
            self.tensors[key] = obj.detach().to("cpu").contiguous().clone()
            return {"__tensor__": key}
        if isinstance(obj, Mapping):
            items = []
            for k, v in obj.items():
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise TypeError(f"{where}: dict key {k!r} ({type(k).__name__}) is not a str or int")
                items.append([k, self.encode(v, f"{where}[{k!r}]")])
            return {"__dict__": items}
        if isinstance(obj, tuple):
            return {"__tuple__": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, float) and not math.isfinite(obj):
            return {"__float__": repr(obj)}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(
            f"{where}: cannot save a {type(obj).__name__} without pickle "
            "(supported: tensors, dict, list, tuple, str, int, float, bool, None)"
        )


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__dict__"}:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        raise ValueError(f"malformed optimizer-state encoding: unexpected object with keys {sorted(obj)}")
    return obj


def save_optimizer_state(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Save a (torch.optim) state dict to a safetensors file, atomically and without pickle.

    Tensors (e.g. Adam's ``exp_avg``, ``exp_avg_sq``, ``step``) are stored as safetensors tensors; everything
    else (param groups, hyperparameters, the structure) as tagged JSON in the header, so that
    :func:`load_optimizer_state` returns an equal structure (same key types, tuples, dtypes, values).
    Works for any nested dict/list/tuple of tensors and JSON scalars (LR-scheduler state dicts too).
    """
    encoder = _Encoder()
    tree = encoder.encode(dict(state_dict))
    check_finite(encoder.tensors, f"not saving the optimizer state to {os.fspath(path)!r}")
    header = {"format": "pt", "hypergrad_state_format": _OPTIMIZER_FORMAT,
              "state_dict": json.dumps(tree, allow_nan=False)}
    atomic_write(path, lambda tmp: save_file(encoder.tensors, tmp, metadata=header))


def load_optimizer_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a state dict written by :func:`save_optimizer_state` (safetensors only, never unpickles).

    Pass the result to ``optimizer.load_state_dict``; torch moves the state tensors to the parameters'
    device there, so ``device="cpu"`` (the default) is fine in general.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"optimizer state file {path!r} not found")
    header = read_safetensors_metadata(path)
    tag = header.get("hypergrad_state_format", "")
    if not tag.startswith(_OPTIMIZER_PREFIX) or "state_dict" not in header:
        raise ValueError(f"{path!r} was not written by save_optimizer_state (header: {sorted(header)})")
    check_format_version(tag[len(_OPTIMIZER_PREFIX):], path, "optimizer-state", _OPTIMIZER_VERSION)
    tensors = {name: t.to(device) for name, t in load_tensors(path).items()}
    check_finite(tensors, f"optimizer state {path!r}")
    try:
        state = _decode(json.loads(header["state_dict"]), tensors)
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise ValueError(f"{path!r}: malformed optimizer state ({type(err).__name__}: {str(err)[:200]})") from None
    _check_param_groups(state, path)
    return state


def _check_param_groups(state: Any, path: str) -> None:
    """Refuse hyperparameters that would silently break every later step: a learning rate that is not a finite
    number >= 0 (NaN makes Adam write NaN parameters; a string fails deep inside the optimizer), or any other
    non-finite float of a parameter group (betas, eps, weight decay, momentum)."""
    groups = state.get("param_groups") if isinstance(state, Mapping) else None
    if groups is None:
        return
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) for g in groups):
        raise ValueError(f"{path!r}: param_groups is not a list of parameter groups; the file is corrupt")
    for i, group in enumerate(groups):
        lr = group.get("lr")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)
                               or lr < 0):
            raise ValueError(f"{path!r}: parameter group {i} has learning rate {lr!r:.40}, not a finite number >= 0; "
                             "the file is corrupt")
        for key, value in group.items():
            values = value if isinstance(value, (tuple, list)) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ValueError(f"{path!r}: parameter group {i} has {key}={value!r}, not finite; the file is corrupt")
