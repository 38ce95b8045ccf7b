"""The response filters' scores against direct computations: lengths counted by hand, the IFD of each row from two
plain forward passes of the model, independent of batching and padding."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from hf_integration.filters import (filter_scores, ifd_scores, response_lengths,
                                    response_losses_with_and_without_prompt)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


def _rows() -> datasets.Dataset:
    """Prepared rows: a prompt (labels -100) then a response, of several lengths; the last response has one token."""
    rng = np.random.default_rng(0)
    ids, labels = [], []
    for prompt, response in ((5, 4), (3, 7), (8, 2), (2, 5), (4, 1)):
        row = rng.integers(1, 64, prompt + response).tolist()
        ids.append(row)
        labels.append([-100] * prompt + row[prompt:])
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels, "example_id": list(range(5))})


def _mean_nll(model, tokens: list[int], scored_from: int) -> float:
    """Mean next-token cross-entropy of ``tokens[scored_from:]`` given everything before each of them."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0]
    targets = torch.tensor(tokens[1:])
    nll = F.cross_entropy(logits[:-1].double(), targets, reduction="none")
    return float(nll[max(scored_from - 1, 0):].mean())


def test_response_lengths_count_the_labelled_tokens():
    np.testing.assert_array_equal(response_lengths(_rows()), [4, 7, 2, 5, 1])
    np.testing.assert_array_equal(filter_scores("length_filter", _rows()), [-4, -7, -2, -5, -1])


def test_ifd_is_the_ratio_of_the_response_loss_with_and_without_its_prompt():
    model, rows = _llama(), _rows()
    conditioned, alone = [], []
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        start = next(i for i, y in enumerate(labels) if y != -100)
        response = ids[start:]
        conditioned.append(_mean_nll(model, ids, start))
        alone.append(_mean_nll(model, response, 1) if len(response) >= 2 else np.nan)
    expected = np.array(conditioned) / np.array(alone)
    for batch_size in (1, 2, 5):  # right padding and batching change nothing
        np.testing.assert_allclose(ifd_scores(model, rows, pad_token_id=0, batch_size=batch_size), expected,
                                   rtol=2e-5, equal_nan=True)
        both = response_losses_with_and_without_prompt(model, rows, pad_token_id=0, batch_size=batch_size)
        np.testing.assert_allclose(both[0], conditioned, rtol=2e-5)
        np.testing.assert_allclose(both[1], alone, rtol=2e-5, equal_nan=True)
    scores = filter_scores("ifd_filter", rows, model, pad_token_id=0)
    assert scores[-1] == -np.inf and np.isfinite(scores[:-1]).all()  # an undefined IFD is never dropped


def test_bad_filter_inputs_are_refused():
    with pytest.raises(ValueError, match=r"lack \['labels'\]"):
        response_lengths(_rows().remove_columns("labels"))
    with pytest.raises(ValueError, match="needs the initial causal LM"):
        filter_scores("ifd_filter", _rows())
    with pytest.raises(ValueError, match="unknown filter"):
        filter_scores("shortest", _rows())
