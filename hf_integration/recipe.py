"""The data-weighting and regularization recipes as library options: presets of measured settings, the inner
problem's data (training rows plus trusted outer rows), example ids, and outer modules described by a kind and its
options.

A data-weighting run that works on real data needs more than an outer module: the outer objective's rows are
also trained on, as *trusted* rows the learned weighting leaves alone (:data:`TRUSTED_COLUMN`), the first outer
step waits until the model has fit the clean signal (``outer_patience_epochs``), and a few settings were chosen
by measurement (``docs/`` and ``benchmarks/`` hold the measurements). :data:`RECIPES` names those settings;
``BilevelTrainingArguments(recipe="data_weighting")`` fills the fields a user left at their defaults with them.
``recipe="lora_regularization"`` does the same for learned LoRA regularization strengths, whose outer steps wait for
a third of the run (``outer_patience_ratio``).

Outer modules can be described instead of built (``outer_module="loss_weights"`` and ``outer_module_options``),
so that a command line or a YAML file sets them, the run records them, and the trainer builds them when what
they need exists: a ``DataWeights`` sized from the training set's example ids, a ``LoraRegularization`` from
the model after PEFT wrapping (TRL's ``peft_config=``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import datasets
from torch import nn

from .data import add_example_ids, num_example_ids
from .outer_modules import DataWeights, ExampleWeighting, LoraRegularization, LossWeights, OuterModule

__all__ = ["RECIPES", "TRUSTED_COLUMN", "OUTER_MODULE_KINDS", "apply_recipe", "append_outer_rows",
           "prepare_training_rows", "steps_per_epoch", "total_inner_steps", "resolve_outer_patience",
           "build_outer_module", "reads_trusted_rows"]

TRUSTED_COLUMN = "trusted"
"""The column flagging the outer rows appended to the inner problem's data (``train_on_outer_data``)."""

RECIPES: dict[str, dict[str, Any]] = {
    # The classification job's measured settings (examples/data_reweighting.py): loss-based weights with the
    # validation rows trained on as trusted rows, first-order hypergradients, an outer step every 10 inner steps
    # after half an epoch, 32 + 32 examples per hypergradient.
    "data_weighting": {
        "outer_module": "loss_weights", "train_on_outer_data": True, "ihvp_method": "identity",
        "outer_learning_rate": 0.3, "unroll_steps": 10, "outer_patience_epochs": 0.5,
        "hypergrad_train_batch_size": 32, "outer_batch_size": 32,
    },
    # The instruction job's (examples/instruction_data_weights.py): the same, with the trusted rows at their uniform
    # share of each batch, loss_scale starting at 1, an outer step every 8 inner steps and 50 validation rows each.
    "sft_data_weighting": {
        "outer_module": "loss_weights", "outer_module_options": {"init_loss_scale": 1.0, "trusted_share": "uniform"},
        "train_on_outer_data": True, "ihvp_method": "identity", "outer_learning_rate": 0.3, "unroll_steps": 8,
        "outer_patience_epochs": 0.5, "hypergrad_train_batch_size": 32, "outer_batch_size": 50,
    },
    # The PEFT regularization job's (examples/peft_regularization.py, docs/peft-regularization.md): one L2 strength
    # per LoRA module starting at 1e-3, an outer step every 2 inner steps once a third of the run is done (earlier
    # hypergradients see a model that cannot overfit yet and push every strength down), Adam lr 0.3 on the log
    # strengths, Nystrom hypergradients of 32 training and 64 validation examples.
    "lora_regularization": {
        "outer_module": "lora_regularization", "outer_module_options": {"granularity": "module", "init_strength": 1e-3},
        "outer_learning_rate": 0.3, "unroll_steps": 2, "outer_patience_ratio": 1 / 3,
        "hypergrad_train_batch_size": 32, "outer_batch_size": 64,
    },
}


# The fields a recipe sets default to None ("not set"): this is what they are when neither the user nor a recipe
# set them.
UNSET_DEFAULTS = {"ihvp_method": "nystrom", "outer_learning_rate": 0.1, "unroll_steps": 10,
                  "train_on_outer_data": False}


def apply_recipe(args: Any) -> None:
    """Fill every field that ``args.recipe`` names and the user left unset (``None``) with the recipe's value, then
    the fields still unset with their plain defaults (:data:`UNSET_DEFAULTS`); ``args.recipe=None`` applies only the
    latter. What the user set stays, even a value equal to a plain default."""
    if args.recipe is not None and args.recipe not in RECIPES:
        raise ValueError(f"`recipe` must be one of {sorted(RECIPES)} or None, got {args.recipe!r}.")
    for name, value in (RECIPES[args.recipe] if args.recipe else {}).items():
        if getattr(args, name) is None:
            setattr(args, name, copy.deepcopy(value))
    for name, value in UNSET_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def steps_per_epoch(args: Any, num_rows: int) -> int:
    """Optimizer steps in one epoch of ``num_rows`` training rows, as `Trainer` counts them (every process's batch
    and gradient accumulation)."""
    batches = math.ceil(num_rows / (args.per_device_train_batch_size * max(1, args.world_size)))
    return max(math.ceil(batches / args.gradient_accumulation_steps), 1)


def total_inner_steps(args: Any, num_rows: int) -> int:
    """The optimizer steps `Trainer` will run on ``num_rows`` rows: ``max_steps``, or the epochs' worth of batches."""
    if args.max_steps > 0:
        return args.max_steps
    return math.ceil(args.num_train_epochs * steps_per_epoch(args, num_rows))


def resolve_outer_patience(args: Any, num_training_rows: int, num_inner_rows: int | None = None) -> int:
    """``args.outer_patience_steps``, first set (when it is 0) from ``outer_patience_epochs``, epochs of the
    ``num_training_rows`` training rows, else from ``outer_patience_ratio``, that fraction of the run's inner steps on
    ``num_inner_rows`` rows (default: the training rows; the trusted outer rows of ``train_on_outer_data`` count
    there), rounded to the nearest step. Idempotent: once set, the steps stay."""
    if args.outer_patience_steps == 0:
        if args.outer_patience_epochs is not None:
            args.outer_patience_steps = round(args.outer_patience_epochs * steps_per_epoch(args, num_training_rows))
        elif args.outer_patience_ratio is not None:
            total = total_inner_steps(args, num_training_rows if num_inner_rows is None else num_inner_rows)
            args.outer_patience_steps = round(args.outer_patience_ratio * total)
    return args.outer_patience_steps


def reads_trusted_rows(module: nn.Module | None, kind: str | None) -> bool:
    """Whether the outer module (or the kind to build) can leave trusted rows out of its weighting: a module with a
    ``trusted_column`` attribute (``LossWeights``, or a combination holding one)."""
    if kind is not None:
        return kind == "loss_weights"
    return module is not None and any(isinstance(part, ExampleWeighting) and part.accepts_trusted_rows
                                      for part in module.modules())


def append_outer_rows(train: datasets.Dataset, outer: datasets.Dataset, flag_column: str | None = TRUSTED_COLUMN,
                      drop: tuple[str, ...] = ()) -> datasets.Dataset:
    """The training rows followed by the outer rows, on the columns both have (without ``drop``, e.g. example-id
    columns the outer rows lack); ``flag_column`` (unless ``None``) flags the outer rows (1) and the training rows
    (0), the trusted rows of ``train_on_outer_data``."""
    if not isinstance(train, datasets.Dataset) or not isinstance(outer, datasets.Dataset):
        raise TypeError("the training and outer data must be datasets.Dataset objects to be joined, got "
                        f"{type(train).__name__} and {type(outer).__name__}.")
    if flag_column is not None and flag_column in train.column_names:
        raise ValueError(f"train_on_outer_data adds the column {flag_column!r}, which the training data already has; "
                         "rename it.")
    shared = [c for c in train.column_names if c in outer.column_names and c not in drop]
    if not shared:
        raise ValueError(f"the outer data shares no column with the training data (training: {train.column_names}; "
                         f"outer: {outer.column_names}).")
    first = train.select_columns(shared)
    joined = datasets.concatenate_datasets([first, outer.select_columns(shared).cast(first.features)])
    if flag_column is None:
        return joined
    return joined.add_column(flag_column, [0] * len(first) + [1] * (len(joined) - len(first)))


def _with_ids(train: Any, column: str) -> Any:
    """``train`` with example ids in ``column`` (added in its current row order when missing)."""
    if not isinstance(train, datasets.Dataset) or column in train.column_names:
        return train
    return add_example_ids(train, column)


def prepare_training_rows(train: Any, outer: Any, *, module: nn.Module | None, kind: str | None,
                          options: Mapping[str, Any], train_on_outer_data: bool) -> tuple[Any, Any, str | None]:
    """``(training rows, inner data, trusted column)``: the training set with the example ids the outer module
    reads (added where missing, in the rows' current order); the inner problem's data, those rows followed by the
    outer rows flagged trusted when ``train_on_outer_data``; the trusted column (``None`` without trusted rows)."""
    id_columns = [part.id_column for part in (module.modules() if module is not None else ())
                  if isinstance(part, OuterModule)]
    if kind == "data_weights":
        id_columns.append(options.get("id_column", "example_id"))
    for column in (c for c in id_columns if isinstance(c, str) and c):
        train = _with_ids(train, column)
    if not train_on_outer_data:
        return train, train, None
    if not reads_trusted_rows(module, kind):
        what = kind or type(module).__name__
        raise ValueError(f"train_on_outer_data needs an outer module that leaves trusted rows out of its weighting "
                         f"(loss_weights); {what} would weight the outer rows too and fit the set it is scored on.")
    readers = [part for part in (module.modules() if module is not None else ())
               if isinstance(part, ExampleWeighting) and part.accepts_trusted_rows]
    column = next((part.trusted_column for part in readers if part.trusted_column), None) or TRUSTED_COLUMN
    for part in readers:
        if part.trusted_column is None:
            part.trusted_column = column
    return train, append_outer_rows(train, outer, column, drop=tuple(c for c in id_columns if c)), column


OUTER_MODULE_KINDS = ("data_weights", "loss_weights", "lora_regularization")


def build_outer_module(kind: str, options: Mapping[str, Any], *, model: nn.Module, train_dataset: Any,
                       trusted_column: str | None) -> OuterModule:
    """The outer module of ``kind`` with ``options``, built from what exists once the trainer does: ``data_weights``
    sized from ``train_dataset``'s example ids, ``loss_weights`` with the trusted column, ``lora_regularization``
    from the (PEFT-wrapped) ``model``. Unknown options are refused with the kind's own message."""
    options = dict(options)
    try:
        if kind == "data_weights":
            column = options.pop("id_column", "example_id")
            return DataWeights(num_example_ids(train_dataset, column), id_column=column, **options)
        if kind == "loss_weights":
            return LossWeights(trusted_column=trusted_column, **options)
        if kind == "lora_regularization":
            if "init_strength" in options:  # the friendlier scale of the example script
                options["init_log_strength"] = math.log(options.pop("init_strength"))
            return LoraRegularization.from_peft_model(model, **options)
    except TypeError as err:
        raise ValueError(f"`outer_module_options` {dict(options)} do not fit outer_module={kind!r}: {err}") from None
    raise ValueError(f"`outer_module` must be one of {OUTER_MODULE_KINDS}, got {kind!r}.")
