"""Weighting the training examples: :class:`ExampleWeighting` (the inner objective ``sum_i w_i l_i / sum_i w_i``)
and :class:`IndexedWeighting` (weights looked up by an integer id column of the batch)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
from torch import Tensor

from .base import OuterModule

__all__ = ["ExampleWeighting", "IndexedWeighting"]


def _is_plain_tensor(t: Tensor) -> bool:
    """True unless ``t`` is wrapped by a torch.func transform (then data-dependent checks are impossible)."""
    if torch.compiler.is_compiling():
        return False
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return not (is_wrapped is not None and is_wrapped(t))

def promote(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``a`` and ``b`` (moved to ``a``'s device) in their common dtype (``torch.promote_types``)."""
    b = b.to(a.device)
    if a.dtype == b.dtype:
        return a, b
    common = torch.promote_types(a.dtype, b.dtype)
    return a.to(common), b.to(common)


def _check_per_example_loss(per_example_loss: Tensor) -> None:
    """Refuse anything but a non-empty 1-D tensor of per-example losses."""
    if per_example_loss.dim() != 1 or per_example_loss.shape[0] == 0:
        raise ValueError(
            f"per_example_loss must have shape (batch_size,) with batch_size > 0, got "
            f"{tuple(per_example_loss.shape)}; average per-token losses within each example first"
        )

def _normalized_weighted_mean(weights: Tensor, per_example_loss: Tensor, fixed_share: Tensor | None = None) -> Tensor:
    """``sum_i w_i l_i / sum_i w_i``: the inner objective of every data-weighting module.

    With ``fixed_share`` (a boolean mask ``F`` of the batch's rows, the rest ``R``), the rows of ``F`` keep
    their uniform share of the batch and the weights only divide the rest among ``R``::

        L = ( sum_{i in F} l_i + |R| * sum_{i in R} w_i l_i / sum_{i in R} w_i ) / n

    i.e. the normalized weighted mean with weights ``1`` on ``F`` and ``|R| w_i / sum_R w`` on ``R`` (plain
    normalization when ``F`` is empty, the mean over ``F`` when ``R`` is). The losses are moved to the
    weights' device and both are promoted to their common dtype first.
    """
    weights, loss = promote(weights, per_example_loss)
    if fixed_share is not None:
        fixed = fixed_share.to(weights.device).bool()
        rest = (~fixed).to(weights.dtype)
        # |R| / sum_R w; when R is empty every row is fixed and the scale is never used
        scale = rest.sum() / (weights * rest).sum().clamp_min(torch.finfo(weights.dtype).tiny)
        weights = torch.where(fixed, torch.ones_like(weights), weights * scale)
    return (weights * loss).sum() / weights.sum()

class ExampleWeighting(OuterModule):
    """An outer module that weights the training examples: subclasses give each example of a batch a weight
    ``w_i > 0`` (:meth:`example_weights`, differentiable in the outer parameters) and the inner objective is the
    normalized weighted mean ``sum_i w_i l_i / sum_i w_i`` of the per-example losses.

    A kind that can leave *trusted* rows out of its weighting (rows flagged 1 in a batch column, e.g. the outer
    set's rows when the inner problem also trains on them) sets ``accepts_trusted_rows`` and reads the column
    named by ``trusted_column``."""

    accepts_trusted_rows: ClassVar[bool] = False
    trusted_column: str | None = None
    # True when example_weights reads the losses as values only (detached, or not at all), so that the inner
    # gradient is sum_i w_i grad l_i / sum_i w_i and the mixed derivative d/dphi (grad_theta L . v) is
    # d/dphi [sum_i w_i (grad l_i . v) / sum_i w_i]: BilevelTrainer then takes it as gradients of the loss weighted by
    # the weights' slopes in phi instead of a double backward. A subclass differentiating its weights through the
    # losses leaves it False.
    weights_hold_losses_fixed: ClassVar[bool] = False

    def example_weights(self, per_example_loss: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """Unnormalized weights of the batch's examples, shape ``(batch_size,)``."""
        raise NotImplementedError

    def fixed_share_rows(self, batch: Mapping[str, Tensor], batch_size: int) -> Tensor | None:
        """Boolean mask of the batch's rows that keep their uniform share of the inner loss whatever the
        weights (see :func:`_normalized_weighted_mean`), or ``None`` (the default: no such rows)."""
        del batch, batch_size
        return None

    def weighted_mean(self, per_example_loss: Tensor, values: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """``sum_i w_i v_i / sum_i w_i`` with ``w_i`` the weights of the losses ``per_example_loss``
        (:meth:`example_weights`; the rows of :meth:`fixed_share_rows`, if any, at their uniform share) and ``v_i``
        the ``values``: the inner objective for ``values = per_example_loss``, its mixed derivative's integrand
        for ``values`` the losses' directional derivatives (see ``weights_hold_losses_fixed``)."""
        weights = self.example_weights(per_example_loss, batch)
        return _normalized_weighted_mean(weights, values, self.fixed_share_rows(batch, per_example_loss.shape[0]))

    def forward(
        self, per_example_loss: Tensor, batch: Mapping[str, Tensor], inner_params: Mapping[str, Tensor]
    ) -> Tensor:
        """``sum_i w_i l_i / sum_i w_i`` (:meth:`weighted_mean` of the losses themselves); ``inner_params`` is
        unused (the weights depend on the example and its loss, not on the model's parameters)."""
        del inner_params
        return self.weighted_mean(per_example_loss, per_example_loss, batch)

def _batch_index_column(
    batch: Mapping[str, Tensor],
    column: str,
    *,
    size: int,
    batch_size: int | None,
    check_range: bool,
    what: str,
    missing_message: Callable[[], str],
    range_message: Callable[[int], str],
) -> Tensor:
    """The integer column ``column`` of ``batch`` as a 1-D LongTensor (not moved), validated.

    Checks presence (``KeyError(missing_message())``), an integer dtype, one value per example, the length
    ``batch_size`` and (when ``check_range`` and the tensor is not wrapped by a torch.func transform) the
    range ``0 .. size - 1`` (``IndexError(range_message(bad_value))``). ``what`` names the values in messages,
    e.g. ``"example id"``.
    """
    if column not in batch:
        raise KeyError(missing_message())
    ids = batch[column]
    if not isinstance(ids, Tensor):
        ids = torch.as_tensor(ids)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"batch[{column!r}] must hold integer {what}s, got dtype {ids.dtype}")
    if ids.dim() > 1:
        if ids.numel() != ids.shape[0]:
            raise ValueError(f"batch[{column!r}] must have one {what} per example, got shape {tuple(ids.shape)}")
        ids = ids.reshape(-1)
    if ids.dim() == 0:
        ids = ids.reshape(1)
    if batch_size is not None and ids.shape[0] != batch_size:
        raise ValueError(
            f"batch[{column!r}] has {ids.shape[0]} ids but per_example_loss has {batch_size} entries"
        )
    if check_range and _is_plain_tensor(ids) and ids.numel() > 0:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= size:
            raise IndexError(range_message(lo if lo < 0 else hi))
    return ids


class IndexedWeighting(ExampleWeighting):
    """Weights looked up by an integer id column of the batch (``id_column``: example ids, source ids): subclasses
    hold ``num_ids`` weights (:meth:`weights`) and say how a missing column or an id out of range is explained."""

    id_what: ClassVar[str] = "id"  # what the ids are, in messages ("example id", "source id")
    weights_hold_losses_fixed: ClassVar[bool] = True  # the weights do not read the losses
    check_ids: bool = True  # False skips the (host-syncing) range check

    @property
    def num_ids(self) -> int:
        raise NotImplementedError

    def weights(self) -> Tensor:
        """All weights, indexed by id (differentiable)."""
        raise NotImplementedError

    def _missing_message(self, batch: Mapping[str, Tensor]) -> str:
        raise NotImplementedError

    def _range_message(self, bad: int) -> str:
        raise NotImplementedError

    def batch_columns(self) -> tuple[str, ...]:
        return (self.id_column,)

    def batch_ids(self, batch: Mapping[str, Tensor], batch_size: int | None = None) -> Tensor:
        """The ids of ``batch`` as a 1-D LongTensor on the weights' device, validated (presence, dtype, length,
        range)."""
        ids = _batch_index_column(batch, self.id_column, size=self.num_ids, batch_size=batch_size,
                                  check_range=self.check_ids, what=self.id_what,
                                  missing_message=lambda: self._missing_message(batch),
                                  range_message=self._range_message)
        return ids.to(device=self.logits.device, dtype=torch.long)

    def weights_of(self, ids: Tensor) -> Tensor:
        """``weights()[ids]`` (subclasses may compute it without every weight)."""
        return self.weights().index_select(0, ids)

    def example_weights(self, per_example_loss: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """Unnormalized weights of the batch's examples, ``weights()[id_i]``, shape ``(batch_size,)``
        (differentiable); ``per_example_loss`` only gives the batch size."""
        _check_per_example_loss(per_example_loss)
        return self.weights_of(self.batch_ids(batch, per_example_loss.shape[0]))
