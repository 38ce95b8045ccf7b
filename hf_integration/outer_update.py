"""The outer step of `BilevelTrainer` (:class:`OuterUpdateMixin`): the hypergradient of the outer loss at the current
inner weights -- a training batch for the inner objective, an outer batch for the outer one, an IHVP method of
:mod:`hypergrad.methods` -- and the outer optimizer's step, with the HVP mode, precision and every process agreeing."""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import datasets
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.utils import logging

from hypergrad.approx_hypergrad import hypergrad_from_products, implicit_hypergrad
from hypergrad.autodiff import gradient
from hypergrad.distributed import DataParallel, any_process, broadcast_tree
from hypergrad.methods import METHODS, get_method
from hypergrad.mode_probe import probe_hvp_mode
from hypergrad.outer_step import NonFiniteError, apply_outer_update
from hypergrad.sharded import sharded_hypergrad

from .outer_modules import ExampleWeighting
from .outer_modules.weighting import promote
from .weights_out import weight_spread

__all__ = ["OuterUpdateMixin"]

logger = logging.get_logger(__name__)

_MODULE_PREFIX = "outer_module."
_MODEL_PREFIX = "model."
# the weighted-gradient mixed product takes one backward pass per outer number; the general one about two and a half
WEIGHTED_GRADIENT_MAX_PARAMS = 2


class OuterUpdateMixin:
    """`BilevelTrainer`'s outer problem (a mixin of it: it reads the trainer's outer module, parameter trees,
    arguments and batches)."""

    def _create_outer_optimizer(self) -> torch.optim.Optimizer:
        params = list(self._outer_param_tree().values())
        args = self.args
        if args.outer_optim == "sgd":
            return torch.optim.SGD(params, lr=args.outer_learning_rate, momentum=args.outer_momentum,
                                   weight_decay=args.outer_weight_decay)
        return torch.optim.Adam(params, lr=args.outer_learning_rate, weight_decay=args.outer_weight_decay)

    def _outer_step_problem(self, batch: Mapping[str, Any]) -> str | None:
        """``validate`` of :func:`~hypergrad.outer_step.apply_outer_update`: after an outer step, a reason to
        roll it back when the inner objective on ``batch`` is no longer finite (e.g. an L2 strength or a
        weight normalization that overflowed). One verdict for all processes."""
        known = self.__dict__.pop("_hypergradient_losses", None)
        # the model did not move: with the hypergradient's losses of this batch at hand, only the weights are new
        reuse = known is not None and known[1] is batch
        with torch.no_grad(), contextlib.nullcontext() if reuse else self._second_order_context():
            if reuse:
                losses = known[0]
            else:
                model = self.model_wrapped if self.is_sharded else self._unwrapped
                losses = self._per_example_losses(model, None, {}, batch, weighted=True)[0]
            phi = {k: v.detach() for k, v in self._outer_param_tree().items()}
            loss = self._weighted_loss(losses, batch, phi, self._inner_param_tree())
            self._weight_spread = self._batch_weight_spread(losses, batch)
        self._checked_inner_loss = float(loss)
        if any_process(not bool(torch.isfinite(loss)), self.args.device):
            return f"non-finite inner objective: {float(loss)} with the new outer parameters"
        return None

    def _batch_weight_spread(self, losses: Tensor | None, batch: Mapping[str, Any]) -> float | None:
        """std/mean of the outer module's weights of the batch's training rows (trusted rows aside), from the
        per-example losses the inner objective weights (no extra forward pass); ``None`` for a module that weights no
        examples."""
        if not isinstance(self.outer_module, ExampleWeighting):
            return None
        weights = self.outer_module.example_weights(losses, batch)
        if self.trusted_column in batch:
            weights = weights[~torch.as_tensor(batch[self.trusted_column], device=weights.device).bool()]
        return weight_spread(weights)

    def _sample_batch(self, dataset, batch_size: int, generator: torch.Generator, description: str,
                      rows: list[int] | None = None) -> dict:
        """A random batch of ``dataset`` drawn with ``generator`` (reproducible from the step), collated and on the
        device: ``batch_size`` distinct rows among the positions ``rows`` of the prepared dataset (default: all)."""
        prepared = self._prepared_dataset(dataset, description)
        positions = range(len(prepared)) if rows is None else rows
        picks = torch.randperm(len(positions), generator=generator)[:min(batch_size, len(positions))].tolist()
        collator = self._get_collator_with_removed_columns(self.data_collator, description)
        return self._prepare_inputs(collator([prepared[positions[i]] for i in picks]))

    def _prepared_dataset(self, dataset, description: str):
        """``dataset`` with the columns the model does not take removed, as `Trainer`'s loaders do (once per
        ``description``)."""
        cache = self.__dict__.setdefault("_prepared_datasets", {})
        if description not in cache:
            cache[description] = (self._remove_unused_columns(dataset, description=description)
                                  if isinstance(dataset, datasets.Dataset) else dataset)
        return cache[description]

    def _generators(self, step: int) -> tuple[torch.Generator, torch.Generator]:
        """Random generators of outer step ``step``: one for the batches (different on every
        process, so each sees other examples) and one for the Nyström sketch (the same on
        every process, so all solve with the same sketch). Both depend only on the seed and
        the step, so a resumed run draws exactly what an uninterrupted one would."""
        base = self.args.seed * 1_000_003 + step * 7919
        data = torch.Generator().manual_seed((base + 104_729 * (1 + self.args.process_index)) % (2**63 - 1))
        sketch = torch.Generator().manual_seed(base % (2**63 - 1))
        return data, sketch

    def _solver(self, generator: torch.Generator) -> Callable:
        """The run's IHVP solver (one object for the whole run, so a Nyström factor can be
        reused across outer steps) with this step's sketch generator bound."""
        return functools.partial(self.ihvp_solver, generator=generator)

    @property
    def _low_precision(self) -> bool:
        """Whether forward passes run in bf16/fp16 (mixed-precision training or half weights)."""
        args = self.args
        return bool(args.bf16 or args.fp16) or any(
            p.dtype in (torch.bfloat16, torch.float16) for p in self._inner_param_tree().values())

    @contextlib.contextmanager
    def _second_order_context(self):
        """Evaluation mode (deterministic, no dropout, no gradient checkpointing), the SDPA
        math backend (which, unlike the fused kernels, has forward-mode AD and a double
        backward) and, for mixed-precision models, bf16/fp16 autocast of the forward passes
        while every IHVP vector stays float32."""
        model = self._unwrapped
        was_training = model.training
        model.eval()
        args = self.args
        autocast = contextlib.nullcontext()
        if self._low_precision:
            dtype = torch.float16 if args.fp16 else torch.bfloat16
            autocast = torch.autocast(device_type=args.device.type, dtype=dtype)
        try:
            with sdpa_kernel(SDPBackend.MATH), autocast:
                yield
        finally:
            model.train(was_training)

    def _theta(self) -> dict[str, Tensor]:
        """The inner parameters as the IHVP sees them: detached, at least float32."""
        return {k: v.detach().to(torch.promote_types(v.dtype, torch.float32))
                for k, v in self._inner_param_tree().items()}

    def _batches(self, step: int, with_training: bool = True) -> tuple[dict | None, dict, torch.Generator]:
        """Outer step ``step``'s hypergradient batches: training rows (``hypergrad_train_batch_size``; ``None``
        without ``with_training``), validation rows (``outer_batch_size``) and the sketch generator."""
        data_generator, sketch_generator = self._generators(step)
        args = self.args
        train_bs = args.hypergrad_train_batch_size or args.per_device_train_batch_size
        outer_bs = args.outer_batch_size or args.per_device_eval_batch_size
        train_batch = (self._sample_batch(self.train_dataset, train_bs, data_generator, "training")
                       if with_training else None)
        eval_batch = self._sample_batch(self.outer_dataset, outer_bs, data_generator, "evaluation")
        return train_batch, eval_batch, sketch_generator

    def compute_hypergradient(self, train_batch: Mapping[str, Any], eval_batch: Mapping[str, Any],
                              generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The hypergradient at the current inner weights, keyed like the outer parameters
        (``"outer_module.<name>"`` / ``"model.<name>"``).

        Single process and DDP: :func:`hypergrad.approx_hypergrad.implicit_hypergrad` on the
        unwrapped model, with every product averaged over processes under DDP. FSDP:
        :func:`hypergrad.sharded.sharded_hypergrad`, finite-difference products taken in
        place on the shards. Every process returns the same hypergradient."""
        self.resolve_hvp_mode()
        self._check_batch_columns(train_batch, weighted=True)
        self._check_batch_columns(eval_batch, weighted=False)
        solve = self._solver(generator if generator is not None else torch.Generator().manual_seed(self.args.seed))
        phi = {k: v.detach() for k, v in self._outer_param_tree().items()}
        with self._second_order_context():
            if self.is_sharded:
                model = self.model_wrapped
                return sharded_hypergrad(
                    model,
                    lambda o: self._objective(model, None, o, train_batch, weighted=True)[0],
                    lambda o: self._objective(model, None, o, eval_batch, weighted=False)[0],
                    phi, solve, **self._sharded_stop_gradient_mixed(model, train_batch))
            data_parallel = self._data_parallel()
            if self._takes_weighted_gradient_mixed_product():
                return self._weighted_gradient_hypergradient(train_batch, eval_batch, phi, solve, data_parallel)
            budget = self.args.hvp_memory_budget_mb
            try:
                grads, outer_value = implicit_hypergrad(
                    lambda i, o: self.inner_forward(i, o, train_batch),
                    lambda i, o: self.outer_forward(i, o, eval_batch),
                    self._theta(), phi, solve, self.hvp_mode, data_parallel, self.args.hvp_chunk_size,
                    hvp_memory_budget=None if budget is None else int(budget * 2**20), return_outer_value=True)
            except (torch.cuda.OutOfMemoryError, NonFiniteError):
                raise
            except Exception as err:
                if self.args.hvp_mode == "auto" or not self._gradient_runs(phi, train_batch):
                    raise  # the probe vouched for the mode, or the error is not the products' (data, model)
                raise ValueError(
                    f"hvp_mode={self.hvp_mode!r} cannot run on this model ({type(err).__name__}: {err}); its "
                    "plain gradient runs. Use hvp_mode='auto' (probes the model, falls back to finite "
                    "differences) or 'finite_diff'.") from err
            self._last_outer_loss = float(outer_value)  # this process's validation loss at the current weights
            return grads

    def _sharded_stop_gradient_mixed(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Callable]:
        """For an outer module whose weights read the losses as values (a stop-gradient, e.g. `LossWeights`), the
        mixed product of :func:`hypergrad.sharded.sharded_hypergrad` from the losses' directional derivatives
        (finite differences of gradients would differentiate through the stop-gradient): the inner objective is
        ``sum_i wh_i(phi, sg(l)) l_i(theta)``, so ``M v = grad_phi weighted_mean(l, dl)`` with ``dl`` the losses'
        derivatives along ``v``. ``{}`` for every other outer module (their mixed products are finite differences)."""
        module = self.outer_module
        if not (self._weights_hold_losses_fixed() and module.stops_gradients):
            return {}
        live = {_MODULE_PREFIX + n: p for n, p in module.named_parameters()}

        def losses() -> Tensor:
            return self._per_example_losses(model, None, {}, batch, weighted=True)[0]

        def mixed_from_directional(values: Tensor, directional: Tensor) -> dict[str, Tensor]:
            weighted = module.weighted_mean(values, directional.to(values.dtype), batch)
            grads = torch.autograd.grad(weighted, list(live.values()), allow_unused=True)
            return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(live.items(), grads)}

        return {"inner_outputs": losses, "mixed_from_directional": mixed_from_directional}

    def _takes_weighted_gradient_mixed_product(self) -> bool:
        """Whether the hypergradient's one second-order product is taken as weighted gradients (see
        :meth:`_weighted_gradient_hypergradient`): an IHVP method without Hessian-vector products, an outer module that
        weights examples by values of their losses with at most :data:`WEIGHTED_GRADIENT_MAX_PARAMS` numbers, and no
        model tensor among the outer parameters."""
        return (self._weights_hold_losses_fixed() and not self.outer_model_param_names
                and get_method(self.args.ihvp_method).hessian_free
                and sum(p.numel() for p in self.outer_module.parameters()) <= WEIGHTED_GRADIENT_MAX_PARAMS)

    def _weights_hold_losses_fixed(self) -> bool:
        """Whether the outer module weights examples and reads their losses as values only
        (:attr:`~hf_integration.outer_modules.ExampleWeighting.weights_hold_losses_fixed`)."""
        return isinstance(self.outer_module, ExampleWeighting) and self.outer_module.weights_hold_losses_fixed

    def _weighted_gradient_hypergradient(self, train_batch: Mapping[str, Any], eval_batch: Mapping[str, Any],
                                         phi: Mapping[str, Tensor], solve: Callable,
                                         data_parallel: DataParallel | None) -> dict[str, Tensor]:
        """The hypergradient of a data weighting ``L(theta, phi) = sum_i w_i(phi, l_i) l_i(theta) / sum_i w_i``
        whose weights read the losses as values only, by an IHVP method that needs no Hessian-vector product.

        The rule is :func:`hypergrad.approx_hypergrad.hypergrad_from_products`'s, ``grad_phi g - M solve(grad_theta
        g)``, and its only second-order product is the mixed one. With ``wh_i(phi)`` the normalized weights of the
        batch (:meth:`~hf_integration.outer_modules.ExampleWeighting.weighted_mean`), ``grad_theta L =
        sum_i wh_i grad l_i``, so for each scalar ``phi_j``::

            (M v)_j = d/dphi_j (grad_theta L . v) = grad_theta (sum_i c_ij l_i) . v,    c_ij = d wh_i / d phi_j

        one backward pass of the ``c_j``-weighted loss per outer number, after one forward pass, instead of a
        gradient graph and a backward through it; the same value (tested against the general path). The slopes
        ``c_ij`` come from the weights alone (no model). The forward pass's losses also serve the post-step check
        (:meth:`_outer_step_problem`): the outer step does not move the model."""
        theta = self._theta()
        grad_in, grad_out = self._outer_gradient(eval_batch, theta, phi, data_parallel)

        def mixed(v: Mapping[str, Tensor]) -> dict[str, Tensor]:
            with torch.enable_grad():
                leaves = {k: x.detach().requires_grad_(True) for k, x in theta.items()}
                losses = self._per_example_losses(self._unwrapped, leaves, {}, train_batch, weighted=True)[0]
                return self._loss_weight_mixed_product(v, leaves, losses, train_batch, data_parallel)

        return hypergrad_from_products(grad_in, grad_out, self._no_products, self._no_products, mixed, solve)

    def _data_parallel(self) -> DataParallel | None:
        """What averages the hypergradient's products over data-parallel processes (``None``: one process)."""
        return DataParallel() if self.args.world_size > 1 else None

    def _no_products(self, _v: Any) -> None:
        raise RuntimeError(f"ihvp_method={self.args.ihvp_method!r} asked for a Hessian-vector product")

    def _outer_gradient(self, eval_batch: Mapping[str, Any], theta: Mapping[str, Tensor], phi: Mapping[str, Tensor],
                        data_parallel: DataParallel | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(grad_theta g, grad_phi g)`` of the outer loss ``g`` on ``eval_batch`` (averaged over processes), one
        forward and backward pass; the loss itself is kept for the outer step's metrics."""
        average = data_parallel.average if data_parallel is not None else (lambda tree: tree)
        (grad_in, grad_out), value = gradient(lambda i, o: self.outer_forward(i, o, eval_batch), (0, 1), "rev_rev",
                                              with_value=True)(theta, phi)
        self._last_outer_loss = float(value)
        return average(grad_in), average(grad_out)

    def _loss_weight_mixed_product(self, v: Mapping[str, Tensor], params: Mapping[str, Tensor], losses: Tensor,
                                   batch: Mapping[str, Any], data_parallel: DataParallel | None,
                                   keep_graph: bool = False) -> dict[str, Tensor]:
        """``M v`` of :meth:`_weighted_gradient_hypergradient` (averaged over processes): the per-example ``losses``
        of ``batch``, with their graph from the inner ``params``, weighted by each outer number's slopes and
        differentiated once per number. ``keep_graph`` leaves the graph for a later backward pass (the inner step's
        own, :mod:`~hf_integration.inner_batch_outer`). The losses are kept for the post-step check."""
        module = self.outer_module
        live = {_MODULE_PREFIX + n: p for n, p in module.named_parameters()}
        out = {k: torch.zeros_like(p) for k, p in live.items()}
        self._hypergradient_losses = (losses.detach(), batch)  # the post-step check's losses
        slopes = _weight_slopes(module, losses.detach(), batch, live)
        for n, (key, index, c) in enumerate(slopes):
            c, weighted = promote(c, losses)
            grads = torch.autograd.grad((c * weighted).sum(), list(params.values()), allow_unused=True,
                                        retain_graph=keep_graph or n < len(slopes) - 1)
            out[key].view(-1)[index] = sum((g.to(v[k].dtype) * v[k]).sum()
                                           for k, g in zip(params, grads) if g is not None)
        return data_parallel.average(out) if data_parallel is not None else out

    def _gradient_runs(self, phi: Mapping[str, Tensor], batch: Mapping[str, Any]) -> bool:
        """Whether a plain first-order gradient of the inner objective on ``batch`` runs (an explicit HVP mode
        that failed is then to blame)."""
        try:
            with torch.enable_grad():
                theta = {k: v.detach().requires_grad_(True) for k, v in self._theta().items()}
                torch.autograd.grad(self.inner_forward(theta, phi, batch), list(theta.values()), allow_unused=True)
        except Exception:  # noqa: BLE001 - any failure means the products are not the (only) problem
            return False
        return True

    def outer_update(self) -> dict[str, float]:
        """One outer step: hypergradient on fresh batches, outer optimizer step, metrics logged."""
        started = time.perf_counter()
        step = self.state.global_step
        train_batch, eval_batch, generator = self._batches(step)
        start = time.perf_counter()
        grads = self.compute_hypergradient(train_batch, eval_batch, generator)
        ihvp_time = time.perf_counter() - start
        outer_loss = self.__dict__.pop("_last_outer_loss", None)
        if outer_loss is None:  # the sharded path does not report it
            with torch.no_grad(), self._second_order_context():
                model = self.model_wrapped if self.is_sharded else self._unwrapped
                phi = {k: v.detach() for k, v in self._outer_param_tree().items()}
                outer_loss = float(self._objective(model, None, phi, eval_batch, weighted=False)[0])
        metrics = self._apply_hypergradient(step, grads, train_batch, outer_loss, ihvp_time)
        self.outer_steps_seconds += time.perf_counter() - started
        return metrics

    def _apply_hypergradient(self, step: int, grads: Mapping[str, Tensor], train_batch: Mapping[str, Any],
                             outer_loss: float, ihvp_time: float) -> dict[str, float]:
        """The outer optimizer's step on ``grads`` (rolled back when the inner objective on ``train_batch`` is no
        longer finite after it), the replicas' parameters made identical, and the step's metrics queued for the
        next training log."""
        self._checked_inner_loss = math.nan
        result = apply_outer_update(self.outer_optimizer, self._outer_param_tree(), grads, self.outer_history,
                                    validate=lambda: self._outer_step_problem(train_batch))
        if result.applied:
            broadcast_tree(list(self._outer_param_tree().values()))  # replicas stay bitwise identical
        else:
            logger.warning("Outer step at step %d skipped: %s (%d skipped so far).", step, result.reason,
                           self.outer_history.skipped)
        self.outer_step += 1
        norm = result.norm
        metrics = {
            # the inner objective on the hypergradient's training batch after the step (its finiteness check;
            # NaN, and so not logged, when the step was skipped) and the validation loss before it
            "outer/inner_loss": self._checked_inner_loss,
            "outer/loss": outer_loss,
            "outer/hypergrad_norm": norm,
            "outer/ihvp_time": ihvp_time,
            "outer/step": float(self.outer_step),
            "outer/skipped_steps": float(self.skipped_outer_steps),
            "outer/applied_steps": float(self.outer_history.applied),
            # the HVP mode as a number, so every `report_to` backend can plot it (it is also
            # logged by name once, and saved in the outer parameters' metadata)
            "outer/finite_diff_hvp": float(self.hvp_mode == "finite_diff"),
        }
        if result.applied and self._weight_spread is not None:
            metrics["outer/weight_spread"] = self._weight_spread
        if self.outer_module is not None:
            metrics.update({f"outer/{k}": float(v) for k, v in self.outer_module.summary_stats().items()})
        self.__dict__.setdefault("_outer_logs", []).append(metrics)  # logged with the next training log
        return metrics

    def resolve_hvp_mode(self) -> str:
        """The Hessian-vector-product mode. ``hvp_mode="auto"`` runs :func:`hypergrad.mode_probe.probe_hvp_mode`
        on a 2-example training batch: the first exact mode (``rev_rev``, then ``fwd_rev``) that agrees with an
        independent product and fits ``hvp_max_memory_ratio``, else finite differences; a run resumed from a
        checkpoint takes the mode that checkpoint recorded, without probing. An explicit mode is taken as given,
        without any product: a model that cannot run it fails at the first hypergradient, with a message naming
        the mode. Either way a training batch lacking a column the outer module reads (example ids) fails here,
        before training, naming it."""
        if self._hvp_mode_checked:
            return self.hvp_mode
        requested = self.args.hvp_mode
        exact_only = self.outer_module is not None and self.outer_module.stops_gradients
        if self.is_sharded and exact_only and not get_method(self.args.ihvp_method).hessian_free:
            free = tuple(m.name for m in METHODS.values() if m.hessian_free)
            raise ValueError(f"{type(self.outer_module).__name__} needs exact Hessian-vector products, which FSDP-sharded "
                             f"parameters cannot run; use an ihvp_method without products under FSDP: {free}.")
        if self.is_sharded and exact_only and not self._weights_hold_losses_fixed():
            raise ValueError(f"{type(self.outer_module).__name__} holds a stop-gradient that the mixed product on "
                             "FSDP-sharded parameters can respect only for example weights that read the losses as "
                             "values (LossWeights); train this outer module without sharding (DDP).")
        if self.is_sharded:
            if requested not in ("auto", "finite_diff"):
                raise ValueError(f"hvp_mode={requested!r} cannot run on FSDP-sharded parameters (they break jvp "
                                 f"and double backward); use hvp_mode='auto' or 'finite_diff'.")
            mode = "finite_diff"
        else:
            generator = torch.Generator().manual_seed(self.args.seed)
            batch = self._sample_batch(self.train_dataset, min(2, len(self.train_dataset)), generator, "training")
            phi = {k: v.detach() for k, v in self._outer_param_tree().items()}
            with torch.no_grad():  # a missing column is a data error, not an HVP-mode one: check it first
                self._check_batch_columns(batch, weighted=True)
            if requested in ("rev_rev", "fwd_rev"):
                mode = requested  # explicit: no probe
            elif requested == "auto" and self._recorded_hvp_mode is not None:
                mode = self._recorded_hvp_mode  # the run being resumed chose it: the same products as before
            else:  # "finite_diff" takes no product either, only the check that the objective allows it
                with self._second_order_context():
                    mode = probe_hvp_mode(lambda t: self.inner_forward(t, phi, batch), self._theta(), requested,
                                          self._low_precision, generator, self.args.hvp_max_memory_ratio,
                                          exact_only=exact_only)
        self.hvp_mode, self._hvp_mode_checked = mode, True
        logger.info("Hessian-vector products: hvp_mode=%s (requested %s).", mode, requested)
        return mode


def _weight_slopes(module: ExampleWeighting, losses: Tensor, batch: Mapping[str, Any],
                   params: Mapping[str, Tensor]) -> list[tuple[str, int, Tensor]]:
    """``(name, index, c)`` for every scalar ``phi_j`` of the outer ``params``: ``c_i = d wh_i / d phi_j``, the
    slopes of the batch's normalized weights ``wh = d/du weighted_mean(losses, u)`` (the mean is linear in ``u``),
    each by a backward pass through the weights alone (``r`` picks the column: ``d/dr (d (wh . r) / d phi_j)``)."""
    u = torch.zeros_like(losses, requires_grad=True)
    weights = torch.autograd.grad(module.weighted_mean(losses, u, batch), u, create_graph=True)[0]
    r = torch.zeros_like(weights, requires_grad=True)
    names = list(params)
    per_param = torch.autograd.grad((weights * r).sum(), [params[k] for k in names], create_graph=True,
                                    allow_unused=True)
    slopes = []
    for name, d in zip(names, per_param):
        for index in range(params[name].numel()):
            if d is None or not d.requires_grad:  # these weights do not depend on this number
                slopes.append((name, index, torch.zeros_like(losses)))
                continue
            slopes.append((name, index, torch.autograd.grad(d.reshape(-1)[index], r, retain_graph=True)[0]))
    return slopes
