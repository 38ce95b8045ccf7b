"""Outer-parameter modules: what the bilevel trainer learns on the outer (held-out) objective.

An :class:`OuterModule` turns the per-example losses of a training batch into the scalar *inner* objective
that the model's trainable (inner) parameters minimize. Its own parameters (the *outer* parameters) are
tuned by implicit hypergradients so that the inner solution does well on held-out data.

The modules provided:

* :class:`DataWeights` -- one learned weight per training example (down-weights noisy or harmful
  examples); inner loss = ``sum_i w_i l_i / sum_i w_i`` over the batch.
* :class:`LossWeights` -- data weights as a learned one-parameter function of each example's current loss;
  inner loss = ``sum_i w_i l_i / sum_i w_i`` with ``w_i = sigmoid(-loss_scale * stop_grad(l_i))``.
* :class:`LoraRegularization` -- one learned L2 strength per LoRA module (or per transformer layer);
  inner loss = ``mean_i l_i + sum_m 1/2 exp(s_m) (|A_m|^2 + |B_m|^2)``.
* :class:`SourceWeights` -- one learned weight per data source (domain), ``w_s = S * softmax(a)_s``, each example
  weighted by its source's weight; inner loss = ``sum_i w_s(i) l_i / sum_i w_s(i)``.
* :class:`CombinedWeights` -- the product of several weightings (e.g. per-source times per-example weights);
  inner loss = ``sum_i w_i l_i / sum_i w_i`` with ``w_i = prod_k w^(k)_i``.

The trainer evaluates the module functionally::

    inner_obj = torch.func.functional_call(outer_module, outer_params, (per_example_loss, batch, inner_params))

so ``forward`` is a pure function of the module's parameters and its inputs (no in-place updates, no
state), which makes it usable under ``torch.func.grad``, ``jvp`` and ``vmap`` over tangents of
``inner_params``.

Persistence (``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``) builds on
:mod:`hf_integration.serialization` (file layout, validation on load), :mod:`hf_integration.model_card`
(each kind describes itself in its card with :meth:`OuterModule.card_text`),
:mod:`hf_integration.optimizer_state` and :mod:`hf_integration.hub` (upload).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from . import hub, serialization
from .model_card import CardText, render_model_card
from .optimizer_state import load_optimizer_state, save_optimizer_state

logger = logging.getLogger(__name__)

__all__ = ["OuterModule", "DataWeights", "LossWeights", "LoraRegularization", "find_lora_modules", "parse_layer_index",
           "SourceWeights", "CombinedWeights"]


def _is_plain_tensor(t: Tensor) -> bool:
    """True unless ``t`` is wrapped by a torch.func transform (then data-dependent checks are impossible)."""
    if torch.compiler.is_compiling():
        return False
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return not (is_wrapped is not None and is_wrapped(t))


class OuterModule(nn.Module):
    """Base class of outer-parameter modules (learned data weights, learned regularization, ...).

    Subclasses set the class attribute ``kind`` (the string recorded on save, used by
    :meth:`OuterModule.from_pretrained` to dispatch to the right class) and implement :meth:`forward`,
    :meth:`summary_stats`, :meth:`config_dict` and :meth:`_from_config`; they override :meth:`card_text` to
    describe themselves in model cards.

    Attributes:
        metadata: String metadata recorded with the parameters (training method, base model, dataset
            fingerprint, ...). Filled by :meth:`from_pretrained`; merged under the ``metadata`` passed to
            :meth:`save_pretrained` (the explicit argument wins on conflicting keys).
    """

    kind: ClassVar[str] = ""
    # True when the inner objective holds something computed from the model under a stop-gradient (its Hessian
    # treats it as a constant, which finite differences of gradients cannot do): exact HVP modes only.
    stops_gradients: ClassVar[bool] = False
    _registry: ClassVar[dict[str, type[OuterModule]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind:
            existing = OuterModule._registry.get(kind)
            if existing is not None and existing.__qualname__ != cls.__qualname__:
                raise TypeError(f"outer module kind {kind!r} is already registered by {existing.__name__}")
            OuterModule._registry[kind] = cls

    def __init__(self) -> None:
        super().__init__()
        self.metadata: dict[str, str] = {}

    # ---------------------------------------------------------------- interface
    def forward(
        self, per_example_loss: Tensor, batch: Mapping[str, Tensor], inner_params: Mapping[str, Tensor]
    ) -> Tensor:
        """Scalar inner objective.

        Args:
            per_example_loss: Shape ``(B,)``, one loss per example of the batch (for causal LMs, the mean over
                the example's non-ignored tokens, i.e. labels ``!= -100``).
            batch: The batch dict (holds e.g. the example-id column).
            inner_params: The model's inner (trainable) parameters by name, named as in
                ``model.named_parameters()``.
        """
        raise NotImplementedError

    def summary_stats(self) -> dict[str, float]:
        """Statistics for logging (e.g. mean/std/min/max of the weights or strengths)."""
        raise NotImplementedError

    def set_inner_step(self, step: int) -> None:
        """Tell this module and the outer modules inside it (the parts of a combined one) that training has
        taken ``step`` inner optimizer steps; `BilevelTrainer` calls it before every inner step, so outer
        updates see the value of the inner step they follow. Modules with a schedule (`LossWeights`'
        ``warmup_steps``) override :meth:`_on_inner_step`; the others ignore it."""
        for module in self.modules():
            if isinstance(module, OuterModule):
                module._on_inner_step(step)

    def _on_inner_step(self, step: int) -> None:
        """This module's own reaction to :meth:`set_inner_step` (default: none)."""

    def config_dict(self) -> dict[str, Any]:
        """JSON-serializable config that :meth:`from_pretrained` needs to rebuild the module (includes ``kind``)."""
        raise NotImplementedError

    @classmethod
    def _from_config(cls, config: Mapping[str, Any]) -> OuterModule:
        """Build a freshly initialized module from :meth:`config_dict` output (subclasses implement)."""
        raise NotImplementedError

    def card_text(self) -> CardText:
        """What this kind says about itself in a model card (subclasses override; this is a generic text)."""
        return CardText(title=f"Outer parameters ({self.kind})",
                        description=f"outer parameters of kind `{self.kind}`, learned by bilevel optimization.")

    # ---------------------------------------------------------------- persistence
    def save_pretrained(
        self,
        save_directory: str,
        metadata: dict[str, str] | None = None,
        optimizer_state: dict | None = None,
        *,
        model_card: bool = True,
    ) -> None:
        """Save to ``save_directory``: ``outer_params.safetensors``, ``outer_config.json`` and ``README.md``.

        Args:
            save_directory: Folder (created if missing). Files are written atomically.
            metadata: String metadata to record (``int``/``float``/``bool`` are converted with ``str``,
                ``None`` values dropped), e.g. ``method``, ``rank``, ``rho``, ``steps``, ``base_model``,
                ``dataset_name``, ``split``, ``fingerprint``, ``num_rows``, ``id_column`` (see
                :func:`hf_integration.data.dataset_fingerprint_metadata`). Merged over :attr:`metadata`.
            optimizer_state: An outer optimizer's ``state_dict()``; if given, also written (without pickle) to
                ``outer_optimizer.safetensors`` for resuming. Read it back with :meth:`load_optimizer_state`.
            model_card: Write ``README.md``; pass ``False`` when saving into a folder whose ``README.md`` belongs
                to something else (e.g. a ``Trainer`` output dir holding the model's card; append
                :func:`hf_integration.model_card.outer_params_card_section` to that card instead).
        """
        self._save(save_directory, metadata=metadata, optimizer_state=optimizer_state, card_repo_id=None,
                   model_card=model_card)

    def _save(
        self,
        save_directory: str,
        *,
        metadata: Mapping[str, Any] | None,
        optimizer_state: Mapping[str, Any] | None,
        card_repo_id: str | None,
        model_card: bool = True,
    ) -> None:
        merged = {**self.metadata, **serialization.normalize_metadata(metadata)}
        card = None
        if model_card:
            card = render_model_card(self, metadata=merged, repo_id=card_repo_id or os.fspath(save_directory))
        serialization.save_outer_files(save_directory, kind=self.kind, config=self.config_dict(),
                                       tensors=self.state_dict(), metadata=merged, card=card)
        if optimizer_state is not None:
            save_optimizer_state(optimizer_state, os.path.join(save_directory, serialization.OUTER_OPTIMIZER_NAME))

    @staticmethod
    def load_optimizer_state(save_directory: str) -> dict[str, Any]:
        """The outer optimizer state that :meth:`save_pretrained` wrote with ``optimizer_state=`` (never unpickled).

        Pass it to ``optimizer.load_state_dict`` of an optimizer built over the loaded module's parameters.

        Raises:
            FileNotFoundError: ``save_directory`` holds no ``outer_optimizer.safetensors``.
        """
        return load_optimizer_state(os.path.join(os.fspath(save_directory), serialization.OUTER_OPTIMIZER_NAME))

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        expected: dict | None = None,
        hub_timeout: float | None = None,
        **hub_kwargs: Any,
    ) -> OuterModule:
        """Load outer parameters from a local folder (takes precedence) or a Hub repo id.

        Only ``outer_params.safetensors`` is read, with safetensors (never pickle). Called on the base class,
        ``OuterModule.from_pretrained`` returns an instance of whichever subclass was saved; called on a
        subclass, it refuses a file of another kind.

        Args:
            path_or_repo_id: Folder written by :meth:`save_pretrained`, or a Hub repo id.
            revision: Hub revision (branch, tag or commit sha).
            token: Hub token.
            expected: Fields that must match what was saved, e.g.
                ``{"num_rows": 1000, "fingerprint": ds._fingerprint, "id_column": "example_id",
                "base_model": "org/model"}`` (compared against the metadata, as strings) or config fields such
                as ``{"module_names": [...], "num_examples": 1000}``. ``None`` values are skipped; a field
                that was never saved is refused (it cannot be verified).
            hub_timeout: Deadline in seconds of the download from the Hub (:func:`hf_integration.hub.hub_call`);
                ``None``: ``HF_HUB_ETAG_TIMEOUT + HF_HUB_DOWNLOAD_TIMEOUT`` (20 s unless set). Without it a Hub
                that does not answer keeps ``hf_hub_download`` in its retries for minutes.
            **hub_kwargs: Passed to :func:`huggingface_hub.hf_hub_download` (``cache_dir``,
                ``local_files_only``, ``subfolder``, ``force_download``, ...).

        Raises:
            FileNotFoundError: No ``outer_params.safetensors`` at the location, or the download failed or did not
                finish within ``hub_timeout`` (one line).
            ValueError: A corrupt file or header, NaN/inf values, wrong kind, a tensor shape that does not match
                the config (checked before a module of the config's size is allocated), or an ``expected``
                field that does not match (the message names the field, the saved and the expected value).
        """
        loaded = serialization.load_outer_files(path_or_repo_id, revision=revision, token=token,
                                                hub_timeout=hub_timeout, **hub_kwargs)
        source = str(path_or_repo_id)
        target = OuterModule._registry.get(loaded.kind)
        if cls is not OuterModule and loaded.kind != cls.kind:
            hint = f"; load it with {target.__name__}.from_pretrained" if target is not None else ""
            raise ValueError(
                f"{source!r} holds outer parameters of kind {loaded.kind!r}, but {cls.__name__}.from_pretrained "
                f"expects kind {cls.kind!r}{hint} (or OuterModule.from_pretrained to dispatch by kind)"
            )
        if target is None:
            raise ValueError(
                f"{source!r} holds outer parameters of unknown kind {loaded.kind!r} "
                f"(known kinds: {sorted(OuterModule._registry)})"
            )
        serialization.check_expected(expected, metadata=loaded.metadata, config=loaded.config, source=source)
        try:  # on the meta device first: a config claiming a huge size must not allocate it
            with torch.device("meta"):
                own = target._from_config(loaded.config).state_dict()
        except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as err:
            raise ValueError(f"{source!r}: invalid {loaded.kind} config {_short_config(loaded.config)}: "
                             f"{type(err).__name__}: {err}") from err
        if set(own) != set(loaded.tensors):
            raise ValueError(
                f"{source!r}: saved tensors {sorted(loaded.tensors)} do not match the parameters of "
                f"{target.__name__} {sorted(own)}"
            )
        for name, param in own.items():
            saved = loaded.tensors[name]
            if tuple(saved.shape) != tuple(param.shape):
                raise ValueError(
                    f"{source!r}: tensor {name!r} has shape {tuple(saved.shape)} in the file, but the saved config "
                    f"({_short_config(loaded.config)}) implies shape {tuple(param.shape)}; the file is inconsistent"
                )
            if not saved.is_floating_point():
                raise ValueError(f"{source!r}: tensor {name!r} has non-floating dtype {saved.dtype}")
        module = target._from_config(loaded.config)  # its sizes are now known to be those of the file
        own = module.state_dict()
        with torch.no_grad():
            module.load_state_dict({k: v.to(own[k].dtype) for k, v in loaded.tensors.items()})
        module.metadata = dict(loaded.metadata)
        return module

    def push_to_hub(
        self,
        repo_id: str,
        *,
        metadata: dict[str, str] | None = None,
        commit_message: str = "Upload outer parameters",
        private: bool | None = None,
        token: str | bool | None = None,
        create_pr: bool = False,
    ) -> str:
        """Upload ``outer_params.safetensors``, ``outer_config.json`` and ``README.md`` to a Hub model repo.

        Creates the repo if needed (``exist_ok=True``), saves to a temporary folder (the card's loading
        snippet names ``repo_id``) and uploads it in one commit. Returns the commit URL (the pull-request
        URL with ``create_pr=True``). The optimizer state is never uploaded. ``metadata`` is checked first
        (:func:`~hf_integration.serialization.normalize_metadata`): a refused key creates no repo.
        """
        serialization.normalize_metadata(metadata)
        return hub.push_folder_to_hub(
            lambda folder, resolved_id: self._save(
                folder, metadata=metadata, optimizer_state=None, card_repo_id=resolved_id
            ),
            repo_id,
            commit_message=commit_message,
            private=private,
            token=token,
            create_pr=create_pr,
        )


def _short_config(config: Mapping[str, Any]) -> str:
    parts = []
    for key, value in config.items():
        if isinstance(value, list) and len(value) > 3:
            value = f"[{len(value)} items]"
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def _require(config: Mapping[str, Any], *keys: str) -> None:
    missing = [k for k in keys if k not in config]
    if missing:
        raise KeyError(f"config lacks {missing}")


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
    loss = per_example_loss.to(weights.device)
    if loss.dtype != weights.dtype:
        common = torch.promote_types(loss.dtype, weights.dtype)
        loss, weights = loss.to(common), weights.to(common)
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
    normalized weighted mean ``sum_i w_i l_i / sum_i w_i`` of the per-example losses."""

    def example_weights(self, per_example_loss: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """Unnormalized weights of the batch's examples, shape ``(batch_size,)``."""
        raise NotImplementedError

    def fixed_share_rows(self, batch: Mapping[str, Tensor], batch_size: int) -> Tensor | None:
        """Boolean mask of the batch's rows that keep their uniform share of the inner loss whatever the
        weights (see :func:`_normalized_weighted_mean`), or ``None`` (the default: no such rows)."""
        del batch, batch_size
        return None

    def forward(
        self, per_example_loss: Tensor, batch: Mapping[str, Tensor], inner_params: Mapping[str, Tensor]
    ) -> Tensor:
        """``sum_i w_i l_i / sum_i w_i`` with ``w_i`` from :meth:`example_weights` (the rows of
        :meth:`fixed_share_rows`, if any, at their uniform share); ``inner_params`` is unused (the weights depend
        on the example and its loss, not on the model's parameters)."""
        del inner_params
        weights = self.example_weights(per_example_loss, batch)
        return _normalized_weighted_mean(weights, per_example_loss,
                                         self.fixed_share_rows(batch, per_example_loss.shape[0]))


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


# ==================================================================================================
# Data weights
# ==================================================================================================


class DataWeights(ExampleWeighting):
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

    def __init__(self, num_examples: int, id_column: str = "example_id", init: float = 0.0) -> None:
        super().__init__()
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
            raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
        if not isinstance(id_column, str) or not id_column:
            raise ValueError(f"id_column must be a non-empty str, got {id_column!r}")
        self.num_examples = num_examples
        self.id_column = id_column
        self.init = float(init)
        self.check_ids = True  # set False to skip the (host-syncing) range check in forward
        self.logits = nn.Parameter(torch.full((num_examples,), self.init))

    def extra_repr(self) -> str:
        return f"num_examples={self.num_examples}, id_column={self.id_column!r}"

    def weights(self) -> Tensor:
        """All weights ``sigmoid(logits)``, shape ``(num_examples,)``, indexed by example id (differentiable)."""
        return torch.sigmoid(self.logits)

    def batch_ids(self, batch: Mapping[str, Tensor], batch_size: int | None = None) -> Tensor:
        """The example ids of ``batch`` as a 1-D LongTensor, validated (presence, dtype, length, range)."""
        ids = _batch_index_column(
            batch, self.id_column, size=self.num_examples, batch_size=batch_size, check_range=self.check_ids,
            what="example id",
            missing_message=lambda: (
                f"DataWeights needs the example-id column {self.id_column!r} in the batch, but the batch has "
                f"{sorted(batch)}. Add ids to the training dataset with hf_integration.add_example_ids(...) "
                "before shuffling/filtering, and keep the column through the data collator "
                "(e.g. remove_unused_columns must not drop it)."
            ),
            range_message=lambda bad: (
                f"example id {bad} in batch[{self.id_column!r}] is out of range for DataWeights with "
                f"num_examples={self.num_examples} (valid ids: 0..{self.num_examples - 1}); was the module "
                "built for another dataset, or were ids added after filtering/concatenation?"
            ),
        )
        return ids.to(device=self.logits.device, dtype=torch.long)

    def example_weights(self, per_example_loss: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """Unnormalized weights ``w_i = sigmoid(s_{id_i})`` of the batch's examples, shape ``(batch_size,)``
        (differentiable in ``logits``); ``per_example_loss`` only gives the batch size."""
        _check_per_example_loss(per_example_loss)
        ids = self.batch_ids(batch, per_example_loss.shape[0])
        return torch.sigmoid(self.logits.index_select(0, ids))


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
    example, the hard but clean ones included, at nearly uniform weights. Measured on the instruction job
    (SmolLM2, 3 seeds, from ``loss_scale = 1``): a warm-up over half the run lowered the test loss where a tilt
    from the start had hurt it most (seed 0: 0.929 vs 0.971) and left the mean unchanged (0.739 vs 0.740), at
    a slightly lower AUC (0.920 vs 0.927); that job does not use it by default.

    Two measured choices: no offset (with ``sigmoid(bias - ...)`` the outer problem drove ``bias`` up until every
    weight saturated near 1 and the weighting switched itself off) and a positive scale (a signed one went
    negative, up-weighting the noisy examples, in 5 of 27 runs of ``benchmarks/reweighting_outcome.py``; the
    worst a positive one can do is stay near uniform).

    Trusted rows (``trusted_column``): when the inner problem also trains on the clean validation examples (the
    data-weighting script's ``--train_on_validation``), a true value in that batch column marks them, and they
    are not weighted by their loss: weighting the validation examples by their loss too let the outer problem
    prefer keeping its own hard examples, and ``loss_scale`` drifted back to uniform (measured in
    ``benchmarks/reweighting_outcome.py``: scipy_docs with 30% pairwise noise, AUC 0.86 -> 0.94 at seed 0).
    ``trusted_share`` says how much they count:

    * ``"max_weight"`` (default): the weight of a zero-loss example, ``sigmoid(0) = 1/2``, the largest there is,
      normalized with the rest. A larger ``loss_scale`` then also shifts the batch's mass onto the trusted rows,
      which are the outer objective's own rows.
    * ``"uniform"``: they keep their uniform share of each batch, ``n_trusted / n``, and the weights only divide
      the rest among the training rows (:func:`_normalized_weighted_mean` with ``fixed_share``), so the outer
      problem cannot lower its loss by training more on its own rows. Measured on the instruction job (SmolLM2,
      3 seeds): test loss 0.728 / 0.637 / 0.532 vs 0.971 / 0.653 / 0.595 with ``"max_weight"`` (uniform SFT:
      0.905 / 0.730 / 0.707) at an AUC of 0.920 / 0.901 / 0.908 vs 0.940 / 0.924 / 0.918; that job's default.
      On the classification job's real-text sets it lowered the AUC and test accuracy at 30% pairwise noise
      (e.g. ``scipy_docs``: 0.909 / 69.4% vs 0.938 / 73.1%), so that job keeps ``"max_weight"``.

    As in Meta-Weight-Net, the weights are inputs to the inner step, not functions it differentiates: the
    inner gradient is ``sum_i w_i grad l_i / sum_i w_i`` and the Hessian of the hypergradient is that of the
    weighted loss with the weights held at their current values (``stops_gradients``). Exact HVP modes compute
    exactly this; finite differences of gradients would also differentiate the weights, so the trainer
    refuses ``hvp_mode="finite_diff"`` with this module and checks its exact modes against each other.
    (Differentiating through the weights instead makes the loss a redescending robust loss; measured on the
    real-text sets it learned worse weights and, on one set, the opposite sign.)

    No example ids are needed (``id_column`` is ``None``), so any collator works (one that keeps
    ``trusted_column`` when it is set).

    Args:
        init_loss_scale: Initial ``loss_scale`` (> 0; the default 0.1 is nearly uniform).
        trusted_column: Optional batch column of 0/1 flags marking the trusted rows (see above).
        warmup_steps: Inner steps over which the tilt grows linearly to full strength (0: none; see above).
        trusted_share: ``"max_weight"`` or ``"uniform"``: how much the trusted rows count (see above).
    """

    kind: ClassVar[str] = "loss_weights"
    stops_gradients: ClassVar[bool] = True
    id_column = None

    TRUSTED_SHARES: ClassVar[tuple[str, ...]] = ("max_weight", "uniform")

    def __init__(self, init_loss_scale: float = 0.1, trusted_column: str | None = None,
                 warmup_steps: int = 0, trusted_share: str = "max_weight") -> None:
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
        self.init_loss_scale = float(init_loss_scale)
        self.trusted_column = trusted_column
        self.warmup_steps = warmup_steps
        self.trusted_share = trusted_share
        self.warmup_factor = 1.0  # r of the warm-up; 1 outside training (a loaded module weights at full tilt)
        # softplus^-1(s) = log(expm1(s))
        self.loss_scale_raw = nn.Parameter(torch.tensor(math.log(math.expm1(self.init_loss_scale))))

    @property
    def loss_scale(self) -> Tensor:
        """``softplus(loss_scale_raw)``, differentiable."""
        return nn.functional.softplus(self.loss_scale_raw)

    def _on_inner_step(self, step: int) -> None:
        self.warmup_factor = min(1.0, step / self.warmup_steps) if self.warmup_steps else 1.0

    def weights_for(self, per_example_loss: Tensor) -> Tensor:
        """``sigmoid(-r * loss_scale * l)`` for the losses ``l`` (no gradient flows into ``l``), ``r`` the
        warm-up factor (1 after the warm-up and outside training)."""
        return torch.sigmoid(-self.warmup_factor * self.loss_scale * per_example_loss.detach())

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
        """Unnormalized weights ``w_i = sigmoid(-loss_scale * stop_grad(l_i))`` of the batch's examples, shape
        ``(batch_size,)`` (:meth:`weights_for`); the rows that ``batch[trusted_column]`` flags get ``1/2``
        (with ``trusted_share="uniform"`` the inner loss gives them their uniform share instead)."""
        _check_per_example_loss(per_example_loss)
        losses = per_example_loss.to(self.loss_scale_raw.device)
        trusted = self._trusted_rows(batch, losses.shape[0])
        if trusted is not None:
            losses = torch.where(trusted, torch.zeros_like(losses), losses)
        return self.weights_for(losses)

    def fixed_share_rows(self, batch: Mapping[str, Tensor], batch_size: int) -> Tensor | None:
        """The trusted rows with ``trusted_share="uniform"``, else ``None``."""
        return self._trusted_rows(batch, batch_size) if self.trusted_share == "uniform" else None


    @torch.no_grad()
    def summary_stats(self) -> dict[str, float]:
        """``loss_scale``, and the warm-up factor while it is below 1."""
        stats = {"loss_scale": float(self.loss_scale)}
        if self.warmup_factor < 1.0:
            stats["warmup_factor"] = self.warmup_factor
        return stats

    def config_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "init_loss_scale": self.init_loss_scale, "trusted_column": self.trusted_column,
                "warmup_steps": self.warmup_steps, "trusted_share": self.trusted_share}

    @classmethod
    def _from_config(cls, config: Mapping[str, Any]) -> LossWeights:
        return cls(init_loss_scale=config.get("init_loss_scale", 0.1), trusted_column=config.get("trusted_column"),
                   warmup_steps=config.get("warmup_steps", 0), trusted_share=config.get("trusted_share", "max_weight"))

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
                       if self.trusted_share == "uniform" else ""),
            usage=("w = outer.weights_for(per_example_loss)  # weights of examples with these losses under a model\n"
                   "# e.g. the losses of the training set under the fine-tuned model, to rank or filter it"),
        )


# ==================================================================================================
# LoRA regularization
# ==================================================================================================

_LORA_A_RE = re.compile(r"^(?P<module>.+)\.lora_A\.(?P<adapter>[^.]+)\.weight$")
# Transformer-block containers across common architectures: Llama/Mistral/Qwen ``layers.N``, GPT-2/Falcon
# ``h.N``, BERT/RoBERTa ``layer.N``, T5 ``block.N``, ViT-style ``blocks.N``.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def parse_layer_index(module_name: str) -> int:
    """Transformer layer index of a module name, e.g. ``...model.layers.3.self_attn.q_proj`` -> ``3``.

    Raises:
        ValueError: The name has no ``layers.N`` / ``layer.N`` / ``h.N`` / ``block(s).N`` component.
    """
    match = _LAYER_RE.search(module_name)
    if match is None:
        raise ValueError(
            f"cannot parse a transformer layer index from module name {module_name!r} (looked for "
            "'layers.N', 'layer.N', 'h.N', 'blocks.N', 'block.N'); use granularity='module' instead"
        )
    return int(match.group(1))


def _layer_index_or_none(module_name: str) -> int | None:
    match = _LAYER_RE.search(module_name)
    return None if match is None else int(match.group(1))


def find_lora_modules(
    named_parameters: Sequence[tuple[str, Tensor]] | Mapping[str, Tensor],
    adapter_name: str | None = None,
    only_trainable: bool = True,
) -> tuple[list[str], str]:
    """Find LoRA modules from parameter names ``<module>.lora_A.<adapter>.weight`` / ``<module>.lora_B.<adapter>.weight``.

    Args:
        named_parameters: ``model.named_parameters()`` (or a name -> tensor mapping).
        adapter_name: Adapter to use; ``None`` picks the only adapter present (error if several).
        only_trainable: Skip parameters with ``requires_grad=False`` (e.g. inactive adapters).

    Returns:
        ``(module_names, adapter_name)``, module names in parameter order.
    """
    items = list(named_parameters.items() if isinstance(named_parameters, Mapping) else named_parameters)
    names = {n for n, p in items if not only_trainable or p.requires_grad}
    found: dict[str, list[str]] = {}
    for name, _ in items:
        if name not in names:
            continue
        match = _LORA_A_RE.match(name)
        if match and f"{match['module']}.lora_B.{match['adapter']}.weight" in names:
            found.setdefault(match["adapter"], []).append(match["module"])
    if adapter_name is None:
        if len(found) > 1:
            raise ValueError(f"the model has several LoRA adapters {sorted(found)}; pass adapter_name")
        adapter_name = next(iter(found), None)
    modules = found.get(adapter_name or "", [])
    if not modules:
        what = "trainable " if only_trainable else ""
        extra = f" (adapters found: {sorted(found)})" if found else ""
        raise ValueError(
            f"the model has no {what}LoRA parameters for adapter {adapter_name!r}{extra}: no parameter named "
            "'<module>.lora_A.<adapter>.weight' with a matching lora_B. Wrap the model with "
            "peft.get_peft_model(model, LoraConfig(...)) first."
        )
    return modules, adapter_name  # type: ignore[return-value]


class LoraRegularization(OuterModule):
    """Learned L2 regularization strengths for LoRA factors.

    Each group ``g`` (a LoRA module, or all LoRA modules of a transformer layer) has a learned log-strength
    ``s_g`` (the parameter ``log_strength``); the inner loss is::

        L = mean_i l_i + sum_m 1/2 exp(s_{g(m)}) (|A_m|_F^2 + |B_m|_F^2)

    where ``A_m``, ``B_m`` are the inner parameters ``<module>.lora_A.<adapter>.weight`` and
    ``<module>.lora_B.<adapter>.weight``. Parameterizing by the log keeps strengths positive and lets the
    outer optimizer move them across orders of magnitude.

    Args:
        module_names: LoRA module names, exactly as prefixes of ``model.named_parameters()`` names, e.g.
            ``"base_model.model.model.layers.0.self_attn.q_proj"`` for a PEFT model. Prefer
            :meth:`from_peft_model`.
        granularity: ``"module"`` (one strength per LoRA module), ``"layer"`` (one per transformer layer,
            parsed with :func:`parse_layer_index`; a LoRA module outside the layers, e.g. a classification
            head, is a group of its own, named by the module) or ``"global"`` (a single strength).
        init_log_strength: Initial ``s`` of every group (default ``log(1e-3)``).
        adapter_name: PEFT adapter name in the parameter names.
    """

    kind: ClassVar[str] = "lora_regularization"
    GRANULARITIES: ClassVar[tuple[str, ...]] = ("module", "layer", "global")

    def __init__(
        self,
        module_names: Sequence[str],
        granularity: str = "module",
        init_log_strength: float = math.log(1e-3),
        adapter_name: str = "default",
    ) -> None:
        super().__init__()
        if isinstance(module_names, str):
            raise TypeError("module_names must be a list of module names, not a single str")
        module_names = list(module_names)
        if not module_names:
            raise ValueError("module_names is empty: there are no LoRA modules to regularize")
        if len(set(module_names)) != len(module_names):
            raise ValueError("module_names has duplicates")
        if granularity not in self.GRANULARITIES:
            raise ValueError(f"granularity must be one of {self.GRANULARITIES}, got {granularity!r}")
        self.module_names = module_names
        self.granularity = granularity
        self.adapter_name = adapter_name
        self.init_log_strength = float(init_log_strength)

        if granularity == "module":
            group_names = list(module_names)
            group_index = list(range(len(module_names)))
        elif granularity == "layer":
            # a module outside the transformer layers (a classification head, embeddings) is a group of its own
            indices = [_layer_index_or_none(m) for m in module_names]
            group_names = ([f"layer.{i}" for i in sorted({i for i in indices if i is not None})]
                           + [m for m, i in zip(module_names, indices) if i is None])
            position = {group: k for k, group in enumerate(group_names)}
            group_index = [position[m if i is None else f"layer.{i}"] for m, i in zip(module_names, indices)]
        else:
            group_names = ["global"]
            group_index = [0] * len(module_names)
        self.group_names: list[str] = group_names
        self.group_index: list[int] = group_index  # module k -> strength group_index[k]
        self._a_keys = [f"{m}.lora_A.{adapter_name}.weight" for m in module_names]
        self._b_keys = [f"{m}.lora_B.{adapter_name}.weight" for m in module_names]
        self.log_strength = nn.Parameter(torch.full((len(group_names),), self.init_log_strength))

    def extra_repr(self) -> str:
        return f"granularity={self.granularity!r}, modules={len(self.module_names)}, groups={len(self.group_names)}"

    @classmethod
    def from_peft_model(
        cls,
        model: nn.Module,
        granularity: str = "module",
        init_log_strength: float = math.log(1e-3),
        adapter_name: str | None = None,
    ) -> LoraRegularization:
        """Build from a PEFT LoRA model, finding its LoRA modules from ``model.named_parameters()``.

        Module names are the prefixes in *this* model's parameter names (for a ``PeftModel`` they start with
        ``base_model.model.``), so pass the same (unwrapped) model whose ``named_parameters()`` the trainer
        uses for ``inner_params``. ``adapter_name=None`` uses the model's active adapter (or the only one).

        Raises:
            ValueError: The model has no trainable LoRA parameters.
        """
        if adapter_name is None:
            active = getattr(model, "active_adapter", None)
            if isinstance(active, (list, tuple)):
                active = active[0] if len(active) == 1 else None
            adapter_name = active if isinstance(active, str) else None
        modules, adapter = find_lora_modules(list(model.named_parameters()), adapter_name=adapter_name)
        covered = {f"{m}.lora_{ab}.{adapter}.weight" for m in modules for ab in "AB"}
        uncovered = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n and n not in covered]
        if uncovered:
            logger.warning(
                "LoraRegularization does not regularize %d trainable LoRA parameter(s) such as %s "
                "(only <module>.lora_A/lora_B.<adapter>.weight pairs are)",
                len(uncovered), uncovered[:3],
            )
        return cls(modules, granularity=granularity, init_log_strength=init_log_strength, adapter_name=adapter)

    def strengths(self) -> Tensor:
        """Regularization strengths ``exp(log_strength)``, one per group (see :attr:`group_names`); differentiable."""
        return torch.exp(self.log_strength)

    def squared_norms(self, inner_params: Mapping[str, Tensor]) -> Tensor:
        """``|A_m|^2 + |B_m|^2`` per module (float32 or wider), shape ``(len(module_names),)``."""
        terms = []
        for a_key, b_key in zip(self._a_keys, self._b_keys):
            try:
                a, b = inner_params[a_key], inner_params[b_key]
            except KeyError as err:
                sample = [k for k in inner_params if "lora_" in k][:3]
                raise KeyError(
                    f"LoraRegularization: inner parameter {err.args[0]!r} not found among inner_params "
                    f"(sample LoRA names there: {sample}). Build the module with "
                    "LoraRegularization.from_peft_model on the same unwrapped model whose named_parameters() "
                    "name the inner params (a DDP wrapper adds a 'module.' prefix)."
                ) from None
            terms.append(_sq_norm(a) + _sq_norm(b))
        return torch.stack(terms)

    def penalty(self, inner_params: Mapping[str, Tensor]) -> Tensor:
        """``sum_m 1/2 exp(s_{g(m)}) (|A_m|^2 + |B_m|^2)``."""
        strengths = torch.exp(self.log_strength)
        index = torch.tensor(self.group_index, device=strengths.device)
        sq = self.squared_norms(inner_params).to(strengths.device)
        if sq.dtype != strengths.dtype:
            common = torch.promote_types(sq.dtype, strengths.dtype)
            sq, strengths = sq.to(common), strengths.to(common)
        return 0.5 * (strengths.index_select(0, index) * sq).sum()

    def forward(
        self, per_example_loss: Tensor, batch: Mapping[str, Tensor], inner_params: Mapping[str, Tensor]
    ) -> Tensor:
        """``mean(per_example_loss) + penalty(inner_params)``; ``batch`` is unused."""
        del batch
        penalty = self.penalty(inner_params)
        return per_example_loss.mean().to(penalty.device) + penalty

    @torch.no_grad()
    def summary_stats(self) -> dict[str, float]:
        """``strength_mean``/``_min``/``_max``, ``log_strength_mean``/``_std``; per group too when there are at most 8."""
        s = self.log_strength.detach().float()
        stats = {
            "strength_mean": float(s.exp().mean()),
            "strength_min": float(s.exp().min()),
            "strength_max": float(s.exp().max()),
            "log_strength_mean": float(s.mean()),
            "log_strength_std": float(s.std(unbiased=False)),
        }
        if len(self.group_names) <= 8:
            for name, value in zip(self.group_names, s.exp().tolist()):
                stats[f"strength[{name}]"] = float(value)
        return stats

    def config_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "module_names": list(self.module_names),
            "granularity": self.granularity,
            "adapter_name": self.adapter_name,
            "init_log_strength": self.init_log_strength,
            "group_names": list(self.group_names),
        }

    def card_text(self) -> CardText:
        return CardText(
            title="Learned LoRA regularization",
            description=(
                "learned **LoRA regularization strengths**: one log-strength `s_m` per LoRA module (or per "
                "transformer layer), and the inner (training) loss is "
                "`mean_i l_i + sum_m 1/2 exp(s_m) (|A_m|^2 + |B_m|^2)`. The strengths were tuned by bilevel "
                "optimization so that fine-tuning minimizes a held-out (outer) loss."
            ),
            details=(
                f"Granularity: `{self.granularity}`; {len(self.module_names)} LoRA modules "
                f"(adapter `{self.adapter_name}`), {len(self.group_names)} learned strengths."
            ),
            usage="print(outer.strengths())  # exp(log_strength), one per group",
        )

    @classmethod
    def _from_config(cls, config: Mapping[str, Any]) -> LoraRegularization:
        _require(config, "module_names", "granularity")
        module = cls(
            module_names=config["module_names"],
            granularity=config["granularity"],
            init_log_strength=config.get("init_log_strength", math.log(1e-3)),
            adapter_name=config.get("adapter_name", "default"),
        )
        saved_groups = config.get("group_names")
        if saved_groups is not None and list(saved_groups) != module.group_names:
            raise ValueError(f"saved group_names {saved_groups} differ from those derived {module.group_names}")
        return module


def _sq_norm(t: Tensor) -> Tensor:
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.pow(2).sum()


# ==================================================================================================
# Per-source (per-domain) weights, and products of weightings
# ==================================================================================================

_MAX_SOURCES_IN_STATS = 64


class SourceWeights(ExampleWeighting):
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
        self.check_ids = True  # set False to skip the (host-syncing) range check in forward
        self.logits = nn.Parameter(torch.tensor(logits, dtype=torch.get_default_dtype()))

    def extra_repr(self) -> str:
        return f"num_sources={self.num_sources}, id_column={self.id_column!r}"

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
        from .data import example_sampling_probabilities

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

    def batch_ids(self, batch: Mapping[str, Tensor], batch_size: int | None = None) -> Tensor:
        """The source ids of ``batch`` as a 1-D LongTensor, validated (presence, dtype, length, range)."""
        ids = _batch_index_column(
            batch, self.id_column, size=self.num_sources, batch_size=batch_size, check_range=self.check_ids,
            what="source id",
            missing_message=lambda: (
                f"SourceWeights needs the source-id column {self.id_column!r} in the batch, but the batch has "
                f"{sorted(batch)}. Add it to the training dataset with hf_integration.add_source_ids(dataset, "
                f"source_column, id_column={self.id_column!r}), and keep the column through the data collator "
                "(e.g. remove_unused_columns must not drop it)."
            ),
            range_message=lambda bad: (
                f"source id {bad} in batch[{self.id_column!r}] is out of range for SourceWeights with "
                f"{self.num_sources} sources {_names_preview(self.source_names)} (valid ids: "
                f"0..{self.num_sources - 1}); were the ids made by add_source_ids with other names?"
            ),
        )
        return ids.to(device=self.logits.device, dtype=torch.long)

    def example_weights(self, per_example_loss: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """Unnormalized weights ``w_{s(i)}`` of the batch's examples, shape ``(batch_size,)`` (differentiable in
        ``logits``); ``per_example_loss`` only gives the batch size."""
        _check_per_example_loss(per_example_loss)
        ids = self.batch_ids(batch, per_example_loss.shape[0])
        return self.weights().index_select(0, ids)


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


def _names_preview(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


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

    @property
    def id_columns(self) -> tuple[str, ...]:
        """The batch columns that the parts read, in part order, without repeats."""
        columns: list[str] = []
        for part in self.parts:
            part_columns = getattr(part, "id_columns", None)
            if part_columns is None:
                column = getattr(part, "id_column", None)
                part_columns = () if column is None else (column,)
            columns += [c for c in part_columns if c not in columns]
        return tuple(columns)

    @property
    def id_column(self) -> str | None:
        """The first of :attr:`id_columns` (``None`` when no part reads a column)."""
        columns = self.id_columns
        return columns[0] if columns else None

    @property
    def stops_gradients(self) -> bool:  # type: ignore[override]
        """True when any part stops gradients (its weights are constants for the Hessian)."""
        return any(bool(getattr(part, "stops_gradients", False)) for part in self.parts)

    def example_weights(self, per_example_loss: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """Unnormalized weights ``prod_k w^(k)_i`` of the batch's examples, shape ``(batch_size,)``."""
        _check_per_example_loss(per_example_loss)
        weights = None
        for part in self.parts:
            w = part.example_weights(per_example_loss, batch)
            if weights is None:
                weights = w
                continue
            w = w.to(weights.device)
            if w.dtype != weights.dtype:
                common = torch.promote_types(w.dtype, weights.dtype)
                w, weights = w.to(common), weights.to(common)
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
