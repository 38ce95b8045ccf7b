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
import functools
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import Trainer, TrainerCallback
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from hypergrad.approx_hypergrad import implicit_hypergrad
from hypergrad.methods import check_problem_size, get_method, options_from_arguments, options_metadata
from hypergrad.products import EXACT_MODES, probe_hvp_mode
from hypergrad.distributed import DataParallel, any_process, broadcast_tree, sharded_hypergrad
from hypergrad.solver import count_outer_steps, is_outer_step
from hypergrad.outer_step import NonFiniteError, OuterStepHistory, apply_outer_update, first_non_finite

from .arguments import BilevelTrainingArguments
from .losses import per_example_loss
from .data import dataset_fingerprint_metadata
from .checkpoints import CheckpointError, ResumeFinishedRun, checkpoint_problem, resolve_checkpoint
from .collators import KeepColumnsCollator
from .frozen_trunk import CachedTrunkCheckpoints
from .hub import error_line
from .model_card import (outer_params_card_section, render_model_card, render_model_tensors_card,
                         with_hub_base_model)
from .optimizer_state import load_optimizer_state, save_optimizer_state
from .serialization import (DATA_METADATA_KEYS, MODEL_CARD_NAME, OUTER_OPTIMIZER_NAME, OUTER_PARAMS_NAME,
                            atomic_write_text, hub_model_id, public_name)
from .outer_modules import DataWeights, ExampleWeighting, OuterModule
from .recipe import build_outer_module, prepare_training_rows, steps_per_epoch
from .weights_dataset import push_weights_dataset, render_weights_card, save_weights_dataset
from .weights_out import example_weights, weight_spread, weighted_dataset, weights_report

__all__ = ["BilevelTrainer", "OUTER_OPTIMIZER_NAME", "outer_batch_columns"]

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


def outer_batch_columns(module: OuterModule | None) -> list[str]:
    """The batch columns an outer module reads besides the model's inputs (:meth:`OuterModule.batch_columns`)."""
    return [] if module is None else list(module.batch_columns())


class NonFiniteGuard(TrainerCallback):
    """Skips inner optimizer steps whose loss or gradients hold NaN/inf, and stops training when they persist.

    Before each optimizer step (after gradient clipping) the gradients of the trainable parameters, and the
    losses passed to :meth:`note_loss` since the previous step, are checked, with one verdict for all
    processes. A non-finite value clears every gradient, so the optimizer leaves the parameters and its state
    as they were (the learning-rate schedule still advances). Training stops with :class:`NonFiniteError`,
    naming the step and the cause, after ``max_consecutive`` skipped steps in a row, when a run ends without
    a single applied step, or when an optimizer step makes a parameter non-finite (nothing can be rolled back
    then). With a gradient scaler (fp16) gradients are left to the scaler, which skips overflowing steps itself.

    `BilevelTrainer` installs one; pass one in ``callbacks`` to guard a plain `Trainer` too.
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        self.max_consecutive = max_consecutive
        self.skipped = 0  # over the whole run, resumes included (BilevelTrainer checkpoints it)
        self.consecutive = 0
        self._this_call = [0, 0]  # steps applied and skipped by the current train() call
        self._loss_problem: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._this_call = [0, 0]
        self.consecutive = 0
        return control

    def note_loss(self, loss: Tensor) -> None:
        """Remember a non-finite training loss until the next optimizer step."""
        if self._loss_problem is None and not bool(torch.isfinite(loss.detach()).all()):
            self._loss_problem = f"non-finite training loss ({float(loss.detach().float().sum())})"

    @staticmethod
    def _trainable(model: nn.Module) -> list[tuple[str, Tensor]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        params = self._trainable(model)
        problem, self._loss_problem = self._loss_problem, None
        if problem is None and getattr(optimizer, "scaler", None) is None:
            bad = first_non_finite((n, p.grad) for n, p in params if p.grad is not None)
            problem = None if bad is None else f"non-finite gradient of {bad}"
        if not any_process(problem is not None, args.device):
            self._this_call[0] += 1
            self.consecutive = 0
            return control
        problem = problem or "non-finite loss or gradient on another process"
        for _, p in params:
            p.grad = None
        self.skipped += 1
        self._this_call[1] += 1
        self.consecutive += 1
        step = state.global_step + 1
        logger.warning("Inner step %d skipped: %s; the parameters were not updated (%d skipped so far).",
                       step, problem, self.skipped)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"training stopped at inner step {step}: {self.consecutive} steps in a row had NaN/inf values "
                f"(last: {problem}); they were not applied. Lower --learning_rate, set --max_grad_norm, or check "
                "the data.")
        return control

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        bad = first_non_finite(self._trainable(model))
        if any_process(bad is not None, args.device):
            raise NonFiniteError(
                f"training stopped at inner step {state.global_step + 1}: the optimizer step made "
                f"{bad or 'a parameter on another process'} non-finite (--learning_rate {args.learning_rate:g} "
                "too high?); nothing was saved from it.")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        applied, skipped = self._this_call
        if skipped and not applied:
            raise NonFiniteError(f"no inner step could be applied: all {skipped} had NaN/inf values; "
                                 "the model is untrained. Check the data and --learning_rate.")
        return control


_AVERAGED_OUTER_METRICS = ("outer/loss", "outer/inner_loss", "outer/hypergrad_norm", "outer/ihvp_time",
                           "outer/weight_spread")


def _merged_outer_metrics(steps: list[dict[str, float]]) -> dict[str, float]:
    """The metrics of the outer steps since the last training log, as one log entry: the mean over the steps of
    their losses, norms, times and weight spreads (finite values only), the last step's counters and statistics."""
    merged: dict[str, float] = {}
    for key in dict.fromkeys(k for step in steps for k in step):
        values = [step[key] for step in steps if key in step and math.isfinite(step[key])]
        if values:
            merged[key] = sum(values) / len(values) if key in _AVERAGED_OUTER_METRICS else values[-1]
    return merged


_OUTER_KEY = "__outer__"  # the outer data among the evaluation sets while Trainer (and TRL) prepare them


def _with_outer_dataset(eval_dataset: Any, outer_dataset: Any) -> Any:
    """The evaluation sets with the outer data among them (as they are when there is no separate outer data)."""
    if outer_dataset is None:
        return eval_dataset
    evals = dict(eval_dataset) if isinstance(eval_dataset, Mapping) else (
        {} if eval_dataset is None else {"eval": eval_dataset})
    return {**evals, _OUTER_KEY: outer_dataset}


def _split_outer_dataset(prepared: Any, eval_dataset: Any, outer_dataset: Any) -> tuple[Any, Any]:
    """``(evaluation sets, outer data)`` from what :func:`_with_outer_dataset` gave `Trainer`: without separate outer
    data the evaluation set is the outer data; without evaluation sets, the outer data is evaluated."""
    if outer_dataset is None:
        return prepared, prepared
    prepared = dict(prepared)
    outer = prepared.pop(_OUTER_KEY)
    if eval_dataset is None:
        return outer, outer
    return (prepared if isinstance(eval_dataset, Mapping) else prepared["eval"]), outer


_COUNTERS_KEY = "bilevel_counters"  # extra entry of outer_optimizer.safetensors: applied/skipped step counts


class BilevelTrainer(CachedTrunkCheckpoints, ResumeFinishedRun, Trainer):
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
        outer_dataset=None,
        **kwargs: Any,
    ) -> None:
        outer = eval_dataset if outer_dataset is None else outer_dataset
        self._check_inputs(args, train_dataset, eval_dataset, outer_dataset, outer_module, outer_param_patterns)
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("`compute_loss_func` is not supported: BilevelTrainer needs each example's loss (for the "
                             "outer module and the hypergradient), which it computes from the logits itself "
                             "(hf_integration.losses.per_example_loss; label_smoothing_factor is honoured). Subclass "
                             "BilevelTrainer and override `_objective` for another loss.")
        options = dict(args.outer_module_options or {})
        # example ids where the outer module reads them, the outer rows as trusted rows with train_on_outer_data
        self.raw_train_dataset, train_dataset, self.trusted_column = prepare_training_rows(
            train_dataset, outer, module=outer_module, kind=args.outer_module, options=options,
            train_on_outer_data=args.train_on_outer_data)
        self.num_training_rows = len(train_dataset) - (len(outer) if self.trusted_column else 0)
        self.outer_module = outer_module
        self.outer_columns = outer_batch_columns(outer_module)  # kept through collation, never model inputs
        self.dataset_name = public_name(dataset_name) if dataset_name else dataset_name  # never a machine path
        self.dataset_split = dataset_split
        self.outer_model_param_names = self._select_outer_model_params(model, outer_param_patterns or ())
        if outer_module is None and args.outer_module is None and not self.outer_model_param_names:
            raise ValueError(
                "No outer parameters: pass `outer_module` (e.g. DataWeights, LoraRegularization), set "
                "`args.outer_module`, and/or pass `outer_param_patterns` matching some model parameters."
            )
        # the outer data travels with the evaluation sets through Trainer's (and TRL's) preparation
        super().__init__(model=model, args=args, train_dataset=train_dataset,
                         eval_dataset=_with_outer_dataset(eval_dataset, outer_dataset), **kwargs)
        for name in ("hf_integration", "hypergrad"):  # the library's log lines follow log_level, as Trainer's do
            logging.getLogger(name).setLevel(args.get_process_log_level())
        self.eval_dataset, self.outer_dataset = _split_outer_dataset(self.eval_dataset, eval_dataset, outer_dataset)
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean
        if self.is_fsdp_enabled and self.outer_model_param_names:
            raise ValueError("`outer_param_patterns` (model tensors as outer parameters) is not supported with FSDP: "
                             "the shards are inner parameters of the sharded model. Use DDP, or an outer module.")
        if outer_module is None and args.outer_module is not None:  # built now: the model is wrapped (PEFT)
            outer_module = self.outer_module = build_outer_module(
                args.outer_module, options, model=self._unwrapped, train_dataset=train_dataset,
                trusted_column=self.trusted_column)
            self.outer_columns = outer_batch_columns(outer_module)
        self._check_outer_columns()
        if isinstance(self.data_collator, KeepColumnsCollator):  # e.g. a ResponseCollator: it keeps what we read too
            self.data_collator.columns = tuple(dict.fromkeys((*self.data_collator.columns, *self.outer_columns)))
        self.id_column = outer_module.id_column if outer_module is not None else None
        if outer_module is not None:
            outer_module.to(self.args.device)
        if args.outer_patience_epochs is not None and args.outer_patience_steps == 0:
            args.outer_patience_steps = int(round(args.outer_patience_epochs
                                                  * steps_per_epoch(args, self.num_training_rows)))
        self.inner_param_names = [n for n, p in self._unwrapped.named_parameters() if p.requires_grad]
        if not self.inner_param_names:
            raise ValueError("The model has no trainable (inner) parameters left: nothing to fine-tune.")
        if outer_module is not None and outer_module.stops_gradients and args.hvp_mode == "finite_diff" and not self.is_fsdp_enabled:
            raise ValueError(f"hvp_mode='finite_diff' cannot differentiate the objective of {type(outer_module).__name__}: "
                             "it holds a stop-gradient, which finite differences of gradients differentiate too. Use "
                             "hvp_mode='auto', 'rev_rev' or 'fwd_rev'.")
        self.ihvp_options = options_from_arguments(args.ihvp_method, args)
        check_problem_size(args.ihvp_method, self.ihvp_options, sum(p.numel() for p in self._inner_param_tree().values()),
                           argument_names=True)
        if self.is_fsdp_enabled and not get_method(args.ihvp_method).shardable:
            raise ValueError(f"ihvp_method={args.ihvp_method!r} cannot run on FSDP-sharded parameters; "
                             f"use 'nystrom', 'cg', 'neumann' or 'identity'.")
        self.ihvp_solver = get_method(args.ihvp_method).build(self.ihvp_options)
        self._check_data_weights()
        self.outer_optimizer = self._create_outer_optimizer()
        self.hvp_mode: str | None = None if args.hvp_mode == "auto" else args.hvp_mode
        self._hvp_mode_checked = False
        self._recorded_hvp_mode: str | None = None  # the mode of the checkpoint resumed from (hvp_mode="auto")
        self.outer_step = 0
        self._weight_spread: float | None = None  # std/mean of the last checked training batch's weights
        self._causal_lm = self._is_causal_lm(self._unwrapped)
        self.add_callback(_OuterStepCallback(self))

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_inputs(args, train_dataset, eval_dataset, outer_dataset, outer_module, patterns) -> None:
        if not isinstance(args, BilevelTrainingArguments):
            raise TypeError("`args` must be a BilevelTrainingArguments (it carries the outer problem's settings).")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: it defines the inner problem.")
        if outer_dataset is None:
            if eval_dataset is None:
                raise ValueError("`eval_dataset` (or `outer_dataset`) is required: the outer objective's data.")
            if isinstance(eval_dataset, Mapping):
                raise ValueError("`eval_dataset` is a dict of evaluation sets: pass the outer objective's data as "
                                 "`outer_dataset`.")
        outer = eval_dataset if outer_dataset is None else outer_dataset
        name = "eval_dataset" if outer_dataset is None else "outer_dataset"
        for label, data in (("train_dataset", train_dataset), (name, outer)):
            if isinstance(data, torch.utils.data.IterableDataset) or not (hasattr(data, "__getitem__")
                                                                           and hasattr(data, "__len__")):
                raise TypeError(f"`{label}` must be a map-style dataset (a datasets.Dataset, or a torch Dataset with "
                                f"__len__ and __getitem__), got {type(data).__name__}: the outer problem draws random "
                                "batches by index. Load it without streaming=True.")
        if len(outer) == 0:
            raise ValueError(f"`{name}` is empty.")
        if len(train_dataset) == 0:
            raise ValueError("`train_dataset` is empty.")
        if outer_module is not None:
            if args.outer_module is not None:
                raise ValueError(f"pass `outer_module` or set `args.outer_module` ({args.outer_module!r}), not both.")
            if not isinstance(outer_module, OuterModule):
                raise TypeError(f"`outer_module` must be an OuterModule (hf_integration.outer_modules: the contract the "
                                f"trainer asks it through), got {type(outer_module).__name__}.")
            if not any(True for _ in outer_module.parameters()):
                raise ValueError("`outer_module` has no parameters: there is nothing to learn.")
        for pattern in patterns or ():
            re.compile(pattern)

    def _check_outer_columns(self) -> None:
        """Every column the outer module reads is a column of the training data."""
        names = getattr(self.train_dataset, "column_names", None)  # None for a dataset of unknown features
        id_column = self.outer_module.id_column if self.outer_module is not None else None
        for column in self.outer_columns:
            if names is None or column in names:
                continue
            if column == id_column:
                raise ValueError(
                    f"`train_dataset` has no column {id_column!r} holding example ids, which "
                    f"{type(self.outer_module).__name__} needs. Add it with `hf_integration.add_example_ids("
                    f"dataset, column={id_column!r})` before shuffling or filtering."
                )
            raise ValueError(f"`train_dataset` has no column {column!r}, which {type(self.outer_module).__name__} "
                             "reads from every training batch.")

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

    def _check_data_weights(self) -> None:
        if self.id_column is None or not isinstance(self.train_dataset, datasets.Dataset):
            return  # another dataset's ids are checked batch by batch
        ids = self.train_dataset[self.id_column]
        for part in self.outer_module.modules():
            if not isinstance(part, DataWeights):
                continue
            values, first, counts = np.unique(np.asarray(self.train_dataset[part.id_column]), return_index=True,
                                              return_counts=True)
            shared = np.flatnonzero(counts > 1)
            if shared.size:
                i = shared[0]
                raise ValueError(
                    f"`train_dataset` column {part.id_column!r} gives {int((counts[shared] - 1).sum())} row(s) the "
                    f"id of another row (id {values[i]} is shared by {counts[i]} rows, the first at row {first[i]}): "
                    "per-example weights need one id per example. Add them with "
                    "`hf_integration.add_example_ids(dataset)` before shuffling, filtering or concatenating.")
        num = self.outer_module.num_examples if isinstance(self.outer_module, DataWeights) else None
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
        for column in self.outer_columns:
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    # ------------------------------------------------------------------ objectives
    def _objective(self, model: nn.Module, in_params: Mapping[str, Tensor] | None,
                   out_params: Mapping[str, Tensor], batch: Mapping[str, Any], weighted: bool):
        """Loss of ``batch`` (and the model outputs).

        ``in_params=None`` runs ``model`` (possibly DDP-wrapped) with its own parameters, as
        inner training steps do; otherwise the unwrapped model is called functionally with
        ``in_params`` and the model part of ``out_params``. ``weighted`` selects the inner
        objective (through the outer module) instead of the plain mean loss."""
        self._check_batch_columns(batch, weighted)
        inputs = {k: v for k, v in batch.items() if k != "labels" and k not in self.outer_columns}
        if self._causal_lm:
            inputs.setdefault("use_cache", False)  # no key/value cache in training or in the products
        model_outer = {k[len(_MODEL_PREFIX):]: v for k, v in out_params.items() if k.startswith(_MODEL_PREFIX)}
        if in_params is None:
            outputs = model(**inputs)
            inner_named = self._inner_param_tree()
        else:
            outputs = functional_call(model, {**in_params, **model_outer}, (), inputs, strict=False)
            inner_named = in_params
        # the inner objective (training steps, and the hypergradient's inner problem) is what training minimizes,
        # label smoothing included; the outer objective and evaluation are the plain loss
        smoothing = self.args.label_smoothing_factor if weighted else 0.0
        losses = per_example_loss(outputs["logits"], batch["labels"], self._causal_lm, label_smoothing=smoothing)
        if weighted and self.outer_module is not None:
            module_params = {k[len(_MODULE_PREFIX):]: v for k, v in out_params.items() if k.startswith(_MODULE_PREFIX)}
            loss = functional_call(self.outer_module, module_params, (losses, batch, inner_named))
        else:
            loss = losses.mean()
        return loss, outputs

    def _check_batch_columns(self, batch: Mapping[str, Any], weighted: bool) -> None:
        if "labels" not in batch:
            raise ValueError("The batch has no `labels`; the data collator must produce them.")
        missing = [c for c in self.outer_columns if c not in batch] if weighted else []
        if not missing:
            return
        column = missing[0]
        if column in (getattr(self.train_dataset, "column_names", None) or (column,)):
            cause = ("the training dataset has it, so the data collator dropped it (TRL's and most collators keep "
                     "only model inputs; BilevelSFTTrainer puts it back for TRL's own, a collator you pass must keep "
                     "it) or `remove_unused_columns` removed it")
        else:
            cause = ("the prepared training dataset has no such column: its preparation dropped it (TRL's packing "
                     "keeps only input_ids and labels; so does a `map` with `remove_columns`)")
        raise ValueError(
            f"The training batch has no {column!r} column, which {type(self.outer_module).__name__} needs: {cause}. "
            "Use a collator that keeps it (e.g. `DataCollatorForSeq2Seq`/`DataCollatorWithPadding`) or set "
            "`remove_unused_columns=False`.")

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
        if self.outer_module is not None:
            self.outer_module.set_inner_step(self.state.global_step)  # schedules, e.g. LossWeights' warm-up
        loss = self.inner_update(model, inputs, num_items_in_batch)
        self.nonfinite_guard.note_loss(loss)
        return loss

    # ------------------------------------------------------------------ safeguards
    @property
    def nonfinite_guard(self) -> NonFiniteGuard:
        """The callback that skips inner steps with NaN/inf values and stops persistent ones (installed on
        first use); ``nonfinite_guard.skipped`` counts the skipped inner steps."""
        guard = self.__dict__.get("_nonfinite_guard")
        if guard is None:
            guard = self.__dict__["_nonfinite_guard"] = NonFiniteGuard()
            self.add_callback(guard)
        return guard

    @property
    def outer_history(self) -> OuterStepHistory:
        """Applied and skipped outer steps, why they were skipped, and recent hypergradient norms
        (see :func:`hypergrad.outer_step.apply_outer_update`); saved in checkpoints."""
        return self.__dict__.setdefault("_outer_history", OuterStepHistory())

    @property
    def skipped_outer_steps(self) -> int:
        """Outer steps skipped or rolled back so far, resumes included (from :attr:`outer_history`)."""
        return self.outer_history.skipped

    def _outer_step_problem(self, batch: Mapping[str, Any]) -> str | None:
        """``validate`` of :func:`~hypergrad.outer_step.apply_outer_update`: after an outer step, a reason to
        roll it back when the inner objective on ``batch`` is no longer finite (e.g. an L2 strength or a
        weight normalization that overflowed). One verdict for all processes."""
        with torch.no_grad(), self._second_order_context():
            model = self.model_wrapped if self.is_fsdp_enabled else self._unwrapped
            phi = {k: v.detach() for k, v in self._outer_param_tree().items()}
            loss, outputs = self._objective(model, None, phi, batch, weighted=True)
            self._weight_spread = self._batch_weight_spread(outputs, batch)
        self._checked_inner_loss = float(loss)
        if any_process(not bool(torch.isfinite(loss)), self.args.device):
            return f"non-finite inner objective: {float(loss)} with the new outer parameters"
        return None

    def _batch_weight_spread(self, outputs: Any, batch: Mapping[str, Any]) -> float | None:
        """std/mean of the outer module's weights of the batch's training rows (trusted rows aside), from the model
        outputs at hand (no extra forward pass); ``None`` for a module that weights no examples."""
        if not isinstance(self.outer_module, ExampleWeighting):
            return None
        losses = per_example_loss(outputs["logits"], batch["labels"], self._causal_lm)
        weights = self.outer_module.example_weights(losses, batch)
        if self.trusted_column in batch:
            weights = weights[~torch.as_tensor(batch[self.trusted_column], device=weights.device).bool()]
        return weight_spread(weights)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """`Trainer.log` without NaN/inf values (e.g. the gradient norm of a skipped step), which would
        otherwise reach ``trainer_state.json`` and every ``report_to`` backend; skipped steps are counted. The outer
        steps' metrics since the last training log join it (as TRL merges its metrics): they follow
        ``logging_steps`` and ``logging_strategy`` like the training loss."""
        if "loss" in logs:
            logs = {**logs, **_merged_outer_metrics(self.__dict__.pop("_outer_logs", []))}
            if self.nonfinite_guard.skipped:
                logs["inner/skipped_steps"] = float(self.nonfinite_guard.skipped)
        logs = {k: v for k, v in logs.items() if not (isinstance(v, float) and not math.isfinite(v))}
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ outer problem
    def _sample_batch(self, dataset, batch_size: int, generator: torch.Generator, description: str) -> dict:
        """A random batch of ``dataset`` drawn with ``generator``: reproducible from the step."""
        cache = self.__dict__.setdefault("_prepared_datasets", {})
        if description not in cache:
            cache[description] = (self._remove_unused_columns(dataset, description=description)
                                  if isinstance(dataset, datasets.Dataset) else dataset)
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

    def _batches(self, step: int) -> tuple[dict, dict, torch.Generator]:
        data_generator, sketch_generator = self._generators(step)
        args = self.args
        train_bs = args.hypergrad_train_batch_size or args.per_device_train_batch_size
        outer_bs = args.outer_batch_size or args.per_device_eval_batch_size
        train_batch = self._sample_batch(self.train_dataset, train_bs, data_generator, "training")
        eval_batch = self._sample_batch(self.outer_dataset, outer_bs, data_generator, "evaluation")
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
        self._check_batch_columns(train_batch, weighted=True)
        self._check_batch_columns(eval_batch, weighted=False)
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
            data_parallel = DataParallel() if self.args.world_size > 1 else None
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
        step = self.state.global_step
        train_batch, eval_batch, generator = self._batches(step)
        start = time.perf_counter()
        grads = self.compute_hypergradient(train_batch, eval_batch, generator)
        ihvp_time = time.perf_counter() - start
        outer_loss = self.__dict__.pop("_last_outer_loss", None)
        if outer_loss is None:  # the sharded path does not report it
            with torch.no_grad(), self._second_order_context():
                model = self.model_wrapped if self.is_fsdp_enabled else self._unwrapped
                phi = {k: v.detach() for k, v in self._outer_param_tree().items()}
                outer_loss = float(self._objective(model, None, phi, eval_batch, weighted=False)[0])
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
        """The Hessian-vector-product mode. ``hvp_mode="auto"`` runs :func:`hypergrad.products.probe_hvp_mode`
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
        if self.is_fsdp_enabled and exact_only and self.args.ihvp_method != "identity":
            raise ValueError(f"{type(self.outer_module).__name__} needs exact Hessian-vector products, which FSDP-sharded "
                             "parameters cannot run; use ihvp_method='identity' (no products) under FSDP.")
        if self.is_fsdp_enabled:
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

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """`Trainer.train`, after checking the checkpoint to resume from and the HVP mode, so that
        either problem fails before any training step.

        ``resume_from_checkpoint=True`` takes the last *complete* checkpoint of ``output_dir``
        (:func:`~hf_integration.hub.last_checkpoint` skips folders of an interrupted save); a path
        must be a complete checkpoint (:func:`~hf_integration.hub.checkpoint_problem`); otherwise
        :class:`~hf_integration.hub.CheckpointError`. Installs the :class:`NonFiniteGuard`."""
        resume_from_checkpoint = self._checkpoint_to_resume(resume_from_checkpoint)
        if resume_from_checkpoint is not None and not self._hvp_mode_checked:
            self._recorded_hvp_mode = self._checkpoint_hvp_mode(resume_from_checkpoint)
        self.resolve_hvp_mode()
        self.nonfinite_guard  # noqa: B018 (installs the callback)
        settings = self.args
        total = settings.max_steps if settings.max_steps > 0 else math.ceil(
            settings.num_train_epochs * steps_per_epoch(settings, len(self.train_dataset)))
        if count_outer_steps(total, settings.unroll_steps, settings.outer_patience_steps) == 0:
            logger.warning("No outer step is scheduled: %d inner steps, and the first outer step follows inner step "
                           "max(outer_patience_steps=%d, unroll_steps=%d) + 1. The outer parameters will keep their "
                           "initial values: train longer, or lower those two.", total, settings.outer_patience_steps,
                           settings.unroll_steps)
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        for line in weights_report(self.outer_module, self._weight_spread):
            logger.warning("After training, %s", line)
        return output

    def example_weights(self, dataset: Any = None) -> np.ndarray:
        """The learned weight of every row of ``dataset`` (default: the training rows; the trusted outer rows of
        ``train_on_outer_data`` aside), in the rows' order, as the inner loss uses them (``w_i`` of ``sum_i w_i l_i /
        sum_i w_i``): free weights by example id, loss-based ones at each example's loss under the trained model.
        ``dataset`` must be prepared like the training data (tokenized, with the columns the outer module reads).
        See :func:`hf_integration.weights_out.example_weights`."""
        return example_weights(self, dataset)

    def weighted_dataset(self, column: str = "weight") -> datasets.Dataset:
        """The training rows as given to the trainer, with a ``column`` of their learned weights."""
        return weighted_dataset(self, column=column)

    def save_weights_dataset(self, folder: str, **card: Any) -> datasets.Dataset:
        """Write :meth:`weighted_dataset` to ``folder`` (``datasets.load_from_disk``) with a dataset card; returns it.
        ``card``: extra arguments of :func:`~hf_integration.weights_dataset.render_weights_card` (``figures``, ...)."""
        table = self.weighted_dataset()
        save_weights_dataset(table, folder, self._weights_card(table, folder, **card))
        return table

    def push_weights_dataset(self, repo_id: str, *, token: str | bool | None = None, private: bool | None = None,
                             **card: Any) -> str:
        """Publish :meth:`weighted_dataset` as the Hub dataset ``repo_id`` with its card; returns the commit URL."""
        table = self.weighted_dataset()
        return push_weights_dataset(table, repo_id, card=self._weights_card(table, repo_id, **card), token=token,
                                    private=private)

    def _weights_card(self, table: datasets.Dataset, repo_id: str, **card: Any) -> str:
        """The weighted training set's card: what the weights are (the outer module's own text), how they were learned
        (this run's metadata), the task inferred from the model (text generation for a causal LM, else text
        classification)."""
        metadata = self.outer_metadata()
        how = {key: metadata[key] for key in ("base_model", "dataset_name", "method", "hvp_mode", "steps", "outer_steps",
                                              "unroll_steps", "outer_learning_rate") if key in metadata}
        card.setdefault("how", {"weighting": type(self.outer_module).__name__, **how})
        card.setdefault("task", "text-generation" if self._causal_lm else "text-classification")
        return render_weights_card(table, repo_id=repo_id,
                                   description=self.outer_module.card_text().description.rstrip("."), **card)

    @staticmethod
    def _checkpoint_hvp_mode(checkpoint: str) -> str | None:
        """The HVP mode the run that wrote ``checkpoint`` used (``None`` for a checkpoint that did not record it)."""
        path = os.path.join(checkpoint, OUTER_OPTIMIZER_NAME)
        try:
            mode = load_optimizer_state(path).get(_COUNTERS_KEY, {}).get("hvp_mode")
        except (OSError, ValueError, KeyError, RecursionError) as err:
            raise CheckpointError(f"cannot resume from {checkpoint!r}: {error_line(err)}") from err
        if mode is not None and mode not in EXACT_MODES + ("finite_diff",):
            raise CheckpointError(f"cannot resume from {checkpoint!r}: {OUTER_OPTIMIZER_NAME} records an unknown "
                                  f"hvp_mode {mode!r:.60}; the file is corrupt")
        return mode

    def _checkpoint_files(self) -> tuple[str, ...]:
        """The outer files a checkpoint of this trainer must hold."""
        return (OUTER_OPTIMIZER_NAME,) + ((OUTER_PARAMS_NAME,) if self.outer_module is not None else ())

    def _checkpoint_to_resume(self, checkpoint: str | bool | None) -> str | None:
        return resolve_checkpoint(checkpoint, self.args.output_dir, outer_files=self._checkpoint_files())

    # ------------------------------------------------------------------ persistence
    def outer_metadata(self) -> dict[str, str]:
        """Metadata saved with the outer parameters (all values are strings)."""
        args = self.args
        base = self._unwrapped
        config = getattr(base, "config", None)
        meta = {
            **options_metadata(args.ihvp_method, self.ihvp_options),
            "hvp_mode": str(self.hvp_mode or args.hvp_mode),
            "steps": str(self.state.global_step),
            "outer_steps": str(self.outer_step),
            "unroll_steps": str(args.unroll_steps),
            "outer_learning_rate": str(args.outer_learning_rate),
            "base_model": hub_model_id(getattr(config, "_name_or_path", None)) or "",  # never a local path
        }
        if getattr(self, "_best_step", None) is not None:  # load_best_model_at_end: these are that step's
            meta["best_step"] = str(self._best_step)
        if isinstance(self.train_dataset, datasets.Dataset):  # what the outer parameters were learned on
            meta.update(dataset_fingerprint_metadata(self.train_dataset, dataset_name=self.dataset_name,
                                                     split=self.dataset_split, id_column=self.id_column))
        return {k: v for k, v in meta.items() if v != ""}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        inner = self._wrapped()
        if inner is not None:  # a cached trunk saves as the model it wraps (its card, too: a PEFT adapter)
            wrapper, self.model = self.model, inner
            try:
                return self._save(output_dir, None)
            finally:
                self.model = wrapper
        named = state_dict if state_dict is not None else dict(self._unwrapped.named_parameters())
        bad = first_non_finite(named) or first_non_finite(self._outer_param_tree())
        if bad is not None:
            raise NonFiniteError(f"refusing to save to {output_dir or self.args.output_dir!r}: {bad} holds NaN/inf "
                                 "values")
        super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        metadata = self.outer_metadata()
        if self.outer_module is not None:
            self.outer_module.save_pretrained(output_dir, metadata=metadata, model_card=False)
        self._write_card(output_dir, metadata)

    def _write_card(self, output_dir: str, metadata: dict[str, str]) -> None:
        """Replace the README.md that the model's ``save_pretrained`` left (PEFT's empty template, whose
        ``base_model`` is the local path of a model loaded from a folder) by our card."""
        path = os.path.join(output_dir, MODEL_CARD_NAME)
        adapter = hasattr(self._unwrapped, "peft_config")
        note = ("The fine-tuned model is saved in the same folder"
                + (" as a PEFT adapter: `peft.AutoPeftModel.from_pretrained(folder)`" if adapter else
                   ": `transformers.AutoModel.from_pretrained(folder)`")
                + " loads it (with the base model named above).")
        if self.outer_module is not None:
            card = render_model_card(self.outer_module, metadata=metadata,
                                     repo_id=self.args.hub_model_id or "path/or/repo_id",
                                     model_note=f"## The fine-tuned model\n\n{note}")
        else:  # outer parameters are model tensors, saved with the model
            card = render_model_tensors_card(metadata, self.outer_model_param_names,
                                             model_note=f"## Loading\n\n{note}")
        atomic_write_text(path, card)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            counters = {"outer_history": self.outer_history.state_dict(),
                        "skipped_inner_steps": self.nonfinite_guard.skipped,
                        "hvp_mode": self.hvp_mode}
            if hasattr(self.ihvp_solver, "state_dict") and not self.is_fsdp_enabled:
                # a reused Nyström factor and its refresh count (the same on every data-parallel process;
                # under FSDP each process holds its own shards, so a resumed run sketches anew)
                counters["ihvp_solver"] = self.ihvp_solver.state_dict()
            save_optimizer_state({**self.outer_optimizer.state_dict(), _COUNTERS_KEY: counters},
                                 os.path.join(output_dir, OUTER_OPTIMIZER_NAME))

    def _load_best_model(self) -> None:
        """`Trainer`'s (the best checkpoint's model weights), then that checkpoint's outer parameters, so that a
        save after ``load_best_model_at_end`` holds a model and the outer parameters it was trained with."""
        super()._load_best_model()
        best = self.state.best_model_checkpoint
        if self.outer_module is None or best is None:
            return
        try:
            saved = type(self.outer_module).from_pretrained(best)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"load_best_model_at_end: cannot read the outer parameters of {best!r}: "
                                  f"{error_line(err)}") from err
        self.outer_module.load_state_dict(saved.state_dict())
        self._best_step = int(saved.metadata.get("steps", -1))
        logger.info("Loaded the outer parameters of the best checkpoint %s.", best)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """`Trainer`'s, except that a checkpoint without this process's random-number states is refused (`Trainer`
        logs and goes on with fresh states: a run that no longer continues the interrupted one)."""
        if checkpoint is not None:
            name = f"rng_state_{self.args.process_index}.pth" if self.args.world_size > 1 else "rng_state.pth"
            if not os.path.isfile(os.path.join(checkpoint, name)):
                present = sorted(f for f in os.listdir(checkpoint) if f.startswith("rng_state"))
                raise CheckpointError(
                    f"cannot resume from {checkpoint!r}: it has no {name} for {self.args.world_size} process(es) "
                    f"(it holds {present}); resume with as many processes as the run that saved it")
        super()._load_rng_state(checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """`Trainer`'s states, then the outer ones. Refused with a :class:`CheckpointError` naming the file:
        an incomplete checkpoint (no ``outer_optimizer.safetensors``, ...), unreadable files, NaN/inf values,
        and outer parameters learned on other data (fingerprint, sizes) or for another layout."""
        if checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        problem = checkpoint_problem(checkpoint, outer_files=self._checkpoint_files())
        if problem is not None:
            raise CheckpointError(f"cannot resume: {problem}")
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except Exception as err:
            raise CheckpointError(f"cannot resume from {checkpoint!r}: loading Trainer's optimizer/scheduler state "
                                  f"(optimizer.pt, scheduler.pt) failed: {error_line(err)}") from err
        try:
            if self.outer_module is not None:
                meta = self.outer_metadata()
                expected = {k: meta[k] for k in DATA_METADATA_KEYS if k in meta}
                expected.update({k: v for k, v in self.outer_module.config_dict().items() if not k.startswith("init")})
                saved = type(self.outer_module).from_pretrained(checkpoint, expected=expected)
                self.outer_module.load_state_dict(saved.state_dict())
            state = load_optimizer_state(os.path.join(checkpoint, OUTER_OPTIMIZER_NAME))
            counters = state.pop(_COUNTERS_KEY, {})
            self.outer_optimizer.load_state_dict(state)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"cannot resume from {checkpoint!r}: {err}") from err
        self.outer_history.load_state_dict(counters.get("outer_history", {}))
        if "ihvp_solver" in counters and hasattr(self.ihvp_solver, "load_state_dict"):
            self.ihvp_solver.load_state_dict(counters["ihvp_solver"], like=self._theta())
        elif hasattr(self.ihvp_solver, "calls"):  # no saved factor (FSDP): sketch at the next outer step
            self.ihvp_solver.factor, self.ihvp_solver.calls = None, 0
        self.nonfinite_guard.skipped = int(counters.get("skipped_inner_steps", 0))
        self.outer_step = count_outer_steps(self.state.global_step, self.args.unroll_steps,
                                            self.args.outer_patience_steps)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """`Trainer`'s card (``base_model`` a Hub id, never a local path) plus a section on the outer parameters."""
        super().create_model_card(*args, **kwargs)
        path = os.path.join(self.args.output_dir, MODEL_CARD_NAME)
        if not self.args.should_save or not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as handle:
            card = with_hub_base_model(handle.read())
        if self.outer_module is not None:
            card = card.rstrip() + "\n\n" + outer_params_card_section(self.outer_module, self.outer_metadata())
        atomic_write_text(path, card)
