"""Dataset helpers: stable example ids (for per-example data weights) and fingerprint metadata.

Per-example outer parameters (:class:`hf_integration.outer_modules.DataWeights`) are indexed by an integer
example id stored *in* the dataset, not by row position: positions change under ``shuffle``, ``filter``,
``select`` or ``train_test_split``, while an id column travels with its row. Add ids once, right after
loading and **before** any shuffling or filtering, so that the same id always names the same example::

    ds = add_example_ids(load_dataset(...)["train"])     # ids 0..n-1 in original order
    ds = ds.filter(...).shuffle(seed=0)                  # ids survive
    weights = DataWeights(num_example_ids(ds))
"""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
import pyarrow as pa

__all__ = ["add_example_ids", "num_example_ids", "dataset_fingerprint_metadata"]


def _id_array(dataset: datasets.Dataset, column: str) -> np.ndarray:
    """The id column in row order (honouring shuffle/select index mappings), validated as non-null integers."""
    table = dataset.select_columns([column]).with_format("arrow")[:]
    col = table.column(column)
    if not pa.types.is_integer(col.type):
        raise TypeError(
            f"dataset column {column!r} exists but has type {col.type}, not an integer type; example ids must be "
            f"integers. Rename or remove it, or pass another column name"
        )
    if col.null_count:
        raise ValueError(f"dataset column {column!r} has {col.null_count} missing (null) ids")
    return col.to_numpy()


def add_example_ids(dataset: datasets.Dataset | datasets.DatasetDict, column: str = "example_id") -> Any:
    """Add a stable integer example-id column ``0 .. n-1`` (in the current row order).

    Call this **before** shuffling or filtering: the ids then name the original examples and survive any
    later ``shuffle`` / ``filter`` / ``select``, which is what lets learned per-example weights be matched
    back to examples. If ``column`` already exists and holds unique non-negative integers, the dataset is
    returned unchanged (so calling this again after filtering keeps the original ids).

    Args:
        dataset: A ``datasets.Dataset``, or a ``DatasetDict`` (each split gets its own ids ``0 .. n_split-1``).
        column: Name of the id column.

    Returns:
        The dataset with the id column (``int64``).

    Raises:
        TypeError: ``column`` exists with a non-integer type, or ``dataset`` is not a (map-style) Dataset.
        ValueError: ``column`` exists with null, negative or duplicate values.
    """
    if isinstance(dataset, datasets.DatasetDict):
        return datasets.DatasetDict({split: add_example_ids(ds, column) for split, ds in dataset.items()})
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"add_example_ids needs a map-style datasets.Dataset (or DatasetDict), got {type(dataset).__name__}; "
            "streaming IterableDatasets have no stable row count to index weights by"
        )
    if column in dataset.column_names:
        ids = _id_array(dataset, column)
        if ids.size and ids.min() < 0:
            raise ValueError(f"dataset column {column!r} has negative ids (min {ids.min()}); ids must be >= 0")
        unique = np.unique(ids)
        if unique.size != ids.size:
            raise ValueError(
                f"dataset column {column!r} exists but its values are not unique ({ids.size - unique.size} "
                "duplicates): it cannot serve as example ids. Remove it or choose another column name"
            )
        return dataset
    return dataset.add_column(column, np.arange(dataset.num_rows, dtype=np.int64))


def num_example_ids(dataset: datasets.Dataset, column: str = "example_id") -> int:
    """``max(id) + 1``: the ``num_examples`` a :class:`DataWeights` for this dataset needs (0 if empty).

    After filtering, this can exceed ``len(dataset)``: weights of dropped examples simply stay unused.
    """
    if column not in dataset.column_names:
        raise KeyError(f"dataset has no example-id column {column!r}; add it with add_example_ids first")
    ids = _id_array(dataset, column)
    return int(ids.max()) + 1 if ids.size else 0


def dataset_fingerprint_metadata(
    dataset: datasets.Dataset,
    dataset_name: str | None = None,
    split: str | None = None,
    id_column: str = "example_id",
) -> dict[str, str]:
    """Metadata identifying the training data, to save with learned outer parameters and check on load.

    Returns ``{"fingerprint", "num_rows", "id_column"}`` plus ``"dataset_name"`` / ``"split"`` when given
    (all values ``str``). ``fingerprint`` is the ``datasets`` fingerprint (``dataset._fingerprint``), a hash
    of the data and of the transforms applied to it: deterministic for the same data and processing, but
    changed by *any* transform (including ``shuffle``), so record it for the dataset as the trainer receives
    it and compare against one prepared the same way. Use the result directly as
    ``OuterModule.from_pretrained(..., expected=...)``.
    """
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"dataset_fingerprint_metadata needs a datasets.Dataset, got {type(dataset).__name__}")
    meta = {
        "fingerprint": str(dataset._fingerprint),
        "num_rows": str(dataset.num_rows),
        "id_column": id_column,
    }
    if dataset_name is not None:
        meta["dataset_name"] = str(dataset_name)
    if split is not None:
        meta["split"] = str(split)
    return meta
