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
   peak memory stays that of the larger of the two passes);
2. the inner forward pass: per-example losses ``l_i(theta_{t+1})`` with their graph;
3. the mixed product from that graph and the outer optimizer's step, rolled back when the inner objective is no
   longer finite (as every outer step);
4. the inner objective with the new outer parameters, whose backward pass and optimizer step `Trainer` takes.

What differs from a sampled batch: the mixed product's rows are the inner batch (``per_device_train_batch_size``
rows, not ``hypergrad_train_batch_size``), and their losses are the training forward pass's (dropout on, as the inner
objective sees them). The outer step after the last inner step has no next step and runs on a sampled batch. A
checkpoint saved after step ``t`` holds the outer state before that step's update; the resumed run's first inner
step takes it, as the uninterrupted run's step ``t + 1`` does.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from transformers.utils import logging

from hypergrad.distributed import DataParallel
from hypergrad.solver import is_outer_step

__all__ = ["InnerBatchOuterStepMixin"]

logger = logging.get_logger(__name__)


class InnerBatchOuterStepMixin:
    """`BilevelTrainer`'s outer steps inside inner steps (a mixin of it: it reads the trainer's schedule, outer
    module and the weighted-gradient rule of :class:`~hf_integration.outer_update.OuterUpdateMixin`)."""

    def _check_inner_batch_outer_step(self) -> None:
        """Refuse ``hypergrad_on_inner_batch=True`` where it cannot apply, unless a recipe set it (then the outer steps
        sample their batches, with an info line)."""
        args = self.args
        if not args.hypergrad_on_inner_batch or self.takes_outer_steps_on_inner_batches:
            return
        reason = ("FSDP-sharded parameters" if self.is_sharded else "gradient checkpointing"
                  if args.gradient_checkpointing else f"outer_module={type(self.outer_module).__name__}, "
                  f"ihvp_method={args.ihvp_method!r}")
        if "hypergrad_on_inner_batch" in getattr(args, "fields_from_recipe", ()):
            logger.info("Outer steps sample their training batch (hypergrad_on_inner_batch does not apply with %s).",
                        reason)
            return
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
        """Whether this inner step (its first micro-batch) takes the outer step scheduled after the previous one."""
        step = self.state.global_step
        return (self.takes_outer_steps_on_inner_batches and self.__dict__.get("_outer_step_taken_at") != step
                and is_outer_step(step - 1, self.args.unroll_steps, self.args.outer_patience_steps))

    def _outer_step_pending(self) -> bool:
        """Whether the outer step scheduled after the last inner step taken is still to come (the next inner step
        takes it): what a checkpoint of this step holds, and a resumed run's first step does."""
        state, args = self.state, self.args
        return (self.takes_outer_steps_on_inner_batches and state.global_step < state.max_steps
                and is_outer_step(state.global_step - 1, args.unroll_steps, args.outer_patience_steps))

    def _inner_objective_with_outer_step(self, model: nn.Module, inputs: Mapping[str, Any]) -> tuple[Tensor, Any]:
        """The inner objective of ``inputs`` (and the model outputs), with the outer step due taken on the batch's
        forward pass in between (steps 1-4 of the module)."""
        step = self.state.global_step
        self._outer_step_taken_at = step
        start = time.perf_counter()
        _, eval_batch, generator = self._batches(step, with_training=False)
        self._check_batch_columns(eval_batch, weighted=False)
        data_parallel = DataParallel() if self.args.world_size > 1 else None
        phi = {k: v.detach() for k, v in self._outer_param_tree().items()}
        with self._second_order_context():
            outer_gradient = self._outer_gradient(eval_batch, self._theta(), phi, data_parallel)
        losses, outputs = self._per_example_losses(model, None, {}, inputs, weighted=True)
        live = self._inner_param_tree()
        grads = self._weighted_gradient_mixed(outer_gradient, lambda: (live, losses), inputs, self._solver(generator),
                                              data_parallel, keep_graph=True)
        ihvp_time = time.perf_counter() - start
        self._apply_hypergradient(step, grads, inputs, self.__dict__.pop("_last_outer_loss"), ihvp_time)
        out_params = {k: v.detach() for k, v in self._outer_param_tree().items()}
        return self._weighted_loss(losses, inputs, out_params, live), outputs

    def _run_outer_step_now(self, state: Any) -> bool:
        """Whether the outer step scheduled after this inner step runs now (a sampled batch) rather than inside the
        next inner step: always, unless outer steps take inner batches and a next step follows."""
        return not self.takes_outer_steps_on_inner_batches or state.global_step >= state.max_steps
