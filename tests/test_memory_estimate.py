"""`benchmarks/memory_estimate.py` against what autograd really saves and what the models really hold, on shapes its
coefficients were not fitted on; and `scale.py --preset llama8b` printing it on a CPU."""

from __future__ import annotations

import pytest
import torch
from repo_scripts import load

estimate = load("benchmarks/memory_estimate.py")
scale = load("benchmarks/scale.py")

SHAPES = [  # (hidden, heads, kv heads, MLP, layers, vocab, LoRA rank): none of them was used to fit the coefficients
    (384, 6, 2, 1024, 3, 2000, 8), (256, 4, 4, 512, 2, 1500, 16)]


def _config(hidden, heads, kv_heads, intermediate, layers, vocab):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       intermediate_size=intermediate, num_hidden_layers=layers, vocab_size=vocab,
                       attn_implementation="sdpa")


def _lora_model(config, rank, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return get_peft_model(LlamaForCausalLM(config).to(dtype), LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(estimate.LORA_TARGETS)))


def _saved_bytes(model, input_ids) -> int:
    """Bytes of the distinct storages autograd saves for backward in a forward pass with the loss, parameters not
    counted (they are resident anyway)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(x):
        pointer = x.untyped_storage().data_ptr()
        if pointer not in params:
            saved[pointer] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(input_ids=input_ids, labels=input_ids)
    return sum(saved.values())


@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "bf16"), (torch.float32, "fp32")])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_activation_estimate_matches_what_autograd_saves(shape, dtype, name):
    *dims, rank = shape
    config = _config(*dims)
    model = _lora_model(config, rank, dtype)
    input_ids = torch.randint(0, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    counted = _saved_bytes(model, input_ids)
    assert estimate.estimate(config, 2, 48, rank, name).activations == pytest.approx(counted, rel=0.05)


@pytest.mark.parametrize("shape", SHAPES)
def test_parameter_counts_are_the_models(shape):
    *dims, rank = shape
    config = _config(*dims)
    model = _lora_model(config, rank, torch.float32)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate.lora_parameters(config, rank) == trainable
    assert estimate.model_parameters(config) == sum(p.numel() for p in model.parameters()) - trainable


def test_peaks_add_up_and_bad_settings_are_refused():
    config = _config(*SHAPES[0][:-1])
    e = estimate.estimate(config, 4, 64, 8, "bf16")
    assert e.inner_step() == e.parameters + e.adapter_state + e.activations
    assert e.inner_step() < e.hypergradient("finite_diff") < e.hypergradient("fwd_rev") < e.hypergradient("rev_rev")
    with pytest.raises(ValueError, match="hvp_mode must be one of"):
        e.hypergradient("auto")
    with pytest.raises(ValueError, match="all seven projections"):
        estimate.estimate(config, 1, 8, targets=("q_proj", "v_proj"))
    with pytest.raises(ValueError, match="dtype must be one of"):
        estimate.estimate(config, 1, 8, dtype="fp16")


def test_the_8b_preset_prints_its_estimate_on_a_cpu(tmp_path, capsys):
    assert scale.main(["--preset", "llama8b", "--device", "cpu", "--out", str(tmp_path / "scale.json")]) == []
    printed = capsys.readouterr().out
    assert "CPU estimate for 8.03B parameters" in printed and "batch 1x1024" in printed and "batch 4x1024" in printed
    assert (tmp_path / "scale_estimate.md").read_text().strip() == printed.strip()
