"""Cost of a hypergradient relative to an inner step, across model sizes.

For Llama-architecture causal LMs built from configs (random weights, no download) with
LoRA adapters and per-example `DataWeights`, this measures through `BilevelTrainer`:

* one inner step (`training_step` forward/backward + optimizer step), and
* one hypergradient (`compute_hypergradient`: Nyström IHVP with batched HVPs + mixed term),

reporting wall time, peak memory above the resident model (CUDA `max_memory_allocated`; not
measured on CPU, where torch's allocations are invisible to Python) and the ratio
hypergradient / inner step. Prints a markdown table
and writes JSON.

    python benchmarks/scale.py                      # CPU preset: 0.2M to 6.5M parameters
    python benchmarks/scale.py --preset gpu --dtype bf16   # 56M to 1.1B parameters
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESETS = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "cpu": [("llama-0.2M", 64, 2, 4, 2, 172, 1024), ("llama-1.3M", 128, 4, 4, 2, 344, 2048),
            ("llama-6.5M", 256, 6, 8, 4, 688, 4096)],
    "gpu": [("llama-56M", 512, 8, 8, 4, 1376, 32000), ("llama-207M", 1024, 12, 16, 8, 2816, 32000),
            ("llama-1.1B", 2048, 22, 32, 4, 5632, 32000)],
}


class Meter:
    """Wall time (synchronised on CUDA) and peak memory of a block."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self):
        gc.collect()
        self.peak_mb = None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        self.seconds = time.perf_counter() - self.start


def build_trainer(spec, args, device, output_dir):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_integration import BilevelTrainer, BilevelTrainingArguments, DataWeights, add_example_ids

    name, hidden, layers, heads, kv_heads, intermediate, vocab = spec
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                         max_position_embeddings=max(args.seq_len, 128))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    total = sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=args.lora_rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    inner = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n = max(args.batch_size * 4, 64)
    tokens = torch.randint(0, vocab, (n, args.seq_len)).tolist()
    data = Dataset.from_dict({"input_ids": tokens, "attention_mask": [[1] * args.seq_len] * n, "labels": tokens})
    train = add_example_ids(data)
    targs = BilevelTrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        max_steps=1000, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=device.type == "cpu",
        bf16=args.dtype == "bf16", nystrom_rank=args.rank, nystrom_rho=0.1, hvp_mode=args.hvp_mode, learning_rate=1e-4)
    trainer = BilevelTrainer(model=model, args=targs, train_dataset=train, eval_dataset=data,
                             outer_module=DataWeights(n))
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train; we drive steps by hand
    return trainer, name, total, inner


def measure(spec, args, device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainer, name, total, inner = build_trainer(spec, args, device, tmp)
        model = trainer.model
        train_batch, eval_batch, sketch = trainer._batches(step=1)

        def inner_step():
            model.train()
            trainer.training_step(model, train_batch)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

        trainer.resolve_hvp_mode()
        inner_step()  # warm-up
        trainer.compute_hypergradient(train_batch, eval_batch, sketch)
        rows = {}
        for label, fn, repeats in (("inner", inner_step, args.repeats),
                                   ("hypergrad", lambda: trainer.compute_hypergradient(train_batch, eval_batch, sketch),
                                    args.repeats)):
            times, peaks = [], []
            for _ in range(repeats):
                with Meter(device) as meter:
                    fn()
                times.append(meter.seconds)
                peaks.append(meter.peak_mb)
            rows[label] = {"seconds": min(times), "peak_mb": None if peaks[0] is None else max(peaks)}
        result = {
            "model": name, "params": total, "inner_params": inner, "hvp_mode": trainer.hvp_mode,
            "inner_step_s": rows["inner"]["seconds"], "inner_peak_mb": rows["inner"]["peak_mb"],
            "hypergrad_s": rows["hypergrad"]["seconds"], "hypergrad_peak_mb": rows["hypergrad"]["peak_mb"],
        }
        result["time_ratio"] = result["hypergrad_s"] / result["inner_step_s"]
        if result["inner_peak_mb"]:
            result["memory_ratio"] = result["hypergrad_peak_mb"] / result["inner_peak_mb"]
        del trainer, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return result


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="model sizes (default: gpu when CUDA is available, else cpu)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=5, help="Nyström rank (number of HVPs)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--hvp-mode", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "scale.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    results = []
    for spec in PRESETS[args.preset]:
        results.append(measure(spec, args, device))
        print(f"done {spec[0]}: {results[-1]}", flush=True)
    header = ("| model | params | inner (LoRA) params | hvp_mode | inner step s | hypergrad s | time ratio "
              "| inner peak MB | hypergrad peak MB |")
    print(f"\ndevice={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}), "
          f"dtype={args.dtype}, batch={args.batch_size}x{args.seq_len}, Nyström rank={args.rank}, LoRA r={args.lora_rank}\n")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in results:
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['inner_params'] / 1e6:.2f}M | {r['hvp_mode']} "
              f"| {r['inner_step_s']:.3f} | {r['hypergrad_s']:.3f} | {r['time_ratio']:.1f}x "
              f"| {_mb(r['inner_peak_mb'])} | {_mb(r['hypergrad_peak_mb'])} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = {"device": str(device), "dtype": args.dtype, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "rank": args.rank, "lora_rank": args.lora_rank, "torch": torch.__version__}
    with open(args.out + ".tmp", "w") as handle:
        json.dump({"meta": meta, "results": results}, handle, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
