"""Frozen-trunk caching: run the frozen bottom of a model once per example, not once per training step.

When LoRA adapts only the top layers of a transformer (``layers_to_transform``), the embeddings and every layer
below the first adapted one are constant functions of the input. Their output ``h_i`` for example ``i`` is
computed once, before training, in evaluation mode, and stored in a table (:meth:`CachedTrunk.cache_features`);
every later forward pass -- inner steps, the Hessian-vector products and outer gradients of the hypergradient,
evaluation -- starts from ``h_i`` and runs only the adapted layers and the head. Backpropagation never entered
the frozen layers, so losses, gradients, Hessians and hypergradients are those of the full model with its frozen
layers in evaluation mode (only their dropout is gone).

A batch names its rows of the table in a ``feature_row`` column (:func:`add_feature_rows`); ``input_ids`` are
still padded as usual and ``attention_mask`` masks the padded positions of ``h_i`` exactly as it masked the padded
tokens. Two wrappers share the one caching loop:

* :class:`CachedTrunkClassifier`: BERT-style sequence classifiers (embeddings, ``encoder.layer``, pooler, head);
* :class:`CachedTrunkCausalLM`: Llama-style decoders. Causal attention lets no token see a later one, so the hidden
  states of a right-padded sequence's real tokens do not depend on the padding, and positions are ``0 .. n - 1``
  whatever the batch. It also computes logits only where a response token is predicted (the LM head is the costliest
  layer of a small model): :class:`~hf_integration.collators.ResponseCollator` turns the usual ``labels`` (``-100`` on
  prompt and padding) into a window, ``labels[b, k]`` the ``k``-th supervised token of example ``b`` and ``response_positions[b, k]`` the
  position ``t - 1`` whose hidden state predicts it, and the wrapper returns logits ``(batch, K, vocab)`` aligned
  with those labels (no shift): the per-example mean of their cross-entropies is the full model's response loss.

:class:`CachedTrunkCheckpoints` lets `Trainer` subclasses save, resume and reload such a wrapper as the PEFT model it
wraps (`BilevelTrainer` and the rivals of :mod:`hf_integration.rivals` include it).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import torch
from accelerate.utils import send_to_device
from torch import Tensor, nn

from hypergrad.distributed import is_fully_sharded

from .losses import per_example_loss

__all__ = ["FEATURE_ROW", "RESPONSE_POSITIONS", "add_feature_rows", "CachedTrunk", "CachedTrunkClassifier",
           "CachedTrunkCausalLM", "SharedTrunkCache", "CachedTrunkCheckpoints"]

FEATURE_ROW = "feature_row"
RESPONSE_POSITIONS = "response_positions"


def add_feature_rows(splits: Mapping[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
    """Give every example of every split its own row of the feature table: a ``feature_row`` column numbering
    the splits' rows consecutively, in the order of ``splits``."""
    out, offset = {}, 0
    for role, dataset in splits.items():
        out[role] = dataset.add_column(FEATURE_ROW, list(range(offset, offset + len(dataset))))
        offset += len(dataset)
    return out


class CachedTrunk(nn.Module):
    """A (PEFT-wrapped) ``model`` whose layers below ``first_layer`` (the lowest holding a trainable parameter) run
    once per example, into the table ``features`` (no state dict holds it). Subclasses say which layers are frozen
    (:meth:`_first_trainable_layer`), how the trunk turns a batch into hidden states (:meth:`_trunk`) and run the
    rest in ``forward``; the wrapped ``model`` is a submodule (its parameter names gain a ``model.`` prefix)."""

    accepts_loss_kwargs = False  # the loss is a per-batch mean (for `Trainer`'s gradient-accumulation scaling)
    trunk_columns: tuple[str, ...] = ("input_ids", "attention_mask")
    sort_by_length = False  # batch the caching pass by length (less padding to compute)

    def __init__(self, model: nn.Module, first_layer: int | None = None, cache: bool = True) -> None:
        super().__init__()
        self.model = model
        self.first_layer = self._first_trainable_layer() if first_layer is None else first_layer
        self.cache = bool(cache)
        self.register_buffer("features", torch.empty(0), persistent=False)
        self.config = getattr(model, "config", None)

    def _first_trainable_layer(self) -> int:
        raise NotImplementedError

    def add_model_tags(self, tags: list[str] | str) -> None:
        """The wrapped model's Hub tags (TRL's trainers tag the model they train)."""
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(tags)

    def _trunk(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The hidden states entering layer ``first_layer`` for a collated batch."""
        raise NotImplementedError

    @torch.no_grad()
    def cache_features(self, splits: Mapping[str, datasets.Dataset], collator: Any, batch_size: int = 32) -> None:
        """Fill the table from tokenized ``splits`` (``feature_row`` columns, :func:`add_feature_rows`): the trunk in
        evaluation mode, each example's row padded with zeros to the longest example."""
        if not self.cache:
            return
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        rows, states = [], []
        try:
            for dataset in splits.values():
                dataset = dataset.select_columns([c for c in (*self.trunk_columns, FEATURE_ROW)
                                                  if c in dataset.column_names])
                order = list(range(len(dataset)))
                if self.sort_by_length:
                    lengths = [len(ids) for ids in dataset["input_ids"]]
                    order.sort(key=lengths.__getitem__)
                for start in range(0, len(order), batch_size):
                    batch = send_to_device(collator([dataset[i] for i in order[start: start + batch_size]]), device)
                    rows.append(batch.pop(FEATURE_ROW))
                    states.append(self._trunk(batch))
        finally:
            self.model.train(was_training)
        width = max(s.shape[1] for s in states)
        table = states[0].new_zeros(int(max(int(r.max()) for r in rows)) + 1, width, states[0].shape[-1])
        for r, s in zip(rows, states):
            table[r, : s.shape[1]] = s
        self.features = table

    def _cached(self, feature_row: Tensor | None, length: int) -> Tensor:
        if self.features.numel() == 0 or feature_row is None:
            raise RuntimeError(f"{type(self).__name__}: the feature table is empty or the batch has no {FEATURE_ROW}; "
                               "call cache_features first.")
        return self.features[feature_row, :length]


# ------------------------------------------------------------------------------------------------- encoders


def _encoder_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(classifier_model, encoder_model)``: the sequence classifier under a PEFT wrapper and its BERT-style
    encoder (``.embeddings``, ``.encoder.layer``, ``.pooler``); ``ValueError`` for other architectures."""
    classifier = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoder = getattr(classifier, getattr(classifier, "base_model_prefix", ""), None)
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if (encoder is None or layers is None or not hasattr(encoder, "embeddings") or not hasattr(encoder, "pooler")
            or not hasattr(classifier, "classifier")):
        raise ValueError(f"frozen-trunk caching supports BERT-style sequence classifiers (embeddings, encoder.layer, "
                         f"pooler, classifier); {type(classifier).__name__} is not one: do not cache its layers "
                         "(--cache_frozen_layers False).")
    return classifier, encoder


def _bidirectional_mask(encoder: nn.Module, hidden: Tensor, attention_mask: Tensor) -> Any:
    """The encoder's own attention mask for ``hidden`` (what its forward pass builds from ``attention_mask``)."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=attention_mask)


class CachedTrunkClassifier(CachedTrunk):
    """A BERT-style sequence classifier whose frozen bottom is a table lookup: ``features[r, :n_r]`` is the output
    of layer ``first_layer - 1`` (of the embeddings when ``first_layer`` is 0) for the example in feature row ``r``.
    The forward pass takes ``feature_row`` and ``attention_mask``, runs layers ``first_layer ..``, the pooler,
    dropout and the head, and returns the model's ``loss`` (mean cross-entropy) and ``logits`` (and, with
    ``output_hidden_states=True``, ``hidden_states`` holding the last layer's output alone: the layers below come
    from the table)."""

    trunk_columns = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, model: nn.Module, first_layer: int | None = None) -> None:
        _encoder_parts(model)
        super().__init__(model, first_layer, cache=True)

    def _first_trainable_layer(self) -> int:
        """The lowest encoder layer holding a trainable parameter (the number of layers when none does);
        ``ValueError`` when the embeddings are trainable (nothing can be cached then)."""
        _, encoder = _encoder_parts(self.model)
        if any(p.requires_grad for p in encoder.embeddings.parameters()):
            raise ValueError("frozen-trunk caching: the embeddings are trainable, so no layer output is constant; "
                             "do not cache (--cache_frozen_layers False).")
        return next((i for i, layer in enumerate(encoder.encoder.layer)
                     if any(p.requires_grad for p in layer.parameters())), len(encoder.encoder.layer))

    def _trunk(self, batch: Mapping[str, Tensor]) -> Tensor:
        _, encoder = _encoder_parts(self.model)
        hidden = encoder.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
        mask = _bidirectional_mask(encoder, hidden, batch["attention_mask"])
        for layer in encoder.encoder.layer[: self.first_layer]:
            hidden = layer(hidden, mask)
        return hidden

    def forward(self, attention_mask: Tensor, feature_row: Tensor, labels: Tensor | None = None,
                input_ids: Tensor | None = None, token_type_ids: Tensor | None = None, **kwargs: Any) -> dict:
        from transformers.modeling_outputs import SequenceClassifierOutput

        classifier, encoder = _encoder_parts(self.model)
        hidden = self._cached(feature_row, attention_mask.shape[1])
        mask = _bidirectional_mask(encoder, hidden, attention_mask)
        for layer in encoder.encoder.layer[self.first_layer:]:
            hidden = layer(hidden, mask)
        pooled = encoder.pooler(hidden) if encoder.pooler is not None else hidden[:, 0]
        logits = classifier.classifier(classifier.dropout(pooled))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits,
                                        hidden_states=(hidden,) if kwargs.get("output_hidden_states") else None)


# ------------------------------------------------------------------------------------------------- decoders


@functools.cache
def _parameter_names(function: Any) -> frozenset[str]:
    """The names of ``function``'s parameters (read once per function: the mask is built at every forward)."""
    return frozenset(inspect.signature(function).parameters)


def _causal_mask(config: Any, hidden: Tensor, attention_mask: Tensor | None, position_ids: Tensor) -> Any:
    """The decoder's own causal (+ padding) attention mask for ``hidden`` without a KV cache, through
    ``transformers.masking_utils.create_causal_mask``, whose argument names differ across releases: the
    embeddings are ``inputs_embeds`` (``input_embeds`` in 4.x), the cache is ``past_key_values`` (5.17) or
    ``cache`` (5.24), and 4.x also requires ``cache_position``."""
    from transformers.masking_utils import create_causal_mask

    params = _parameter_names(create_causal_mask)
    kwargs: dict[str, Any] = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids,
                              "inputs_embeds" if "inputs_embeds" in params else "input_embeds": hidden}
    kwargs.update({name: None for name in ("cache", "past_key_values") if name in params}
                  if "cache" not in params else {"cache": None})  # 5.25 still takes the old name, with a warning
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
    return create_causal_mask(**kwargs)


def _decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(causal_lm, decoder)``: the causal LM under a PEFT wrapper and its decoder (``embed_tokens``, ``layers``,
    ``norm``, ``rotary_emb``); ``ValueError`` for other architectures."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(causal, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if decoder is None or not all(hasattr(decoder, a) for a in needed) or not hasattr(causal, "lm_head"):
        raise ValueError(f"frozen-trunk caching supports Llama-style decoders (model.embed_tokens, model.layers, "
                         f"model.norm, model.rotary_emb, lm_head); {type(causal).__name__} is not one: do not cache "
                         "its layers (--cache_frozen_layers False).")
    return causal, decoder


class CachedTrunkCausalLM(CachedTrunk):
    """A causal LM that computes logits on the response window (:class:`~hf_integration.collators.ResponseCollator`'s
    batches), from the
    table of frozen hidden states when ``cache=True`` (``features[r, :n_r]`` is the input of decoder layer
    ``first_layer``); without a cache (``cache=False``, or trainable embeddings) every layer runs. It returns
    ``loss`` (the mean over examples of the per-example response-token mean, the quantity data weights reweight)
    and ``logits`` ``(batch, K, vocab)`` aligned with ``labels``; :meth:`generate` is the wrapped model's own."""

    trunk_columns = ("input_ids", "labels")
    sort_by_length = True

    def __init__(self, model: nn.Module, first_layer: int | None = None, cache: bool = True) -> None:
        _decoder_parts(model)
        super().__init__(model, first_layer, cache)
        self.cache = self.cache and self.first_layer > 0

    def _first_trainable_layer(self) -> int:
        """The lowest decoder layer holding a trainable parameter (the number of layers when none does); 0 when the
        embeddings are trainable (nothing below the layers is constant then)."""
        _, decoder = _decoder_parts(self.model)
        if any(p.requires_grad for p in decoder.embed_tokens.parameters()):
            return 0
        return next((i for i, layer in enumerate(decoder.layers) if any(p.requires_grad for p in layer.parameters())),
                    len(decoder.layers))

    def generate(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.model.generate(*args, **kwargs)

    def _run_layers(self, decoder: nn.Module, hidden: Tensor, attention_mask: Tensor | None,
                    layers: Sequence[nn.Module]) -> Tensor:
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0).expand(hidden.shape[0], -1)
        mask = _causal_mask(decoder.config, hidden, attention_mask, position_ids)
        embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)
        for layer in layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=embeddings, position_ids=position_ids)
        return hidden

    def _trunk(self, batch: Mapping[str, Tensor]) -> Tensor:
        _, decoder = _decoder_parts(self.model)
        hidden = decoder.embed_tokens(batch["input_ids"])
        return self._run_layers(decoder, hidden, batch["attention_mask"], decoder.layers[: self.first_layer])

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_positions: Tensor,
                labels: Tensor | None = None, feature_row: Tensor | None = None, **kwargs: Any) -> dict:
        from transformers.modeling_outputs import CausalLMOutput

        if not self.cache and is_fully_sharded(self.model):
            # FSDP2 gathers the shards in the model's own forward pass: run it whole, then keep the response window
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            logits = logits.gather(1, response_positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
            loss = None if labels is None else per_example_loss(logits, labels, causal_lm=False).mean()
            return CausalLMOutput(loss=loss, logits=logits)
        causal, decoder = _decoder_parts(self.model)
        if self.cache:
            hidden, layers = self._cached(feature_row, input_ids.shape[1]), decoder.layers[self.first_layer:]
        else:
            hidden, layers = decoder.embed_tokens(input_ids), decoder.layers
        hidden = self._run_layers(decoder, hidden, attention_mask, layers)
        index = response_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        logits = causal.lm_head(decoder.norm(hidden.gather(1, index)))  # the norm is per position
        loss = None if labels is None else per_example_loss(logits, labels, causal_lm=False).mean()
        return CausalLMOutput(loss=loss, logits=logits)


class SharedTrunkCache:
    """Wraps every model of a run (the bilevel model and its rivals share one initialisation, hence one frozen
    trunk) in ``wrapper`` with one feature table, computed once from tokenized ``splits``: by the first model
    wrapped when ``splits`` are given here, else by :meth:`fill` (e.g. from the rows a TRL trainer prepared)."""

    def __init__(self, wrapper: type[CachedTrunk], collator: Any, batch_size: int, device: Any = None,
                 splits: Mapping[str, datasets.Dataset] | None = None, **options: Any) -> None:
        self.wrapper, self.collator, self.batch_size, self.splits = wrapper, collator, batch_size, splits
        self.device, self.options = device, options
        self.features: Tensor | None = None
        self.seconds = 0.0  # the caching pass
        self._waiting: weakref.WeakSet[CachedTrunk] = weakref.WeakSet()  # wrapped before the table existed

    def __call__(self, model: nn.Module) -> CachedTrunk:
        cached = self.wrapper(model, **self.options)
        if self.device is not None:
            cached.to(self.device)  # the frozen layers run where the training will (Trainer would move it)
        self._waiting.add(cached)
        if self.features is None and self.splits is not None:
            self.fill(self.splits)
        if self.features is not None:
            cached.features = self.features
        return cached

    def fill(self, splits: Mapping[str, datasets.Dataset]) -> None:
        """Compute the table from ``splits`` (their ``feature_row`` columns, :func:`add_feature_rows`) with a model
        wrapped so far, and give it to every such model."""
        import time

        models = list(self._waiting)
        if not models:
            raise RuntimeError("SharedTrunkCache.fill: no model has been wrapped yet; wrap one first.")
        start = time.perf_counter()
        models[0].cache_features(splits, self.collator, batch_size=self.batch_size)
        self.features, self.seconds = models[0].features, time.perf_counter() - start
        for model in models:
            model.features = self.features
        self._waiting = weakref.WeakSet()


# ------------------------------------------------------------------------------------------------- checkpoints


class CachedTrunkCheckpoints:
    """A `transformers.Trainer` mixin: checkpoints, final saves and the best-model reload of a :class:`CachedTrunk`
    go through the model it wraps, as `Trainer` does for that model itself.

    `Trainer` saves a model that is neither a `PreTrainedModel` nor a `PeftModel` as its whole state dict with
    ``safetensors.torch.save_file``, which refuses tensors that share memory (the tied input and output embeddings of
    SmolLM2 and most decoders: the first checkpoint of such a run died) and would store every frozen weight in each
    checkpoint; it cannot resume from a folder of PEFT adapter files either. With this mixin a checkpoint holds the
    adapter (and a trained head), like a plain PEFT run's, and resumes into the wrapped model; the feature table is
    rebuilt from the data, never saved."""

    def _wrapped(self) -> nn.Module | None:
        model = getattr(self, "model", None)
        return model.model if isinstance(model, CachedTrunk) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        inner = self._wrapped()
        if inner is None:
            return super()._save(output_dir, state_dict)
        wrapper, self.model = self.model, inner
        try:
            super()._save(output_dir, None)  # the wrapper's state dict would name the wrapped tensors "model.*"
        finally:
            self.model = wrapper

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = self.model if model is None else model
        super()._load_from_checkpoint(resume_from_checkpoint,
                                      model=model.model if isinstance(model, CachedTrunk) else model)

    def _load_best_model(self) -> None:
        inner = self._wrapped()
        if inner is None:
            return super()._load_best_model()
        wrapper, self.model = self.model, inner
        try:
            super()._load_best_model()
        finally:
            self.model = wrapper
