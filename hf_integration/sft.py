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

import inspect
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling, DataCollatorForVisionLanguageModeling

from .arguments import BilevelTrainingArguments
from .collators import KeepColumnsCollator
from .outer_modules import ExampleWeighting, OuterModule
from .trainer import BilevelTrainer, outer_batch_columns

__all__ = ["BilevelSFTConfig", "BilevelSFTTrainer", "KeepColumnsCollator", "check_rows_kept"]

logger = logging.get_logger(__name__)

_TRL_COLLATORS = (DataCollatorForLanguageModeling, DataCollatorForVisionLanguageModeling)


@dataclass
class BilevelSFTConfig(SFTConfig, BilevelTrainingArguments):
    """TRL's ``SFTConfig`` plus the outer problem's fields of :class:`~hf_integration.BilevelTrainingArguments`.

    Every field keeps its default and ``help``; where TRL overrides a ``TrainingArguments`` field, TRL's copy
    wins (``learning_rate=2e-5``, ``gradient_checkpointing=True``, ``bf16`` unless ``fp16``,
    ``logging_steps=10``), which is why ``SFTConfig`` comes first among the bases. Both classes' checks run.
    """


def check_rows_kept(prepared: Any, expected: int, role: str, max_length: int | None) -> None:
    """``ValueError`` when TRL's preparation dropped rows of a ``role`` set: `SFTTrainer` drops an example whose
    completion starts at or beyond ``max_length`` tokens (nothing left to train on), which would leave it out of
    training, weighting and evaluation without a word."""
    if isinstance(prepared, Sized) and len(prepared) != expected:
        raise ValueError(f"`max_length` {max_length} leaves {expected - len(prepared)} of {expected} {role} example(s) "
                         "without a completion token (their prompt fills `max_length`): raise `max_length`, or "
                         "shorten or drop those prompts.")


class BilevelSFTTrainer(BilevelTrainer, SFTTrainer):
    """TRL's ``SFTTrainer`` that also learns outer parameters, as :class:`~hf_integration.BilevelTrainer` does.

    Takes ``SFTTrainer``'s arguments (``processing_class``, ``peft_config``, ``formatting_func``, ...) and
    ``BilevelTrainer``'s (``outer_module``, ``outer_param_patterns``, ``dataset_name``, ``dataset_split``);
    ``args`` must be a :class:`BilevelSFTConfig` and ``eval_dataset`` (one dataset, any format TRL accepts)
    is the outer validation set. The columns the outer module reads (``DataWeights.id_column``) survive TRL's
    dataset preparation and are put back into the batches of TRL's collator; a collator you pass yourself
    must keep them (a :class:`~hf_integration.collators.KeepColumnsCollator`, e.g. ``ResponseCollator``, is told
    to). The training loss is the outer module's combination of per-example losses and
    ``eval_loss`` their mean (TRL's are token means); TRL's token-accuracy and entropy metrics are not logged.

    Raises:
        TypeError: ``args`` is not a :class:`BilevelSFTConfig`.
        ValueError: ``packing`` or ``padding_free`` with an outer module that reads per-example columns (a
            packed or flattened row mixes examples); ``outer_param_patterns`` with ``peft_config``; a training or
            outer example that truncation to ``max_length`` leaves without a completion token (TRL drops it).
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
        weights_examples = args.outer_module in ("data_weights", "loss_weights") or isinstance(outer_module,
                                                                                               ExampleWeighting)
        if weights_examples and not args.assistant_only_loss and "messages" in next(iter(train_dataset), {}):
            logger.warning("The training rows are conversations (`messages`) without `assistant_only_loss`: each "
                           "example's loss, which the data weights judge, covers the prompt's tokens too. Pass "
                           "prompt/completion rows (prompt = messages[:-1], completion = messages[-1:]) or set "
                           "assistant_only_loss=True (a chat template with generation markers).")
        super().__init__(model, args, train_dataset, eval_dataset, outer_module=outer_module,
                         outer_param_patterns=outer_param_patterns, dataset_name=dataset_name,
                         dataset_split=dataset_split, **kwargs)
        outer = eval_dataset if kwargs.get("outer_dataset") is None else kwargs["outer_dataset"]
        if not args.packing:  # rows are examples: the weights, the ids and num_training_rows count them
            check_rows_kept(self.train_dataset, len(train_dataset) + (len(outer) if self.trusted_column else 0),
                            "training", args.max_length)
            check_rows_kept(self.outer_dataset, len(outer), "outer", args.max_length)
        if self.outer_columns and isinstance(self.data_collator, _TRL_COLLATORS):
            self.data_collator = KeepColumnsCollator(self.data_collator, self.outer_columns)

    def _set_signature_columns_if_needed(self) -> None:
        """TRL's columns (``input_ids``, ``labels``, ...), the outer module's, and, as `Trainer` keeps them, the
        model's own inputs: a wrapper such as :class:`~hf_integration.frozen_trunk.CachedTrunkCausalLM` reads
        ``feature_row``, which TRL's fixed list would drop."""
        super()._set_signature_columns_if_needed()
        model = self._unwrapped
        for name in inspect.signature(model.forward).parameters:
            if name not in self._signature_columns and name not in ("args", "kwargs"):
                self._signature_columns.append(name)
