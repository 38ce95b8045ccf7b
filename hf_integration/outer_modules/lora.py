"""Learned LoRA regularization: :class:`LoraRegularization`, one L2 strength per LoRA module or per layer, and
:func:`find_lora_modules` / :func:`parse_layer_index` to find them in a PEFT model."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers.utils import logging

from ..model_card import CardText
from .base import OuterModule, _require
from .weighting import promote

logger = logging.get_logger(__name__)

__all__ = ["LoraRegularization", "find_lora_modules", "parse_layer_index"]


_LORA_A_RE = re.compile(r"^(?P<module>.+)\.lora_A\.(?P<adapter>[^.]+)\.weight$")

# Transformer-block containers across common architectures: Llama/Mistral/Qwen ``layers.N``, GPT-2/Falcon
# ``h.N``, BERT/RoBERTa ``layer.N``, T5 ``block.N``, ViT-style ``blocks.N``.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")

def parse_layer_index(module_name: str) -> int:
    """Transformer layer index of a module name, e.g. ``...model.layers.3.self_attn.q_proj`` -> ``3``.

    Raises:
        ValueError: The name has no ``layers.N`` / ``layer.N`` / ``h.N`` / ``block(s).N`` component.
    """
    match = _LAYER_RE.search(module_name)
    if match is None:
        raise ValueError(
            f"cannot parse a transformer layer index from module name {module_name!r} (looked for "
            "'layers.N', 'layer.N', 'h.N', 'blocks.N', 'block.N'); use granularity='module' instead"
        )
    return int(match.group(1))

def _layer_index_or_none(module_name: str) -> int | None:
    match = _LAYER_RE.search(module_name)
    return None if match is None else int(match.group(1))

def find_lora_modules(
    named_parameters: Sequence[tuple[str, Tensor]] | Mapping[str, Tensor],
    adapter_name: str | None = None,
    only_trainable: bool = True,
) -> tuple[list[str], str]:
    """Find LoRA modules from parameter names ``<module>.lora_A.<adapter>.weight`` / ``<module>.lora_B.<adapter>.weight``.

    Args:
        named_parameters: ``model.named_parameters()`` (or a name -> tensor mapping).
        adapter_name: Adapter to use; ``None`` picks the only adapter present (error if several).
        only_trainable: Skip parameters with ``requires_grad=False`` (e.g. inactive adapters).

    Returns:
        ``(module_names, adapter_name)``, module names in parameter order.
    """
    items = list(named_parameters.items() if isinstance(named_parameters, Mapping) else named_parameters)
    names = {n for n, p in items if not only_trainable or p.requires_grad}
    found: dict[str, list[str]] = {}
    for name, _ in items:
        if name not in names:
            continue
        match = _LORA_A_RE.match(name)
        if match and f"{match['module']}.lora_B.{match['adapter']}.weight" in names:
            found.setdefault(match["adapter"], []).append(match["module"])
    if adapter_name is None:
        if len(found) > 1:
            raise ValueError(f"the model has several LoRA adapters {sorted(found)}; pass adapter_name")
        adapter_name = next(iter(found), None)
    modules = found.get(adapter_name or "", [])
    if not modules:
        what = "trainable " if only_trainable else ""
        extra = f" (adapters found: {sorted(found)})" if found else ""
        raise ValueError(
            f"the model has no {what}LoRA parameters for adapter {adapter_name!r}{extra}: no parameter named "
            "'<module>.lora_A.<adapter>.weight' with a matching lora_B. Wrap the model with "
            "peft.get_peft_model(model, LoraConfig(...)) first."
        )
    return modules, adapter_name  # type: ignore[return-value]

class LoraRegularization(OuterModule):
    """Learned L2 regularization strengths for LoRA factors.

    Each group ``g`` (a LoRA module, or all LoRA modules of a transformer layer) has a learned log-strength
    ``s_g`` (the parameter ``log_strength``); the inner loss is::

        L = mean_i l_i + sum_m 1/2 exp(s_{g(m)}) (|A_m|_F^2 + |B_m|_F^2)

    where ``A_m``, ``B_m`` are the inner parameters ``<module>.lora_A.<adapter>.weight`` and
    ``<module>.lora_B.<adapter>.weight``. Parameterizing by the log keeps strengths positive and lets the
    outer optimizer move them across orders of magnitude.

    Args:
        module_names: LoRA module names, exactly as prefixes of ``model.named_parameters()`` names, e.g.
            ``"base_model.model.model.layers.0.self_attn.q_proj"`` for a PEFT model. Prefer
            :meth:`from_peft_model`.
        granularity: ``"module"`` (one strength per LoRA module), ``"layer"`` (one per transformer layer,
            parsed with :func:`parse_layer_index`; a LoRA module outside the layers, e.g. a classification
            head, is a group of its own, named by the module) or ``"global"`` (a single strength).
        init_log_strength: Initial ``s`` of every group (default ``log(1e-3)``).
        adapter_name: PEFT adapter name in the parameter names.
    """

    kind: ClassVar[str] = "lora_regularization"
    GRANULARITIES: ClassVar[tuple[str, ...]] = ("module", "layer", "global")

    def __init__(
        self,
        module_names: Sequence[str],
        granularity: str = "module",
        init_log_strength: float = math.log(1e-3),
        adapter_name: str = "default",
    ) -> None:
        super().__init__()
        if isinstance(module_names, str):
            raise TypeError("module_names must be a list of module names, not a single str")
        module_names = list(module_names)
        if not module_names:
            raise ValueError("module_names is empty: there are no LoRA modules to regularize")
        if len(set(module_names)) != len(module_names):
            raise ValueError("module_names has duplicates")
        if granularity not in self.GRANULARITIES:
            raise ValueError(f"granularity must be one of {self.GRANULARITIES}, got {granularity!r}")
        self.module_names = module_names
        self.granularity = granularity
        self.adapter_name = adapter_name
        self.init_log_strength = float(init_log_strength)

        if granularity == "module":
            group_names = list(module_names)
            group_index = list(range(len(module_names)))
        elif granularity == "layer":
            # a module outside the transformer layers (a classification head, embeddings) is a group of its own
            indices = [_layer_index_or_none(m) for m in module_names]
            group_names = ([f"layer.{i}" for i in sorted({i for i in indices if i is not None})]
                           + [m for m, i in zip(module_names, indices) if i is None])
            position = {group: k for k, group in enumerate(group_names)}
            group_index = [position[m if i is None else f"layer.{i}"] for m, i in zip(module_names, indices)]
        else:
            group_names = ["global"]
            group_index = [0] * len(module_names)
        self.group_names: list[str] = group_names
        self.group_index: list[int] = group_index  # module k -> strength group_index[k]
        self._a_keys = [f"{m}.lora_A.{adapter_name}.weight" for m in module_names]
        self._b_keys = [f"{m}.lora_B.{adapter_name}.weight" for m in module_names]
        self.log_strength = nn.Parameter(torch.full((len(group_names),), self.init_log_strength))

    def extra_repr(self) -> str:
        return f"granularity={self.granularity!r}, modules={len(self.module_names)}, groups={len(self.group_names)}"

    @classmethod
    def from_peft_model(
        cls,
        model: nn.Module,
        granularity: str = "module",
        init_log_strength: float = math.log(1e-3),
        adapter_name: str | None = None,
    ) -> LoraRegularization:
        """Build from a PEFT LoRA model, finding its LoRA modules from ``model.named_parameters()``.

        Module names are the prefixes in *this* model's parameter names (for a ``PeftModel`` they start with
        ``base_model.model.``), so pass the same (unwrapped) model whose ``named_parameters()`` the trainer
        uses for ``inner_params``. ``adapter_name=None`` uses the model's active adapter (or the only one).

        Raises:
            ValueError: The model has no trainable LoRA parameters.
        """
        if adapter_name is None:
            active = getattr(model, "active_adapter", None)
            if isinstance(active, (list, tuple)):
                active = active[0] if len(active) == 1 else None
            adapter_name = active if isinstance(active, str) else None
        modules, adapter = find_lora_modules(list(model.named_parameters()), adapter_name=adapter_name)
        covered = {f"{m}.lora_{ab}.{adapter}.weight" for m in modules for ab in "AB"}
        uncovered = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n and n not in covered]
        if uncovered:
            logger.warning(
                "LoraRegularization does not regularize %d trainable LoRA parameter(s) such as %s "
                "(only <module>.lora_A/lora_B.<adapter>.weight pairs are)",
                len(uncovered), uncovered[:3],
            )
        return cls(modules, granularity=granularity, init_log_strength=init_log_strength, adapter_name=adapter)

    def strengths(self) -> Tensor:
        """Regularization strengths ``exp(log_strength)``, one per group (see :attr:`group_names`); differentiable."""
        return torch.exp(self.log_strength)

    def squared_norms(self, inner_params: Mapping[str, Tensor]) -> Tensor:
        """``|A_m|^2 + |B_m|^2`` per module (float32 or wider), shape ``(len(module_names),)``."""
        terms = []
        for a_key, b_key in zip(self._a_keys, self._b_keys):
            try:
                a, b = inner_params[a_key], inner_params[b_key]
            except KeyError as err:
                sample = [k for k in inner_params if "lora_" in k][:3]
                raise KeyError(
                    f"LoraRegularization: inner parameter {err.args[0]!r} not found among inner_params "
                    f"(sample LoRA names there: {sample}). Build the module with "
                    "LoraRegularization.from_peft_model on the same unwrapped model whose named_parameters() "
                    "name the inner params (a DDP wrapper adds a 'module.' prefix)."
                ) from None
            terms.append(_sq_norm(a) + _sq_norm(b))
        return torch.stack(terms)

    def penalty(self, inner_params: Mapping[str, Tensor]) -> Tensor:
        """``sum_m 1/2 exp(s_{g(m)}) (|A_m|^2 + |B_m|^2)``."""
        strengths = torch.exp(self.log_strength)
        index = torch.tensor(self.group_index, device=strengths.device)
        strengths, sq = promote(strengths, self.squared_norms(inner_params))
        return 0.5 * (strengths.index_select(0, index) * sq).sum()

    def forward(
        self, per_example_loss: Tensor, batch: Mapping[str, Tensor], inner_params: Mapping[str, Tensor]
    ) -> Tensor:
        """``mean(per_example_loss) + penalty(inner_params)``; ``batch`` is unused."""
        del batch
        penalty = self.penalty(inner_params)
        return per_example_loss.mean().to(penalty.device) + penalty

    @torch.no_grad()
    def summary_stats(self) -> dict[str, float]:
        """``strength_mean``/``_min``/``_max``, ``log_strength_mean``/``_std``; per group too when there are at most 8."""
        s = self.log_strength.detach().float()
        stats = {
            "strength_mean": float(s.exp().mean()),
            "strength_min": float(s.exp().min()),
            "strength_max": float(s.exp().max()),
            "log_strength_mean": float(s.mean()),
            "log_strength_std": float(s.std(unbiased=False)),
        }
        if len(self.group_names) <= 8:
            for name, value in zip(self.group_names, s.exp().tolist()):
                stats[f"strength[{name}]"] = float(value)
        return stats

    def config_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "module_names": list(self.module_names),
            "granularity": self.granularity,
            "adapter_name": self.adapter_name,
            "init_log_strength": self.init_log_strength,
            "group_names": list(self.group_names),
        }

    def card_text(self) -> CardText:
        return CardText(
            title="Learned LoRA regularization",
            description=(
                "learned **LoRA regularization strengths**: one log-strength `s_m` per LoRA module (or per "
                "transformer layer), and the inner (training) loss is "
                "`mean_i l_i + sum_m 1/2 exp(s_m) (|A_m|^2 + |B_m|^2)`. The strengths were tuned by bilevel "
                "optimization so that fine-tuning minimizes a held-out (outer) loss."
            ),
            details=(
                f"Granularity: `{self.granularity}`; {len(self.module_names)} LoRA modules "
                f"(adapter `{self.adapter_name}`), {len(self.group_names)} learned strengths."
            ),
            usage="print(outer.strengths())  # exp(log_strength), one per group",
        )

    @classmethod
    def _from_config(cls, config: Mapping[str, Any]) -> LoraRegularization:
        _require(config, "module_names", "granularity")
        module = cls(
            module_names=config["module_names"],
            granularity=config["granularity"],
            init_log_strength=config.get("init_log_strength", math.log(1e-3)),
            adapter_name=config.get("adapter_name", "default"),
        )
        saved_groups = config.get("group_names")
        if saved_groups is not None and list(saved_groups) != module.group_names:
            raise ValueError(f"saved group_names {saved_groups} differ from those derived {module.group_names}")
        return module

def _sq_norm(t: Tensor) -> Tensor:
    """``|t|^2`` as a plain tensor: for an FSDP2 shard (``DTensor``) the sum over every process's part (its
    gradient flows back to this process's shard)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    total = t.pow(2).sum()
    return total.full_tensor() if hasattr(total, "full_tensor") else total
