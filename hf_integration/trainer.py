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

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import datasets
import numpy as np
from torch import Tensor, nn
from torch.func import functional_call
from transformers import Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging

from hypergrad.methods import METHODS, check_problem_size, get_method, options_from_arguments
from hypergrad.outer_step import OuterStepHistory
from hypergrad.solver import count_outer_steps

from .arguments import BilevelTrainingArguments
from .checkpoints import ResumeFinishedRun
from .collators import KeepColumnsCollator
from .frozen_trunk import CachedTrunkCheckpoints
from .inner_batch_outer import InnerBatchOuterStepMixin
from .losses import per_example_loss
from .outer_modules import OuterModule
from .outer_update import _MODEL_PREFIX, _MODULE_PREFIX, OuterUpdateMixin
from .public_names import public_name
from .recipe import build_outer_module, prepare_training_rows, resolve_outer_patience, total_inner_steps
from .serialization import OUTER_OPTIMIZER_NAME
from .sharding import ShardedModelTrainerMixin
from .trainer_checks import InputChecksMixin
from .trainer_persistence import OuterPersistenceMixin
from .training_callbacks import NonFiniteGuard, _merged_outer_metrics, _OuterStepCallback
from .weights_dataset import push_weights_dataset, render_weights_card, save_weights_dataset
from .weights_out import example_weights, weighted_dataset, weights_report

__all__ = ["BilevelTrainer", "OUTER_OPTIMIZER_NAME", "outer_batch_columns"]

logger = logging.get_logger(__name__)





def outer_batch_columns(module: OuterModule | None) -> list[str]:
    """The batch columns an outer module reads besides the model's inputs (:meth:`OuterModule.batch_columns`)."""
    return [] if module is None else list(module.batch_columns())








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




class _LiveParams(Mapping):
    """The inner parameters by name, looked up on first use: most outer modules never read them (data weights), and
    walking the model's parameters at every training step costs about 2% of a small model's step."""

    def __init__(self, tree: Callable[[], dict[str, Tensor]]) -> None:
        self._tree, self._named = tree, None

    def _resolved(self) -> dict[str, Tensor]:
        if self._named is None:
            self._named = self._tree()
        return self._named

    def __getitem__(self, name: str) -> Tensor:
        return self._resolved()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._resolved())

    def __len__(self) -> int:
        return len(self._resolved())


class BilevelTrainer(InputChecksMixin, InnerBatchOuterStepMixin, OuterUpdateMixin, OuterPersistenceMixin,
                     CachedTrunkCheckpoints, ResumeFinishedRun, ShardedModelTrainerMixin, Trainer):
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
            logging.get_logger(name).setLevel(args.get_process_log_level())
        self.eval_dataset, self.outer_dataset = _split_outer_dataset(self.eval_dataset, eval_dataset, outer_dataset)
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean
        if self.is_sharded and self.outer_model_param_names:
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
        resolve_outer_patience(args, self.num_training_rows, len(self.train_dataset))
        self.inner_param_names = [n for n, p in self._unwrapped.named_parameters() if p.requires_grad]
        if not self.inner_param_names:
            raise ValueError("The model has no trainable (inner) parameters left: nothing to fine-tune.")
        if outer_module is not None and outer_module.stops_gradients and args.hvp_mode == "finite_diff" and not self.is_sharded:
            raise ValueError(f"hvp_mode='finite_diff' cannot differentiate the objective of {type(outer_module).__name__}: "
                             "it holds a stop-gradient, which finite differences of gradients differentiate too. Use "
                             "hvp_mode='auto', 'rev_rev' or 'fwd_rev'.")
        self.ihvp_options = options_from_arguments(args.ihvp_method, args)
        check_problem_size(args.ihvp_method, self.ihvp_options, sum(p.numel() for p in self._inner_param_tree().values()),
                           argument_names=True)
        if self.is_sharded and not get_method(args.ihvp_method).shardable:
            raise ValueError(f"ihvp_method={args.ihvp_method!r} cannot run on FSDP-sharded parameters; "
                             f"use one of {tuple(m.name for m in METHODS.values() if m.shardable)}.")
        self.ihvp_solver = get_method(args.ihvp_method).build(self.ihvp_options)
        self._check_data_weights()
        self.outer_optimizer = self._create_outer_optimizer()
        self.hvp_mode: str | None = None if args.hvp_mode == "auto" else args.hvp_mode
        self._hvp_mode_checked = False
        self._recorded_hvp_mode: str | None = None  # the mode of the checkpoint resumed from (hvp_mode="auto")
        self.outer_step = 0
        self.outer_steps_seconds = 0.0  # wall time of the outer steps taken by this object (not the inner passes)
        self._weight_spread: float | None = None  # std/mean of the last checked training batch's weights
        self._causal_lm = self._is_causal_lm(self._unwrapped)
        self._check_inner_batch_outer_step()
        self.add_callback(_OuterStepCallback(self))

    # ------------------------------------------------------------------ helpers
    @property
    def is_sharded(self) -> bool:
        """Whether the model's parameters are FSDP2 shards: Accelerate's FSDP plugin, or the user's own
        ``fully_shard`` (then hypergradients take finite-difference products in place on the shards,
        :func:`hypergrad.sharded.sharded_hypergrad`)."""
        return self.is_fsdp_enabled or self._user_sharded

    @property
    def _unwrapped(self) -> nn.Module:
        accelerator = getattr(self, "accelerator", None)
        return accelerator.unwrap_model(self.model) if accelerator is not None else self.model

    @staticmethod
    def _is_causal_lm(model: nn.Module) -> bool:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return type(base).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())

    def _outer_param_tree(self) -> dict[str, Tensor]:
        """The live outer parameters by prefixed name: outer-module tensors and model tensors."""
        tree: dict[str, Tensor] = {}
        if self.outer_module is not None:
            tree.update({_MODULE_PREFIX + n: p for n, p in self.outer_module.named_parameters()})
        if self.outer_model_param_names:  # walking the model's parameters costs a training step ~2%: only if needed
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
    def _per_example_losses(self, model: nn.Module, in_params: Mapping[str, Tensor] | None,
                            out_params: Mapping[str, Tensor], batch: Mapping[str, Any], weighted: bool):
        """Each example's loss of ``batch`` (label smoothing for the inner objective, ``weighted``) and the model
        outputs; the model is called as :meth:`_objective` says."""
        self._check_batch_columns(batch, weighted)
        inputs = {k: v for k, v in batch.items() if k != "labels" and k not in self.outer_columns}
        if self._causal_lm:
            inputs.setdefault("use_cache", False)  # no key/value cache in training or in the products
        model_outer = {k[len(_MODEL_PREFIX):]: v for k, v in out_params.items() if k.startswith(_MODEL_PREFIX)}
        if in_params is None:
            outputs = model(**inputs)
        else:
            outputs = functional_call(model, {**in_params, **model_outer}, (), inputs, strict=False)
        # the inner objective (training steps, and the hypergradient's inner problem) is what training minimizes,
        # label smoothing included; the outer objective and evaluation are the plain loss
        smoothing = self.args.label_smoothing_factor if weighted else 0.0
        return per_example_loss(outputs["logits"], batch["labels"], self._causal_lm, label_smoothing=smoothing), outputs

    def _objective(self, model: nn.Module, in_params: Mapping[str, Tensor] | None,
                   out_params: Mapping[str, Tensor], batch: Mapping[str, Any], weighted: bool):
        """Loss of ``batch`` (and the model outputs).

        ``in_params=None`` runs ``model`` (possibly DDP-wrapped) with its own parameters, as
        inner training steps do; otherwise the unwrapped model is called functionally with
        ``in_params`` and the model part of ``out_params``. ``weighted`` selects the inner
        objective (through the outer module) instead of the plain mean loss."""
        losses, outputs = self._per_example_losses(model, in_params, out_params, batch, weighted)
        if not weighted:
            return losses.mean(), outputs
        inner_named = _LiveParams(self._inner_param_tree) if in_params is None else in_params
        return self._weighted_loss(losses, batch, out_params, inner_named), outputs

    def _weighted_loss(self, losses: Tensor, batch: Mapping[str, Any], out_params: Mapping[str, Tensor],
                       inner_named: Mapping[str, Tensor]) -> Tensor:
        """The inner objective from the batch's per-example ``losses``: the outer module's combination, called with
        the module part of ``out_params`` and the inner parameters ``inner_named``, or their mean without a module."""
        if self.outer_module is None:
            return losses.mean()
        module_params = {k[len(_MODULE_PREFIX):]: v for k, v in out_params.items() if k.startswith(_MODULE_PREFIX)}
        return functional_call(self.outer_module, module_params, (losses, batch, inner_named))

    def inner_forward(self, in_params: Mapping[str, Tensor], out_params: Mapping[str, Tensor],
                      batch: Mapping[str, Any]) -> Tensor:
        """Inner objective ``f(theta, phi)`` on a training batch, as a pure function."""
        return self._objective(self._unwrapped, in_params, out_params, batch, weighted=True)[0]

    def outer_forward(self, in_params: Mapping[str, Tensor], out_params: Mapping[str, Tensor],
                      batch: Mapping[str, Any]) -> Tensor:
        """Outer objective ``g(theta, phi)``: the mean validation loss, as a pure function."""
        return self._objective(self._unwrapped, in_params, out_params, batch, weighted=False)[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Inner objective during training (outer parameters held fixed; with ``hypergrad_on_inner_batch``, the
        scheduled outer step taken on this batch first, :mod:`~hf_integration.inner_batch_outer`); plain mean loss
        in evaluation, so `evaluate()` reports the outer objective."""
        if model.training and self._outer_step_due_in_inner_step():
            loss, outputs = self._inner_objective_with_outer_step(model, inputs)
        else:
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

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """`Trainer.train`, after checking the checkpoint to resume from and the HVP mode, so that
        either problem fails before any training step.

        ``resume_from_checkpoint=True`` takes the last *complete* checkpoint of ``output_dir``
        (:func:`~hf_integration.checkpoints.last_checkpoint` skips folders of an interrupted save); a path
        must be a complete checkpoint (:func:`~hf_integration.checkpoints.checkpoint_problem`); otherwise
        :class:`~hf_integration.checkpoints.CheckpointError`. Installs the :class:`NonFiniteGuard`."""
        resume_from_checkpoint = self._checkpoint_to_resume(resume_from_checkpoint)
        if resume_from_checkpoint is not None and not self._hvp_mode_checked:
            self._recorded_hvp_mode = self._checkpoint_hvp_mode(resume_from_checkpoint)
        self.resolve_hvp_mode()
        self.nonfinite_guard  # noqa: B018 (installs the callback)
        settings = self.args
        total = total_inner_steps(settings, len(self.train_dataset))
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
