"""Collators around another collator: columns put back into its batches, and the response window of a causal LM.

TRL's collators (and most others) keep only the model inputs they know; a bilevel run also needs the columns the
outer module reads (example ids, source ids, trusted-row flags) and, for a cached trunk, each example's row of the
feature table. :class:`KeepColumnsCollator` puts those back. :class:`ResponseCollator` also turns the padded
``labels`` of a causal-LM batch (``-100`` on prompt and padding tokens) into the compact window that
:class:`~hf_integration.frozen_trunk.CachedTrunkCausalLM` computes logits on (:func:`response_window`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .frozen_trunk import FEATURE_ROW, RESPONSE_POSITIONS
from .losses import IGNORE_INDEX

__all__ = ["KeepColumnsCollator", "ResponseCollator", "response_window"]


class KeepColumnsCollator:
    """Data collator that puts ``columns`` of the examples back into the batch when ``collator`` dropped them.

    Numbers become a tensor of one value per example, anything else a list; a column some example lacks is
    left out. Other attributes are those of ``collator``.
    """

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]], columns: Sequence[str]) -> None:
        self.collator = collator
        self.columns = tuple(columns)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        for column in self.columns:
            if column in batch or not features or any(column not in f for f in features):
                continue
            values = [f[column] for f in features]
            try:
                batch[column] = torch.as_tensor(values)
            except (TypeError, ValueError, RuntimeError):
                batch[column] = values
        return batch

    def __getattr__(self, name: str) -> Any:
        if name == "collator":  # not yet set (unpickling)
            raise AttributeError(name)
        return getattr(self.collator, name)


def response_window(labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(window_labels, positions)`` of padded per-token causal-LM ``labels`` ``(batch, T)``: with ``S_b`` the
    positions ``t >= 1`` of row ``b`` whose label is not ``-100``, in order, ``window_labels[b, k] = labels[b,
    S_b[k]]`` and ``positions[b, k] = S_b[k] - 1`` (the position whose hidden state predicts that token), both
    ``(batch, K)`` with ``K = max(1, max_b |S_b|)``; ``-100`` and 0 fill the rest of a row."""
    supervised = labels != IGNORE_INDEX
    supervised[:, 0] = False  # nothing predicts the first token
    counts = supervised.sum(1)
    width = max(1, int(counts.max()))
    # the supervised positions first, each row's in order (a stable sort of "not supervised")
    order = torch.sort((~supervised).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(order.shape[1], device=labels.device).unsqueeze(0) < counts.unsqueeze(1)
    window = torch.where(valid, labels.gather(1, order), torch.full_like(order, IGNORE_INDEX))
    return window, torch.where(valid, order - 1, torch.zeros_like(order))


class ResponseCollator(KeepColumnsCollator):
    """``collator``'s right-padded causal-LM batch (``input_ids``, ``attention_mask``, per-token ``labels``; e.g.
    TRL's ``DataCollatorForLanguageModeling``) with the labels turned into the response window of
    :class:`~hf_integration.frozen_trunk.CachedTrunkCausalLM` (:func:`response_window`: ``labels`` and
    ``response_positions``, both ``(batch, K)``), and the ``columns`` it dropped put back (example and source ids,
    feature rows, trusted-row flags)."""

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
                 columns: Sequence[str] = ("example_id", "source_id", FEATURE_ROW)) -> None:
        super().__init__(collator, columns)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().__call__(features)
        if "attention_mask" in batch and not bool((batch["attention_mask"][:, :1] == 1).all()):
            raise ValueError("ResponseCollator needs right-padded batches (the cached decoder's positions start at "
                             "0 on every row); set the collator's padding side to 'right'.")
        batch["labels"], batch[RESPONSE_POSITIONS] = response_window(batch["labels"])
        return batch
