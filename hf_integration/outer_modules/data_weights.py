"""Per-example data weights: :class:`DataWeights`, one learned weight per training example."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..model_card import CardText
from .base import _require
from .weighting import IndexedWeighting

__all__ = ["DataWeights"]


class DataWeights(IndexedWeighting):
    """One learned weight per training example.

    Each example ``i`` has a logit ``s_i`` (the parameter ``logits``, shape ``(num_examples,)``) and weight
    ``w_i = sigmoid(s_i)`` in ``(0, 1)``. The inner loss of a batch is the *normalized* weighted mean::

        L = sum_i w_i l_i / sum_i w_i

    Normalizing keeps the overall loss scale fixed (otherwise the outer optimizer could shrink all weights
    together, which acts as a learning-rate change, not data selection), so only the *relative* weights
    matter. With the default ``init=0.0`` every weight is 0.5 and the loss is the plain batch mean.

    Examples are identified by a stable integer id column of the training dataset (``id_column``, values
    ``0 .. num_examples - 1``), which must be added *before* shuffling or filtering with
    :func:`hf_integration.data.add_example_ids`; the trainer's collator keeps it in the batch as a
    ``LongTensor``. For causal LMs the trainer first averages per-token losses within each example
    (ignoring labels ``-100``), so ``per_example_loss`` has one entry per example.

    Args:
        num_examples: Number of weights; must exceed the largest example id.
        id_column: Name of the example-id entry of the batch.
        init: Initial logit of every example (``0.0`` -> weight 0.5).
    """

    kind: ClassVar[str] = "data_weights"
    id_what: ClassVar[str] = "example id"

    def __init__(self, num_examples: int, id_column: str = "example_id", init: float = 0.0) -> None:
        super().__init__()
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
            raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
        if not isinstance(id_column, str) or not id_column:
            raise ValueError(f"id_column must be a non-empty str, got {id_column!r}")
        self.num_examples = num_examples
        self.id_column = id_column
        self.init = float(init)
        self.logits = nn.Parameter(torch.full((num_examples,), self.init))

    def extra_repr(self) -> str:
        return f"num_examples={self.num_examples}, id_column={self.id_column!r}"

    @property
    def num_ids(self) -> int:
        return self.num_examples

    def weights_of(self, ids: Tensor) -> Tensor:
        return torch.sigmoid(self.logits.index_select(0, ids))

    def _missing_message(self, batch: Mapping[str, Tensor]) -> str:
        return (f"DataWeights needs the example-id column {self.id_column!r} in the batch, but the batch has "
                f"{sorted(batch)}. Add ids to the training dataset with hf_integration.add_example_ids(...) before "
                "shuffling/filtering, and keep the column through the data collator (e.g. remove_unused_columns "
                "must not drop it).")

    def _range_message(self, bad: int) -> str:
        return (f"example id {bad} in batch[{self.id_column!r}] is out of range for DataWeights with "
                f"num_examples={self.num_examples} (valid ids: 0..{self.num_examples - 1}); was the module built for "
                "another dataset, or were ids added after filtering/concatenation?")

    def weights(self) -> Tensor:
        """All weights ``sigmoid(logits)``, shape ``(num_examples,)``, indexed by example id (differentiable)."""
        return torch.sigmoid(self.logits)

    @torch.no_grad()
    def summary_stats(self) -> dict[str, float]:
        """``weight_mean``, ``weight_std``, ``weight_min``, ``weight_max``, ``weight_frac_below_half``, ``logit_mean``."""
        w = torch.sigmoid(self.logits.detach().float())
        return {
            "weight_mean": float(w.mean()),
            "weight_std": float(w.std(unbiased=False)),
            "weight_min": float(w.min()),
            "weight_max": float(w.max()),
            "weight_frac_below_half": float((w < 0.5).float().mean()),
            "logit_mean": float(self.logits.detach().float().mean()),
        }

    def config_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_examples": self.num_examples, "id_column": self.id_column, "init": self.init}

    def card_text(self) -> CardText:
        return CardText(
            title="Learned data weights",
            description=(
                "learned per-example **data weights**: one logit `s_i` per training example, weight "
                "`w_i = sigmoid(s_i)`, and the inner (training) loss is the normalized weighted mean "
                "`sum_i w_i l_i / sum_i w_i` over each batch. The weights were tuned by bilevel optimization so "
                "that training on the weighted data minimizes a held-out (outer) loss; low weights flag examples "
                "that hurt held-out performance (noisy labels, off-distribution data)."
            ),
            details=(
                f"There are {self.num_examples} weights, indexed by the integer example-id column "
                f"`{self.id_column}` of the training dataset (added with `hf_integration.add_example_ids` before "
                "any shuffling or filtering)."
            ),
            usage=(
                "w = outer.weights()  # shape (num_examples,): w[example_id] in (0, 1)\n\n"
                "# Optional: refuse weights learned on other data (train_dataset prepared as for training)\n"
                "from hf_integration import dataset_fingerprint_metadata\n"
                'outer = {class_name}.from_pretrained("{repo_id}", expected=dataset_fingerprint_metadata(train_dataset))'
            ),
        )

    @classmethod
    def _from_config(cls, config: Mapping[str, Any]) -> DataWeights:
        _require(config, "num_examples")
        return cls(
            num_examples=config["num_examples"],
            id_column=config.get("id_column", "example_id"),
            init=config.get("init", 0.0),
        )
