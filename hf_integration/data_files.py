"""Loading a training script's data from local files or the Hub, checked before any work: a split that cannot be
read, a file that is not UTF-8, a column of yes/no flags that does not say yes or no, sizes and rates out of range,
each refused in one line naming the argument to fix (:class:`~hf_integration.runs.InputError`).

Shared by the classification and instruction tasks (:mod:`hf_integration.classification`,
:mod:`hf_integration.instruction`), whose data-argument dataclasses have the fields these functions read
(``dataset_name``, ``train_file``, ``validation_file``, ``test_file``, ``noise_rate``, ``max_train_samples``,
``max_eval_samples``, ``max_seq_length``, ``dataset_seed`` and the split names).
"""

from __future__ import annotations

import codecs
import math
import os
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np

from .hub import error_line
from .runs import InputError, check_reachable

__all__ = ["embedded_split_sizes", "check_source_arguments", "resolve_noise_rate", "parse_flags", "source_name",
           "load_split", "subset", "check_batch_sizes", "TRUE_FLAGS", "FALSE_FLAGS"]


def embedded_split_sizes(defaults: dict[str, int], data_args) -> dict[str, int]:
    """Sizes of a generated data set's train / validation / test splits: ``defaults``, with
    ``--max_train_samples`` replacing the training size and ``--max_eval_samples`` the other two."""
    sizes = dict(defaults)
    if data_args.max_train_samples is not None:
        sizes["train"] = data_args.max_train_samples
    if data_args.max_eval_samples is not None:
        sizes["validation"] = sizes["test"] = data_args.max_eval_samples
    return sizes

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
        value = getattr(data_args, name, None)  # the instruction data has no --max_seq_length (TRL's --max_length)
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

def load_split(data_args: Any, role: str) -> tuple[datasets.Dataset | None, str]:
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

def subset(dataset: datasets.Dataset, size: int | None, seed: int) -> datasets.Dataset:
    """A seeded random subset (Hub datasets are often sorted by label, so a prefix would be one class)."""
    if size is None or size >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(size)).flatten_indices()

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
