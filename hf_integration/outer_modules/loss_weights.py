"""Loss-based data weights: :class:`LossWeights`, each example's weight a learned function of its current loss."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..model_card import CardText
from .weighting import ExampleWeighting, _batch_index_column, _check_per_example_loss, _is_plain_tensor

__all__ = ["LossWeights"]


class LossWeights(ExampleWeighting):
    """Data weights as a learned function of each example's current loss (the idea of Meta-Weight-Net, Shu et
    al., NeurIPS 2019, with one parameter).

    With ``l_i`` the loss of example ``i`` under the current model and ``stop_grad`` blocking its gradient::

        w_i = sigmoid(-loss_scale * stop_grad(l_i)),   loss_scale = softplus(loss_scale_raw) > 0
        L   = sum_i w_i l_i / sum_i w_i                        (over the batch)

    The outer parameter is one number shared by every example, so the validation set decides *how strongly*
    high-loss examples (noisy labels, once the model has fit the clean signal) are down-weighted rather than
    fitting each training example; near ``loss_scale = 0`` the weights are uniform, for large ``loss_scale * l``
    they are an exponential tilt, ``w_i ~ exp(-loss_scale * l_i)``. Every outer step moves every example's
    weight, where free per-example weights (:class:`DataWeights`) move only the examples of the
    hypergradient's batch. :meth:`weights_for` evaluates the weights of given losses (e.g. the training set's
    under the final model).

    Warm-up (``warmup_steps``): over the first ``warmup_steps`` inner steps the tilt grows linearly from none,
    ``w_i = sigmoid(-r * loss_scale * stop_grad(l_i))`` with ``r = min(1, step / warmup_steps)`` (the step as told
    by :meth:`set_inner_step`; `BilevelTrainer` does this), so that the model first learns every kind of
    example, the hard but clean ones included, at nearly uniform weights (its effect on the instruction job:
    ``docs/instruction-data.md``).

    No offset and a positive scale, by design: with ``sigmoid(bias - ...)`` the outer problem can drive ``bias`` up
    until every weight saturates near 1 and the weighting switches itself off, and a signed scale can go
    negative, up-weighting the noisy examples; the worst a positive one can do is stay near uniform (the runs
    behind both choices: ``docs/data-reweighting.md``).

    Trusted rows (``trusted_column``): when the inner problem also trains on the clean validation examples (the
    data-weighting script's ``--train_on_validation``), a true value in that batch column marks them, and they
    are not weighted by their loss: weighting the validation examples by their loss too let the outer problem
    prefer keeping its own hard examples, and ``loss_scale`` drifted back to uniform
    (``docs/data-reweighting.md``). ``trusted_share`` says how much they count:

    * ``"max_weight"`` (default): the weight of a zero-loss example, ``sigmoid(0) = 1/2``, the largest there is,
      normalized with the rest. A larger ``loss_scale`` then also shifts the batch's mass onto the trusted rows,
      which are the outer objective's own rows.
    * ``"uniform"``: they keep their uniform share of each batch, ``n_trusted / n``, and the weights only divide
      the rest among the training rows (:func:`_normalized_weighted_mean` with ``fixed_share``), so the outer
      problem cannot lower its loss by training more on its own rows. The ``instruction_data_weighting``
      recipe's choice; the ``data_weighting`` recipe keeps ``"max_weight"`` (the comparisons behind both:
      ``docs/instruction-data.md``, ``docs/data-reweighting.md``).

    As in Meta-Weight-Net, the weights are inputs to the inner step, not functions it differentiates: the
    inner gradient is ``sum_i w_i grad l_i / sum_i w_i`` and the Hessian of the hypergradient is that of the
    weighted loss with the weights held at their current values (``stops_gradients``). Exact HVP modes compute
    exactly this; finite differences of gradients would also differentiate the weights, so the trainer
    refuses ``hvp_mode="finite_diff"`` with this module and checks its exact modes against each other.
    (Differentiating through the weights instead makes the loss a redescending robust loss, which learned worse
    weights on the real-text sets: ``docs/data-reweighting.md``.)

    A reference loss (``reference_column``): a batch column holding, for each example, a loss it is expected to
    have anyway, computed once before training (e.g. its response's loss *without* its prompt under the initial
    model, the denominator of the instruction-following difficulty; or a reference model's loss, as the irreducible
    loss of RHO-LOSS, Mindermann et al., ICML 2022). The weights then tilt against how far a loss *exceeds* its
    reference, with a second learned number ``reference_scale`` (any sign, starting at ``init_reference_scale``)::

        w_i = sigmoid(-loss_scale * (stop_grad(l_i) - reference_scale * ref_i))

    so the outer problem decides per data set how much of the reference to take off: a generic reply that fits
    any prompt has a low loss *and* a low prompt-free loss, which a loss tilt alone up-weights. The trusted rows
    keep the weight 1/2. ``reference_scale`` enters the inner loss only through the weights, so the weights still
    hold the losses fixed and the hypergradient stays first-order (the measurements: ``docs/instruction-data.md``).

    No example ids are needed (``id_column`` is ``None``), so any collator works (one that keeps
    ``trusted_column`` and ``reference_column`` when they are set).

    Args:
        init_loss_scale: Initial ``loss_scale`` (> 0; the default 0.1 is nearly uniform).
        trusted_column: Optional batch column of 0/1 flags marking the trusted rows (see above).
        warmup_steps: Inner steps over which the tilt grows linearly to full strength (0: none; see above).
        trusted_share: ``"max_weight"`` or ``"uniform"``: how much the trusted rows count (see above).
        reference_column: Optional batch column of each example's reference loss (finite floats; see above).
        init_reference_scale: Initial ``reference_scale`` (a finite number; used with ``reference_column``).
    """

    kind: ClassVar[str] = "loss_weights"
    stops_gradients: ClassVar[bool] = True
    accepts_trusted_rows: ClassVar[bool] = True
    weights_hold_losses_fixed: ClassVar[bool] = True  # the losses are read detached
    id_column = None

    TRUSTED_SHARES: ClassVar[tuple[str, ...]] = ("max_weight", "uniform")

    def __init__(self, init_loss_scale: float = 0.1, trusted_column: str | None = None,
                 warmup_steps: int = 0, trusted_share: str = "max_weight", reference_column: str | None = None,
                 init_reference_scale: float = 0.0) -> None:
        super().__init__()
        if (isinstance(init_loss_scale, bool) or not isinstance(init_loss_scale, (int, float))
                or not math.isfinite(init_loss_scale) or init_loss_scale <= 0):
            raise ValueError(f"init_loss_scale must be a finite number > 0, got {init_loss_scale!r}")
        if trusted_column is not None and (not isinstance(trusted_column, str) or not trusted_column):
            raise ValueError(f"trusted_column must be a column name or None, got {trusted_column!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0 (0: no warm-up), got {warmup_steps!r}")
        if trusted_share not in self.TRUSTED_SHARES:
            raise ValueError(f"trusted_share must be one of {list(self.TRUSTED_SHARES)}, got {trusted_share!r}")
        if reference_column is not None and (not isinstance(reference_column, str) or not reference_column
                                             or reference_column == trusted_column):
            raise ValueError(f"reference_column must be a column name other than trusted_column, or None, got "
                             f"{reference_column!r}")
        if (isinstance(init_reference_scale, bool) or not isinstance(init_reference_scale, (int, float))
                or not math.isfinite(init_reference_scale)):
            raise ValueError(f"init_reference_scale must be a finite number, got {init_reference_scale!r}")
        self.init_loss_scale = float(init_loss_scale)
        self.trusted_column = trusted_column
        self.warmup_steps = warmup_steps
        self.trusted_share = trusted_share
        self.warmup_factor = 1.0  # r of the warm-up; 1 outside training (a loaded module weights at full tilt)
        # softplus^-1(s) = log(expm1(s))
        self.loss_scale_raw = nn.Parameter(torch.tensor(math.log(math.expm1(self.init_loss_scale))))
        self.reference_column = reference_column
        self.init_reference_scale = float(init_reference_scale)
        # only with a reference: a module without one keeps the state dict of one number
        self.reference_scale = (nn.Parameter(torch.tensor(self.init_reference_scale))
                                if reference_column is not None else None)

    def batch_columns(self) -> tuple[str, ...]:
        return tuple(c for c in (self.trusted_column, self.reference_column) if c is not None)

    @property
    def loss_scale(self) -> Tensor:
        """``softplus(loss_scale_raw)``, differentiable."""
        return nn.functional.softplus(self.loss_scale_raw)

    def _on_inner_step(self, step: int) -> None:
        self.warmup_factor = min(1.0, step / self.warmup_steps) if self.warmup_steps else 1.0

    def weights_for(self, per_example_loss: Tensor, reference_loss: Tensor | None = None) -> Tensor:
        """``sigmoid(-r * loss_scale * (l - reference_scale * ref))`` for the losses ``l`` (no gradient flows into
        ``l``) and, with a ``reference_column``, their ``reference_loss`` ``ref`` (required then); ``r`` the warm-up
        factor (1 after the warm-up and outside training)."""
        excess = per_example_loss.detach()
        if self.reference_scale is not None:
            if reference_loss is None:
                raise ValueError(f"LossWeights with reference_column={self.reference_column!r} needs each example's "
                                 "reference_loss")
            excess = excess - self.reference_scale * reference_loss.detach().to(excess)
        return torch.sigmoid(-self.warmup_factor * self.loss_scale * excess)

    def _reference_losses(self, batch: Mapping[str, Tensor], batch_size: int) -> Tensor | None:
        """``batch[reference_column]`` as a 1-D float tensor, checked (``None`` without a reference column)."""
        if self.reference_column is None:
            return None
        if self.reference_column not in batch:
            raise KeyError(f"batch has no {self.reference_column!r} column (LossWeights' reference_column): keep it "
                           "through the data collator, or build LossWeights without it")
        values = torch.as_tensor(batch[self.reference_column])
        if not values.is_floating_point() or values.numel() != batch_size:
            raise ValueError(f"batch[{self.reference_column!r}] must hold one float reference loss per example "
                             f"({batch_size}), got dtype {values.dtype} and shape {tuple(values.shape)}")
        values = values.reshape(-1)
        if _is_plain_tensor(values) and not bool(torch.isfinite(values).all()):
            raise ValueError(f"batch[{self.reference_column!r}] holds a non-finite reference loss; fill undefined "
                             "ones (e.g. with the mean) before training")
        return values.to(self.loss_scale_raw.device)

    def _trusted_rows(self, batch: Mapping[str, Tensor], batch_size: int) -> Tensor | None:
        """Boolean mask of the rows that ``batch[trusted_column]`` flags (``None`` without a trusted column)."""
        if self.trusted_column is None:
            return None
        flags = _batch_index_column(
            batch, self.trusted_column, size=2, batch_size=batch_size, check_range=True, what="0/1 flag",
            missing_message=lambda: (f"batch has no {self.trusted_column!r} column (LossWeights' trusted_column): "
                                     "keep it through the data collator, or build LossWeights without it"),
            range_message=lambda bad: f"batch[{self.trusted_column!r}] holds {bad}; trusted flags are 0 or 1")
        return flags.to(self.loss_scale_raw.device).bool()

    def example_weights(self, per_example_loss: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """Unnormalized weights ``w_i = sigmoid(-loss_scale * stop_grad(l_i))`` of the batch's examples (less
        ``reference_scale * ref_i`` inside with a reference column), shape ``(batch_size,)`` (:meth:`weights_for`);
        the rows that ``batch[trusted_column]`` flags get ``1/2``
        (with ``trusted_share="uniform"`` the inner loss gives them their uniform share instead)."""
        _check_per_example_loss(per_example_loss)
        losses = per_example_loss.to(self.loss_scale_raw.device)
        trusted = self._trusted_rows(batch, losses.shape[0])
        reference = self._reference_losses(batch, losses.shape[0])
        if trusted is not None:
            losses = torch.where(trusted, torch.zeros_like(losses), losses)
            if reference is not None:
                reference = torch.where(trusted, torch.zeros_like(reference), reference)
        return self.weights_for(losses, reference)

    def fixed_share_rows(self, batch: Mapping[str, Tensor], batch_size: int) -> Tensor | None:
        """The trusted rows with ``trusted_share="uniform"``, else ``None``."""
        return self._trusted_rows(batch, batch_size) if self.trusted_share == "uniform" else None


    @torch.no_grad()
    def summary_stats(self) -> dict[str, float]:
        """``loss_scale`` (and ``reference_scale`` with a reference), and the warm-up factor while it is below 1."""
        stats = {"loss_scale": float(self.loss_scale)}
        if self.reference_scale is not None:
            stats["reference_scale"] = float(self.reference_scale)
        if self.warmup_factor < 1.0:
            stats["warmup_factor"] = self.warmup_factor
        return stats

    def config_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "init_loss_scale": self.init_loss_scale, "trusted_column": self.trusted_column,
                "warmup_steps": self.warmup_steps, "trusted_share": self.trusted_share,
                "reference_column": self.reference_column, "init_reference_scale": self.init_reference_scale}

    @classmethod
    def _from_config(cls, config: Mapping[str, Any]) -> LossWeights:
        return cls(init_loss_scale=config.get("init_loss_scale", 0.1), trusted_column=config.get("trusted_column"),
                   warmup_steps=config.get("warmup_steps", 0), trusted_share=config.get("trusted_share", "max_weight"),
                   reference_column=config.get("reference_column"),
                   init_reference_scale=config.get("init_reference_scale", 0.0))

    def card_text(self) -> CardText:
        return CardText(
            title="Learned loss-based data weights",
            description=(
                "a learned **data-weighting function**: each training example gets the weight "
                "`w_i = sigmoid(-loss_scale * l_i)` of its current loss `l_i`, and the inner (training) loss is the "
                "normalized weighted mean `sum_i w_i l_i / sum_i w_i` over each batch. `loss_scale` was tuned by "
                "bilevel optimization so that training on the weighted data minimizes a held-out (outer) loss; "
                "`loss_scale` (> 0) sets how strongly high-loss examples (e.g. noisy labels) are down-weighted."
            ),
            details=f"Learned value: loss_scale = {float(self.loss_scale.detach()):.4f}."
                    + (f" During training the tilt grew linearly to full strength over the first {self.warmup_steps} "
                       "inner steps (`warmup_steps`)." if self.warmup_steps else "")
                    + (f" The trusted rows (column `{self.trusted_column}`) kept their uniform share of each batch and "
                       "the weights divided the rest among the training rows (`trusted_share=\"uniform\"`)."
                       if self.trusted_share == "uniform" else "")
                    + (f" Each weight tilts against the loss less reference_scale = "
                       f"{float(self.reference_scale.detach()):.4f} times the example's reference loss (column "
                       f"`{self.reference_column}`): `w_i = sigmoid(-loss_scale * (l_i - reference_scale * ref_i))`."
                       if self.reference_scale is not None else ""),
            usage=("w = outer.weights_for(per_example_loss)  # weights of examples with these losses under a model\n"
                   "# e.g. the losses of the training set under the fine-tuned model, to rank or filter it"),
        )
