"""A guarded outer optimizer step, shared by :class:`hypergrad.solver.BaseSolver` and
``hf_integration.BilevelTrainer``.

:func:`apply_outer_update` turns a hypergradient into an outer step that can never leave the
outer parameters (or the outer optimizer's state) non-finite:

1. a hypergradient with a NaN/inf entry is dropped;
2. a hypergradient whose norm *explodes* relative to the recent ones (more than
   ``explosion_factor`` times their median norm, e.g. a Nyström damping ``rho`` far too
   small) is refused;
3. otherwise it is accumulated into ``.grad`` and the optimizer steps; if the new parameters,
   the optimizer state (e.g. Adam's squared-gradient average overflowing float32) or an
   optional ``validate`` check are not finite, parameters and state are rolled back.

Every decision is recorded in an :class:`OuterStepHistory` (applied and skipped steps, why
they were skipped, recent norms), which callers report and checkpoint.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .trees import check_same_structure, tree_leaves
from .utils import ParamsLike

__all__ = ["NonFiniteError", "OuterStepHistory", "OuterStepResult", "apply_outer_update", "first_non_finite",
           "refuse_non_finite"]

class NonFiniteError(FloatingPointError):
    """Training met NaN/inf values it could not recover from (the message names the step and the cause)."""


def first_non_finite(named: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> str | None:
    """Name of the first floating-point tensor holding NaN or inf (``None`` if all are finite).

    One host synchronization per device (not one per tensor), so it is cheap enough to run at every step;
    sharded tensors (DTensor) are checked on their local shard.
    """
    items = [(name, t.to_local() if hasattr(t, "to_local") else t)
             for name, t in (named.items() if isinstance(named, Mapping) else named)
             if isinstance(t, Tensor) and t.is_floating_point() and t.device.type != "meta"]
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(items):
        by_device.setdefault(t.device, []).append(i)
    bad = []
    for indices in by_device.values():
        flags = torch.stack([torch.isfinite(items[i][1]).all() for i in indices])
        if not bool(flags.all()):
            bad += [i for i, ok in zip(indices, flags.tolist()) if not ok]
    return items[min(bad)][0] if bad else None


def refuse_non_finite(what: str, *trees: Mapping[str, Tensor]) -> None:
    """Raise :class:`NonFiniteError` ("refusing to <what>: <name> holds NaN/inf values") naming the first tensor of
    ``trees`` that is not finite (:func:`first_non_finite`)."""
    for tree in trees:
        bad = first_non_finite(tree)
        if bad is not None:
            raise NonFiniteError(f"refusing to {what}: {bad} holds NaN/inf values")


@dataclass
class OuterStepResult:
    """What :func:`apply_outer_update` did: ``applied``, the hypergradient's ``norm`` (NaN when it was
    not finite) and, for a skipped step, the ``reason``: one line, ``"<cause>: <details>"``."""

    @property
    def cause(self) -> str:
        """The reason's short cause, e.g. ``"non-finite hypergradient"`` (``""`` when applied)."""
        return self.reason.split(":")[0]

    applied: bool
    norm: float
    reason: str = ""


@dataclass
class OuterStepHistory:
    """Counts of applied and skipped outer steps, the causes of the skips, and the norms of the last
    ``window`` finite hypergradients (the reference of the explosion test; refused ones count too, so that a
    lasting change of scale is accepted once it fills half the window, while a spike is refused).

    Args:
        explosion_factor: refuse a hypergradient whose norm exceeds this many times the median norm of
            the recent ones (``inf`` disables the test).
        min_history: the explosion test needs at least this many recent norms.
        window: how many recent norms are kept.
    """

    explosion_factor: float = 1e3
    min_history: int = 3
    window: int = 20
    norms: list[float] = field(default_factory=list)
    applied: int = 0
    skipped: int = 0
    skip_causes: dict[str, int] = field(default_factory=dict)

    def explosion(self, norm: float) -> str:
        """Why ``norm`` counts as an explosion (``""`` when it does not)."""
        if len(self.norms) < self.min_history:
            return ""
        median = statistics.median(self.norms)
        if norm > self.explosion_factor * median:
            return (f"exploding hypergradient: norm {norm:.3g} is more than {self.explosion_factor:g} x the median "
                    f"{median:.3g} of the last {len(self.norms)} hypergradients")
        return ""

    def record(self, result: OuterStepResult) -> None:
        if math.isfinite(result.norm):  # refused ones too: a lasting change of scale is accepted after a while
            self.norms = (self.norms + [result.norm])[-self.window:]
        if result.applied:
            self.applied += 1
        else:
            self.skipped += 1
            self.skip_causes[result.cause] = self.skip_causes.get(result.cause, 0) + 1

    def describe(self) -> str:
        """One line, e.g. ``"5 outer steps applied, 2 skipped (non-finite hypergradient: 2)"``."""
        text = f"{self.applied} outer steps applied, {self.skipped} skipped"
        if self.skip_causes:
            text += " (" + ", ".join(f"{cause}: {n}" for cause, n in self.skip_causes.items()) + ")"
        return text

    def state_dict(self) -> dict[str, Any]:
        return {"norms": list(self.norms), "applied": self.applied, "skipped": self.skipped,
                "skip_causes": dict(self.skip_causes)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.norms = [float(n) for n in state.get("norms", [])][-self.window:]
        self.applied = int(state.get("applied", 0))
        self.skipped = int(state.get("skipped", 0))
        self.skip_causes = {str(k): int(v) for k, v in dict(state.get("skip_causes", {})).items()}


def _snapshot(optimizer: torch.optim.Optimizer, leaves: list[Tensor]) -> tuple[list[Tensor], dict]:
    values = [p.detach().clone() for p in leaves]
    state = {p: {k: v.clone() if isinstance(v, Tensor) else v for k, v in s.items()}
             for p, s in optimizer.state.items()}
    return values, state


def _restore(optimizer: torch.optim.Optimizer, leaves: list[Tensor], snapshot: tuple[list[Tensor], dict]) -> None:
    values, state = snapshot
    with torch.no_grad():
        for p, v in zip(leaves, values):
            p.copy_(v)
    optimizer.state.clear()
    optimizer.state.update(state)


def _optimizer_state_problem(optimizer: torch.optim.Optimizer) -> str | None:
    for i, state in enumerate(optimizer.state.values()):
        bad = first_non_finite(state)
        if bad is not None:
            return f"non-finite outer optimizer state after the step: {bad!r} of parameter {i}"
    return None


def apply_outer_update(
    optimizer: torch.optim.Optimizer | None,
    params: ParamsLike,
    grads: ParamsLike,
    history: OuterStepHistory | None = None,
    *,
    validate: Callable[[], str | None] | None = None,
) -> OuterStepResult:
    """Accumulate the hypergradient ``grads`` into ``params``' ``.grad`` and step ``optimizer``, safely.

    A non-finite or exploding (see :class:`OuterStepHistory`) hypergradient is dropped: every ``.grad``
    of ``params`` is cleared and nothing moves. After the step, non-finite parameters or optimizer state,
    or a reason returned by ``validate()`` (e.g. "the inner objective became inf"), roll parameters and
    optimizer state back to their values before the step. ``.grad`` is cleared after a step.

    Args:
        optimizer: the outer optimizer over ``params``; ``None`` only accumulates the gradient (the caller
            steps, as with ``BaseSolver.outer_grad = ...``; no rollback is then possible).
        params: the outer parameters (a tuple/list or a dict of tensors).
        grads: the hypergradient, with the same structure and shapes as ``params``.
        history: updated with the outcome; ``None`` skips the explosion test.
        validate: called after the step; returns ``None`` when the new values are acceptable, else the reason
            to roll back, as ``"<cause>: <details>"`` (the cause is what :class:`OuterStepHistory` counts).
            With several processes it must return the same on every one.

    Returns:
        :class:`OuterStepResult`. A shape/structure mismatch raises ``ValueError`` (a programming error).
    """
    check_same_structure(params, grads, "outer parameters", "outer_grad")
    leaves, grad_leaves = tree_leaves(params), tree_leaves(grads)
    names = list(params) if isinstance(params, Mapping) else [f"outer parameter {i}" for i in range(len(leaves))]
    bad = first_non_finite(zip(names, grad_leaves))
    if bad is None:
        norm = math.sqrt(sum(float(g.detach().double().pow(2).sum()) for g in grad_leaves))
        reason = "" if math.isfinite(norm) else "non-finite hypergradient: its norm overflows float64"
        reason = reason or (history.explosion(norm) if history is not None else "")
    else:
        norm, reason = math.nan, f"non-finite hypergradient: NaN or inf in {bad}"
    if not reason:
        for p, g in zip(leaves, grad_leaves):
            g = g.detach().to(p.dtype)
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        if optimizer is not None:
            snapshot = _snapshot(optimizer, leaves)
            optimizer.step()
            bad = first_non_finite(zip(names, leaves))
            reason = (f"non-finite outer parameters after the step: {bad}" if bad is not None
                      else _optimizer_state_problem(optimizer) or (validate() if validate is not None else None) or "")
            if reason:
                _restore(optimizer, leaves, snapshot)
                reason += "; the step was rolled back"
    if reason or optimizer is not None:
        for p in leaves:
            p.grad = None
    result = OuterStepResult(applied=not reason, norm=norm, reason=reason)
    if history is not None:
        history.record(result)
    return result
