"""Builders shared by the trainer tests: a tiny Llama classifier with LoRA and a synthetic
token-classification task with a known set of corrupted labels (no downloads)."""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset

from hf_integration import BilevelTrainingArguments, add_example_ids

VOCAB = 32
SEQ_LEN = 8


def token_task(n: int, noise: float, seed: int) -> Dataset:
    """Sequences whose tokens all come from the lower half of the vocabulary (label 1) or the
    upper half (label 0); a ``noise`` fraction of labels is flipped (column ``corrupted``)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    low = rng.integers(1, VOCAB // 2, (n, SEQ_LEN))
    high = rng.integers(VOCAB // 2, VOCAB, (n, SEQ_LEN))
    x = np.where(y[:, None] == 1, low, high)
    flipped = rng.random(n) < noise
    return Dataset.from_dict({
        "input_ids": x.tolist(),
        "attention_mask": np.ones_like(x).tolist(),
        "label": np.where(flipped, 1 - y, y).tolist(),
        "corrupted": flipped.tolist(),
    })


def tiny_classifier(seed: int = 0, hidden: int = 32, layers: int = 2, rank: int = 4,
                    dtype: torch.dtype = torch.float32, attn: str = "sdpa", train_head: bool = True):
    """A randomly initialised Llama sequence classifier with LoRA on q/v and (optionally) a
    trainable head."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, num_labels=2,
                         pad_token_id=0, attn_implementation=attn)
    model = LlamaForSequenceClassification(config).to(dtype)
    return get_peft_model(model, LoraConfig(r=rank, target_modules=["q_proj", "v_proj"],
                                            modules_to_save=["score"] if train_head else None))


def datasets_with_ids(n_train: int = 64, n_val: int = 32, noise: float = 0.3, seed: int = 0):
    return add_example_ids(token_task(n_train, noise, seed)), token_task(n_val, 0.0, seed + 1)


def bilevel_args(tmp_path, **overrides) -> BilevelTrainingArguments:
    defaults = dict(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=16,
                    per_device_eval_batch_size=32, learning_rate=3e-3, logging_steps=5, save_strategy="no",
                    report_to=[], unroll_steps=2, outer_learning_rate=0.3, nystrom_rank=4, use_cpu=True,
                    disable_tqdm=True, seed=0)
    defaults.update(overrides)
    return BilevelTrainingArguments(**defaults)


def tiny_bert_classifier(seed: int = 0, hidden: int = 16, rank: int = 1, dtype: torch.dtype = torch.float64):
    """A one-layer BERT classifier with LoRA on query/value and a frozen head. Unlike Llama's
    RMSNorm, BERT's layers keep float64 throughout, so finite differences can be tight."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * hidden,
                        vocab_size=VOCAB, num_labels=2, max_position_embeddings=SEQ_LEN, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    model = BertForSequenceClassification(config).to(dtype)
    return get_peft_model(model, LoraConfig(r=rank, target_modules=["query", "value"]))
