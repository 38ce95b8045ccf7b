"""Frozen-trunk caching: run the frozen bottom of an encoder classifier once per example, not once per step.

When LoRA adapts only the top layers of a BERT-style encoder (``--lora_layers -1``), the embeddings and every
layer below the first adapted one are constant functions of the input. Their output ``h_i`` for example ``i``
is computed once, before training, in evaluation mode, and stored in a table; every later forward pass --
inner steps, the Hessian-vector products and outer gradients of the hypergradient, evaluation -- starts from
``h_i`` and runs only the adapted layers, the pooler and the head. Backpropagation never entered the frozen
layers, so gradients, Hessians and hypergradients are those of the full model with the frozen layers in
evaluation mode; only their dropout is gone (the trainable layers keep theirs).

A batch names its rows of the table in a ``feature_row`` column (`add_feature_rows`), so the data pipeline,
collators and `Trainer` are unchanged: ``input_ids`` are still padded as usual and ignored by the forward
pass, and ``attention_mask`` masks the padded positions of ``h_i`` exactly as it masked the padded tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import datasets
import torch
from accelerate.utils import send_to_device
from torch import Tensor, nn

from hf_integration import BilevelTrainer

__all__ = ["FEATURE_ROW", "CachedTrunkClassifier", "WrappedModelCheckpoints", "CachedTrunkBilevelTrainer",
           "first_trainable_layer", "add_feature_rows"]

FEATURE_ROW = "feature_row"


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(classifier_model, encoder_model)``: the sequence classifier under a PEFT wrapper and its BERT-style
    encoder (``.embeddings``, ``.encoder.layer``, ``.pooler``); ``ValueError`` for other architectures."""
    classifier = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoder = getattr(classifier, getattr(classifier, "base_model_prefix", ""), None)
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if (encoder is None or layers is None or not hasattr(encoder, "embeddings") or not hasattr(encoder, "pooler")
            or not hasattr(classifier, "classifier")):
        raise ValueError(f"--cache_frozen_layers supports BERT-style sequence classifiers (embeddings, "
                         f"encoder.layer, pooler, classifier); {type(classifier).__name__} is not one: pass "
                         "--cache_frozen_layers False.")
    return classifier, encoder


def _mask(encoder: nn.Module, hidden: Tensor, attention_mask: Tensor) -> Any:
    """The encoder's own attention mask for ``hidden`` (what its forward pass builds from ``attention_mask``)."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=attention_mask)


def first_trainable_layer(model: nn.Module) -> int:
    """Index of the lowest encoder layer holding a trainable parameter (the number of layers when none does);
    ``ValueError`` when the embeddings are trainable (nothing can be cached then)."""
    _, encoder = _parts(model)
    if any(p.requires_grad for p in encoder.embeddings.parameters()):
        raise ValueError("--cache_frozen_layers: the embeddings are trainable, so no layer output is constant; "
                         "pass --cache_frozen_layers False.")
    for index, layer in enumerate(encoder.encoder.layer):
        if any(p.requires_grad for p in layer.parameters()):
            return index
    return len(encoder.encoder.layer)


def add_feature_rows(splits: Mapping[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
    """Give every example of every split its own row of the feature table: a ``feature_row`` column numbering
    the splits' rows consecutively, in the order of ``splits``."""
    out, offset = {}, 0
    for role, dataset in splits.items():
        out[role] = dataset.add_column(FEATURE_ROW, list(range(offset, offset + len(dataset))))
        offset += len(dataset)
    return out


class CachedTrunkClassifier(nn.Module):
    """A BERT-style sequence classifier (optionally PEFT-wrapped) whose frozen bottom is a table lookup.

    ``features[r, :n_r]`` holds the output of layer ``first_layer - 1`` (the embeddings when ``first_layer`` is
    0) for the example in feature row ``r``, of ``n_r`` tokens, computed with :meth:`cache_features`. The forward
    pass takes ``feature_row`` and ``attention_mask`` from the batch, runs layers ``first_layer ..`` , the pooler,
    dropout and the classification head, and returns the model's ``loss`` (mean cross-entropy) and ``logits``.
    The wrapped ``model`` is a submodule: its parameter names gain a ``model.`` prefix, and
    ``model.save_pretrained`` saves it as usual (the table is not part of any state dict).
    """

    def __init__(self, model: nn.Module, first_layer: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.first_layer = first_trainable_layer(model) if first_layer is None else first_layer
        self.register_buffer("features", torch.empty(0), persistent=False)
        self.config = getattr(model, "config", None)

    @torch.no_grad()
    def cache_features(self, splits: Mapping[str, datasets.Dataset], collator: Any, batch_size: int = 64) -> None:
        """Fill the table from tokenized ``splits`` (with ``feature_row`` columns, `add_feature_rows`):
        the embeddings and layers ``0 .. first_layer - 1`` in evaluation mode, padded with zeros to the longest
        example."""
        _, encoder = _parts(self.model)
        device = next(encoder.parameters()).device
        was_training = encoder.training
        encoder.eval()
        rows, states = [], []
        try:
            for dataset in splits.values():
                columns = [c for c in ("input_ids", "attention_mask", "token_type_ids", FEATURE_ROW)
                           if c in dataset.column_names]
                dataset = dataset.select_columns(columns)
                for start in range(0, len(dataset), batch_size):
                    batch = send_to_device(
                        collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]), device)
                    rows.append(batch.pop(FEATURE_ROW))
                    states.append(self._trunk(encoder, batch))
        finally:
            encoder.train(was_training)
        width = max(s.shape[1] for s in states)
        table = states[0].new_zeros(int(max(r.max() for r in rows)) + 1, width, states[0].shape[-1])
        for r, s in zip(rows, states):
            table[r, : s.shape[1]] = s
        self.features = table

    def _trunk(self, encoder: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        hidden = encoder.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
        mask = _mask(encoder, hidden, batch["attention_mask"])
        for layer in encoder.encoder.layer[: self.first_layer]:
            hidden = layer(hidden, mask)
        return hidden

    def forward(self, attention_mask: Tensor, feature_row: Tensor, labels: Tensor | None = None,
                input_ids: Tensor | None = None, token_type_ids: Tensor | None = None, **kwargs: Any) -> dict:
        from transformers.modeling_outputs import SequenceClassifierOutput

        if self.features.numel() == 0:
            raise RuntimeError("CachedTrunkClassifier: the feature table is empty; call cache_features first.")
        classifier, encoder = _parts(self.model)
        hidden = self.features[feature_row, : attention_mask.shape[1]]
        mask = _mask(encoder, hidden, attention_mask)
        for layer in encoder.encoder.layer[self.first_layer:]:
            hidden = layer(hidden, mask)
        pooled = encoder.pooler(hidden) if encoder.pooler is not None else hidden[:, 0]
        logits = classifier.classifier(classifier.dropout(pooled))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class WrappedModelCheckpoints:
    """A `transformers.Trainer` mixin for models that wrap a `PreTrainedModel` or PEFT model in ``.model`` (the
    cached-trunk wrappers here and in `frozen_decoder.py`): checkpoints, final saves and the best-model reload go
    through the wrapped model, as `Trainer` does for the model itself.

    `Trainer` saves a model that is neither a `PreTrainedModel` nor a `PeftModel` as its whole state dict with
    ``safetensors.torch.save_file``, which refuses tensors that share memory (the tied input and output embeddings
    of SmolLM2 and most decoders: the first checkpoint of such a run died) and would store every frozen weight
    of the base model in each checkpoint; it cannot resume from a folder of PEFT adapter files either. With this
    mixin a checkpoint holds the adapter (and the trained head), like a plain PEFT run's, and resumes into the
    wrapped model; the feature table is rebuilt from the data, never saved."""

    def _wrapped(self) -> nn.Module | None:
        model = getattr(self, "model", None)
        return model.model if hasattr(model, "cache_features") else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        inner = self._wrapped()
        if inner is None:
            return super()._save(output_dir, state_dict)
        wrapper = self.model
        self.model = inner
        try:
            super()._save(output_dir, None)  # the wrapper's state dict would name the wrapped tensors "model.*"
        finally:
            self.model = wrapper

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = self.model if model is None else model
        super()._load_from_checkpoint(resume_from_checkpoint, model=model.model if hasattr(model, "cache_features")
                                      else model)

    def _load_best_model(self) -> None:
        inner = self._wrapped()
        if inner is None:
            return super()._load_best_model()
        wrapper = self.model
        self.model = inner
        try:
            super()._load_best_model()
        finally:
            self.model = wrapper


class CachedTrunkBilevelTrainer(WrappedModelCheckpoints, BilevelTrainer):
    """`BilevelTrainer` whose checkpoints and saves of a cached-trunk model hold the wrapped adapter."""
