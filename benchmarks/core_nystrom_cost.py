"""Time and peak memory of the core `hypergrad.approx_hypergrad.nystrom` (the seed-style call, no trainer) per HVP
mode, as ratios to one inner gradient step, on a small Llama: the measurement behind the core's default mode,
``hvp_mode="auto"`` (row ``auto``: the steady-state call; ``auto, first call``: the one that probes).

The problem is the one of issue 26: a 4-layer Llama (hidden 256, random weights and tokens), LoRA on q/v as the inner
parameters ``theta``, one weight per example as the outer ones (``w = sigmoid(phi)``), the inner objective the
weighted mean of the per-example causal-LM losses of a training batch, the outer one the mean loss of a validation
batch. Each mode is timed and metered (`scale.py`'s `Meter`: CPU RSS above the resident memory, or CUDA's allocator)
side by side with the inner step, each mode in a process of its own (on CPU the resident memory a mode leaves
behind would inflate the next one's peak)::

    python benchmarks/core_nystrom_cost.py --batch-size 8 --seq-len 128 --repeats 2

Results: ``--out`` (JSON) and a markdown table (``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("auto", "rev_rev", "fwd_rev", "finite_diff")


def problem(batch_size: int, seq_len: int, device: torch.device):
    """``(inner, outer, theta, phi)`` of the small-Llama data-weighting problem."""
    from peft import LoraConfig, get_peft_model
    from torch.func import functional_call
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_integration.losses import per_example_loss

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=4096, attn_implementation="eager")
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).to(device)
    model.eval()
    theta = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for n, p in theta.items():  # LoRA's B starts at 0: move it, so that every product is nonzero
        if "lora_B" in n:
            p.normal_(0, 0.02)
    train, val = (torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device) for _ in range(2))

    def losses(t, tokens):
        logits = functional_call(model, t, (), {"input_ids": tokens}, strict=False).logits
        return per_example_loss(logits, tokens, causal_lm=True)

    def inner(t, o):
        w = torch.sigmoid(o["logits"])
        return (w * losses(t, train)).sum() / w.sum()

    def outer(t, o):
        return losses(t, val).mean()

    return inner, outer, theta, {"logits": torch.zeros(batch_size, device=device)}


def measure(mode: str, batch_size: int, seq_len: int, rank: int, repeats: int) -> list[dict]:
    """This process's rows for ``mode``: the inner step and ``nystrom(..., hvp_mode=mode)`` side by side (for
    ``auto``, its first call, which probes, and the later ones, which reuse the probed mode)."""
    from hypergrad.approx_hypergrad import nystrom

    scale = runpy.run_path(os.path.join(HERE, "scale.py"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inner, outer, theta, phi = problem(batch_size, seq_len, device)

    def inner_step():
        leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
        torch.autograd.grad(inner(leaves, phi), list(leaves.values()))

    def hypergradient():
        return nystrom(inner, outer, theta, phi, rank=rank, rho=0.1, hvp_mode=mode,
                       generator=torch.Generator().manual_seed(0))

    step = scale["timed"](inner_step, repeats, device)
    costs = [(mode, None)]
    if mode == "auto":
        costs = [("auto, first call", scale["timed"](hypergradient, 1, device)), ("auto", None)]
    rows = []
    for name, cost in costs:
        cost = cost or scale["timed"](hypergradient, repeats, device)
        rows.append({"hvp_mode": name, "seconds": cost["seconds"], "peak_mb": cost["peak_mb"],
                     "time_ratio": cost["seconds"] / step["seconds"],
                     "memory_ratio": cost["peak_mb"] / max(step["peak_mb"], 1e-9),
                     "inner_step_seconds": step["seconds"], "inner_step_peak_mb": step["peak_mb"]})
    if mode == "auto":
        from hypergrad.mode_probe import resolve_hvp_mode

        for row in rows:
            row["chosen_mode"] = resolve_hvp_mode(inner, theta, phi)  # the cached choice
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--in-process", action="store_true",
                        help="Measure every mode in this process (the child processes' own form).")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "core_nystrom_cost.json"))
    args = parser.parse_args(argv)

    if args.in_process:
        rows = [row for mode in args.modes
                for row in measure(mode, args.batch_size, args.seq_len, args.rank, args.repeats)]
        print("ROWS " + json.dumps(rows))
        return rows
    rows = []
    for mode in args.modes:
        child = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--in-process", "--modes", mode, "--batch-size",
             str(args.batch_size), "--seq-len", str(args.seq_len), "--rank", str(args.rank), "--repeats",
             str(args.repeats)], capture_output=True, text=True, check=False)
        if child.returncode != 0:
            raise SystemExit(f"error: measuring hvp_mode={mode} failed:\n{child.stderr[-3000:]}")
        rows += json.loads(next(line for line in child.stdout.splitlines() if line.startswith("ROWS "))[5:])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    title = (f"core nystrom(rank={args.rank}, rho=0.1) on a 4-layer Llama (hidden 256), LoRA q/v, batch "
             f"{args.batch_size}x{args.seq_len}, {device}; each mode in its own process, side by side with an inner "
             f"step (inner step {min(r['inner_step_seconds'] for r in rows):.3f}-"
             f"{max(r['inner_step_seconds'] for r in rows):.3f} s, "
             f"{min(r['inner_step_peak_mb'] for r in rows):.0f}-{max(r['inner_step_peak_mb'] for r in rows):.0f} MB "
             f"above resident)")
    lines = [title, "",
             "| hvp_mode | chose | hypergradient s | peak MB | time / inner step | memory / inner step |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['hvp_mode']} | {r.get('chosen_mode', '')} | {r['seconds']:.3f} | {r['peak_mb']:.0f} | "
              f"{r['time_ratio']:.1f}x | {r['memory_ratio']:.1f}x |" for r in rows]
    text = "\n".join(lines)
    print(text)
    scale = runpy.run_path(os.path.join(HERE, "scale.py"))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    scale["_write_atomic"](args.out, json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    scale["_write_atomic"](os.path.splitext(args.out)[0] + ".md", text + "\n")
    return rows


if __name__ == "__main__":
    main()
