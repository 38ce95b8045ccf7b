"""Per-source data weights: :class:`SourceWeights`, one learned weight per data source (domain)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..data import example_sampling_probabilities
from ..model_card import CardText
from .base import _require
from .weighting import IndexedWeighting

__all__ = ["SourceWeights"]


_MAX_SOURCES_IN_STATS = 64


def _names_preview(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


class SourceWeights(IndexedWeighting):
    """One learned weight per data source (domain): the setting of DoReMi (Xie et al., NeurIPS 2023) and ScaleBiO
    (Pan et al., 2024), where a training set mixes several sources (tasks, domains, languages, ...).

    The ``S`` sources (the values of a source column, mapped to ids ``0 .. S-1`` by
    :func:`hf_integration.data.add_source_ids`) have logits ``a_s`` (the parameter ``logits``, shape ``(S,)``) and
    weights::

        w_s = S * softmax(a)_s = S exp(a_s) / sum_t exp(a_t)          (so mean_s w_s = 1)

    Example ``i`` of source ``s(i)`` gets the weight ``w_{s(i)}``, and the inner loss of a batch is the normalized
    weighted mean, exactly as for :class:`DataWeights`::

        L = sum_i w_{s(i)} l_i / sum_i w_{s(i)}

    With the default init every ``w_s = 1`` and ``L`` is the plain batch mean. Only ratios of weights matter
    (normalization), and the softmax removes the one redundant direction (adding a constant to every logit).

    **As a mixture.** ``softmax(a) = w / S`` sums to one. On batches drawn uniformly from a training set where
    source ``s`` has ``n_s`` examples, the weighting puts the share ``q_s = n_s w_s / sum_t n_t w_t`` of the
    objective on source ``s``; drawing source ``s`` with probability ``q_s`` (each of its examples with
    ``q_s / n_s``) and weighting uniformly gives the same expected objective. :meth:`mixture` returns ``q`` given
    the counts ``n`` (``softmax(a)`` without them, which equals ``q`` when the sources are equally large);
    :meth:`sampling_weights` and :func:`hf_integration.data.mixture_sampler` give the per-example probabilities.

    The batch must hold the integer source-id column ``id_column`` (one id per example); the trainer keeps it
    through its column removal, the data collator must keep it too.

    Args:
        source_names: The sources in id order (``names`` of :func:`~hf_integration.data.add_source_ids`); stored
            as strings in the config, so saved weights say which source is which.
        id_column: Name of the source-id entry of the batch.
        init_weights: Initial weights ``w_s`` (positive; rescaled to mean 1), e.g. ``N / (S n_s)`` to start from
            a mixture balanced over sources; default all 1 (the plain mean loss).
    """

    kind: ClassVar[str] = "source_weights"
    id_what: ClassVar[str] = "source id"

    def __init__(
        self,
        source_names: Sequence[str],
        id_column: str = "source_id",
        init_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(source_names, (str, bytes)) or not isinstance(source_names, Sequence):
            raise TypeError(f"source_names must be a list of source names, got {type(source_names).__name__}")
        names = [str(n) for n in source_names]
        if not names:
            raise ValueError("source_names is empty: there are no sources to weight")
        if len(set(names)) != len(names):
            raise ValueError(f"source_names has duplicates: {names}")
        if not isinstance(id_column, str) or not id_column:
            raise ValueError(f"id_column must be a non-empty str, got {id_column!r}")
        self.source_names: list[str] = names
        self.id_column = id_column
        self.init_weights: list[float] | None = None
        logits = [0.0] * len(names)
        if init_weights is not None:
            values = [float(v) for v in init_weights]
            if len(values) != len(names) or not all(math.isfinite(v) and v > 0 for v in values):
                raise ValueError(f"init_weights must hold {len(names)} finite positive numbers (one per source), "
                                 f"got {list(init_weights)}")
            mean = sum(values) / len(values)
            self.init_weights = [v / mean for v in values]
            logits = [math.log(v) for v in self.init_weights]
        self.logits = nn.Parameter(torch.tensor(logits, dtype=torch.get_default_dtype()))

    def extra_repr(self) -> str:
        return f"num_sources={self.num_sources}, id_column={self.id_column!r}"

    @property
    def num_ids(self) -> int:
        return self.num_sources

    def _missing_message(self, batch: Mapping[str, Tensor]) -> str:
        return (f"SourceWeights needs the source-id column {self.id_column!r} in the batch, but the batch has "
                f"{sorted(batch)}. Add it to the training dataset with hf_integration.add_source_ids(dataset, "
                f"source_column, id_column={self.id_column!r}), and keep the column through the data collator "
                "(e.g. remove_unused_columns must not drop it).")

    def _range_message(self, bad: int) -> str:
        return (f"source id {bad} in batch[{self.id_column!r}] is out of range for SourceWeights with "
                f"{self.num_sources} sources {_names_preview(self.source_names)} (valid ids: "
                f"0..{self.num_sources - 1}); were the ids made by add_source_ids with other names?")

    @property
    def num_sources(self) -> int:
        """``S``, the number of sources."""
        return len(self.source_names)

    def weights(self) -> Tensor:
        """All source weights ``w = S * softmax(logits)``, shape ``(S,)``, indexed by source id (differentiable)."""
        return self.num_sources * torch.softmax(self.logits, dim=0)

    def mixture(self, source_counts: Sequence[int] | Tensor | None = None) -> Tensor:
        """Source proportions, shape ``(S,)``, summing to one (differentiable).

        Args:
            source_counts: ``n_s``, the number of training examples of each source (a sequence, tensor or
                array; :func:`hf_integration.data.source_counts`). Given, the result is the training mix that the
                learned weighting realises, ``q_s = n_s w_s / sum_t n_t w_t``: sample sources in these proportions
                (examples uniformly within a source) to train on the same expected objective without weights.
                Omitted, it is ``softmax(logits) = w / S``, which is ``q`` when all sources are equally large.
        """
        if source_counts is None:
            return torch.softmax(self.logits, dim=0)
        counts = torch.as_tensor(source_counts).reshape(-1).to(self.logits.device)
        if counts.numel() != self.num_sources or bool((counts < 0).any()) or float(counts.sum()) <= 0:
            raise ValueError(f"source_counts must hold {self.num_sources} non-negative counts with a positive sum, "
                             f"got {counts.tolist()}")
        mass = counts.to(self.logits.dtype) * self.weights()
        return mass / mass.sum()

    @torch.no_grad()
    def sampling_weights(self, source_ids: Sequence[int] | Tensor) -> Tensor:
        """Per-example sampling probabilities that realise the learned mixture on a dataset, shape ``(N,)``.

        ``source_ids`` are the source ids of the dataset's ``N`` examples; with ``n_s`` counted among them and
        ``q = mixture(n)``, example ``i`` gets ``q_{s(i)} / n_{s(i)} = w_{s(i)} / sum_j w_{s(j)}`` (float64, summing
        to one; e.g. for ``torch.utils.data.WeightedRandomSampler``, or use
        :func:`hf_integration.data.mixture_sampler`).
        """

        ids = torch.as_tensor(source_ids).reshape(-1)
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"source_ids must be integers, got dtype {ids.dtype}")
        if ids.numel() == 0:
            raise ValueError("source_ids is empty")
        if int(ids.min()) < 0 or int(ids.max()) >= self.num_sources:
            raise IndexError(f"source ids must lie in 0..{self.num_sources - 1} ({self.num_sources} sources), got "
                             f"{int(ids.min())}..{int(ids.max())}")
        counts = torch.bincount(ids.to("cpu", torch.long), minlength=self.num_sources)
        return example_sampling_probabilities(ids.cpu(), self.mixture(counts).cpu())

    @torch.no_grad()
    def summary_stats(self) -> dict[str, float]:
        """``weight_min``, ``weight_max``, ``mixture_entropy`` (of ``softmax(logits)``, in nats; ``log S`` when
        uniform) and ``weight[<source name>]`` per source (for at most 64 sources)."""
        w = self.weights().detach().double()
        p = w / w.sum()
        stats = {
            "weight_min": float(w.min()),
            "weight_max": float(w.max()),
            "mixture_entropy": float(-(p * p.clamp_min(1e-300).log()).sum()),
        }
        if self.num_sources <= _MAX_SOURCES_IN_STATS:
            for name, value in zip(self.source_names, w.tolist()):
                stats[f"weight[{name}]"] = float(value)
        return stats

    def config_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "source_names": list(self.source_names), "id_column": self.id_column,
                "init_weights": None if self.init_weights is None else list(self.init_weights)}

    @classmethod
    def _from_config(cls, config: Mapping[str, Any]) -> SourceWeights:
        _require(config, "source_names")
        return cls(source_names=config["source_names"], id_column=config.get("id_column", "source_id"),
                   init_weights=config.get("init_weights"))

    def card_text(self) -> CardText:
        w = self.weights().detach().double().tolist()
        table = ""
        if self.num_sources <= _MAX_SOURCES_IN_STATS:
            rows = "\n".join(f"| {k} | `{name.replace('|', '/')}` | {value:.4f} | {value / self.num_sources:.4f} |"
                             for k, (name, value) in enumerate(zip(self.source_names, w)))
            table = f"\n\n| id | source | weight `w_s` | `softmax(a)_s` |\n|---|---|---|---|\n{rows}"
        return CardText(
            title="Learned data-source weights",
            description=(
                "learned per-source **data weights** (data mixing, as in DoReMi and ScaleBiO): one logit `a_s` per "
                "data source (domain), weight `w_s = S * softmax(a)_s` (mean 1 over the `S` sources), each example "
                "weighted by its source's weight, and the inner (training) loss is the normalized weighted mean "
                "`sum_i w_s(i) l_i / sum_i w_s(i)` over each batch. The weights were tuned by bilevel optimization "
                "so that training on the weighted data minimizes a held-out (outer) loss; on a training set where "
                "source `s` has `n_s` examples they amount to the mixture `q_s = n_s w_s / sum_t n_t w_t`."
            ),
            details=(
                f"There are {self.num_sources} sources, indexed by the integer source-id column `{self.id_column}` "
                "of the training dataset (added with `hf_integration.add_source_ids`, in the order below)." + table
            ),
            usage=(
                "w = outer.weights()  # shape (num_sources,): w[source_id], mean 1\n"
                "print(dict(zip(outer.source_names, w.tolist())))\n\n"
                "# A training mix that realises the learned weighting (train_dataset holds the source column)\n"
                "from hf_integration import add_source_ids, mixture_sampler\n"
                'train_dataset, _ = add_source_ids(train_dataset, "<source column>", names=outer.source_names)\n'
                "mixed = train_dataset.select(list(mixture_sampler(train_dataset, outer)))"
            ),
        )
