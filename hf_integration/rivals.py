"""The rivals of learned data weights, trained like the bilevel run (model initialisation, seed, data order,
optimizer, schedule, number of inner steps), so that a comparison measures the weighting alone.

* ``uniform``: plain `transformers.Trainer` on the (noisy) training set, the mean loss.
* ``uniform_train_val``: the same on training + outer (validation) rows. A bilevel run learns from the outer data
  through its objective (and trains on it with ``train_on_outer_data``), so a model that simply trains on it is the
  fair rival.
* ``loss_filter``: the standard cheap noisy-label baseline ("small-loss" selection): uniform training until inner
  step ``filter_step`` (0: before training, the initial model's ranking), then the ``fraction`` of training examples
  with the highest loss under the model of that step get weight 0 for the rest of training (the batch loss is the
  mean over the kept examples).
* ``length_filter`` and ``ifd_filter`` (instruction data): the same ``fraction`` dropped before training by a score
  computed once (:mod:`hf_integration.filters`): the shortest responses, or the highest instruction-following
  difficulty under the initial model.
* ``reference_filter`` (classification): the same ``fraction`` dropped before training, those whose label has the
  highest loss under a linear probe fitted on the outer rows (:mod:`hf_integration.holdout_reference`): the rival
  that uses what ``--loss_reference holdout_probe`` gives the learned weights, without learning anything.

Every checkpoint of a weighted rival holds its example weights (``example_weights.safetensors``; for the loss
filter also the ranking losses), so a resumed rival trains on what the interrupted one did: the loss filter's
dropped set is restored, never recomputed or lost, and a checkpoint whose weights do not belong to this run is
refused. The rivals train and resume a cached-trunk model (:mod:`hf_integration.frozen_trunk`) as its adapter.
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
from safetensors.torch import save_file
from torch import nn
from transformers import Trainer, TrainerCallback

from .atomic_files import atomic_write
from .checkpoints import CheckpointError, ResumeFinishedRun
from .filters import SCORE_FILTERS
from .frozen_trunk import CachedTrunk, CachedTrunkCheckpoints
from .losses import per_example_loss
from .recipe import append_outer_rows
from .reporting import auc_by_kind, weights_auc
from .serialization import load_tensors
from .sharding import ShardedModelTrainerMixin

__all__ = ["RIVALS", "FIXED_SCORE_RIVALS", "EXAMPLE_WEIGHTS_NAME", "UniformTrainer", "WeightedTrainer",
           "LossFilterTrainer",
           "ScoreFilterTrainer", "dataset_losses", "train_rival", "filter_ranking"]

RIVALS = ("uniform", "uniform_train_val", "loss_filter", "reference_filter", *SCORE_FILTERS)
FIXED_SCORE_RIVALS = ("reference_filter", *SCORE_FILTERS)  # drop by a score computed before training
EXAMPLE_WEIGHTS_NAME = "example_weights.safetensors"  # in every checkpoint of a weighted rival


def _causal(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if isinstance(model, CachedTrunk):
        return False  # its logits are aligned with its labels
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


@torch.no_grad()
def dataset_losses(trainer: Trainer, dataset: datasets.Dataset) -> np.ndarray:
    """Every row's loss under ``trainer``'s model in evaluation mode (the per-example mean over its labelled tokens
    for token outputs), in the rows' order, batch by batch (no logits of the whole set are kept)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    causal = _causal(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for batch in trainer.get_eval_dataloader(dataset):
            labels = batch.pop("labels")
            batch = {k: v for k, v in batch.items() if k not in getattr(trainer, "id_columns", ())}
            losses = per_example_loss(model(**batch)["logits"], labels, causal)
            out.append(trainer.accelerator.gather_for_metrics(losses.float()).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).double().numpy()


class UniformTrainer(CachedTrunkCheckpoints, ResumeFinishedRun, ShardedModelTrainerMixin, Trainer):
    """`Trainer` (the mean loss); a cached-trunk model checkpoints as its adapter, and a resume from the last step's
    checkpoint takes no step more."""


class WeightedTrainer(CachedTrunkCheckpoints, ResumeFinishedRun, ShardedModelTrainerMixin, Trainer):
    """`Trainer` whose training loss is a fixed weighted mean: ``sum_{i in B} w_i l_i / sum_{i in B} w_i`` over a batch
    ``B`` (0 when every weight of the batch is 0), with ``w_i = weights[example_id_i]``. Checkpoints hold the weights;
    resuming from one whose weights differ from this trainer's is refused."""

    def __init__(self, *args: Any, weights: torch.Tensor | None = None, id_column: str = "example_id",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.id_column = id_column
        self.id_columns = (id_column,)
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
        smoothing = self.args.label_smoothing_factor if model.training else 0.0  # as Trainer's rivals train
        losses = per_example_loss(outputs["logits"], labels, _causal(self.accelerator.unwrap_model(model)),
                                  label_smoothing=smoothing)
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
    """`Trainer` that drops the highest-loss ``fraction`` of the training set after inner step ``filter_step`` (0: at
    the start, by the initial model's losses).

    Training examples are identified by ``id_column`` (ids ``0 .. n-1``); ``weights[i]`` is 1 until the filter runs,
    then 0 for the dropped examples. Once it has run, ``losses`` holds every training example's loss at
    ``filter_step`` (indexed by id) and ``dropped`` the dropped ids; ``ranking_time_s`` the time the ranking took.
    """

    def __init__(self, *args: Any, fraction: float, filter_step: int, id_column: str = "example_id",
                 **kwargs: Any) -> None:
        super().__init__(*args, id_column=id_column, **kwargs)
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
        if filter_step < 0:
            raise ValueError(f"filter_step must be >= 0, got {filter_step!r}")
        self.fraction, self.filter_step = fraction, filter_step
        self.dropped: np.ndarray | None = None
        self.losses: np.ndarray | None = None
        self.ranking_time_s = 0.0
        self.add_callback(_FilterAt(self))

    def apply_filter(self) -> None:
        """Rank the training examples by their loss under the current model and drop the top ``fraction``."""
        start = time.perf_counter()
        dataset = self.train_dataset
        self._set_filter(np.asarray(dataset[self.id_column]), dataset_losses(self, dataset))
        self.ranking_time_s = time.perf_counter() - start

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


class ScoreFilterTrainer(LossFilterTrainer):
    """`Trainer` that drops the ``fraction`` of the training set with the highest fixed ``scores`` (indexed by example
    id, computed before training, e.g. :func:`hf_integration.filters.filter_scores`) at the start; checkpoints keep
    the scores and the dropped set as the loss filter's do."""

    def __init__(self, *args: Any, scores: np.ndarray, **kwargs: Any) -> None:
        super().__init__(*args, filter_step=0, **kwargs)
        self.scores = np.asarray(scores, dtype=np.float64)

    def apply_filter(self) -> None:
        ids = np.asarray(self.train_dataset[self.id_column])
        if self.scores.shape[0] <= ids.max():
            raise ValueError(f"scores cover {self.scores.shape[0]} example ids, the training rows go up to {ids.max()}")
        self._set_filter(ids, self.scores[ids])


class _FilterAt(TrainerCallback):
    def __init__(self, trainer: LossFilterTrainer) -> None:
        self.trainer = trainer

    def _maybe_filter(self, state, model) -> None:
        if state.global_step == self.trainer.filter_step and self.trainer.dropped is None:
            was_training = model.training if model is not None else True
            self.trainer.apply_filter()
            if model is not None:
                model.train(was_training)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._maybe_filter(state, model)  # filter_step 0 (a resumed run has its filter restored already)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._maybe_filter(state, model)


def train_rival(name: str, build_model: Callable[[], nn.Module], training_args: Any, train_dataset: datasets.Dataset,
                outer_dataset: datasets.Dataset, *, filter_fraction: float = 0.2, filter_step: int = 0,
                resume: str | None = None, id_column: str = "example_id", filter_scores: np.ndarray | None = None,
                **trainer_kwargs: Any) -> tuple[Trainer, float]:
    """Train rival ``name`` (one of :data:`RIVALS`) in ``<output_dir>/baseline-<name>`` and return the trainer and its
    training wall time. ``train_dataset`` carries the example-id column; ``outer_dataset`` is the evaluation set (and,
    for ``uniform_train_val``, extra training data); ``filter_scores`` (by example id) are the dropping scores of a
    filter by a fixed score (:data:`FIXED_SCORE_RIVALS`: ``length_filter``, ``ifd_filter``, ``reference_filter``)."""
    if name not in RIVALS:
        raise ValueError(f"unknown rival {name!r}; choose from {RIVALS}")
    fixed = name in FIXED_SCORE_RIVALS
    if fixed != (filter_scores is not None):
        raise ValueError(f"rival {name!r} {'needs' if fixed else 'takes no'} filter_scores")
    args = dataclasses.replace(training_args, output_dir=os.path.join(training_args.output_dir, f"baseline-{name}"))
    common = dict(model=build_model(), args=args, eval_dataset=outer_dataset, **trainer_kwargs)
    if fixed:
        trainer: Trainer = ScoreFilterTrainer(train_dataset=train_dataset, fraction=filter_fraction,
                                              scores=filter_scores, id_column=id_column, **common)
    elif name == "loss_filter":
        trainer = LossFilterTrainer(train_dataset=train_dataset, fraction=filter_fraction,
                                             filter_step=filter_step, id_column=id_column, **common)
    else:
        data = (append_outer_rows(train_dataset, outer_dataset, flag_column=None, drop=(id_column,))
                if name == "uniform_train_val" else train_dataset.remove_columns(id_column))
        trainer = UniformTrainer(train_dataset=data, **common)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    return trainer, time.perf_counter() - start


def filter_ranking(rival: LossFilterTrainer, example_ids: Any, corrupted: Any, kinds: Any = None) -> dict[str, Any]:
    """What a filter rival's ranking says of the corrupted examples: ``fraction_dropped``, ``ranking_time_s`` and,
    when the flags hold both groups, the AUC of its dropping score against them (``auc_high_loss_vs_corrupted``
    for the loss filter, ``auc_ranking_vs_corrupted`` for a score filter) and, with ``kinds`` (``""`` = clean), the
    AUC per corruption kind (``..._by_corruption``). Scores are looked up by ``example_ids``, the flags' order."""
    key = "auc_high_loss" if type(rival) is LossFilterTrainer else "auc_ranking"
    out: dict[str, Any] = {"fraction_dropped": rival.fraction, "ranking_time_s": rival.ranking_time_s}
    scores = rival.losses[np.asarray(example_ids)]
    finite = np.isfinite(scores)
    low, high = (scores[finite].min() - 1.0, scores[finite].max() + 1.0) if finite.any() else (0.0, 1.0)
    scores = np.where(finite, scores, np.where(scores == np.inf, high, low))  # +inf dropped first; -inf, NaN kept
    corrupted = np.asarray(corrupted, dtype=bool)
    if corrupted.any() and not corrupted.all():
        out[f"{key}_vs_corrupted"] = weights_auc(-scores, corrupted)
        if kinds is not None:
            out[f"{key}_by_corruption"] = auc_by_kind(-scores, kinds)
    return out
