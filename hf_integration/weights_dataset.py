"""Learned data weights as a Hub *dataset*: the training set with a ``weight`` column and a dataset card.

Learned per-example weights are most useful next to the examples they weigh: a later plain fine-tuning run can
keep the top-weighted examples, drop those below a threshold, sample by weight or weight its loss, without
hypergrad. This module publishes such a table:

* :func:`weight_summary`: the figures of a weight column (mean, spread, quantiles, the fraction below 1/2; by
  source and for clean / corrupted examples when those columns exist);
* :func:`render_weights_card`: a ``README.md`` rendered with ``huggingface_hub.DatasetCard`` /
  ``DatasetCardData``: what the weights are, how they were learned, the summary figures, and how to filter,
  sample or weight with them;
* :func:`check_weights_repo`: credentials and reachability, checked before a long run (the dataset repo is
  created, as ``--push_to_hub`` does for model repos);
* :func:`push_weights_dataset`: the card, then ``datasets.Dataset.push_to_hub`` (which keeps the card's text and
  adds the ``dataset_info`` / ``configs`` metadata of the uploaded parquet files);
* :func:`save_weights_dataset`: the same locally (``save_to_disk`` + ``README.md``).

Weights enter training as a normalized weighted mean, ``L = sum_i w_i l_i / sum_i w_i`` over a batch, so only
their ratios matter: a weight is a relative trust in an example, not a probability.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import numpy as np
from huggingface_hub import DatasetCard, DatasetCardData, HfApi

from .atomic_files import atomic_write_dir
from .hub import HubError, check_hub_repo, error_line, hub_call, upload_deadline
from .public_names import hub_model_id, looks_like_local_path, public_name
from .serialization import MODEL_CARD_NAME

__all__ = ["WEIGHT_COLUMN", "weight_summary", "render_weights_card", "check_weights_repo", "push_weights_dataset",
           "save_weights_dataset"]

WEIGHT_COLUMN = "weight"


def weight_summary(dataset: datasets.Dataset, weight_column: str = WEIGHT_COLUMN, *,
                   source_column: str | None = "source", corrupted_column: str | None = "corrupted") -> dict[str, Any]:
    """Figures of ``dataset[weight_column]``: ``num_examples``, ``weight_mean``, ``weight_std``, ``weight_min``,
    ``weight_q25``, ``weight_median``, ``weight_q75``, ``weight_max``, ``weight_frac_below_half`` and
    ``weight_spread`` (std / mean; near 0: the weights carry no signal). With a boolean ``corrupted_column``:
    ``num_corrupted``, ``mean_weight_clean``, ``mean_weight_corrupted``; with a ``source_column``:
    ``mean_weight_by_source`` (source -> mean weight, and ``count_by_source``)."""
    if weight_column not in dataset.column_names:
        raise KeyError(f"the dataset has no column {weight_column!r}; its columns are {dataset.column_names}")
    w = np.asarray(dataset[weight_column], dtype=np.float64)
    if w.size == 0 or not np.all(np.isfinite(w)):
        raise ValueError(f"column {weight_column!r} must hold finite weights (got {w.size} values, "
                         f"{int(np.sum(~np.isfinite(w)))} non-finite)")
    q25, median, q75 = np.quantile(w, [0.25, 0.5, 0.75])
    out: dict[str, Any] = {
        "num_examples": int(w.size), "weight_mean": float(w.mean()), "weight_std": float(w.std()),
        "weight_min": float(w.min()), "weight_q25": float(q25), "weight_median": float(median),
        "weight_q75": float(q75), "weight_max": float(w.max()),
        "weight_frac_below_half": float(np.mean(w < 0.5)),
        "weight_spread": float(w.std() / max(abs(float(w.mean())), 1e-12)),
    }
    if corrupted_column and corrupted_column in dataset.column_names:
        bad = np.asarray(dataset[corrupted_column], dtype=bool)
        out["num_corrupted"] = int(bad.sum())
        out["mean_weight_clean"] = float(w[~bad].mean()) if (~bad).any() else math.nan
        out["mean_weight_corrupted"] = float(w[bad].mean()) if bad.any() else math.nan
    if source_column and source_column in dataset.column_names:
        sources = np.asarray([str(s) for s in dataset[source_column]])
        names = sorted(set(sources.tolist()))
        out["mean_weight_by_source"] = {name: float(w[sources == name].mean()) for name in names}
        out["count_by_source"] = {name: int(np.sum(sources == name)) for name in names}
    return out


def _size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return name
    return "n>1M"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def render_weights_card(dataset: datasets.Dataset, *, repo_id: str, description: str,
                        how: Mapping[str, Any] | None = None, figures: Mapping[str, Any] | None = None,
                        weight_column: str = WEIGHT_COLUMN, source_column: str | None = "source",
                        corrupted_column: str | None = "corrupted", pretty_name: str | None = None,
                        source_datasets: Sequence[str] = (), example_fraction: float = 0.7,
                        task: str = "text-generation") -> str:
    """The ``README.md`` of a weighted training set: front matter (``DatasetCardData``), what the ``weight``
    column is, how it was learned, its summary figures (:func:`weight_summary` plus ``figures``), and how to
    use it (keep the top ``example_fraction``, filter by a threshold, sample by weight, weight the loss).

    Args:
        dataset: The training set with its weight column.
        repo_id: The dataset repo (or a local path) named in the usage snippet.
        description: Completes "The weights are ...": how a weight is defined (e.g. the outer module's
            ``card_text().description``).
        how: Training facts (base model, weighting, hypergradient method, steps, validation data, ...);
            a ``base_model`` that is a local path is dropped (:func:`hub_model_id`), any other local path is
            reduced to its last component (:func:`~hf_integration.public_names.public_name`).
        figures: Extra results, e.g. the AUC of "low weight vs corrupted" or evaluation metrics.
        source_datasets: Hub ids of the data the set comes from (front matter).
        task: The Hub task category of the data (``"text-generation"`` for SFT data, ``"text-classification"``, ...).
    """
    summary = weight_summary(dataset, weight_column, source_column=source_column, corrupted_column=corrupted_column)
    how = {k: v for k, v in (how or {}).items() if v is not None and v != ""}
    base = hub_model_id(str(how.pop("base_model"))) if "base_model" in how else None
    how = {k: public_name(v) if isinstance(v, str) else v for k, v in how.items()}  # no machine path in a card
    if base:
        how["base_model"] = base
    data = DatasetCardData(
        pretty_name=pretty_name or f"{repo_id.split('/')[-1]} (learned data weights)",
        tags=["hypergrad", "data-weights", "bilevel-optimization"],
        task_categories=[task],
        size_categories=[_size_category(len(dataset))],
        source_datasets=[s for s in source_datasets if s] or None,
    )
    columns = ", ".join(f"`{name}` ({feature.dtype if hasattr(feature, 'dtype') else type(feature).__name__})"
                        for name, feature in dataset.features.items())
    lines = [
        f"# {data.pretty_name}", "",
        f"This dataset is a training set of {len(dataset)} examples with a learned per-example "
        f"**`{weight_column}`** column. The weights are {description.rstrip('.')}.", "",
        "They were learned by bilevel optimization (hypergrad's `hf_integration.BilevelTrainer`): the inner "
        "problem fine-tunes a model on the weighted loss `sum_i w_i l_i / sum_i w_i`, the outer problem moves the "
        "weights so that the fine-tuned model does well on clean held-out data, with implicit hypergradients. "
        "Only ratios of weights matter; a low weight flags an example that hurt held-out performance "
        "(a wrong, truncated, swapped or off-task response, for instance).", "",
        f"Columns: {columns}.", "",
        "## How the weights were learned", "", "| | |", "|---|---|",
    ]
    lines += [f"| {key} | `{_fmt(value)}` |" for key, value in how.items()] or ["| (not recorded) | |"]
    shown = {k: v for k, v in summary.items() if not isinstance(v, Mapping)}
    shown.update({k: v for k, v in (figures or {}).items() if not isinstance(v, Mapping)})
    lines += ["", "## Summary figures", "", "| figure | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in shown.items()]
    if "mean_weight_by_source" in summary:
        lines += ["", f"Mean weight by `{source_column}`:", "", "| source | examples | mean weight |", "|---|---|---|"]
        lines += [f"| {name} | {summary['count_by_source'][name]} | {_fmt(mean)} |"
                  for name, mean in summary["mean_weight_by_source"].items()]
    k = f"{example_fraction:g}"
    cut = float(np.quantile(np.asarray(dataset[weight_column], dtype=np.float64), 1.0 - example_fraction))
    load = (f'ds = datasets.load_from_disk("{repo_id}")' if looks_like_local_path(repo_id)
            else f'ds = datasets.load_dataset("{repo_id}", split="train")')
    lines += [
        "", "## Using the weights", "",
        "```python",
        "import datasets",
        "",
        load,
        "",
        f"# keep the top-weighted {k} of the examples for a plain SFT run",
        f'top = ds.sort("{weight_column}", reverse=True).select(range(int({k} * len(ds))))',
        f"# or drop the examples below a threshold ({cut:.4g}: the same cut here)",
        f'kept = ds.filter(lambda row: row["{weight_column}"] >= {cut:.4g})',
        "# or sample examples in proportion to their weight",
        "import torch",
        f'sampler = torch.utils.data.WeightedRandomSampler(ds["{weight_column}"], num_samples=len(ds))',
        "# or weight each example's loss: sum_i w_i l_i / sum_i w_i over a batch",
        "```", "",
    ]
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def check_weights_repo(repo_id: str, *, token: str | bool | None = None, private: bool | None = None) -> str:
    """Check credentials and reachability before a long run: create the dataset repo ``repo_id`` if needed
    (:func:`~hf_integration.hub.check_hub_repo` with ``repo_type="dataset"``). Returns the resolved repo id;
    raises :class:`~hf_integration.hub.HubError` (one line) otherwise."""
    return check_hub_repo(repo_id, token=token, private=private, repo_type="dataset")


def push_weights_dataset(dataset: datasets.Dataset, repo_id: str, *, card: str, token: str | bool | None = None,
                         private: bool | None = None,
                         commit_message: str = "Upload a training set with learned data weights") -> str:
    """Publish ``dataset`` as the ``train`` split of the Hub dataset ``repo_id`` with ``card`` as its README.

    The card is uploaded first; ``datasets.Dataset.push_to_hub`` then keeps its text and front matter and adds
    the metadata of the parquet files it uploads (``dataset_info``, ``configs``). Each upload runs under a
    deadline (:func:`~hf_integration.hub.upload_deadline` of its size); any failure raises
    :class:`~hf_integration.hub.HubError`. Returns the URL of the data commit.
    """
    repo_id = check_weights_repo(repo_id, token=token, private=private)
    card_bytes = card.encode("utf-8")
    calls = (
        ("uploading the dataset card", len(card_bytes), lambda: HfApi(token=token).upload_file(
            path_or_fileobj=card_bytes, path_in_repo=MODEL_CARD_NAME, repo_id=repo_id, repo_type="dataset",
            token=token, commit_message="Add the dataset card")),
        ("uploading the weighted dataset", dataset.data.nbytes, lambda: dataset.push_to_hub(
            repo_id, split="train", token=token if isinstance(token, str) else None, private=private,
            commit_message=commit_message)),
    )
    for what, num_bytes, call in calls:
        deadline = upload_deadline(num_bytes)
        try:
            commit = hub_call(call, what=f"{what} to the Hub dataset repo {repo_id!r}", timeout=deadline)
        except HubError:
            raise
        except Exception as err:
            raise HubError(f"{what} to the Hub dataset repo {repo_id!r} failed: {error_line(err)}") from err
    url = getattr(commit, "commit_url", None)
    return url if isinstance(url, str) else f"https://huggingface.co/datasets/{repo_id}"


def save_weights_dataset(dataset: datasets.Dataset, folder: str | os.PathLike, card: str | None = None) -> None:
    """``dataset.save_to_disk(folder)`` (atomically: a complete folder or none) plus ``card`` as ``README.md``
    (``datasets.load_from_disk`` ignores it)."""
    def write(tmp: str) -> None:
        dataset.save_to_disk(tmp)
        if card is not None:
            with open(os.path.join(tmp, MODEL_CARD_NAME), "w", encoding="utf-8") as handle:
                handle.write(card)

    atomic_write_dir(os.fspath(folder), write)
