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
import pyarrow.compute as pc
import torch
from torch.utils.data import Sampler

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
    id_column: str | None = "example_id",
) -> dict[str, str]:
    """Metadata identifying the training data, to save with learned outer parameters and check on load.

    Returns ``{"fingerprint", "num_rows", "id_column"}`` plus ``"dataset_name"`` / ``"split"`` when given
    (all values ``str``; no ``"id_column"`` with ``id_column=None``, for outer parameters that index no
    examples, e.g. ``LossWeights``). ``fingerprint`` is the ``datasets`` fingerprint (``dataset._fingerprint``), a hash
    of the data and of the transforms applied to it: deterministic for the same data and processing, but
    changed by *any* transform (including ``shuffle``), so record it for the dataset as the trainer receives
    it and compare against one prepared the same way. Use the result directly as
    ``OuterModule.from_pretrained(..., expected=...)``.
    """
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"dataset_fingerprint_metadata needs a datasets.Dataset, got {type(dataset).__name__}")
    meta = {"fingerprint": str(dataset._fingerprint), "num_rows": str(dataset.num_rows)}
    if id_column is not None:
        meta["id_column"] = id_column
    if dataset_name is not None:
        meta["dataset_name"] = str(dataset_name)
    if split is not None:
        meta["split"] = str(split)
    return meta


# ==================================================================================================
# Data sources (domains): integer source ids and sampling by a learned mixture
# ==================================================================================================

__all__ += ["add_source_ids", "source_counts", "example_sampling_probabilities", "MixtureSampler", "mixture_sampler"]


def _source_table_column(dataset: datasets.Dataset, column: str) -> pa.Array:
    """``column`` in row order (honouring shuffle/select index mappings) as one arrow array, without nulls."""
    if column not in dataset.column_names:
        raise KeyError(f"dataset has no source column {column!r} (columns: {dataset.column_names})")
    col = dataset.select_columns([column]).with_format("arrow")[:].column(column).combine_chunks()
    if not (pa.types.is_integer(col.type) or pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
            or pa.types.is_boolean(col.type)):
        raise TypeError(f"dataset column {column!r} has type {col.type}; source values must be strings or integers")
    if col.null_count:
        raise ValueError(f"dataset column {column!r} has {col.null_count} missing (null) values; every example "
                         "needs a source")
    return col


def add_source_ids(
    dataset: datasets.Dataset | datasets.DatasetDict,
    source_column: str,
    id_column: str = "source_id",
    names: list[str] | tuple[str, ...] | None = None,
) -> tuple[Any, list[str]]:
    """Add an integer source-id column: the index of each example's source (domain) in a fixed list of names.

    The names are the sorted unique values of ``source_column`` (as strings: integer values are sorted as
    numbers, then written with ``str``), or, for a ``datasets.ClassLabel`` column, its label names (ids are
    then the class indices); pass ``names`` to fix the order yourself, e.g. the
    :attr:`~hf_integration.outer_modules.SourceWeights.source_names` of saved weights, so that the ids of
    another split or dataset mean the same sources. Unlike example ids, source ids may be added at any time
    (they depend on the row's own value, not on its position)::

        train, names = add_source_ids(train, "domain")           # e.g. names == ["code", "math", "web"]
        val, _ = add_source_ids(val, "domain", names=names)      # same ids for the same domains
        weights = SourceWeights(names)                           # reads batch["source_id"]

    Args:
        dataset: A ``datasets.Dataset``, or a ``DatasetDict`` (all splits share one list of names: by default
            the sorted union of their values).
        source_column: The column naming each example's source (strings, integers or a ``ClassLabel``).
        id_column: Name of the new ``int64`` column.
        names: The source names in id order; every value of ``source_column`` (as ``str``) must be one of them
            (names without examples are allowed).

    Returns:
        ``(dataset with the id column, names)``; ``names[k]`` is the source of id ``k``.

    Raises:
        KeyError: ``source_column`` is missing.
        TypeError: ``source_column`` is not of a string, integer or boolean type; ``dataset`` is not a Dataset.
        ValueError: ``id_column`` already exists, ``source_column`` has nulls, ``names`` is empty or has
            duplicates, or a value of ``source_column`` is not in ``names`` (the message names both).
    """
    if isinstance(dataset, datasets.DatasetDict):
        if names is None:
            names = _union_source_names([_source_names_of(ds, source_column) for ds in dataset.values()])
        names = list(names)
        out = {split: add_source_ids(ds, source_column, id_column, names)[0] for split, ds in dataset.items()}
        return datasets.DatasetDict(out), names
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"add_source_ids needs a datasets.Dataset (or DatasetDict), got {type(dataset).__name__}")
    if id_column in dataset.column_names:
        raise ValueError(f"dataset already has a column {id_column!r}; remove it "
                         f"(dataset.remove_columns({id_column!r})) or pass another id_column")
    if id_column == source_column:
        raise ValueError(f"id_column must differ from source_column (both {id_column!r})")
    col = _source_table_column(dataset, source_column)
    if names is None:
        names = _source_names_of(dataset, source_column, col)
    else:
        if isinstance(names, str):
            raise TypeError("names must be a list of source names, not a single str")
        names = [str(n) for n in names]
        if not names:
            raise ValueError("names is empty")
        if len(set(names)) != len(names):
            raise ValueError(f"names has duplicates: {names}")
    index = {name: k for k, name in enumerate(names)}
    uniques = pc.unique(col)
    label = _label_of(dataset, source_column)
    unique_ids = []
    for value in uniques.to_pylist():
        name = label(value)
        if name not in index:
            unknown = len([v for v in uniques.to_pylist() if label(v) not in index])
            raise ValueError(
                f"dataset column {source_column!r} holds the source {name!r}, which is not among the names "
                f"{names if len(names) <= 20 else str(names[:20])[:-1] + ', ...]'} ({unknown} unknown source "
                "value(s)); pass names that cover every source (e.g. those the weights were learned with)"
            )
        unique_ids.append(index[name])
    positions = pc.index_in(col, value_set=uniques).to_numpy(zero_copy_only=False)
    ids = np.asarray(unique_ids, dtype=np.int64)[positions] if len(col) else np.zeros(0, dtype=np.int64)
    return dataset.add_column(id_column, ids), list(names)


def _label_of(dataset: datasets.Dataset, column: str):
    """value -> source name: the ``ClassLabel`` name of a class index, else ``str(value)``."""
    feature = dataset.features.get(column)
    if isinstance(feature, datasets.ClassLabel):
        return lambda value: feature.int2str(int(value))
    return str


def _source_names_of(dataset: datasets.Dataset, column: str, col: pa.Array | None = None) -> list[str]:
    """The default names of ``column``: a ClassLabel's names, else its sorted unique values as strings."""
    feature = dataset.features.get(column)
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    col = _source_table_column(dataset, column) if col is None else col
    return [str(v) for v in sorted(pc.unique(col).to_pylist())]


def _union_source_names(per_split: list[list[str]]) -> list[str]:
    seen = {name for names in per_split for name in names}
    if per_split and all(names == per_split[0] for names in per_split):  # e.g. the same ClassLabel everywhere
        return list(per_split[0])
    return sorted(seen)


def source_counts(dataset: datasets.Dataset, num_sources: int, id_column: str = "source_id") -> np.ndarray:
    """``n_s``: the number of rows of ``dataset`` with source id ``s``, shape ``(num_sources,)`` (``int64``).

    Raises:
        KeyError: no ``id_column`` (add it with :func:`add_source_ids`).
        IndexError: an id outside ``0 .. num_sources - 1``.
    """
    return np.bincount(_source_id_array(dataset, id_column, num_sources), minlength=num_sources)


def _source_id_array(dataset: datasets.Dataset, id_column: str, num_sources: int) -> np.ndarray:
    if id_column not in dataset.column_names:
        raise KeyError(f"dataset has no source-id column {id_column!r}; add it with add_source_ids first")
    ids = _id_array(dataset, id_column)
    if ids.size and (ids.min() < 0 or ids.max() >= num_sources):
        bad = ids.min() if ids.min() < 0 else ids.max()
        raise IndexError(f"source id {bad} in column {id_column!r} is out of range for {num_sources} sources "
                         f"(valid ids: 0..{num_sources - 1})")
    return ids.astype(np.int64, copy=False)


def example_sampling_probabilities(source_ids: Any, mixture: Any) -> torch.Tensor:
    """Per-example probabilities ``P(i) = p_{s(i)} / n_{s(i)}`` that draw source ``s`` with probability ``p_s``.

    ``n_s`` is the number of entries of ``source_ids`` equal to ``s``; each example of a source is equally
    likely. ``mixture`` (``p``, shape ``(S,)``, non-negative) is normalized to sum to one first.

    Args:
        source_ids: Integer source ids in ``0 .. S-1``, shape ``(N,)`` (tensor, array or list).
        mixture: Source proportions ``p`` (tensor, array or list).

    Returns:
        A float64 ``torch.Tensor`` of shape ``(N,)`` summing to one.

    Raises:
        TypeError: non-integer ids. IndexError: an id outside ``0 .. S-1``.
        ValueError: ``mixture`` has a negative or non-finite entry or sums to zero, or gives a positive
            proportion to a source without examples (it could never be drawn).
    """
    if isinstance(source_ids, torch.Tensor):
        ids = source_ids.detach().to("cpu").reshape(-1)
    else:
        ids = torch.from_numpy(np.array(source_ids).reshape(-1))  # a copy: writable
    if ids.numel() and (ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex()):
        raise TypeError(f"source ids must be integers, got dtype {ids.dtype}")
    ids = ids.long()
    p = torch.as_tensor(mixture).detach().to("cpu", torch.float64).reshape(-1)
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or float(p.sum()) <= 0:
        raise ValueError(f"mixture must hold finite non-negative proportions with a positive sum, got {p.tolist()}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= p.numel()):
        raise IndexError(f"source ids must lie in 0..{p.numel() - 1} for a mixture of {p.numel()} sources")
    p = p / p.sum()
    counts = torch.bincount(ids, minlength=p.numel()).to(torch.float64)
    empty = [s for s in range(p.numel()) if counts[s] == 0 and p[s] > 0]
    if empty:
        raise ValueError(f"the mixture gives sources {empty} positive proportions, but they have no examples")
    return (p / counts.clamp_min(1)).index_select(0, ids)


class MixtureSampler(Sampler[int]):
    """A ``torch.utils.data`` sampler of dataset positions: each draw picks source ``s`` with probability ``p_s``,
    then one of its ``n_s`` rows uniformly (with replacement), i.e. row ``i`` with probability
    ``p_{s(i)} / n_{s(i)}`` (:func:`example_sampling_probabilities`).

    Two stages (a source, then a row) instead of one ``torch.multinomial`` over all rows: it is exact for any
    number of rows (``multinomial`` is limited to ``2**24`` categories). Each iteration draws ``num_samples``
    fresh positions with ``generator``. Build it with :func:`mixture_sampler`.

    Args:
        source_ids: The source id of each row, in row order, shape ``(N,)``.
        mixture: Source proportions ``p``, shape ``(S,)``; normalized.
        num_samples: Positions per iteration.
        generator: ``torch.Generator`` for reproducible draws.
    """

    def __init__(self, source_ids: Any, mixture: Any, num_samples: int,
                 generator: torch.Generator | None = None) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        super().__init__()
        probs = example_sampling_probabilities(source_ids, mixture)  # validates ids and the mixture
        ids = np.asarray(source_ids, dtype=np.int64).reshape(-1)
        p = torch.as_tensor(mixture).detach().to("cpu", torch.float64).reshape(-1)
        self.mixture = p / p.sum()
        self.rows_of_source = [torch.as_tensor(np.flatnonzero(ids == s)) for s in range(p.numel())]
        self.num_samples = num_samples
        self.generator = generator
        self.example_probabilities = probs

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        sources = torch.multinomial(self.mixture, self.num_samples, replacement=True, generator=self.generator)
        out = torch.empty(self.num_samples, dtype=torch.long)
        for s, rows in enumerate(self.rows_of_source):
            where = (sources == s).nonzero().reshape(-1)
            if where.numel():
                pick = torch.randint(len(rows), (where.numel(),), generator=self.generator)
                out[where] = rows[pick]
        yield from out.tolist()


def mixture_sampler(
    dataset: datasets.Dataset,
    source_weights: Any,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    id_column: str | None = None,
) -> MixtureSampler:
    """A sampler that turns learned source weights into a training mix (the second stage of DoReMi-style
    data mixing: learn the mixture with a bilevel run, then train on data sampled by it).

    ``source_weights`` is either

    * a :class:`~hf_integration.outer_modules.SourceWeights`: rows are drawn with probability
      ``w_{s(i)} / sum_j w_{s(j)}``, i.e. source ``s`` with proportion ``q_s = n_s w_s / sum_t n_t w_t``
      (``SourceWeights.mixture(source_counts)``). Training on such draws with *uniform* loss weights has the
      same expected inner objective as the learned weighted loss ``sum_i w_i l_i / sum_i w_i`` on uniformly
      drawn batches; or
    * source proportions ``p`` (a sequence or tensor of ``S`` non-negative numbers, normalized): source ``s``
      is drawn with proportion ``p_s``, each of its ``n_s`` rows with probability ``p_s / n_s``.

    The sampler yields row *positions* of ``dataset`` (as the dataset is now, after any shuffling), with
    replacement. Use it with any ``DataLoader`` (``sampler=``), or materialize the mix for a plain
    ``Trainer``: ``mixed = dataset.select(list(mixture_sampler(dataset, weights, generator=g)))``.

    Args:
        dataset: A dataset holding the source-id column (:func:`add_source_ids`).
        source_weights: A ``SourceWeights`` module or source proportions.
        num_samples: Positions per iteration (default ``len(dataset)``).
        generator: ``torch.Generator`` for reproducible draws.
        id_column: The source-id column (default: the module's ``id_column``, else ``"source_id"``).

    Raises:
        KeyError: the id column is missing. IndexError: an id is out of range for the number of sources.
        ValueError: a positive proportion for a source without rows, or invalid proportions.
    """
    if id_column is None:
        id_column = getattr(source_weights, "id_column", None) or "source_id"
    if hasattr(source_weights, "mixture"):  # a SourceWeights module
        with torch.no_grad():
            num_sources = int(source_weights.weights().numel())
            ids = _source_id_array(dataset, id_column, num_sources)
            mixture = source_weights.mixture(np.bincount(ids, minlength=num_sources))
    else:
        mixture = torch.as_tensor(source_weights, dtype=torch.float64).reshape(-1)
        ids = _source_id_array(dataset, id_column, mixture.numel())
    return MixtureSampler(ids, mixture, len(dataset) if num_samples is None else num_samples, generator)
