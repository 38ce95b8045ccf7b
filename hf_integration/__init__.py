"""Hugging Face integration of hypergrad: bilevel fine-tuning with learned outer parameters.

* :mod:`hf_integration.trainer`: :class:`BilevelTrainer`, a ``transformers.Trainer`` that learns outer parameters;
* :mod:`hf_integration.arguments`: :class:`BilevelTrainingArguments`;
* :mod:`hf_integration.outer_modules`: :class:`OuterModule`, :class:`DataWeights`, :class:`LossWeights`, :class:`LoraRegularization`;
* :mod:`hf_integration.serialization`: atomic writes, safetensors save/load/check of outer-parameter files;
* :mod:`hf_integration.model_card`: model cards (``huggingface_hub.ModelCard``);
* :mod:`hf_integration.optimizer_state`: optimizer state dicts without pickle;
* :mod:`hf_integration.checkpoints`: complete-checkpoint checks for resuming;
* :mod:`hf_integration.hub`: Hub upload, timeouts, reachability (re-exports the names above);
* :mod:`hf_integration.data`: stable example ids and dataset fingerprint metadata.
"""

from .data import add_example_ids, dataset_fingerprint_metadata, num_example_ids
from .serialization import (
    MODEL_CARD_NAME,
    OUTER_CONFIG_NAME,
    OUTER_OPTIMIZER_NAME,
    OUTER_PARAMS_NAME,
    atomic_write,
    atomic_write_text,
)
from .model_card import outer_params_card_section
from .optimizer_state import load_optimizer_state, save_optimizer_state
from .outer_modules import DataWeights, LoraRegularization, LossWeights, OuterModule, find_lora_modules, parse_layer_index
from .arguments import BilevelTrainingArguments
from .checkpoints import CheckpointError
from .hub import HubError
from .trainer import BilevelTrainer, NonFiniteGuard

__all__ = [
    # trainer
    "BilevelTrainer",
    "BilevelTrainingArguments",
    "NonFiniteGuard",
    # errors that name the file or the Hub request that failed
    "CheckpointError",
    "HubError",
    # outer modules
    "OuterModule",
    "DataWeights",
    "LoraRegularization",
    "LossWeights",
    "find_lora_modules",
    "parse_layer_index",
    # data
    "add_example_ids",
    "num_example_ids",
    "dataset_fingerprint_metadata",
    # persistence
    "atomic_write",
    "atomic_write_text",
    "outer_params_card_section",
    "save_optimizer_state",
    "load_optimizer_state",
    "OUTER_PARAMS_NAME",
    "OUTER_CONFIG_NAME",
    "OUTER_OPTIMIZER_NAME",
    "MODEL_CARD_NAME",
]
