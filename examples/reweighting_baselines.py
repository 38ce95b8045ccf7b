"""The rivals of learned data weights in `data_reweighting.py`, trained with the same model, seed, data order,
optimizer, schedule and number of inner steps as the bilevel run.

* ``uniform``: plain `transformers.Trainer` on the (noisy) training set, mean cross-entropy.
* ``uniform_train_val``: the same on training + validation examples. The bilevel run learns from the
  validation set through its outer objective, so a model that simply trains on it is the fair rival.
* ``loss_filter``: the standard cheap noisy-label baseline ("small-loss" selection): uniform training until
  inner step ``filter_step``, then the ``fraction`` of training examples with the highest loss under the model
  of that step get weight 0 for the rest of training (the batch loss is the mean over the kept examples).
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

from hf_integration.losses import per_example_loss

__all__ = ["BASELINES", "TRUSTED_COLUMN", "WeightedTrainer", "LossFilterTrainer", "inner_training_set",
           "per_example_losses", "train_baseline", "train_plus_validation"]

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


class WeightedTrainer(Trainer):
    """`Trainer` whose training loss is a fixed weighted mean: ``sum_{i in B} w_i l_i / sum_{i in B} w_i`` over
    a batch ``B`` (0 when every weight of the batch is 0), with ``w_i = weights[example_id_i]``."""

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
        losses = per_example_loss(outputs["logits"], labels, causal_lm=False)
        if ids is None or not model.training:
            loss = losses.mean()
        else:
            w = self.weights.to(losses.device)[ids]
            loss = (w * losses).sum() / w.sum().clamp_min(1e-12)
        return (loss, outputs) if return_outputs else loss


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
        ids = np.asarray(dataset[self.id_column])
        order = np.argsort(-losses, kind="stable")
        self.dropped = ids[order[: int(round(self.fraction * len(ids)))]]
        self.losses = np.full(int(ids.max()) + 1, np.nan)
        self.losses[ids] = losses
        self.weights[torch.as_tensor(self.dropped, dtype=torch.long)] = 0.0


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
        trainer = Trainer(train_dataset=data, **common)
    tic = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    return trainer, time.perf_counter() - tic
