"""Hugging Face integration of hypergrad: bilevel fine-tuning with learned outer parameters.

* :mod:`hf_integration.trainer`: :class:`BilevelTrainer`, a ``transformers.Trainer`` that learns outer parameters;
* :mod:`hf_integration.arguments`: :class:`BilevelTrainingArguments`;
* :mod:`hf_integration.outer_modules`: :class:`OuterModule`, :class:`DataWeights`, :class:`LossWeights`, :class:`LoraRegularization`,
  :class:`SourceWeights`, :class:`CombinedWeights`;
* :mod:`hf_integration.serialization`: safetensors save/load/check of outer-parameter files;
* :mod:`hf_integration.atomic_files`: atomic file and folder writes; :mod:`hf_integration.public_names`: names that
  may reach the Hub (no machine paths);
* :mod:`hf_integration.model_card`: model cards (``huggingface_hub.ModelCard``);
* :mod:`hf_integration.optimizer_state`: optimizer state dicts without pickle;
* :mod:`hf_integration.checkpoints`: complete-checkpoint checks for resuming;
* :mod:`hf_integration.hub`: Hub upload, timeouts, reachability;
* :mod:`hf_integration.data`: stable example ids, source ids and mixture sampling, dataset fingerprint metadata;
* :mod:`hf_integration.recipe`: the measured data-weighting settings (``recipe=``), trusted outer rows, outer modules
  described by kind and options;
* :mod:`hf_integration.weights_out` / :mod:`hf_integration.weights_dataset`: every example's learned weight, the
  weighted training set, saved or pushed with a dataset card;
* :mod:`hf_integration.sft`: :class:`BilevelSFTTrainer` and :class:`BilevelSFTConfig` for TRL's ``SFTTrainer``
  (optional dependency ``trl``: imported on first use of these names, never by ``import hf_integration``).
"""

from .arguments import BilevelTrainingArguments
from .atomic_files import atomic_write, atomic_write_text
from .checkpoints import CheckpointError
from .data import (MixtureSampler, add_example_ids, add_source_ids, dataset_fingerprint_metadata,
                   example_sampling_probabilities, mixture_sampler, num_example_ids, source_counts)
from .hub import HubError
from .model_card import outer_params_card_section
from .optimizer_state import load_optimizer_state, save_optimizer_state
from .outer_modules import (CombinedWeights, DataWeights, ExampleWeighting, LoraRegularization, LossWeights,
                            OuterModule, SourceWeights, find_lora_modules, parse_layer_index)
from .recipe import RECIPES, TRUSTED_COLUMN, append_outer_rows
from .serialization import MODEL_CARD_NAME, OUTER_CONFIG_NAME, OUTER_OPTIMIZER_NAME, OUTER_PARAMS_NAME
from .trainer import BilevelTrainer, NonFiniteGuard
from .weights_dataset import push_weights_dataset, render_weights_card, save_weights_dataset, weight_summary
from .weights_out import example_weights, weighted_dataset

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
    "SourceWeights",
    "CombinedWeights",
    "ExampleWeighting",
    # data
    "add_example_ids",
    "num_example_ids",
    "dataset_fingerprint_metadata",
    "add_source_ids",
    "source_counts",
    "example_sampling_probabilities",
    "MixtureSampler",
    "mixture_sampler",
    # the recipe and its outputs
    "RECIPES",
    "TRUSTED_COLUMN",
    "append_outer_rows",
    "example_weights",
    "weighted_dataset",
    "save_weights_dataset",
    "push_weights_dataset",
    "render_weights_card",
    "weight_summary",
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

_TRL_NAMES = ("BilevelSFTTrainer", "BilevelSFTConfig")  # not in __all__: a star import must not need TRL


def __getattr__(name: str):
    if name in _TRL_NAMES:
        try:
            from . import sft
        except ModuleNotFoundError as err:
            if err.name != "trl" and not (err.name or "").startswith("trl."):
                raise
            raise ModuleNotFoundError(f"hf_integration.{name} needs TRL: pip install 'hypergrad-bilevel[trl]'.",
                                      name=err.name) from err
        return getattr(sft, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
