"""A reference loss for each training label from a small model of the clean outer (validation) rows: what
`LossWeights`' ``reference_column`` measures each loss against on classification data.

RHO-LOSS (Mindermann et al., ICML 2022) calls a model fitted on holdout data the *irreducible-loss model*: the loss it
gives an example's label says how plausible that label is to a model that never saw the (noisy) training labels. Here
that model is a linear probe on the frozen initial encoder:

* features ``z(x)``: the encoder's last hidden states averaged over the non-padding tokens, scaled to unit norm
  (:func:`pooled_features`; a LoRA model at initialization computes exactly the pretrained encoder's);
* the probe: multinomial logistic regression ``p(c | x) = softmax(W z(x) + b)_c`` fitted on the outer rows, its
  inverse L2 strength ``C`` chosen by stratified cross-validation on those rows' log loss
  (:func:`holdout_reference_losses`);
* the reference loss of row ``i`` with label ``y_i``: ``ref_i = -log max(p(y_i | x_i), 1e-6)``, for a training row
  under the probe fitted on every outer row, for an outer row under the probe of the fold that left it out.

A flipped label that the encoder's features put in another class gets a high ``ref_i`` however well the model in
training has memorized it; a hard but correct example is hard for the probe too, but less often wrong. With
``LossWeights(reference_column=...)`` the weights are ``sigmoid(-loss_scale * (l_i - reference_scale * ref_i))``
and the outer problem learns ``reference_scale``: negative values down-weight labels the probe finds implausible.
The measurements behind it are in ``docs/data-reweighting.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn

from .frozen_trunk import FEATURE_ROW, CachedTrunk

__all__ = ["ReferenceLosses", "check_reference_labels", "holdout_reference", "holdout_reference_losses",
           "pooled_features"]

MIN_PROBABILITY = 1e-6  # the reference loss is at most -log(1e-6) = 13.8
_FOLDS = 5
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@torch.no_grad()
def pooled_features(model: nn.Module, dataset: datasets.Dataset, collator: Any, batch_size: int = 64) -> np.ndarray:
    """Unit-norm mean of ``model``'s last hidden states over each row's non-padding tokens, shape ``(rows, hidden)``,
    in the rows' order (``model`` in evaluation mode for the pass; its training mode is restored).

    ``dataset`` is tokenized (``input_ids``, ``attention_mask``, ``token_type_ids`` and the frozen-trunk cache's
    ``feature_row`` where present; other columns are ignored) and ``collator`` pads a list of its rows into a batch
    (e.g. `transformers.DataCollatorWithPadding`). A :class:`~hf_integration.frozen_trunk.CachedTrunkClassifier`
    runs only its layers above the cached ones."""
    inputs = (*_MODEL_INPUTS, FEATURE_ROW) if isinstance(model, CachedTrunk) else _MODEL_INPUTS
    columns = [c for c in inputs if c in dataset.column_names]
    if "input_ids" not in columns or "attention_mask" not in columns:
        raise ValueError(f"pooled_features needs tokenized rows with input_ids and attention_mask, got columns "
                         f"{dataset.column_names}")
    rows = dataset.select_columns(columns)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(rows), batch_size):
            batch = collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
            batch = {k: v.to(device) for k, v in batch.items() if k in columns}
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(nn.functional.normalize(mean.float(), dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy().astype(np.float64)


@dataclass(frozen=True)
class ReferenceLosses:
    """The result of :func:`holdout_reference_losses`: ``train`` and ``outer`` hold each row's reference loss (the
    outer rows' out of fold), ``inverse_regularization`` the chosen ``C``, ``outer_accuracy`` the out-of-fold accuracy
    of the probe on the outer rows (how much the features alone tell the classes apart)."""

    train: np.ndarray
    outer: np.ndarray
    inverse_regularization: float
    outer_accuracy: float


def _label_losses(proba: np.ndarray, classes: np.ndarray, labels: np.ndarray, num_labels: int) -> np.ndarray:
    """``-log max(p(y_i), MIN_PROBABILITY)`` from a probe's ``proba`` over its ``classes``."""
    full = np.zeros((len(labels), num_labels))
    full[:, classes] = proba
    return -np.log(np.maximum(full[np.arange(len(labels)), labels], MIN_PROBABILITY))


def check_reference_labels(outer_labels: Sequence[int], train_labels: Sequence[int], num_labels: int) -> int:
    """Refuse labels the probe could not judge: every class of either set needs at least 2 outer rows (a probe is
    cross-validated on them, and a class it never saw would give its training labels probability 0). Returns the
    outer row count of the rarest such class."""
    outer_labels, train_labels = np.asarray(outer_labels, np.int64), np.asarray(train_labels, np.int64)
    counts = np.bincount(outer_labels, minlength=num_labels)
    needed = np.union1d(np.unique(train_labels), np.unique(outer_labels))
    thin = [int(c) for c in needed if counts[c] < 2]
    if thin:
        raise ValueError(f"the holdout reference needs at least 2 validation rows of every class; classes {thin} have "
                         f"{[int(counts[c]) for c in thin]}: add validation rows of them, or train without it")
    return int(counts[needed].min())


def holdout_reference_losses(outer_features: np.ndarray, outer_labels: Sequence[int], train_features: np.ndarray,
                             train_labels: Sequence[int], num_labels: int, seed: int = 0,
                             candidates: Sequence[float] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)) -> ReferenceLosses:
    """Fit the linear probe on the outer rows and return every row's reference loss (see the module docstring).

    ``C`` is the member of ``candidates`` with the lowest stratified ``k``-fold log loss on the outer rows
    (``k = min(5, rows of the rarest class)``, folds shuffled by ``seed``; ties go to the smaller ``C``). Every class
    of the training labels must have at least 2 outer rows, else the probe could not judge its labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    outer_labels, train_labels = np.asarray(outer_labels, np.int64), np.asarray(train_labels, np.int64)
    rarest = check_reference_labels(outer_labels, train_labels, num_labels)
    if len(outer_features) != len(outer_labels) or len(train_features) != len(train_labels):
        raise ValueError(f"holdout_reference_losses needs one feature row per label, got {len(outer_features)} / "
                         f"{len(outer_labels)} outer and {len(train_features)} / {len(train_labels)} training")
    folds = StratifiedKFold(n_splits=min(_FOLDS, rarest), shuffle=True, random_state=seed)

    def probe(c: float) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=5000)

    classes = np.unique(outer_labels)
    out_of_fold = {c: cross_val_predict(probe(c), outer_features, outer_labels, cv=folds, method="predict_proba")
                   for c in candidates}
    best = min(candidates, key=lambda c: (log_loss(outer_labels, out_of_fold[c], labels=classes), c))
    fitted = probe(best).fit(outer_features, outer_labels)
    return ReferenceLosses(
        train=_label_losses(fitted.predict_proba(train_features), fitted.classes_, train_labels, num_labels),
        outer=_label_losses(out_of_fold[best], classes, outer_labels, num_labels),
        inverse_regularization=float(best),
        outer_accuracy=float((classes[out_of_fold[best].argmax(1)] == outer_labels).mean()))


def holdout_reference(model: nn.Module, train_dataset: datasets.Dataset, outer_dataset: datasets.Dataset,
                      collator: Any, num_labels: int, *, batch_size: int = 64, seed: int = 0,
                      label_column: str = "labels") -> ReferenceLosses:
    """Every training and outer row's reference loss: :func:`pooled_features` of both tokenized sets under ``model``
    (the initial model: its encoder is the probe's), then :func:`holdout_reference_losses` on their
    ``label_column``. Add ``train`` and ``outer`` as a column of each set to weight by them, e.g.
    ``LossWeights(reference_column="reference_loss")``."""
    return holdout_reference_losses(
        pooled_features(model, outer_dataset, collator, batch_size), outer_dataset[label_column],
        pooled_features(model, train_dataset, collator, batch_size), train_dataset[label_column], num_labels,
        seed=seed)
