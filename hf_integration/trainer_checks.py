"""`BilevelTrainer`'s input checks (:class:`InputChecksMixin`): the arguments, datasets, outer module and model
patterns refused before any work, and a batch without the columns the outer module reads, named with its cause."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn

from .arguments import BilevelTrainingArguments
from .outer_modules import DataWeights, OuterModule

__all__ = ["InputChecksMixin"]


class InputChecksMixin:
    """The checks of `BilevelTrainer` (a mixin of it)."""

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
