"""`hf_integration.frozen_trunk`: the cached-trunk classifier computes the full model's logits and gradients."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import DataCollatorWithPadding

from hf_integration.classification import ModelArguments, build_lora_model, load_tokenizer, tokenize_splits
from hf_integration.frozen_trunk import FEATURE_ROW, CachedTrunkClassifier, add_feature_rows


@pytest.fixture
def setup(tiny_model_dir):
    model_args = ModelArguments(model_name_or_path=tiny_model_dir, lora_layers=[-1])
    tokenizer = load_tokenizer(model_args)
    raw = {role: datasets.Dataset.from_dict({"text": [f"{role} text number {i} " * (1 + i % 3) for i in range(n)],
                                             "labels": [i % 2 for i in range(n)]})
           for role, n in (("train", 6), ("validation", 5))}
    tokenized = add_feature_rows(tokenize_splits(raw, tokenizer, 24))
    model = build_lora_model(model_args, ["a", "b"], seed=0, tokenizer=tokenizer)
    return model, tokenizer, tokenized


def test_feature_rows_number_the_splits_consecutively(setup):
    _, _, tokenized = setup
    assert tokenized["train"][FEATURE_ROW] == list(range(6))
    assert tokenized["validation"][FEATURE_ROW] == list(range(6, 11))


def test_logits_and_gradients_match_the_full_model(setup):
    model, tokenizer, tokenized = setup
    collator = DataCollatorWithPadding(tokenizer)
    cached = CachedTrunkClassifier(model)
    assert cached.first_layer == cached._first_trainable_layer() == 1  # LoRA on the top layer of two
    cached.cache_features(tokenized, collator, batch_size=4)
    assert cached.features.shape[0] == 11
    model.eval()  # no dropout: the two forward passes must agree exactly
    batch = collator([tokenized["validation"][i] for i in range(5)])
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 token_type_ids=batch["token_type_ids"], labels=batch["labels"])
    fast = cached(**batch)
    torch.testing.assert_close(fast.logits, full.logits, rtol=1e-5, atol=1e-6)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads_full = torch.autograd.grad(full.loss, trainable)
    grads_fast = torch.autograd.grad(fast.loss, trainable)
    for a, b in zip(grads_fast, grads_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert "features" not in cached.state_dict()  # the table is never saved


def test_refuses_trainable_embeddings(setup):
    model, _, _ = setup
    model.get_base_model().bert.embeddings.word_embeddings.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="embeddings are trainable.*--cache_frozen_layers False"):
        CachedTrunkClassifier(model)


def test_refuses_other_architectures():
    with pytest.raises(ValueError, match="BERT-style sequence classifiers.*--cache_frozen_layers False"):
        CachedTrunkClassifier(torch.nn.Linear(2, 2))


def test_forward_before_caching_is_an_error(setup):
    model, tokenizer, tokenized = setup
    batch = DataCollatorWithPadding(tokenizer)([tokenized["train"][0]])
    with pytest.raises(RuntimeError, match="call cache_features first"):
        CachedTrunkClassifier(model)(**batch)
