"""The outer-module contract: :class:`OuterModule`, what every kind of outer parameters declares (the inner
objective, the batch columns it reads, statistics, config and card text) and how it is saved, loaded and pushed."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import hub, serialization
from ..model_card import CardText, render_model_card
from ..optimizer_state import load_optimizer_state, save_optimizer_state

__all__ = ["OuterModule"]


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
    # The batch column of per-example or per-source ids the module indexes (None: it reads none; see batch_columns).
    id_column: str | None = None
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

    def batch_columns(self) -> tuple[str, ...]:
        """The batch columns :meth:`forward` reads besides the losses (ids, flags), in order, without repeats: the
        trainer keeps them through collation and out of the model's inputs. Default: none."""
        return ()

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
            files=[serialization.OUTER_PARAMS_NAME, serialization.OUTER_CONFIG_NAME, serialization.MODEL_CARD_NAME],
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
