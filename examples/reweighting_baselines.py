"""The rivals of learned data weights in `data_reweighting.py`, trained with the same model, seed, data order,
optimizer, schedule and number of inner steps as the bilevel run.

* ``uniform``: plain `transformers.Trainer` on the (noisy) training set, mean cross-entropy.
* ``uniform_train_val``: the same on training + validation examples. The bilevel run learns from the
  validation set through its outer objective, so a model that simply trains on it is the fair rival.
* ``loss_filter``: the standard cheap noisy-label baseline ("small-loss" selection): uniform training until
  inner step ``filter_step``, then the ``fraction`` of training examples with the highest loss under the model
  of that step get weight 0 for the rest of training (the batch loss is the mean over the kept examples).

Every checkpoint of a rival holds its example weights (``example_weights.safetensors``; for the loss filter also
the ranking losses), so a resumed rival trains on what the interrupted one did: the loss filter's dropped set is
restored, never recomputed or lost, and a checkpoint whose weights do not belong to this run is refused.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from safetensors.torch import save_file

from frozen_features import WrappedModelCheckpoints
from hf_integration.checkpoints import CheckpointError, ResumeFinishedRun
from hf_integration.losses import per_example_loss
from hf_integration.serialization import atomic_write, load_tensors

__all__ = ["BASELINES", "TRUSTED_COLUMN", "EXAMPLE_WEIGHTS_NAME", "UniformTrainer", "WeightedTrainer",
           "LossFilterTrainer", "inner_training_set", "per_example_losses", "train_baseline", "train_plus_validation"]

EXAMPLE_WEIGHTS_NAME = "example_weights.safetensors"  # in every checkpoint of a weighted rival

BASELINES = ("uniform", "uniform_train_val", "loss_filter")
# the column that flags the validation rows of the bilevel run's inner problem under --train_on_validation
TRUSTED_COLUMN = "trusted"


def per_example_losses(trainer: Trainer, dataset: datasets.Dataset, prefix: str = "losses") -> torch.Tensor:
    """Cross-entropy of every example of ``dataset`` (its rows' order) under ``trainer``'s model, in evaluation
    mode (``trainer.predict``)."""
    prediction = trainer.predict(dataset, metric_key_prefix=prefix)
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return nn.functional.cross_entropy(torch.as_tensor(logits).float(), torch.as_tensor(prediction.label_ids),
                                       reduction="none")


class UniformTrainer(WrappedModelCheckpoints, ResumeFinishedRun, Trainer):
    """`Trainer` (the mean loss), with checkpoints of a cached-trunk model holding its adapter."""


class WeightedTrainer(WrappedModelCheckpoints, ResumeFinishedRun, Trainer):
    """`Trainer` whose training loss is a fixed weighted mean: ``sum_{i in B} w_i l_i / sum_{i in B} w_i`` over
    a batch ``B`` (0 when every weight of the batch is 0), with ``w_i = weights[example_id_i]``. Checkpoints hold
    the weights; resuming from one whose weights differ from this trainer's is refused."""

    def __init__(self, *args: Any, weights: torch.Tensor | None = None, id_column: str = "example_id",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.id_column = id_column
        self.weights = (torch.ones(len(self.train_dataset)) if weights is None
                        else torch.as_tensor(weights, dtype=torch.float32))

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.id_column not in self._signature_columns:
            self._signature_columns.append(self.id_column)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs.pop(self.id_column, None)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        # cross-entropy of class logits; for token logits aligned with their labels (frozen_decoder's response
        # window), each example's mean over its labelled tokens
        smoothing = self.args.label_smoothing_factor if model.training else 0.0  # as Trainer's rivals train
        losses = per_example_loss(outputs["logits"], labels, causal_lm=False, label_smoothing=smoothing)
        if ids is None or not model.training:
            loss = losses.mean()
        else:
            w = self.weights.to(losses.device)[ids]
            loss = (w * losses).sum() / w.sum().clamp_min(1e-12)
        return (loss, outputs) if return_outputs else loss

    def _weights_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint records of the example weights (:meth:`_restore_weights` reads it back)."""
        return {"weights": self.weights.detach().cpu().contiguous()}

    def _restore_weights(self, saved: dict[str, torch.Tensor], checkpoint: str) -> None:
        weights = saved.get("weights")
        if weights is None or weights.shape != self.weights.shape or not torch.equal(weights, self.weights.cpu()):
            raise CheckpointError(f"cannot resume from {checkpoint!r}: the example weights it was trained with differ "
                                  "from this run's (other data, or another filter); start this rival over")

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            tensors = self._weights_state()
            atomic_write(os.path.join(output_dir, EXAMPLE_WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, EXAMPLE_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise CheckpointError(f"cannot resume from {checkpoint!r}: it has no {EXAMPLE_WEIGHTS_NAME} (the example "
                                  "weights this rival trained with); start this rival over")
        try:
            saved = load_tensors(path)
        except ValueError as err:
            raise CheckpointError(f"cannot resume from {checkpoint!r}: {err}") from err
        self._restore_weights(saved, checkpoint)


class LossFilterTrainer(WeightedTrainer):
    """`Trainer` that drops the highest-loss ``fraction`` of the training set after inner step ``filter_step``.

    Training examples are identified by ``id_column`` (ids ``0 .. n-1``); ``weights[i]`` is 1 until the filter
    runs, then 0 for the dropped examples (the weights of a :class:`WeightedTrainer`). Once the filter has run,
    ``losses`` holds every training example's loss at ``filter_step`` (indexed by id) and ``dropped`` the
    dropped ids.
    """

    def __init__(self, *args: Any, fraction: float, filter_step: int, id_column: str = "example_id",
                 **kwargs: Any) -> None:
        super().__init__(*args, id_column=id_column, **kwargs)
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
        self.fraction, self.filter_step = fraction, filter_step
        self.dropped: np.ndarray | None = None
        self.losses: np.ndarray | None = None
        self.add_callback(_FilterAt(self))

    def apply_filter(self) -> None:
        """Rank the training examples by their loss under the current model and drop the top ``fraction``."""
        dataset = self.train_dataset
        losses = per_example_losses(self, dataset, prefix="filter").numpy()
        self._set_filter(np.asarray(dataset[self.id_column]), losses)

    def _set_filter(self, ids: np.ndarray, losses: np.ndarray) -> None:
        """Drop the top ``fraction`` of ``ids`` by their ``losses`` (a stable order, so a restore is exact)."""
        order = np.argsort(-losses, kind="stable")
        self.dropped = ids[order[: int(round(self.fraction * len(ids)))]]
        self.losses = np.full(int(ids.max()) + 1, np.nan)
        self.losses[ids] = losses
        self.weights = torch.ones_like(self.weights)
        self.weights[torch.as_tensor(self.dropped, dtype=torch.long)] = 0.0

    def _weights_state(self) -> dict[str, torch.Tensor]:
        state = super()._weights_state()
        if self.dropped is not None:  # the ranking that chose them, to restore the filter and report its AUC
            ids = np.flatnonzero(~np.isnan(self.losses))
            state.update(filter_ids=torch.as_tensor(ids, dtype=torch.int64),
                         filter_losses=torch.as_tensor(self.losses[ids], dtype=torch.float64))
        return state

    def _restore_weights(self, saved: dict[str, torch.Tensor], checkpoint: str) -> None:
        filtered = self.state.global_step >= self.filter_step
        if filtered != ("filter_ids" in saved):
            raise CheckpointError(f"cannot resume from {checkpoint!r}: it is the checkpoint of step "
                                  f"{self.state.global_step} but {'lacks' if filtered else 'holds'} the loss filter's "
                                  f"ranking (the filter runs after step {self.filter_step}); start this rival over")
        if filtered:
            self._set_filter(saved["filter_ids"].numpy(), saved["filter_losses"].numpy())
        super()._restore_weights(saved, checkpoint)


class _FilterAt(TrainerCallback):
    def __init__(self, trainer: LossFilterTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.trainer.filter_step and self.trainer.dropped is None:
            was_training = model.training if model is not None else True
            self.trainer.apply_filter()
            if model is not None:
                model.train(was_training)


def train_plus_validation(train_dataset: datasets.Dataset, validation_dataset: datasets.Dataset,
                          trusted_column: str | None = None) -> datasets.Dataset:
    """The training examples (without their ``example_id``) followed by the validation examples, on the
    training set's columns and features; with ``trusted_column``, that column flags the validation rows (1) and
    the training rows (0) (`hf_integration.LossWeights`' ``trusted_column``)."""
    data = train_dataset.remove_columns("example_id")
    extra = validation_dataset.select_columns([c for c in data.column_names if c in validation_dataset.column_names])
    joined = datasets.concatenate_datasets([data, extra.cast(data.features)])
    if trusted_column is None:
        return joined
    return joined.add_column(trusted_column, [0] * len(data) + [1] * len(extra))


def inner_training_set(train_dataset: datasets.Dataset, validation_dataset: datasets.Dataset,
                       train_on_validation: bool) -> tuple[datasets.Dataset, str | None]:
    """The bilevel run's inner training data and the column flagging its trusted rows: with
    ``train_on_validation``, :func:`train_plus_validation` with the validation rows flagged in
    :data:`TRUSTED_COLUMN`; else the training set as it is and ``None``."""
    if not train_on_validation:
        return train_dataset, None
    return train_plus_validation(train_dataset, validation_dataset, TRUSTED_COLUMN), TRUSTED_COLUMN


def train_baseline(name: str, build_model: Callable[[], nn.Module], training_args: Any,
                   train_dataset: datasets.Dataset, validation_dataset: datasets.Dataset, *,
                   filter_fraction: float, filter_step: int, callbacks: list | None = None,
                   resume: str | None = None, **trainer_kwargs: Any) -> tuple[Trainer, float]:
    """Train baseline ``name`` (one of :data:`BASELINES`) in ``<output_dir>/baseline-<name>`` and return the
    trainer and its training wall time. ``train_dataset`` carries an ``example_id`` column; ``validation_dataset``
    is the evaluation set (and, for ``uniform_train_val``, extra training data)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")
    args = dataclasses.replace(training_args, output_dir=os.path.join(training_args.output_dir, f"baseline-{name}"))
    common = dict(model=build_model(), args=args, eval_dataset=validation_dataset, callbacks=list(callbacks or []),
                  **trainer_kwargs)
    if name == "loss_filter":
        trainer: Trainer = LossFilterTrainer(train_dataset=train_dataset, fraction=filter_fraction,
                                             filter_step=filter_step, **common)
    else:
        data = (train_plus_validation(train_dataset, validation_dataset) if name == "uniform_train_val"
                else train_dataset.remove_columns("example_id"))
        trainer = UniformTrainer(train_dataset=data, **common)
    tic = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    return trainer, time.perf_counter() - tic
