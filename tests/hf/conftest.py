"""Shared fixtures: a tiny randomly initialized PEFT LoRA Llama, built from a config (no downloads)."""

from __future__ import annotations

import pytest
import torch


def build_tiny_lora_llama(seed: int = 0, *, random_lora_b: bool = True):
    """A 2-layer Llama (hidden 32) with LoRA r=4 on q_proj/v_proj; lora_B randomized so penalties are non-trivial."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    if random_lora_b:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_lora_llama():
    return build_tiny_lora_llama()
