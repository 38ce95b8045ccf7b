"""`BilevelTrainer`: a `transformers.Trainer` that also learns outer parameters.

The inner problem is ordinary fine-tuning, run by `Trainer` itself (its optimizer,
scheduler, gradient accumulation, Accelerate wrapping, checkpoints and callbacks). The outer
problem follows the schedule of :mod:`hypergrad.solver`: after inner step ``i`` (0-based),
when :func:`hypergrad.solver.is_outer_step` says so, :meth:`BilevelTrainer.outer_update`
computes the hypergradient with a :mod:`hypergrad.approx_hypergrad` method at the current
inner weights (a fresh training batch for the inner objective, a validation batch for the
outer one) and steps the outer optimizer.

Outer parameters are an :class:`~hf_integration.outer_modules.OuterModule` (per-example data
weights, LoRA regularization strengths) and/or model tensors selected by name pattern (e.g.
a LoRA adapter), which are then frozen for the inner optimizer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import Trainer, TrainerCallback
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from hypergrad.approx_hypergrad import implicit_hypergrad, make_solver
from hypergrad.distributed import DataParallel, broadcast_tree, sharded_hypergrad
from hypergrad.solver import accumulate_outer_grad, is_outer_step
from hypergrad.utils import hvp, tree_norm

from .arguments import BilevelTrainingArguments
from .losses import per_example_loss
from .data import dataset_fingerprint_metadata
from .hub import OUTER_OPTIMIZER_NAME, atomic_write_text, load_optimizer_state, outer_params_card_section, save_optimizer_state
from .outer_modules import OuterModule

__all__ = ["BilevelTrainer", "OUTER_OPTIMIZER_NAME"]

logger = logging.getLogger(__name__)

_MODULE_PREFIX = "outer_module."
_MODEL_PREFIX = "model."


class _OuterStepCallback(TrainerCallback):
    """Runs the outer update after each inner optimizer step that the schedule names.

    `on_step_end` comes after the inner optimizer step and before `Trainer` logs, evaluates
    and saves, so checkpoints hold the outer state of the same step."""

    def __init__(self, trainer: BilevelTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        iteration = state.global_step - 1
        if is_outer_step(iteration, args.unroll_steps, args.outer_patience_steps):
            self.trainer.outer_update()
        return control


class BilevelTrainer(Trainer):
    """`Trainer` for bilevel fine-tuning with implicit hypergradients.

    Args:
        model: the inner model (a `PreTrainedModel` or PEFT model) whose trainable
            parameters are the inner parameters.
        args: :class:`BilevelTrainingArguments`.
        train_dataset: training data of the inner problem. With `DataWeights`, it must hold
            the example-id column (see :func:`~hf_integration.data.add_example_ids`).
        eval_dataset: validation data of the outer problem (required).
        outer_module: the learned outer parameters, e.g. `DataWeights` or
            `LoraRegularization`; its `forward(per_example_loss, batch, inner_params)`
            is the inner objective. `None` for a plain mean loss.
        outer_param_patterns: regular expressions; model parameters whose names match are
            outer parameters (e.g. `[r"lora_"]` to learn a LoRA adapter as hyperparameters),
            frozen for the inner optimizer.
        dataset_name, dataset_split: recorded in the saved outer parameters' metadata.
        **kwargs: everything else `Trainer` takes (data_collator, processing_class,
            callbacks, compute_metrics, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        args: BilevelTrainingArguments,
        train_dataset=None,
        eval_dataset=None,
        outer_module: OuterModule | None = None,
        outer_param_patterns: Sequence[str] | None = None,
        dataset_name: str | None = None,
        dataset_split: str | None = "train",
        **kwargs: Any,
    ) -> None:
        self._check_inputs(model, args, train_dataset, eval_dataset, outer_module, outer_param_patterns)
        self.outer_module = outer_module
        self.id_column = getattr(outer_module, "id_column", None)
        self.dataset_name = dataset_name
        self.dataset_split = dataset_split
        self.outer_model_param_names = self._select_outer_model_params(model, outer_param_patterns or ())
        if outer_module is None and not self.outer_model_param_names:
            raise ValueError(
                "No outer parameters: pass `outer_module` (e.g. DataWeights, LoraRegularization) and/or "
                "`outer_param_patterns` matching some model parameters."
            )
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs)
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean
        if self.is_fsdp_enabled and self.outer_model_param_names:
            raise ValueError("`outer_param_patterns` (model tensors as outer parameters) is not supported with FSDP: "
                             "the shards are inner parameters of the sharded model. Use DDP, or an outer module.")
        if outer_module is not None:
            outer_module.to(self.args.device)
        self.inner_param_names = [n for n, p in self._unwrapped.named_parameters() if p.requires_grad]
        if not self.inner_param_names:
            raise ValueError("The model has no trainable (inner) parameters left: nothing to fine-tune.")
        self._check_rank()
        self._check_data_weights()
        self.outer_optimizer = self._create_outer_optimizer()
        self.hvp_mode: str | None = None if args.hvp_mode == "auto" else args.hvp_mode
        self._hvp_mode_checked = False
        self.outer_step = 0
        self.skipped_outer_steps = 0
        self._causal_lm = self._is_causal_lm(self._unwrapped)
        self.add_callback(_OuterStepCallback(self))

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_inputs(model, args, train_dataset, eval_dataset, outer_module, patterns) -> None:
        if not isinstance(args, BilevelTrainingArguments):
            raise TypeError("`args` must be a BilevelTrainingArguments (it carries the outer problem's settings).")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: it defines the inner problem.")
        if eval_dataset is None:
            raise ValueError("`eval_dataset` is required: it is the validation set of the outer objective.")
        if isinstance(eval_dataset, Mapping):
            raise ValueError("`eval_dataset` must be a single dataset (the outer validation set), not a dict.")
        if len(eval_dataset) == 0:
            raise ValueError("`eval_dataset` is empty.")
        if len(train_dataset) == 0:
            raise ValueError("`train_dataset` is empty.")
        if outer_module is not None:
            if not isinstance(outer_module, nn.Module):
                raise TypeError(f"`outer_module` must be an nn.Module (an OuterModule), got {type(outer_module).__name__}.")
            if not any(True for _ in outer_module.parameters()):
                raise ValueError("`outer_module` has no parameters: there is nothing to learn.")
            id_column = getattr(outer_module, "id_column", None)
            if id_column is not None and id_column not in train_dataset.column_names:
                raise ValueError(
                    f"`train_dataset` has no column {id_column!r} holding example ids, which "
                    f"{type(outer_module).__name__} needs. Add it with "
                    f"`hf_integration.add_example_ids(dataset, column={id_column!r})` before shuffling or filtering."
                )
        for pattern in patterns or ():
            re.compile(pattern)

    @staticmethod
    def _select_outer_model_params(model: nn.Module, patterns: Sequence[str]) -> list[str]:
        if not patterns:
            return []
        compiled = [re.compile(p) for p in patterns]
        names = [n for n, p in model.named_parameters() if p.requires_grad and any(c.search(n) for c in compiled)]
        if not names:
            raise ValueError(f"`outer_param_patterns` {list(patterns)} match no trainable model parameter.")
        for name, param in model.named_parameters():
            if name in names:
                param.requires_grad_(False)  # outer: updated by the outer optimizer only
        return names

    def _check_rank(self) -> None:
        p = sum(p.numel() for p in self._inner_param_tree().values())
        if self.args.ihvp_method == "nystrom" and self.args.nystrom_rank > p:
            raise ValueError(f"`nystrom_rank` ({self.args.nystrom_rank}) exceeds the number of inner parameters ({p}).")
        if self.args.ihvp_method == "exact" and p > 20_000:
            raise ValueError(f"`ihvp_method='exact'` builds a dense {p}x{p} Hessian; use 'nystrom' or 'cg'.")

    def _check_data_weights(self) -> None:
        if self.id_column is None:
            return
        ids = self.train_dataset[self.id_column]
        num = getattr(self.outer_module, "num_examples", None)
        if num is not None and len(ids) and max(ids) >= num:
            raise ValueError(
                f"`train_dataset` has example id {max(ids)} in column {self.id_column!r} but the outer module "
                f"holds {num} weights: the weights and the dataset do not match (build DataWeights with "
                f"num_examples >= {max(ids) + 1})."
            )

    # ------------------------------------------------------------------ helpers
    @property
    def _unwrapped(self) -> nn.Module:
        accelerator = getattr(self, "accelerator", None)
        return accelerator.unwrap_model(self.model) if accelerator is not None else self.model

    @staticmethod
    def _is_causal_lm(model: nn.Module) -> bool:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return type(base).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())

    def _create_outer_optimizer(self) -> torch.optim.Optimizer:
        params = list(self._outer_param_tree().values())
        args = self.args
        if args.outer_optim == "sgd":
            return torch.optim.SGD(params, lr=args.outer_learning_rate, momentum=args.outer_momentum,
                                   weight_decay=args.outer_weight_decay)
        return torch.optim.Adam(params, lr=args.outer_learning_rate, weight_decay=args.outer_weight_decay)

    def _outer_param_tree(self) -> dict[str, Tensor]:
        """The live outer parameters by prefixed name: outer-module tensors and model tensors."""
        tree: dict[str, Tensor] = {}
        if self.outer_module is not None:
            tree.update({_MODULE_PREFIX + n: p for n, p in self.outer_module.named_parameters()})
        named = dict(self._unwrapped.named_parameters())
        tree.update({_MODEL_PREFIX + n: named[n] for n in self.outer_model_param_names})
        return tree

    def _inner_param_tree(self) -> dict[str, Tensor]:
        named = dict(self._unwrapped.named_parameters())
        return {n: named[n] for n in self.inner_param_names}

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.id_column is not None and self.id_column not in self._signature_columns:
            self._signature_columns.append(self.id_column)

    # ------------------------------------------------------------------ objectives
    def _objective(self, model: nn.Module, in_params: Mapping[str, Tensor] | None,
                   out_params: Mapping[str, Tensor], batch: Mapping[str, Any], weighted: bool):
        """Loss of ``batch`` (and the model outputs).

        ``in_params=None`` runs ``model`` (possibly DDP-wrapped) with its own parameters, as
        inner training steps do; otherwise the unwrapped model is called functionally with
        ``in_params`` and the model part of ``out_params``. ``weighted`` selects the inner
        objective (through the outer module) instead of the plain mean loss."""
        if "labels" not in batch:
            raise ValueError("The batch has no `labels`; the data collator must produce them.")
        inputs = {k: v for k, v in batch.items() if k not in ("labels", self.id_column)}
        model_outer = {k[len(_MODEL_PREFIX):]: v for k, v in out_params.items() if k.startswith(_MODEL_PREFIX)}
        if in_params is None:
            outputs = model(**inputs)
            inner_named = self._inner_param_tree()
        else:
            outputs = functional_call(model, {**in_params, **model_outer}, (), inputs, strict=False)
            inner_named = in_params
        losses = per_example_loss(outputs["logits"], batch["labels"], self._causal_lm)
        if weighted and self.outer_module is not None:
            module_params = {k[len(_MODULE_PREFIX):]: v for k, v in out_params.items() if k.startswith(_MODULE_PREFIX)}
            loss = functional_call(self.outer_module, module_params, (losses, batch, inner_named))
        else:
            loss = losses.mean()
        return loss, outputs

    def inner_forward(self, in_params: Mapping[str, Tensor], out_params: Mapping[str, Tensor],
                      batch: Mapping[str, Any]) -> Tensor:
        """Inner objective ``f(theta, phi)`` on a training batch, as a pure function."""
        return self._objective(self._unwrapped, in_params, out_params, batch, weighted=True)[0]

    def outer_forward(self, in_params: Mapping[str, Tensor], out_params: Mapping[str, Tensor],
                      batch: Mapping[str, Any]) -> Tensor:
        """Outer objective ``g(theta, phi)``: the mean validation loss, as a pure function."""
        return self._objective(self._unwrapped, in_params, out_params, batch, weighted=False)[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Inner objective during training (outer parameters held fixed); plain mean loss in
        evaluation, so `evaluate()` reports the outer objective."""
        out_params = {k: v.detach() for k, v in self._outer_param_tree().items()}
        loss, outputs = self._objective(model, None, out_params, inputs, weighted=model.training)
        return (loss, outputs) if return_outputs else loss

    def inner_update(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> Tensor:
        """One inner forward/backward (`Trainer.training_step`); `Trainer` steps the optimizer."""
        return super().training_step(model, inputs, num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        return self.inner_update(model, inputs, num_items_in_batch)

    # ------------------------------------------------------------------ outer problem
    def _sample_batch(self, dataset, batch_size: int, generator: torch.Generator, description: str) -> dict:
        """A random batch of ``dataset`` drawn with ``generator``: reproducible from the step."""
        cache = self.__dict__.setdefault("_prepared_datasets", {})
        if description not in cache:
            cache[description] = self._remove_unused_columns(dataset, description=description)
        prepared = cache[description]
        size = min(batch_size, len(prepared))
        indices = torch.randperm(len(prepared), generator=generator)[:size].tolist()
        collator = self._get_collator_with_removed_columns(self.data_collator, description)
        batch = collator([prepared[i] for i in indices])
        return self._prepare_inputs(batch)

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
        args = self.args
        if args.ihvp_method == "nystrom":
            return make_solver("nystrom", rank=args.nystrom_rank, rho=args.nystrom_rho, sketch=args.nystrom_sketch,
                               generator=generator)
        if args.ihvp_method == "cg":
            return make_solver("cg", num_iters=args.ihvp_iters)
        if args.ihvp_method == "neumann":
            return make_solver("neumann", num_iters=args.ihvp_iters, lr=args.neumann_lr)
        return make_solver("exact")

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

    def _batches(self, step: int) -> tuple[dict, dict, torch.Generator]:
        data_generator, sketch_generator = self._generators(step)
        args = self.args
        train_bs = args.hypergrad_train_batch_size or args.per_device_train_batch_size
        outer_bs = args.outer_batch_size or args.per_device_eval_batch_size
        train_batch = self._sample_batch(self.train_dataset, train_bs, data_generator, "training")
        eval_batch = self._sample_batch(self.eval_dataset, outer_bs, data_generator, "evaluation")
        return train_batch, eval_batch, sketch_generator

    def compute_hypergradient(self, train_batch: Mapping[str, Any], eval_batch: Mapping[str, Any],
                              generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The hypergradient at the current inner weights, keyed like the outer parameters
        (``"outer_module.<name>"`` / ``"model.<name>"``).

        Single process and DDP: :func:`hypergrad.approx_hypergrad.implicit_hypergrad` on the
        unwrapped model, with every product averaged over processes under DDP. FSDP:
        :func:`hypergrad.distributed.sharded_hypergrad`, finite-difference products taken in
        place on the shards. Every process returns the same hypergradient."""
        self.resolve_hvp_mode()
        solve = self._solver(generator if generator is not None else torch.Generator().manual_seed(self.args.seed))
        phi = {k: v.detach() for k, v in self._outer_param_tree().items()}
        with self._second_order_context():
            if self.is_fsdp_enabled:
                model = self.model_wrapped
                return sharded_hypergrad(
                    model,
                    lambda o: self._objective(model, None, o, train_batch, weighted=True)[0],
                    lambda o: self._objective(model, None, o, eval_batch, weighted=False)[0],
                    phi, solve)
            dist = DataParallel() if self.args.world_size > 1 else None
            return implicit_hypergrad(lambda i, o: self.inner_forward(i, o, train_batch),
                                      lambda i, o: self.outer_forward(i, o, eval_batch),
                                      self._theta(), phi, solve, self.hvp_mode, dist, self.args.hvp_chunk_size)

    def outer_update(self) -> dict[str, float]:
        """One outer step: hypergradient on fresh batches, outer optimizer step, metrics logged."""
        step = self.state.global_step
        train_batch, eval_batch, generator = self._batches(step)
        start = time.perf_counter()
        grads = self.compute_hypergradient(train_batch, eval_batch, generator)
        ihvp_time = time.perf_counter() - start
        with torch.no_grad(), self._second_order_context():
            model = self.model_wrapped if self.is_fsdp_enabled else self._unwrapped
            phi = {k: v.detach() for k, v in self._outer_param_tree().items()}
            inner_loss = float(self._objective(model, None, phi, train_batch, weighted=True)[0])
            outer_loss = float(self._objective(model, None, phi, eval_batch, weighted=False)[0])
        applied = accumulate_outer_grad(self._outer_param_tree(), grads)
        if applied:
            self.outer_optimizer.step()
            broadcast_tree(list(self._outer_param_tree().values()))  # replicas stay bitwise identical
        else:
            self.skipped_outer_steps += 1
            logger.warning("Non-finite hypergradient at step %d: outer step skipped (%d so far).",
                           step, self.skipped_outer_steps)
        self.outer_optimizer.zero_grad(set_to_none=True)
        self.outer_step += 1
        norm = float(tree_norm({k: g.double() for k, g in grads.items()})) if applied else math.nan
        metrics = {
            "outer/inner_loss": inner_loss,
            "outer/loss": outer_loss,
            "outer/hypergrad_norm": norm,
            "outer/ihvp_time": ihvp_time,
            "outer/step": float(self.outer_step),
            "outer/skipped_steps": float(self.skipped_outer_steps),
            # the HVP mode as a number, so every `report_to` backend can plot it (it is also
            # logged by name once, and saved in the outer parameters' metadata)
            "outer/finite_diff_hvp": float(self.hvp_mode == "finite_diff"),
        }
        if self.outer_module is not None and hasattr(self.outer_module, "summary_stats"):
            metrics.update({f"outer/{k}": float(v) for k, v in self.outer_module.summary_stats().items()})
        self.log(metrics)
        return metrics

    def resolve_hvp_mode(self) -> str:
        """Pick (``hvp_mode="auto"``) or check the Hessian-vector-product mode on one batch.

        An exact mode is kept only if it runs and agrees with an independent HVP (finite
        differences; for bf16/fp16 forward passes, the other exact mode) on a random
        direction; otherwise ``auto`` falls back to finite differences and an explicit mode
        raises, so a wrong hypergradient is never produced silently."""
        if self._hvp_mode_checked:
            return self.hvp_mode
        requested = self.args.hvp_mode
        if self.is_fsdp_enabled:
            if requested not in ("auto", "finite_diff"):
                raise ValueError(f"hvp_mode={requested!r} cannot run on FSDP-sharded parameters (they break jvp "
                                 f"and double backward); use hvp_mode='auto' or 'finite_diff'.")
            self.hvp_mode, self._hvp_mode_checked = "finite_diff", True
            logger.info("Hessian-vector products: hvp_mode=finite_diff (FSDP, requested %s).", requested)
            return self.hvp_mode
        candidates = ["fwd_rev", "rev_rev", "finite_diff"] if requested == "auto" else [requested]
        generator = torch.Generator().manual_seed(self.args.seed)
        batch = self._sample_batch(self.train_dataset, min(2, len(self.train_dataset)), generator, "training")
        theta = self._theta()
        phi = {k: v.detach() for k, v in self._outer_param_tree().items()}
        tangent = {k: torch.randn(v.shape, generator=generator).to(v) for k, v in theta.items()}
        products: dict[str, Any] = {}

        def product(mode: str):
            """The HVP in ``mode``, or the exception it raised (cached)."""
            if mode not in products:
                try:
                    products[mode] = hvp(lambda t: self.inner_forward(t, phi, batch), theta, tangent, mode)
                except Exception as err:  # a kernel without the needed derivative
                    products[mode] = err
            return products[mode]

        def reference(mode: str):
            """What an exact mode is checked against: finite differences in float32. Finite
            differences of bf16/fp16 forward passes are too noisy, so there the other exact
            mode (forward-over-reverse vs reverse-over-reverse, independent AD paths) is used
            when it runs."""
            if self._low_precision:
                other = product("rev_rev" if mode == "fwd_rev" else "fwd_rev")
                if not isinstance(other, Exception):
                    return other, 2e-2, "the other exact mode"
                return product("finite_diff"), 2e-1, "finite differences"
            return product("finite_diff"), 1e-2, "finite differences"

        with self._second_order_context():
            for mode in candidates:
                result = product(mode)
                if isinstance(result, Exception):
                    if requested != "auto":
                        raise ValueError(
                            f"hvp_mode={mode!r} cannot run on this model ({type(result).__name__}: {result}). "
                            f"Use hvp_mode='auto' or 'finite_diff'."
                        ) from result
                    logger.info("hvp_mode %s unavailable (%s); trying the next one.", mode, type(result).__name__)
                    continue
                if mode == "finite_diff":
                    break
                ref, tolerance, what = reference(mode)
                if isinstance(ref, Exception):
                    raise ref
                error = float(tree_norm({k: result[k] - ref[k] for k in result})) / max(float(tree_norm(ref)), 1e-30)
                if error < tolerance:
                    break
                if requested != "auto":
                    raise ValueError(f"hvp_mode={mode!r} disagrees with {what} on this model "
                                     f"(relative difference {error:.2e}); use hvp_mode='finite_diff'.")
                logger.warning("hvp_mode %s disagrees with %s (%.2e); trying the next one.", mode, what, error)
        self.hvp_mode = mode
        self._hvp_mode_checked = True
        logger.info("Hessian-vector products: hvp_mode=%s (requested %s).", mode, requested)
        return mode

    def train(self, *args: Any, **kwargs: Any):
        """`Trainer.train`, after checking the HVP mode so a model that cannot run it fails
        before any training step."""
        self.resolve_hvp_mode()
        return super().train(*args, **kwargs)

    # ------------------------------------------------------------------ persistence
    def outer_metadata(self) -> dict[str, str]:
        """Metadata saved with the outer parameters (all values are strings)."""
        args = self.args
        base = self._unwrapped
        config = getattr(base, "config", None)
        meta = {
            "method": args.ihvp_method,
            "rank": str(args.nystrom_rank) if args.ihvp_method == "nystrom" else "",
            "rho": str(args.nystrom_rho) if args.ihvp_method == "nystrom" else "",
            "sketch": args.nystrom_sketch if args.ihvp_method == "nystrom" else "",
            "iters": str(args.ihvp_iters) if args.ihvp_method in ("cg", "neumann") else "",
            "hvp_mode": str(self.hvp_mode or args.hvp_mode),
            "steps": str(self.state.global_step),
            "outer_steps": str(self.outer_step),
            "unroll_steps": str(args.unroll_steps),
            "outer_learning_rate": str(args.outer_learning_rate),
            "base_model": str(getattr(config, "_name_or_path", "") or ""),
        }
        if self.id_column is not None:
            meta.update(dataset_fingerprint_metadata(self.train_dataset, dataset_name=self.dataset_name,
                                                     split=self.dataset_split, id_column=self.id_column))
        return {k: v for k, v in meta.items() if v != ""}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.outer_module is not None and self.args.should_save:
            self.outer_module.save_pretrained(output_dir or self.args.output_dir, metadata=self.outer_metadata(),
                                              model_card=False)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_optimizer_state(self.outer_optimizer.state_dict(), os.path.join(output_dir, OUTER_OPTIMIZER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if self.outer_module is not None:
            saved = type(self.outer_module).from_pretrained(checkpoint)
            self.outer_module.load_state_dict(saved.state_dict())
        path = os.path.join(checkpoint, OUTER_OPTIMIZER_NAME)
        if os.path.exists(path):
            self.outer_optimizer.load_state_dict(load_optimizer_state(path))
        self.outer_step = sum(
            1 for i in range(self.state.global_step)
            if is_outer_step(i, self.args.unroll_steps, self.args.outer_patience_steps)
        )

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """`Trainer`'s card plus a section on the learned outer parameters."""
        super().create_model_card(*args, **kwargs)
        if not self.args.should_save or self.outer_module is None:
            return
        path = os.path.join(self.args.output_dir, "README.md")
        with open(path, encoding="utf-8") as handle:
            card = handle.read()
        section = outer_params_card_section(self.outer_module, self.outer_metadata())
        atomic_write_text(path, card.rstrip() + "\n\n" + section)
