"""The cheap data filters practitioners try first on instruction data: scores that rank the training rows for
dropping, computed once before training, higher = dropped first (the rivals' ``length_filter`` and ``ifd_filter``).

* :func:`response_lengths`: the response tokens of each row (its labels other than ``-100``). The length filter
  drops the shortest responses: a truncated response is short, and keeping the longest responses is a strong
  selection baseline for instruction tuning (Zhao et al., 2024, "Long Is More for Alignment").
* :func:`ifd_scores`: the instruction-following difficulty (Li et al., 2024, "From Quantity to Quality"),
  ``IFD = L(response | prompt) / L(response)``, each ``L`` the mean next-token cross-entropy of the response tokens
  under a causal LM (the initial model), with and without the prompt before them. A response its prompt does not
  help predict (swapped to another question, off-task) has an IFD near or above 1; the IFD filter drops the highest.
* :func:`prompt_free_reference`: the IFD's denominator alone, ``L(response)``, defined for every row: the reference
  loss a :class:`~hf_integration.outer_modules.LossWeights` measures each loss against (``reference_column``).

Rows are prepared causal-LM rows (``input_ids`` and ``labels`` with ``-100`` on the prompt, as TRL's
``SFTTrainer`` prepares prompt/completion rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .losses import per_example_loss

__all__ = ["SCORE_FILTERS", "response_lengths", "response_losses_with_and_without_prompt", "prompt_free_reference",
           "ifd_scores", "filter_scores"]

SCORE_FILTERS = ("length_filter", "ifd_filter")


def _rows(dataset) -> tuple[list[list[int]], list[list[int]]]:
    missing = [c for c in ("input_ids", "labels") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"the response filters read prepared causal-LM rows, but the rows lack {missing} (prepare "
                         "them as TRL's SFTTrainer does: prompt/completion rows give labels -100 on the prompt)")
    return list(dataset["input_ids"]), list(dataset["labels"])


def response_lengths(dataset) -> np.ndarray:
    """The number of response tokens of each row (labels other than ``-100``), in the rows' order."""
    _, labels = _rows(dataset)
    return np.array([sum(1 for t in row if t != -100) for row in labels], dtype=np.int64)


def _padded(sequences: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_token_id: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    lab = torch.full((len(sequences), width), -100, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (s, y) in enumerate(zip(sequences, labels)):
        ids[i, : len(s)], lab[i, : len(y)], mask[i, : len(s)] = torch.as_tensor(s), torch.as_tensor(y), 1
    return ids, lab, mask


@torch.no_grad()
def _response_losses(model: nn.Module, dataset, pad_token_id: int, batch_size: int, with_prompt: bool
                     ) -> tuple[np.ndarray | None, np.ndarray]:
    """``(L(response | prompt) or None, L(response))`` of each row (see
    :func:`response_losses_with_and_without_prompt`); the conditioned losses only ``with_prompt``."""
    input_ids, labels = _rows(dataset)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    conditioned, alone = [], []

    def losses_of(sequences, targets) -> torch.Tensor:
        batch_ids, batch_labels, mask = _padded(sequences, targets, pad_token_id)
        logits = model(input_ids=batch_ids.to(device), attention_mask=mask.to(device)).logits
        return per_example_loss(logits, batch_labels.to(device), causal_lm=True).double().cpu()

    try:
        for start in range(0, len(input_ids), batch_size):
            ids, lab = input_ids[start:start + batch_size], labels[start:start + batch_size]
            responses = [[t for t, y in zip(s, y_row) if y != -100] for s, y_row in zip(ids, lab)]
            if with_prompt:
                conditioned.append(losses_of(ids, lab))
            short = torch.tensor([len(r) < 2 for r in responses])
            alone.append(torch.where(short, torch.nan, losses_of(responses, responses)))
    finally:
        model.train(was_training)
    return (torch.cat(conditioned).numpy() if with_prompt else None), torch.cat(alone).numpy()


def response_losses_with_and_without_prompt(model: nn.Module, dataset, pad_token_id: int, batch_size: int = 16
                                            ) -> tuple[np.ndarray, np.ndarray]:
    """``(L(response | prompt), L(response))`` of each row under ``model`` (a causal LM, in evaluation mode), in the
    rows' order: the mean next-token cross-entropy of the response tokens after the prompt, and of the response
    tokens scored alone (its first token is predicted by nothing, as in the IFD paper; a row whose response has fewer
    than 2 tokens gets ``NaN`` there: no unconditioned prediction)."""
    return _response_losses(model, dataset, pad_token_id, batch_size, with_prompt=True)


def prompt_free_reference(model: nn.Module, dataset, pad_token_id: int, batch_size: int = 16) -> np.ndarray:
    """``L(response)`` of each row under ``model`` (the response scored without its prompt, as in
    :func:`response_losses_with_and_without_prompt`), the rows whose response has fewer than 2 tokens given the mean
    of the others: a reference loss for :class:`~hf_integration.outer_modules.LossWeights`' ``reference_column``,
    finite for every row (0 when no row has one)."""
    alone = _response_losses(model, dataset, pad_token_id, batch_size, with_prompt=False)[1]
    defined = alone[~np.isnan(alone)]
    return np.where(np.isnan(alone), float(defined.mean()) if defined.size else 0.0, alone)


def ifd_scores(model: nn.Module, dataset, pad_token_id: int, batch_size: int = 16) -> np.ndarray:
    """``L(response | prompt) / L(response)`` of each row under ``model``, in the rows' order
    (:func:`response_losses_with_and_without_prompt`); ``NaN`` where ``L(response)`` is undefined."""
    conditioned, alone = response_losses_with_and_without_prompt(model, dataset, pad_token_id, batch_size)
    return conditioned / np.maximum(alone, 1e-12)


def filter_scores(name: str, dataset, model: nn.Module | None = None, pad_token_id: int | None = None,
                  batch_size: int = 16) -> np.ndarray:
    """The dropping scores of filter ``name`` (one of :data:`SCORE_FILTERS`) for the rows of ``dataset``: minus the
    response length, or the IFD under ``model`` (rows whose IFD is undefined are kept: score ``-inf``)."""
    if name == "length_filter":
        return -response_lengths(dataset).astype(np.float64)
    if name == "ifd_filter":
        if model is None or pad_token_id is None:
            raise ValueError("the IFD filter needs the initial causal LM and its tokenizer's pad token id")
        scores = ifd_scores(model, dataset, pad_token_id, batch_size)
        return np.where(np.isnan(scores), -np.inf, scores)
    raise ValueError(f"unknown filter {name!r}; choose from {SCORE_FILTERS}")
