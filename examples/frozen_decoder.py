"""Frozen-trunk caching for decoder-only language models (Llama, Mistral, Qwen2, ...), and logits on the response only.

The decoder counterpart of `frozen_features.py`. When LoRA adapts only the top layers of a decoder (the
instruction example adapts the last 2 of SmolLM2's 30), the embeddings and every layer below the first adapted
one are constant functions of the tokens: their output ``h_i`` (the hidden states entering the first LoRA layer,
one row per token of example ``i``) is computed once, in evaluation mode, and stored in a table. Every later
forward pass -- inner steps, hypergradients, evaluation -- starts from ``h_i`` and runs only the adapted layers,
the final norm and the LM head. Backpropagation never entered the frozen layers, so losses, gradients and
Hessian-vector products are those of the full model.

Two facts make the table exact for a batch of right-padded sequences: causal attention lets no token see a later
one, so the hidden states of the real tokens do not depend on the padding after them (the cached rows are
padded with zeros), and the positions are ``0 .. n_i - 1`` whatever the batch.

The second saving is the LM head (``hidden_size x vocab_size``, 28M multiply-adds per token for SmolLM2, more
than 7 of its layers): the supervised fine-tuning loss needs logits only where a response token is predicted.
:class:`ResponseCollator` turns the usual ``labels`` (``-100`` on prompt and padding tokens) into a compact
window: ``labels[b, k]`` is the ``k``-th supervised token of example ``b`` and ``response_positions[b, k]`` the
position ``t - 1`` whose hidden state predicts it (padded with label ``-100``). The model returns logits of shape
``(batch, K, vocab)`` *aligned* with these labels (no shift), so the per-example loss is

    l_b = sum_k CE(logits[b, k], labels[b, k]) / #{k : labels[b, k] != -100}

exactly the response-token mean of the full model's shifted loss. The wrapper is not a causal-LM class, so
`hf_integration.BilevelTrainer` (and `per_example_loss`) treat its logits as already aligned.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from accelerate.utils import send_to_device
from torch import Tensor, nn

from frozen_features import FEATURE_ROW, add_feature_rows
from hf_integration.losses import IGNORE_INDEX, per_example_loss

__all__ = ["FEATURE_ROW", "add_feature_rows", "ResponseCollator", "CachedTrunkCausalLM", "first_trainable_layer"]

RESPONSE_POSITIONS = "response_positions"


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
    kwargs.update({name: None for name in ("cache", "past_key_values") if name in params})
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
    return create_causal_mask(**kwargs)


@dataclass
class ResponseCollator:
    """Right-pads ``input_ids`` (``attention_mask`` 1 on real tokens) and turns per-token ``labels`` into the
    compact response window described in the module docstring (``labels``, ``response_positions``, both
    ``(batch, K)`` with ``K`` the most supervised tokens of an example of the batch). Integer columns such as
    ``example_id``, ``source_id`` and ``feature_row`` become ``LongTensor``; other columns are dropped."""

    pad_token_id: int
    keep: Sequence[str] = ("example_id", "source_id", FEATURE_ROW)

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch = len(features)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        targets = [[(t, int(y)) for t, y in enumerate(f["labels"]) if y != IGNORE_INDEX and t > 0] for f in features]
        k = max(1, max(len(t) for t in targets))
        labels = torch.full((batch, k), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((batch, k), dtype=torch.long)
        for b, (feature, target) in enumerate(zip(features, targets)):
            n = len(feature["input_ids"])
            input_ids[b, :n] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            attention_mask[b, :n] = 1
            if target:
                labels[b, : len(target)] = torch.as_tensor([y for _, y in target])
                positions[b, : len(target)] = torch.as_tensor([t - 1 for t, _ in target])  # t - 1 predicts t
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
               RESPONSE_POSITIONS: positions}
        for column in self.keep:
            if column in features[0]:
                out[column] = torch.as_tensor([int(f[column]) for f in features], dtype=torch.long)
        return out


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(causal_lm, decoder)``: the causal LM under a PEFT wrapper and its decoder (``embed_tokens``, ``layers``,
    ``norm``, ``rotary_emb``); ``ValueError`` for other architectures."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(causal, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if decoder is None or not all(hasattr(decoder, a) for a in needed) or not hasattr(causal, "lm_head"):
        raise ValueError(f"--cache_frozen_layers supports Llama-style decoders (model.embed_tokens, model.layers, "
                         f"model.norm, model.rotary_emb, lm_head); {type(causal).__name__} is not one: pass "
                         "--cache_frozen_layers False.")
    return causal, decoder


def first_trainable_layer(model: nn.Module) -> int:
    """Index of the lowest decoder layer holding a trainable parameter (the number of layers when none does);
    0 when the embeddings are trainable (nothing below the layers is constant then)."""
    _, decoder = _parts(model)
    if any(p.requires_grad for p in decoder.embed_tokens.parameters()):
        return 0
    for index, layer in enumerate(decoder.layers):
        if any(p.requires_grad for p in layer.parameters()):
            return index
    return len(decoder.layers)


class CachedTrunkCausalLM(nn.Module):
    """A causal LM (optionally PEFT-wrapped) that computes logits on the response window, from a table of frozen
    hidden states when ``cache=True``.

    ``features[r, :n_r]`` holds the input of decoder layer ``first_layer`` for the example in feature row ``r``
    (:meth:`cache_features`); without a cache (``cache=False``, or ``first_layer == 0``) the embeddings and
    frozen layers run in every forward pass. The forward pass takes the batch of :class:`ResponseCollator` and
    returns ``loss`` (the mean over examples of the per-example response-token mean, the quantity data weights
    reweight) and ``logits`` ``(batch, K, vocab)`` aligned with ``labels``. The wrapped ``model`` is a submodule
    (parameter names gain a ``model.`` prefix; the table is in no state dict); :meth:`generate` is the wrapped
    model's own (every layer runs).
    """

    accepts_loss_kwargs = False  # the loss is a per-batch mean (for `Trainer`'s gradient-accumulation scaling)

    def __init__(self, model: nn.Module, first_layer: int | None = None, cache: bool = True) -> None:
        super().__init__()
        self.model = model
        _parts(model)
        self.first_layer = first_trainable_layer(model) if first_layer is None else first_layer
        self.cache = bool(cache) and self.first_layer > 0
        self.register_buffer("features", torch.empty(0), persistent=False)
        self.config = getattr(model, "config", None)

    def generate(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.model.generate(*args, **kwargs)

    def _positions(self, hidden: Tensor) -> Tensor:
        return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0).expand(hidden.shape[0], -1)

    def _run_layers(self, decoder: nn.Module, hidden: Tensor, attention_mask: Tensor | None,
                    layers: Sequence[nn.Module]) -> Tensor:
        position_ids = self._positions(hidden)
        mask = _causal_mask(decoder.config, hidden, attention_mask, position_ids)
        embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)
        for layer in layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=embeddings, position_ids=position_ids)
        return hidden

    @torch.no_grad()
    def cache_features(self, splits: Mapping[str, datasets.Dataset], collator: Any, batch_size: int = 32) -> None:
        """Fill the table from tokenized ``splits`` (``feature_row`` columns, `add_feature_rows`): embeddings
        and layers ``0 .. first_layer - 1`` in evaluation mode, rows padded with zeros to the longest example.
        Examples are batched in order of length (less padding to compute)."""
        if not self.cache:
            return
        _, decoder = _parts(self.model)
        device = decoder.embed_tokens.weight.device
        was_training = decoder.training
        decoder.eval()
        rows, states = [], []
        try:
            for dataset in splits.values():
                dataset = dataset.select_columns([c for c in ("input_ids", "labels", FEATURE_ROW)
                                                  if c in dataset.column_names])
                lengths = [len(ids) for ids in dataset["input_ids"]]
                order = sorted(range(len(dataset)), key=lengths.__getitem__)
                for start in range(0, len(order), batch_size):
                    batch = send_to_device(collator([dataset[i] for i in order[start: start + batch_size]]), device)
                    rows.append(batch[FEATURE_ROW])
                    hidden = decoder.embed_tokens(batch["input_ids"])
                    states.append(self._run_layers(decoder, hidden, batch["attention_mask"],
                                                   decoder.layers[: self.first_layer]))
        finally:
            decoder.train(was_training)
        width = max(s.shape[1] for s in states)
        table = states[0].new_zeros(int(max(int(r.max()) for r in rows)) + 1, width, states[0].shape[-1])
        for r, s in zip(rows, states):
            table[r, : s.shape[1]] = s
        self.features = table

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_positions: Tensor,
                labels: Tensor | None = None, feature_row: Tensor | None = None, **kwargs: Any) -> dict:
        from transformers.modeling_outputs import CausalLMOutput

        causal, decoder = _parts(self.model)
        if self.cache:
            if self.features.numel() == 0 or feature_row is None:
                raise RuntimeError("CachedTrunkCausalLM: the feature table is empty or the batch has no feature_row; "
                                   "call cache_features first.")
            hidden = self.features[feature_row, : input_ids.shape[1]]
            layers = decoder.layers[self.first_layer:]
        else:
            hidden = decoder.embed_tokens(input_ids)
            layers = decoder.layers
        hidden = self._run_layers(decoder, hidden, attention_mask, layers)
        index = response_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        logits = causal.lm_head(decoder.norm(hidden.gather(1, index)))  # the norm is per position
        loss = None if labels is None else per_example_loss(logits, labels, causal_lm=False).mean()
        return CausalLMOutput(loss=loss, logits=logits)
