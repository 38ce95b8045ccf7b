"""The outer step taken inside the next inner step, on that step's own batch (``hypergrad_on_inner_batch``).

For example weights that read the losses as values (`LossWeights`) and an IHVP method without Hessian-vector
products (``identity``), the hypergradient is ``grad_phi g - M v`` with ``v = solve(grad_theta g)`` and ``M v`` the
mixed product over a training batch: one forward pass of that batch, then one backward pass per outer number
(:meth:`~hf_integration.outer_update.OuterUpdateMixin._weighted_gradient_hypergradient`). The outer step scheduled
after inner step ``t`` sees the inner weights ``theta_{t+1}``, which are what inner step ``t + 1`` starts from, so
that step's forward pass can be the mixed product's: its per-example losses and their graph give ``M v`` by the same
backward passes (the graph kept for the step's own backward), and the sampled batch and its forward pass are
saved. Within inner step ``t + 1``, in order:

1. the outer gradient on outer step ``t``'s validation batch, its graph freed before the inner forward pass (the
   peak memory stays that of the larger of the two passes, plus ``v``, one vector of the inner parameters' size,
   while the outer step is open);
2. the inner forward pass: per-example losses ``l_i(theta_{t+1})`` with their graph;
3. the mixed product from that graph and the outer optimizer's step, rolled back when the inner objective is no
   longer finite (as every outer step);
4. the inner objective with the new outer parameters, whose backward pass and optimizer step `Trainer` takes.

The mixed product's rows are ``hypergrad_train_batch_size``, as on a sampled batch: when the inner batch holds
fewer, the mixed products of the next micro-batches join it (their mean, ``M`` of the mean of their objectives), each
at the weights its inner step sees, up to one outer period (``unroll_steps`` optimizer steps), and the outer step is
applied on the batch that completes them. What differs from a sampled batch: the rows are consecutive training
batches, taken while the inner weights move a few steps, and their losses are the training forward pass's (dropout
on, as the inner objective sees them). The outer step after the last inner step, which has no next step, runs on a
sampled batch; a window still open when training ends is applied with the rows it holds. A checkpoint saved while an
outer step waits holds the outer state before it and, once its window is open, the window (:meth:`outer_window_state`);
the resumed run goes on from there as the uninterrupted run does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from hypergrad.solver import is_outer_step

__all__ = ["InnerBatchOuterStepMixin"]


class InnerBatchOuterStepMixin:
    """`BilevelTrainer`'s outer steps inside inner steps (a mixin of it: it reads the trainer's schedule, outer
    module and the weighted-gradient rule of :class:`~hf_integration.outer_update.OuterUpdateMixin`)."""

    def _check_inner_batch_outer_step(self) -> None:
        """Refuse ``hypergrad_on_inner_batch=True`` where it cannot apply, naming why."""
        args = self.args
        if not args.hypergrad_on_inner_batch or self.takes_outer_steps_on_inner_batches:
            return
        reason = ("FSDP-sharded parameters" if self.is_sharded else "gradient checkpointing"
                  if args.gradient_checkpointing else f"outer_module={type(self.outer_module).__name__}, "
                  f"ihvp_method={args.ihvp_method!r}")
        raise ValueError(f"hypergrad_on_inner_batch=True does not apply with {reason}: it needs example weights read "
                         "from the losses (loss_weights) with ihvp_method='identity', unsharded parameters and no "
                         "gradient checkpointing; set it to False.")

    @property
    def takes_outer_steps_on_inner_batches(self) -> bool:
        """Whether scheduled outer steps run inside the next inner step, on its batch (see the module)."""
        cached = self.__dict__.get("_outer_steps_on_inner_batches")
        if cached is None:
            cached = self.__dict__["_outer_steps_on_inner_batches"] = bool(
                self.args.hypergrad_on_inner_batch and self._takes_weighted_gradient_mixed_product()
                and not self.is_sharded and not self.args.gradient_checkpointing)
        return cached

    def _outer_step_due_in_inner_step(self) -> bool:
        """Whether this micro-batch takes part in an outer step: one is open, or this inner step is the one after a
        scheduled outer step (its first micro-batch opens it)."""
        if self.__dict__.get("_outer_window") is not None:
            return True
        return self._left_to_this_inner_step() and self.__dict__.get("_outer_step_taken_at") != self.state.global_step

    def _outer_step_pending(self) -> bool:
        """Whether an outer step scheduled before the current inner step is not yet applied: its window is open, or
        the next inner step opens it. What a checkpoint of this step holds, and a resumed run's next steps take."""
        if self.__dict__.get("_outer_window") is not None:
            return True
        return self._left_to_this_inner_step() and self.state.global_step < self.state.max_steps

    def _left_to_this_inner_step(self) -> bool:
        """Whether the schedule names the inner step before the current one and its outer step is left to this one."""
        args = self.args
        return self.takes_outer_steps_on_inner_batches and is_outer_step(
            self.state.global_step - 1, args.unroll_steps, args.outer_patience_steps)

    def _open_outer_window(self) -> _OuterWindow:
        """Step 1: the outer gradient at the current inner weights and ``v = solve(grad_theta g)``."""
        step = self.state.global_step
        self._outer_step_taken_at = step
        start = time.perf_counter()
        _, eval_batch, generator = self._batches(step, with_training=False)
        self._check_batch_columns(eval_batch, weighted=False)
        phi = {k: v.detach() for k, v in self._outer_param_tree().items()}
        with self._second_order_context():
            grad_in, grad_out = self._outer_gradient(eval_batch, self._theta(), phi, self._data_parallel())
        ihvp = self._solver(generator)(self._no_products, self._no_products, grad_in, lambda x: x)
        return _OuterWindow(step=step, ihvp=ihvp, grad_out=grad_out, mixed={k: torch.zeros_like(v) for k, v in
                                                                          grad_out.items()},
                            outer_loss=self.__dict__.pop("_last_outer_loss"), seconds=time.perf_counter() - start)

    def _inner_objective_with_outer_step(self, model: nn.Module, inputs: Mapping[str, Any]) -> tuple[Tensor, Any]:
        """The inner objective of ``inputs`` (and the model outputs), with the open outer step's mixed product taken
        on the batch's forward pass in between, and the outer step applied once its rows are complete (steps 1-4 of
        the module)."""
        start = time.perf_counter()
        window = self.__dict__.get("_outer_window")
        if window is None:
            window = self._outer_window = self._open_outer_window()
        self.outer_steps_seconds += time.perf_counter() - start
        losses, outputs = self._per_example_losses(model, None, {}, inputs, weighted=True)
        start = time.perf_counter()
        live = self._inner_param_tree()
        part = self._loss_weight_mixed_product(window.ihvp, live, losses, inputs, self._data_parallel(),
                                               keep_graph=True)
        for key, value in part.items():
            window.mixed[key] += value
        window.batches += 1
        window.rows += len(losses)
        window.seconds += time.perf_counter() - start
        limit = self.args.unroll_steps * self.args.gradient_accumulation_steps
        if window.rows >= (self.args.hypergrad_train_batch_size or len(losses)) or window.batches >= limit:
            self._close_outer_window(inputs)
        self.outer_steps_seconds += time.perf_counter() - start
        out_params = {k: v.detach() for k, v in self._outer_param_tree().items()}
        return self._weighted_loss(losses, inputs, out_params, live), outputs

    def _close_outer_window(self, batch: Mapping[str, Any] | None = None) -> None:
        """Apply the open outer step: ``grad_phi g - mean_b M_b v`` over the window's batches, the post-step check on
        ``batch`` (the last one; ``None`` at the end of training: a fresh forward pass of the last losses' batch)."""
        window = self.__dict__.pop("_outer_window")
        grads = {k: window.grad_out[k] - window.mixed[k] / window.batches for k in window.grad_out}
        if batch is None:  # the last batch's losses, when this process still holds them; else a sampled batch
            batch = self.__dict__.get("_hypergradient_losses", (None, None))[1] or self._batches(window.step)[0]
        self._apply_hypergradient(window.step, grads, batch, window.outer_loss, window.seconds)

    def _close_outer_window_at_the_end(self, state: Any) -> None:
        """At the last inner step, an outer step whose window is still open is applied with the rows it holds."""
        if state.global_step >= state.max_steps and self.__dict__.get("_outer_window") is not None:
            start = time.perf_counter()
            self._close_outer_window()
            self.outer_steps_seconds += time.perf_counter() - start

    def outer_window_state(self) -> dict[str, Any] | None:
        """The open outer step, for a checkpoint (``None``: none is open)."""
        window = self.__dict__.get("_outer_window")
        return None if window is None else dataclasses.asdict(window)

    def load_outer_window_state(self, state: Mapping[str, Any] | None) -> None:
        """Reopen the outer step a checkpoint saved open (:meth:`outer_window_state`)."""
        self._outer_window = None if state is None else _OuterWindow(**state)
        if state is not None:
            self._outer_step_taken_at = self._outer_window.step

    def _run_outer_step_now(self, state: Any) -> bool:
        """Whether the outer step scheduled after this inner step runs now (a sampled batch) rather than inside the
        next inner step: always, unless outer steps take inner batches and a next step follows."""
        return not self.takes_outer_steps_on_inner_batches or state.global_step >= state.max_steps


@dataclasses.dataclass
class _OuterWindow:
    """An outer step between its outer gradient and its application: ``ihvp = solve(grad_theta g)`` (``v``), ``grad_out
    = grad_phi g``, the sum of the mixed products ``M_b v`` of the batches taken so far, their count and rows, the
    validation loss and the seconds spent (the outer step's metrics)."""

    step: int
    ihvp: dict[str, Tensor]
    grad_out: dict[str, Tensor]
    mixed: dict[str, Tensor]
    outer_loss: float
    seconds: float
    batches: int = 0
    rows: int = 0
