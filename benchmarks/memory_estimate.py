"""Memory of a LoRA fine-tuning step and of a hypergradient for a Llama-architecture causal LM, estimated from its
config's shapes alone (no model is built): the CPU side of ``scale.py --preset llama8b``, which a CUDA run checks.

Terms, in bytes (``b`` sequences of ``s`` tokens, ``L`` layers, hidden size ``h``, MLP size ``I``, key/value width
``kv = num_key_value_heads * head_dim``, vocabulary ``V``, LoRA rank ``r`` on all seven projections):

* parameters: every weight in the model's dtype;
* adapter state: the LoRA weights and their gradients in that dtype, plus Adam's two fp32 moments;
* activations: what autograd saves for one backward, ``b * s * (L * per_layer + 4 V)`` with, for bf16,
  ``per_layer = 36 h + 10 I + 4 kv + 14 r + 8 head_dim`` (fp32: ``24 h + 16 I + 8 kv + 28 r + 8 head_dim``) and
  ``4 V`` the fp32 log-probabilities of the loss. The coefficients were counted with saved-tensor hooks on
  transformers' Llama (SDPA attention, torch 2.13, transformers 5.x): RMSNorm and the rotary embedding keep fp32
  copies, so bf16 saves more than half of fp32. ``tests/test_memory_estimate.py`` counts a shape the fit never saw;
* a hypergradient: the resident terms plus the activations times the ratio of a hypergradient's peak to an inner
  step's that each HVP mode measured (``benchmarks/results/scale_*``: finite differences 1.1-1.2x, the shared
  double-backward graph of ``rev_rev`` 3.5-3.8x; ``fwd_rev`` carries a tangent per saved activation, ~2x).

Transient buffers (the bf16 logits before the loss, kernels' workspaces, the allocator's fragmentation) are not
counted: the CUDA run's measured peak says how much they add.
"""

from __future__ import annotations

import dataclasses
from typing import Any

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# bytes saved per token and layer: coefficients of (h, I, kv, r, head_dim) and a constant
PER_LAYER = {"bf16": (36, 10, 4, 14, 8, 8), "fp32": (24, 16, 8, 28, 8, 8)}
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
HVP_ACTIVATION_RATIO = {"finite_diff": 1.2, "fwd_rev": 2.0, "rev_rev": 3.8}
GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """The estimated terms in bytes; :meth:`inner_step` and :meth:`hypergradient` add them up."""

    parameters: int
    adapter_state: int
    activations: int

    def inner_step(self) -> int:
        """Peak of one LoRA fine-tuning step: resident weights and adapter state, plus one backward's activations."""
        return self.parameters + self.adapter_state + self.activations

    def hypergradient(self, hvp_mode: str) -> int:
        """Peak of one hypergradient in ``hvp_mode``: the activations scale by the mode's measured ratio."""
        if hvp_mode not in HVP_ACTIVATION_RATIO:
            raise ValueError(f"hvp_mode must be one of {sorted(HVP_ACTIVATION_RATIO)}, got {hvp_mode!r}")
        return self.parameters + self.adapter_state + round(HVP_ACTIVATION_RATIO[hvp_mode] * self.activations)


def _shape(config: Any) -> dict[str, int]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"h": config.hidden_size, "I": config.intermediate_size, "L": config.num_hidden_layers,
            "V": config.vocab_size, "head_dim": head_dim,
            "kv": (getattr(config, "num_key_value_heads", None) or heads) * head_dim, "q": heads * head_dim}


def lora_parameters(config: Any, rank: int) -> int:
    """LoRA weights on all seven projections of every layer: ``r * (fan_in + fan_out)`` each."""
    d = _shape(config)
    per_layer = sum(rank * (fan_in + fan_out) for fan_in, fan_out in (
        (d["h"], d["q"]), (d["h"], d["kv"]), (d["h"], d["kv"]), (d["q"], d["h"]),
        (d["h"], d["I"]), (d["h"], d["I"]), (d["I"], d["h"])))
    return d["L"] * per_layer


def model_parameters(config: Any) -> int:
    """Every weight of the Llama model: embeddings, attention and MLP projections, norms and the output head."""
    d = _shape(config)
    attention = d["h"] * d["q"] * 2 + d["h"] * d["kv"] * 2
    layer = attention + 3 * d["h"] * d["I"] + 2 * d["h"]
    head = 0 if getattr(config, "tie_word_embeddings", False) else d["V"] * d["h"]
    return d["V"] * d["h"] + d["L"] * layer + d["h"] + head


def activation_bytes_per_token(config: Any, rank: int, dtype: str) -> int:
    """Bytes autograd saves per token for one backward (see the module docstring)."""
    d = _shape(config)
    c_h, c_i, c_kv, c_r, c_hd, const = PER_LAYER[dtype]
    per_layer = c_h * d["h"] + c_i * d["I"] + c_kv * d["kv"] + c_r * rank + c_hd * d["head_dim"] + const
    return d["L"] * per_layer + 4 * d["V"]


def estimate(config: Any, batch_size: int, seq_len: int, rank: int = 16, dtype: str = "bf16",
             targets: tuple[str, ...] = LORA_TARGETS) -> MemoryEstimate:
    """The memory terms of LoRA (rank ``rank`` on ``targets``, which must be all seven projections: the saved-tensor
    coefficients were counted for that layout) fine-tuning of ``config``'s model on ``batch_size x seq_len``."""
    if dtype not in PER_LAYER:
        raise ValueError(f"dtype must be one of {sorted(PER_LAYER)}, got {dtype!r}")
    if tuple(sorted(targets)) != tuple(sorted(LORA_TARGETS)):
        raise ValueError(f"the estimate covers LoRA on all seven projections {LORA_TARGETS}, got {targets}")
    size = DTYPE_BYTES[dtype]
    adapter = lora_parameters(config, rank)
    return MemoryEstimate(parameters=model_parameters(config) * size, adapter_state=adapter * (2 * size + 8),
                          activations=batch_size * seq_len * activation_bytes_per_token(config, rank, dtype))


def table(config: Any, batch_size: int, seq_len: int, rank: int, dtype: str, budget_gib: float = 80.0) -> str:
    """A markdown table of the estimate, each peak marked whether it fits ``budget_gib``."""
    e = estimate(config, batch_size, seq_len, rank, dtype)
    rows = [("parameters", e.parameters), ("LoRA weights, gradients, Adam moments", e.adapter_state),
            ("activations (one backward)", e.activations), ("inner step (plain LoRA fine-tuning)", e.inner_step()),
            *((f"hypergradient, hvp_mode={mode} ({ratio}x activations)", e.hypergradient(mode))
              for mode, ratio in HVP_ACTIVATION_RATIO.items())]
    title = (f"CPU estimate for {model_parameters(config) / 1e9:.2f}B parameters, LoRA r={rank} on all projections "
             f"({lora_parameters(config, rank) / 1e6:.1f}M), {dtype}, batch {batch_size}x{seq_len}")
    lines = [title, "", f"| term | GiB | fits one {budget_gib:.0f} GiB GPU |", "|---|---|---|"]
    peaks = {"inner step (plain LoRA fine-tuning)", *(r[0] for r in rows[4:])}
    for name, value in rows:
        fits = ("yes" if value / GIB <= budget_gib else "no") if name in peaks else ""
        lines.append(f"| {name} | {value / GIB:.1f} | {fits} |")
    return "\n".join(lines)
