"""Learned data weights out of a trainer: every example's weight, the weighted training set, and what a run's weights
say about themselves (nearly uniform, never moved).

:func:`example_weights` evaluates the trained outer module on every row of a dataset: free per-example weights
(``DataWeights``) by example id, loss-based ones (``LossWeights``) at each example's loss under the trained model,
per-source ones by source, products of them for a combined module. :func:`weighted_dataset` puts them beside the
user's own rows (the untokenized ones given to the trainer), ready for ``save_weights_dataset`` /
``push_weights_dataset`` (:mod:`hf_integration.weights_dataset`).
"""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
import torch
from torch import Tensor, nn

from .losses import per_example_loss
from .outer_modules import DataWeights, ExampleWeighting

__all__ = ["NEARLY_UNIFORM_SPREAD", "example_weights", "weighted_dataset", "weight_spread", "weights_report"]

NEARLY_UNIFORM_SPREAD = 0.05
"""std/mean of a set of weights below which they carry little signal (reported by the trainer)."""


def weight_spread(weights: Tensor | np.ndarray) -> float:
    """``std / mean`` of ``weights`` (0 for one weight or none)."""
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() < 2:
        return 0.0
    return float(w.std(unbiased=False) / w.mean().abs().clamp_min(1e-12))


@torch.no_grad()
def example_weights(trainer: Any, dataset: Any = None) -> np.ndarray:
    """The learned weight of every row of ``dataset`` (default: the training rows, without the trusted outer rows
    ``train_on_outer_data`` added), in the rows' order: the outer module's ``example_weights`` of each batch, the
    loss-based ones at the losses of the trained model in evaluation mode. ``dataset`` must be prepared as the
    trainer's training data is (tokenized, with the columns the outer module reads)."""
    module = trainer.outer_module
    if not isinstance(module, ExampleWeighting):
        raise TypeError(f"{type(module).__name__ if module is not None else 'No outer module'} weights no examples: "
                        "example weights need a data-weighting module (DataWeights, LossWeights, SourceWeights, ...).")
    data = trainer.train_dataset.select(range(trainer.num_training_rows)) if dataset is None else dataset
    trusted = trainer.trusted_column
    if trusted and isinstance(data, datasets.Dataset) and trusted not in data.column_names:
        data = data.add_column(trusted, [0] * len(data))  # rows of the training set: none is a trusted one
    model: nn.Module = trainer.model_wrapped if trainer.is_sharded else trainer._unwrapped
    was_training = model.training
    model.eval()
    out = []
    try:
        for batch in trainer.get_eval_dataloader(data):
            inputs = {k: v for k, v in batch.items() if k != "labels" and k not in trainer.outer_columns}
            if trainer._causal_lm:
                inputs.setdefault("use_cache", False)
            logits = model(**inputs)["logits"]
            losses = per_example_loss(logits, batch["labels"], trainer._causal_lm)
            weights = module.example_weights(losses, batch).detach().float()
            out.append(trainer.accelerator.gather_for_metrics(weights).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def weighted_dataset(trainer: Any, weights: np.ndarray | None = None, column: str = "weight") -> datasets.Dataset:
    """The training rows as the user gave them to the trainer (before tokenization), with a ``column`` of their
    learned weights (:func:`example_weights`, computed unless ``weights`` are given); the prepared rows when the
    user's cannot be matched to them one to one (e.g. packed sequences)."""
    weights = example_weights(trainer) if weights is None else np.asarray(weights)
    rows = trainer.raw_train_dataset
    if not isinstance(rows, datasets.Dataset) or len(rows) != len(weights):
        rows = trainer.train_dataset.select(range(trainer.num_training_rows))
    if column in rows.column_names:
        rows = rows.remove_columns(column)
    return rows.add_column(column, weights.astype(float).tolist())


def weights_report(module: nn.Module | None, spread: float | None) -> list[str]:
    """What the learned weights of a finished run say about themselves, as warning lines: weights nearly uniform
    (``spread``, std/mean of the last checked training batch's weights, below :data:`NEARLY_UNIFORM_SPREAD`), free
    weights that never moved from their initial value (their examples were in no hypergradient batch)."""
    lines = []
    if spread is not None and spread < NEARLY_UNIFORM_SPREAD:
        lines.append(f"the learned data weights are nearly uniform (std/mean {spread:.3f} < {NEARLY_UNIFORM_SPREAD} on "
                     "the last outer step's training batch): they carry little signal. Train longer, start the outer "
                     "steps later (outer_patience_epochs), raise outer_learning_rate, or train on the outer data as "
                     "trusted rows (train_on_outer_data).")
    for part in module.modules() if module is not None else ():
        if isinstance(part, DataWeights):
            still = int((part.logits.detach() == part.init).sum())
            if still:
                lines.append(f"{still} of {part.num_examples} example weights never moved (their examples were in no "
                             "hypergradient batch): train longer or raise hypergrad_train_batch_size.")
    return lines
