"""Bilevel supervised fine-tuning with TRL: :class:`BilevelSFTTrainer` and :class:`BilevelSFTConfig`.

``BilevelSFTTrainer`` is TRL's ``SFTTrainer`` (dataset formats, chat templates, completion-only and
assistant-only losses, PEFT) whose training objective is :class:`~hf_integration.BilevelTrainer`'s: the
outer module (e.g. :class:`~hf_integration.DataWeights`) combines per-example losses, each the mean over
the example's tokens whose label is not ``-100`` (TRL labels a prompt's tokens ``-100`` by default), and its
parameters are learned on ``eval_dataset`` by implicit differentiation. From ``SFTTrainer``,
change the two class names and pass ``outer_module``.

Needs the optional dependency TRL (``pip install "hypergrad-bilevel[trl]"``); ``import hf_integration`` does not
import it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling, DataCollatorForVisionLanguageModeling

from .arguments import BilevelTrainingArguments
from .outer_modules import OuterModule
from .trainer import BilevelTrainer, outer_batch_columns

__all__ = ["BilevelSFTConfig", "BilevelSFTTrainer", "KeepColumnsCollator"]

_TRL_COLLATORS = (DataCollatorForLanguageModeling, DataCollatorForVisionLanguageModeling)


@dataclass
class BilevelSFTConfig(SFTConfig, BilevelTrainingArguments):
    """TRL's ``SFTConfig`` plus the outer problem's fields of :class:`~hf_integration.BilevelTrainingArguments`.

    Every field keeps its default and ``help``; where TRL overrides a ``TrainingArguments`` field, TRL's copy
    wins (``learning_rate=2e-5``, ``gradient_checkpointing=True``, ``bf16`` unless ``fp16``,
    ``logging_steps=10``), which is why ``SFTConfig`` comes first among the bases. Both classes' checks run.
    """


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


class BilevelSFTTrainer(BilevelTrainer, SFTTrainer):
    """TRL's ``SFTTrainer`` that also learns outer parameters, as :class:`~hf_integration.BilevelTrainer` does.

    Takes ``SFTTrainer``'s arguments (``processing_class``, ``peft_config``, ``formatting_func``, ...) and
    ``BilevelTrainer``'s (``outer_module``, ``outer_param_patterns``, ``dataset_name``, ``dataset_split``);
    ``args`` must be a :class:`BilevelSFTConfig` and ``eval_dataset`` (one dataset, any format TRL accepts)
    is the outer validation set. The columns the outer module reads (``DataWeights.id_column``) survive TRL's
    dataset preparation and are put back into the batches of TRL's collator; a collator you pass yourself
    must keep them. The training loss is the outer module's combination of per-example losses and
    ``eval_loss`` their mean (TRL's are token means); TRL's token-accuracy and entropy metrics are not logged.

    Raises:
        TypeError: ``args`` is not a :class:`BilevelSFTConfig`.
        ValueError: ``packing`` or ``padding_free`` with an outer module that reads per-example columns (a
            packed or flattened row mixes examples); ``outer_param_patterns`` with ``peft_config``.
    """

    def __init__(
        self,
        model: str | nn.Module,
        args: BilevelSFTConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        outer_module: OuterModule | None = None,
        outer_param_patterns: Sequence[str] | None = None,
        dataset_name: str | None = None,
        dataset_split: str | None = "train",
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, BilevelSFTConfig):
            raise TypeError("`args` must be a BilevelSFTConfig (TRL's SFTConfig plus the outer problem's settings), "
                            f"got {type(args).__name__}.")
        columns = outer_batch_columns(outer_module)
        if columns and args.packing:
            raise ValueError("`packing=True` cannot be used with per-example weights: one packed row mixes examples; "
                             f"set packing=False ({type(outer_module).__name__} reads {columns[0]!r} per example).")
        if columns and args.padding_free:
            raise ValueError("`padding_free=True` cannot be used with per-example weights: the batch becomes one row "
                             f"mixing examples; set padding_free=False ({type(outer_module).__name__} reads "
                             f"{columns[0]!r} per example).")
        if outer_param_patterns and kwargs.get("peft_config") is not None:
            raise ValueError("`outer_param_patterns` name parameters of the model as passed, which `peft_config` would "
                             "wrap and rename: apply `peft.get_peft_model` first and pass the PEFT model.")
        if isinstance(model, str) and outer_param_patterns:
            raise ValueError("`outer_param_patterns` needs the model itself: load it first, then pass it.")
        super().__init__(model, args, train_dataset, eval_dataset, outer_module=outer_module,
                         outer_param_patterns=outer_param_patterns, dataset_name=dataset_name,
                         dataset_split=dataset_split, **kwargs)
        if self.outer_columns and isinstance(self.data_collator, _TRL_COLLATORS):
            self.data_collator = KeepColumnsCollator(self.data_collator, self.outer_columns)
