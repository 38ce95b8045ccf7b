"""Combined data weights: :class:`CombinedWeights`, the product of several weightings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..model_card import CardText
from .base import OuterModule, _require
from .weighting import ExampleWeighting, _check_per_example_loss, promote

__all__ = ["CombinedWeights"]


class CombinedWeights(ExampleWeighting):
    """Per-example data weights that are the product of several weightings, e.g. per-source weights times
    per-example weights (``CombinedWeights([SourceWeights(names), DataWeights(n)])``) or times loss-based weights
    (``CombinedWeights([SourceWeights(names), LossWeights()])``).

    Each part ``k`` gives unnormalized weights ``w^(k)_i`` of the batch's examples (its ``example_weights``);
    the combined weight and the inner loss are::

        w_i = prod_k w^(k)_i,        L = sum_i w_i l_i / sum_i w_i

    (so with a single part this is that part's own objective). The parameters of part ``k`` are named
    ``parts.<k>.<name>`` (e.g. ``parts.0.logits``); the saved config nests the parts' configs. The combination
    stops gradients where any part does (``stops_gradients``: e.g. with :class:`LossWeights`, exact HVP modes
    only).

    The batch must hold every part's column (:attr:`id_columns`, e.g. ``("source_id", "example_id")``), so the
    data collator must keep them all; :class:`~hf_integration.BilevelTrainer` keeps them out of the model's inputs
    and through its column removal. ``id_column`` is the first of them (``None`` if no part reads a column).

    Args:
        parts: The weighting modules, each with an ``example_weights(per_example_loss, batch)`` method
            (:class:`DataWeights`, :class:`LossWeights`, :class:`SourceWeights`, another ``CombinedWeights``).
    """

    kind: ClassVar[str] = "combined_weights"

    def __init__(self, parts: Sequence[OuterModule]) -> None:
        super().__init__()
        if isinstance(parts, (OuterModule, str)) or not hasattr(parts, "__iter__"):
            raise TypeError("parts must be a list of outer modules, e.g. [SourceWeights(...), DataWeights(...)]")
        parts = list(parts)
        if not parts:
            raise ValueError("parts is empty: there are no weights to combine")
        for part in parts:
            if not isinstance(part, ExampleWeighting):
                raise TypeError(
                    f"{type(part).__name__} cannot be a part of CombinedWeights: it must be an OuterModule that "
                    "weights examples (with an example_weights(per_example_loss, batch) method, like DataWeights, "
                    "LossWeights, SourceWeights)"
                )
        if len({id(p) for p in parts}) != len(parts):
            raise ValueError("parts holds the same module twice")
        self.parts = nn.ModuleList(parts)

    def extra_repr(self) -> str:
        return f"kinds={[p.kind for p in self.parts]}"

    def batch_columns(self) -> tuple[str, ...]:
        """The batch columns that the parts read, in part order, without repeats."""
        return tuple(dict.fromkeys(column for part in self.parts for column in part.batch_columns()))

    @property
    def id_columns(self) -> tuple[str, ...]:
        """The parts' id columns, in part order, without repeats."""
        return tuple(dict.fromkeys(part.id_column for part in self.parts if part.id_column is not None))

    @property
    def id_column(self) -> str | None:
        """The first of :attr:`id_columns` (``None`` when no part reads a column)."""
        columns = self.id_columns
        return columns[0] if columns else None

    @property
    def stops_gradients(self) -> bool:  # type: ignore[override]
        """True when any part stops gradients (its weights are constants for the Hessian)."""
        return any(part.stops_gradients for part in self.parts)

    @property
    def weights_hold_losses_fixed(self) -> bool:  # type: ignore[override]
        """True when every part's weights read the losses as values only."""
        return all(part.weights_hold_losses_fixed for part in self.parts)

    def example_weights(self, per_example_loss: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """Unnormalized weights ``prod_k w^(k)_i`` of the batch's examples, shape ``(batch_size,)``."""
        _check_per_example_loss(per_example_loss)
        weights = None
        for part in self.parts:
            w = part.example_weights(per_example_loss, batch)
            if weights is None:
                weights = w
                continue
            weights, w = promote(weights, w)
            weights = weights * w
        return weights

    def fixed_share_rows(self, batch: Mapping[str, Tensor], batch_size: int) -> Tensor | None:
        """The rows that any part keeps at their uniform share (``None`` when no part has such rows)."""
        masks = [m for m in (part.fixed_share_rows(batch, batch_size) for part in self.parts) if m is not None]
        if not masks:
            return None
        rows = masks[0]
        for mask in masks[1:]:
            rows = rows | mask.to(rows.device)
        return rows


    def _part_prefixes(self) -> list[str]:
        kinds = [part.kind for part in self.parts]
        return [kind if kinds.count(kind) == 1 else f"{kind}.{k}" for k, kind in enumerate(kinds)]

    @torch.no_grad()
    def summary_stats(self) -> dict[str, float]:
        """The parts' statistics, as ``<kind>/<statistic>`` (``<kind>.<k>/<statistic>`` for a repeated kind)."""
        stats: dict[str, float] = {}
        for prefix, part in zip(self._part_prefixes(), self.parts):
            stats.update({f"{prefix}/{key}": float(value) for key, value in part.summary_stats().items()})
        return stats

    def config_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "parts": [part.config_dict() for part in self.parts]}

    @classmethod
    def _from_config(cls, config: Mapping[str, Any]) -> CombinedWeights:
        _require(config, "parts")
        part_configs = config["parts"]
        if not isinstance(part_configs, list):
            raise TypeError(f"config 'parts' must be a list of part configs, got {type(part_configs).__name__}")
        parts = []
        for part_config in part_configs:
            if not isinstance(part_config, Mapping) or "kind" not in part_config:
                raise ValueError(f"each entry of config 'parts' must be a config with a 'kind', got {part_config!r}")
            target = OuterModule._registry.get(part_config["kind"])
            if target is None:
                raise ValueError(f"unknown part kind {part_config['kind']!r} (known kinds: "
                                 f"{sorted(OuterModule._registry)})")
            parts.append(target._from_config(part_config))
        return cls(parts)

    def card_text(self) -> CardText:
        sections = []
        for k, part in enumerate(self.parts):
            text = part.card_text()
            body = f"**Part {k}** (`{type(part).__name__}`, parameters `parts.{k}.*`): {text.title}: {text.description}"
            if text.details:
                body += " " + text.details
            sections.append(body)
        return CardText(
            title="Learned combined data weights",
            description=(
                f"per-example **data weights** that are the product `w_i = prod_k w_i^(k)` of {len(self.parts)} "
                "learned weightings (listed below), and the inner (training) loss is the normalized weighted mean "
                "`sum_i w_i l_i / sum_i w_i` over each batch. The weights were tuned by bilevel optimization so that "
                "training on the weighted data minimizes a held-out (outer) loss."
            ),
            details="\n\n".join(sections),
            usage=("w = outer.example_weights(per_example_loss, batch)  # prod_k of the parts' weights, (batch_size,)\n"
                   "parts = list(outer.parts)  # the weighting modules, e.g. parts[0].weights()"),
        )
