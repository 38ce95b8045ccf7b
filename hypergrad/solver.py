"""Solvers that drive a bilevel optimization schedule.

Subclass :class:`BaseImplicitSolver` (or :class:`BaseSolver` for unrolled differentiation)
and write four methods: ``inner_forward``, ``inner_update``, ``outer_forward`` and
``outer_update``. :meth:`BaseSolver.run` then executes::

    for i in range(num_iters):
        solver.inner_update()
        if i > 0 and i >= outer_patience_iters and i % unroll_steps == 0:
            solver.outer_update()
            solver.post_outer_update()

``outer_update`` computes the hypergradient and passes it to :meth:`BaseSolver.apply_outer_grad`,
which steps the outer optimizer with the safeguards of :mod:`hypergrad.outer_step` (non-finite
or exploding hypergradients dropped, non-finite results rolled back, applied and skipped steps
counted in ``outer_history``).

The inner model is used functionally: ``self.inner_func(self.inner_params, *inputs)`` calls
the module through :func:`torch.func.functional_call` with the tuple of tensors
``self.inner_params``, which the inner optimizer replaces at every step.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .autodiff import check_mode
from .mode_probe import DEFAULT_MAX_MEMORY_RATIO, resolve_hvp_mode
from .outer_step import OuterStepHistory, OuterStepResult, apply_outer_update
from .utils import ParamsLike

__all__ = [
    "BaseSolver",
    "BaseImplicitSolver",
    "MetricsRecorder",
    "InfiniteLoader",
    "is_outer_step",
    "count_outer_steps",
    "accumulate_outer_grad",
]

logger = logging.getLogger(__name__)


class InfiniteLoader(Iterator):
    """Iterate over ``loader`` forever, starting a new epoch (``iter(loader)`` again, so a
    shuffling ``DataLoader`` reshuffles) whenever one ends."""

    def __init__(self, loader: Iterable, name: str = "loader") -> None:
        if not isinstance(loader, Iterable):
            raise TypeError(f"`{name}` must be iterable (e.g. a DataLoader), got {type(loader).__name__}.")
        self.loader = loader
        self.name = name
        self.epoch = 0
        self._it = iter(loader)

    def __iter__(self) -> InfiniteLoader:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                raise ValueError(
                    f"`{self.name}` yielded no batch in a whole epoch; pass a non-empty, "
                    f"re-iterable loader (a DataLoader, not a one-shot generator)."
                ) from None


class MetricsRecorder:
    """Keeps every logged scalar as ``(step, value)`` pairs, by name."""

    def __init__(self) -> None:
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def record(self, step: int, **metrics: float | Tensor) -> None:
        for name, value in metrics.items():
            if isinstance(value, Tensor):
                value = value.detach()  # a loss that requires grad would warn on float()
            self.history[name].append((step, float(value)))

    def latest(self) -> dict[str, float]:
        return {name: values[-1][1] for name, values in self.history.items() if values}

    def values(self, name: str) -> list[float]:
        return [v for _, v in self.history.get(name, [])]

    def mean(self, name: str, last: int | None = None) -> float:
        vals = self.values(name)
        vals = vals[-last:] if last else vals
        return sum(vals) / len(vals) if vals else math.nan


def is_outer_step(iteration: int, unroll_steps: int, outer_patience_iters: int) -> bool:
    """The schedule of the spec: an outer update follows inner iteration ``iteration``
    (0-based) when ``iteration > 0``, ``iteration >= outer_patience_iters`` and
    ``iteration % unroll_steps == 0``. Shared by every driver of the bilevel loop."""
    return iteration > 0 and iteration >= outer_patience_iters and iteration % unroll_steps == 0


def count_outer_steps(num_iters: int, unroll_steps: int, outer_patience_iters: int) -> int:
    """How many of the inner iterations ``0 .. num_iters - 1`` :func:`is_outer_step` names, in O(1): the
    multiples of ``unroll_steps`` in ``[max(1, outer_patience_iters), num_iters - 1]``."""
    first = max(1, outer_patience_iters)
    last = num_iters - 1
    if last < first:
        return 0
    return last // unroll_steps - (first - 1) // unroll_steps


def accumulate_outer_grad(params: ParamsLike, grads: ParamsLike) -> bool:
    """Add ``grads`` to the ``.grad`` of ``params`` (same structure), or, when any entry is
    NaN/inf, clear every ``.grad`` instead so the next optimizer step changes nothing.
    Returns whether the gradients were applied. (:func:`hypergrad.outer_step.apply_outer_update`
    without an optimizer; use that function to also step with rollback.)"""
    return apply_outer_update(None, params, grads).applied


def _progress(iterable: Iterable[int], total: int, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional for the core package
        return iterable
    return tqdm(iterable, total=total, desc="bilevel", dynamic_ncols=True)


class BaseSolver:
    """Base class of bilevel solvers.

    Args:
        inner: the inner model, whose parameters ``theta`` the inner problem trains.
        outer: the module holding the outer parameters ``phi``.
        inner_loader, outer_loader: iterables of batches, wrapped so ``next`` never ends.
        inner_optimizer: functional optimizer ``(params, grads, state) -> (params, state)``
            (e.g. ``functools.partial(diff_sgd, lr=0.1)``).
        outer_optimizer: a ``torch.optim.Optimizer`` over ``outer.parameters()``.
        num_iters: number of inner iterations.
        unroll_steps: an outer update every ``unroll_steps`` inner iterations.
        outer_patience_iters: no outer update before this iteration.
        log_freq: log the latest metrics every ``log_freq`` iterations (0 = never).
        progress_bar: show a progress bar over inner iterations.
    """

    def __init__(
        self,
        inner: nn.Module,
        outer: nn.Module,
        inner_loader: Iterable,
        outer_loader: Iterable,
        inner_optimizer: Callable[..., tuple[ParamsLike, Any]],
        outer_optimizer: torch.optim.Optimizer,
        num_iters: int,
        unroll_steps: int,
        outer_patience_iters: int = 0,
        log_freq: int = 100,
        progress_bar: bool = True,
    ) -> None:
        self._check_arguments(inner, outer, inner_optimizer, outer_optimizer, num_iters,
                              unroll_steps, outer_patience_iters, log_freq)
        self.inner = inner
        self.outer = outer
        self.inner_loader = InfiniteLoader(inner_loader, "inner_loader")
        self.outer_loader = InfiniteLoader(outer_loader, "outer_loader")
        self.inner_optimizer = inner_optimizer
        self.outer_optimizer = outer_optimizer
        self.num_iters = num_iters
        self.unroll_steps = unroll_steps
        self.outer_patience_iters = outer_patience_iters
        self.log_freq = log_freq
        self.progress_bar = progress_bar

        self._param_names = [name for name, _ in inner.named_parameters()]
        self._buffers = dict(inner.named_buffers())
        self._initial_params = tuple(p.detach().clone() for p in inner.parameters())
        self.inner_params = tuple(p.clone() for p in self._initial_params)
        self.inner_optim_state: Any = None
        self.recorder = MetricsRecorder()
        self.iteration = 0
        self.outer_step = 0
        self._inner_steps_done = 0
        self._iterations_done = 0
        self.outer_history = OuterStepHistory()

    @property
    def inner_step(self) -> int:
        """Inner updates completed so far (the original ``hypergrad`` library's ``inner_step``:
        ``i`` while iteration ``i``'s inner update runs, ``i + 1`` after it)."""
        return self._inner_steps_done

    @property
    def global_step(self) -> int:
        """Iterations (inner update plus any outer update) completed so far (the original
        library's ``global_step``). ``outer_step`` counts completed outer updates there and here."""
        return self._iterations_done

    @staticmethod
    def _check_arguments(inner, outer, inner_optimizer, outer_optimizer, num_iters,
                         unroll_steps, outer_patience_iters, log_freq) -> None:
        if not isinstance(inner, nn.Module):
            raise TypeError(f"`inner` must be an nn.Module, got {type(inner).__name__}.")
        if not isinstance(outer, nn.Module):
            raise TypeError(f"`outer` must be an nn.Module, got {type(outer).__name__}.")
        if not any(True for _ in inner.parameters()):
            raise ValueError("`inner` has no parameters: there is nothing to train in the inner problem.")
        if not any(True for _ in outer.parameters()):
            raise ValueError("`outer` has no parameters: there is nothing to learn in the outer problem.")
        if not callable(inner_optimizer):
            raise TypeError("`inner_optimizer` must be a functional optimizer such as "
                            "`functools.partial(diff_sgd, lr=0.1)`.")
        if not isinstance(outer_optimizer, torch.optim.Optimizer):
            raise TypeError("`outer_optimizer` must be a torch.optim.Optimizer over `outer.parameters()`.")
        outer_ids = {id(p) for p in outer.parameters()}
        optim_ids = {id(p) for group in outer_optimizer.param_groups for p in group["params"]}
        if not optim_ids <= outer_ids:
            raise ValueError("`outer_optimizer` holds parameters that are not in `outer`; build it "
                             "from `outer.parameters()`.")
        for value, name in ((num_iters, "num_iters"), (unroll_steps, "unroll_steps")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if num_iters < unroll_steps:
            raise ValueError(f"`num_iters` ({num_iters}) is smaller than `unroll_steps` ({unroll_steps}): "
                             f"no outer update would ever happen.")
        if isinstance(outer_patience_iters, bool) or not isinstance(outer_patience_iters, int) \
                or outer_patience_iters < 0:
            raise ValueError(f"`outer_patience_iters` must be an integer >= 0, got {outer_patience_iters!r}.")
        if not isinstance(log_freq, int) or log_freq < 0:
            raise ValueError(f"`log_freq` must be an integer >= 0, got {log_freq!r}.")

    detach_inner_params: bool = False
    """Whether assigning ``inner_params`` detaches them from the autograd graph. Unrolled
    solvers keep the graph (they differentiate through the inner steps); implicit solvers
    drop it, so the graph does not grow with every inner step."""

    @property
    def inner_params(self) -> tuple[Tensor, ...]:
        return self._inner_params

    @inner_params.setter
    def inner_params(self, params: ParamsLike) -> None:
        if self.detach_inner_params:
            params = type(params)(
                {k: v.detach() for k, v in params.items()} if isinstance(params, Mapping)
                else [p.detach() for p in params]
            )
        self._inner_params = params

    # ---------------------------------------------------------------- functional model
    def inner_func(self, params: ParamsLike, *args: Any, **kwargs: Any) -> Any:
        """Call the inner module with ``params`` (a tuple in ``inner.parameters()`` order,
        or a dict by name) in place of its own parameters."""
        named = params if isinstance(params, Mapping) else dict(zip(self._param_names, params))
        return functional_call(self.inner, (named, self._buffers), args, kwargs)

    def sync_inner(self) -> None:
        """Copy ``self.inner_params`` into the inner module, e.g. before evaluating or saving it."""
        params = self.inner_params
        if isinstance(params, Mapping):  # by name: iterating a dict would give its keys
            named = dict(self.inner.named_parameters())
            pairs = [(named[name], new) for name, new in params.items()]
        else:
            pairs = list(zip(self.inner.parameters(), params))
        with torch.no_grad():
            for p, new in pairs:
                p.copy_(new)

    def reset_inner_model(self, reinitialize: bool = False) -> None:
        """Restart the inner problem: parameters back to their initial values (or freshly
        initialised with each submodule's ``reset_parameters`` when ``reinitialize``) and
        the inner optimizer state cleared."""
        if reinitialize:
            for module in self.inner.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            self._initial_params = tuple(p.detach().clone() for p in self.inner.parameters())
        self.inner_params = tuple(p.clone() for p in self._initial_params)
        self.inner_optim_state = None

    # ---------------------------------------------------------------- outer gradients
    @property
    def skipped_outer_steps(self) -> int:
        """Hypergradients dropped (non-finite, exploding) or steps rolled back; see :attr:`outer_history`."""
        return self.outer_history.skipped

    @property
    def applied_outer_steps(self) -> int:
        """Hypergradients accepted (and, through :meth:`apply_outer_grad`, steps kept)."""
        return self.outer_history.applied

    @property
    def outer_grad(self) -> tuple[Tensor | None, ...]:
        return tuple(p.grad for p in self.outer.parameters())

    @outer_grad.setter
    def outer_grad(self, grads: ParamsLike) -> None:
        """Accumulate ``grads`` into the ``.grad`` of the outer parameters (the caller then steps
        ``outer_optimizer``; prefer :meth:`apply_outer_grad`, which also rolls a bad step back).

        A non-finite or exploding hypergradient is reported and dropped: every outer ``.grad`` is
        cleared, so the following ``outer_optimizer.step()`` leaves the outer parameters unchanged.
        """
        self._outer_result(apply_outer_update(None, self._outer_tree(grads), grads, self.outer_history))

    def apply_outer_grad(self, grads: ParamsLike,
                         validate: Callable[[], str | None] | None = None) -> OuterStepResult:
        """One guarded outer step with the hypergradient ``grads``: accumulate, step
        ``outer_optimizer``, roll back non-finite results, clear ``.grad`` (see
        :func:`hypergrad.outer_step.apply_outer_update`; ``validate`` is passed on)."""
        result = apply_outer_update(self.outer_optimizer, self._outer_tree(grads), grads, self.outer_history,
                                    validate=validate)
        self._outer_result(result)
        return result

    def _outer_tree(self, grads: ParamsLike) -> ParamsLike:
        return dict(self.outer.named_parameters()) if isinstance(grads, Mapping) else tuple(self.outer.parameters())

    def _outer_result(self, result: OuterStepResult) -> None:
        if result.applied:
            self.record(hypergrad_norm=result.norm)
            return
        logger.warning("%s at iteration %d: outer step skipped (%d so far).",
                       result.reason, self.iteration, self.skipped_outer_steps)
        self.record(skipped_outer_steps=self.skipped_outer_steps)

    # ---------------------------------------------------------------- schedule
    def is_outer_step(self, iteration: int) -> bool:
        """Whether :meth:`run` performs an outer update after inner iteration ``iteration``."""
        return is_outer_step(iteration, self.unroll_steps, self.outer_patience_iters)

    def record(self, **metrics: float | Tensor) -> None:
        """Record scalar metrics at the current iteration."""
        self.recorder.record(self.iteration, **metrics)

    def run(self) -> MetricsRecorder:
        """Run the schedule, then copy the final inner parameters into ``self.inner``.

        ``inner_update`` may return a loss (tensor or float) or a dict of metrics; they are
        recorded, shown on the progress bar and logged every ``log_freq`` iterations.
        """
        bar = _progress(range(self.num_iters), self.num_iters, self.progress_bar)
        for i in bar:
            self.iteration = i
            self._record_returned(self.inner_update(), "inner_loss")
            self._inner_steps_done += 1
            if self.is_outer_step(i):
                start = time.perf_counter()
                self._record_returned(self.outer_update(), "outer_loss")
                self.outer_step += 1
                self.record(outer_update_time=time.perf_counter() - start)
                self.post_outer_update()
            if self.log_freq and (i + 1) % self.log_freq == 0:
                latest = self.recorder.latest()
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix({k: f"{v:.4g}" for k, v in latest.items()}, refresh=False)
                logger.info("iteration %d/%d: %s", i + 1, self.num_iters,
                            ", ".join(f"{k}={v:.4g}" for k, v in latest.items()))
            self._iterations_done += 1
        self.sync_inner()
        return self.recorder

    def _record_returned(self, value: Any, name: str) -> None:
        if value is None:
            return
        if isinstance(value, Mapping):
            self.record(**{k: v for k, v in value.items() if isinstance(v, (int, float, Tensor))})
        elif isinstance(value, (int, float, Tensor)) and (not isinstance(value, Tensor) or value.numel() == 1):
            self.record(**{name: value})

    # ---------------------------------------------------------------- user hooks
    def inner_forward(self, in_params: ParamsLike, out_params: ParamsLike, *args: Any) -> Tensor:
        """The inner objective ``f(theta, phi)`` on a batch."""
        raise NotImplementedError

    def inner_update(self) -> Any:
        """One inner optimization step (draw from ``self.inner_loader``, update ``self.inner_params``)."""
        raise NotImplementedError

    def outer_forward(self, in_params: ParamsLike, out_params: ParamsLike, *args: Any) -> Tensor:
        """The outer objective ``g(theta, phi)`` on a batch."""
        raise NotImplementedError

    def outer_update(self) -> Any:
        """One outer step: compute the hypergradient and pass it to :meth:`apply_outer_grad`."""
        raise NotImplementedError

    def post_outer_update(self) -> None:
        """Called after every outer update; override to reset or log. Does nothing by default."""


class BaseImplicitSolver(BaseSolver):
    """Solver whose hypergradient comes from implicit differentiation.

    ``approx_ihvp`` is a function of :mod:`hypergrad.approx_hypergrad` with its options bound,
    e.g. ``functools.partial(nystrom, rank=5, rho=0.1)``; it is available as
    ``self.approx_ihvp(inner_obj, outer_obj, in_params, out_params)`` and each call's wall
    time is recorded as ``ihvp_time``. ``inner_params`` are detached whenever assigned.

    The Hessian-vector-product mode is fixed at the first hypergradient and kept in
    :attr:`hvp_mode`: ``hvp_mode="auto"`` (the core functions' default) is resolved there by
    :func:`hypergrad.mode_probe.resolve_hvp_mode` and every later call gets the same mode. Save
    ``solver.hvp_mode`` with a checkpoint and set it back before :meth:`run` on resume: the
    resumed run then takes the same products without probing.
    """

    detach_inner_params = True

    def __init__(
        self,
        inner: nn.Module,
        outer: nn.Module,
        inner_loader: Iterable,
        outer_loader: Iterable,
        approx_ihvp: Callable[..., ParamsLike],
        inner_optimizer: Callable[..., tuple[ParamsLike, Any]],
        outer_optimizer: torch.optim.Optimizer,
        num_iters: int,
        unroll_steps: int,
        outer_patience_iters: int = 0,
        log_freq: int = 100,
        progress_bar: bool = True,
    ) -> None:
        if not callable(approx_ihvp):
            raise TypeError("`approx_ihvp` must be callable, e.g. "
                            "`functools.partial(hypergrad.approx_hypergrad.nystrom, rank=5, rho=0.1)`.")
        super().__init__(inner, outer, inner_loader, outer_loader, inner_optimizer, outer_optimizer,
                         num_iters, unroll_steps, outer_patience_iters, log_freq, progress_bar)
        self._approx_ihvp = approx_ihvp
        self._bound = _bound_defaults(approx_ihvp, ("hvp_mode", "hvp_max_memory_ratio", "data_parallel"))
        self._hvp_mode: str | None = None

    @property
    def hvp_mode(self) -> str | None:
        """The product mode of this run's hypergradients (``None`` before the first one, and for an
        ``approx_ihvp`` without an ``hvp_mode`` argument)."""
        return self._hvp_mode

    @hvp_mode.setter
    def hvp_mode(self, mode: str | None) -> None:
        if mode is not None:
            check_mode(mode)
            if "hvp_mode" not in self._bound:
                raise ValueError("`hvp_mode` cannot be set: this solver's `approx_ihvp` takes no `hvp_mode` argument.")
        self._hvp_mode = mode

    def approx_ihvp(self, inner_obj: Callable, outer_obj: Callable, in_params: ParamsLike,
                    out_params: ParamsLike) -> ParamsLike:
        start = time.perf_counter()
        options = {}
        if "hvp_mode" in self._bound:
            if self._hvp_mode is None:
                self._hvp_mode = resolve_hvp_mode(
                    inner_obj, in_params, out_params, self._bound["hvp_mode"],
                    self._bound.get("hvp_max_memory_ratio", DEFAULT_MAX_MEMORY_RATIO), self._bound.get("data_parallel"))
                logger.info("Hessian-vector products: hvp_mode=%s.", self._hvp_mode)
            options["hvp_mode"] = self._hvp_mode
        grads = self._approx_ihvp(inner_obj, outer_obj, in_params, out_params, **options)
        self.record(ihvp_time=time.perf_counter() - start)
        return grads


def _bound_defaults(fn: Callable, names: tuple[str, ...]) -> dict[str, Any]:
    """The values ``fn`` uses for those of ``names`` it accepts when they are not passed (its defaults, or
    what a ``functools.partial`` bound)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable without a signature: nothing to read
        return {}
    return {name: parameters[name].default for name in names
            if name in parameters and parameters[name].default is not inspect.Parameter.empty}
