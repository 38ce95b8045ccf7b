"""Model cards (``README.md``) for saved outer parameters, rendered with ``huggingface_hub.ModelCard``.

One card per saved folder says what was learned (the outer-module kind's own :class:`CardText`), how (the
hypergradient method and its options, from the saved metadata), the resulting figures (summary statistics)
and how to load it. The YAML front matter comes from ``huggingface_hub.ModelCardData``; its ``base_model``
is a Hub id (:func:`hub_model_id`), never a local path.

Each :class:`~hf_integration.outer_modules.OuterModule` kind describes itself through
:meth:`~hf_integration.outer_modules.OuterModule.card_text`, so a new kind needs no edit here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .public_names import hub_model_id, is_hub_id
from .serialization import OUTER_CONFIG_NAME, OUTER_PARAMS_NAME, normalize_metadata

__all__ = ["CardText", "render_model_card", "outer_params_card_section", "model_tensors_card_section",
           "model_folder_card"]


@dataclass(frozen=True)
class CardText:
    """What an outer-module kind says about itself in a model card.

    Attributes:
        title: The card's title, e.g. ``"Learned data weights"``.
        description: Completes "This repository holds ...": what the parameters are and how they enter the
            inner loss.
        details: A paragraph derived from the module's config (sizes, layout); may be empty.
        usage: Lines of the loading snippet after ``outer = Cls.from_pretrained(...)``; ``{class_name}`` and
            ``{repo_id}`` are substituted.
    """

    title: str
    description: str
    details: str = ""
    usage: str = "print(outer.summary_stats())"


_HOW_FIELDS = [
    ("method", "Hypergradient method"),
    ("rank", "Rank (Nyström)"),
    ("rho", "rho (damping)"),
    ("sketch", "Nyström sketch"),
    ("iters", "Solver iterations"),
    ("hvp_mode", "HVP mode"),
    ("steps", "Training steps"),
    ("outer_steps", "Outer steps"),
    ("unroll_steps", "Inner steps per outer step"),
    ("outer_learning_rate", "Outer learning rate"),
    ("base_model", "Base model"),
    ("dataset_name", "Dataset"),
    ("split", "Split"),
    ("num_rows", "Rows"),
    ("id_column", "Example-id column"),
    ("fingerprint", "Dataset fingerprint"),
]


def render_model_card(module: Any, *, metadata: Mapping[str, Any] | None = None, repo_id: str,
                      model_note: str = "") -> str:
    """The ``README.md`` of a folder holding ``module``'s parameters: front matter, what, how, figures, loading.

    Args:
        module: An :class:`~hf_integration.outer_modules.OuterModule`.
        metadata: Training metadata (merged over ``module.metadata``).
        repo_id: Repo id or path shown in the loading snippet.
        model_note: A markdown paragraph appended to the card (e.g. about a model saved in the same folder).
    """
    merged = {**getattr(module, "metadata", {}), **normalize_metadata(metadata)}
    dataset = merged.get("dataset_name", "")
    data = ModelCardData(
        library_name="hypergrad",
        tags=["hypergrad", "bilevel-optimization", module.kind.replace("_", "-")],
        base_model=hub_model_id(merged.get("base_model")),
        datasets=[dataset] if is_hub_id(dataset) else None,
    )
    body = _card_body(module, merged, repo_id=repo_id, level=1)
    if model_note:
        body += "\n" + model_note.strip() + "\n"
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def model_tensors_card_section(metadata: Mapping[str, Any], tensor_names: list[str]) -> str:
    """A markdown section (``##`` title) on a model whose outer parameters are model tensors (``outer_param_patterns``,
    e.g. a LoRA adapter learned as a hyperparameter): which tensors were outer and how they were learned."""
    merged = normalize_metadata(metadata)
    shown = ", ".join(f"`{n}`" for n in tensor_names[:20]) + (" ..." if len(tensor_names) > 20 else "")
    how = ", ".join(f"{k}={v}" for k, v in merged.items() if k != "base_model")
    return (f"## Bilevel fine-tuning with hypergrad\n\nThis model was fine-tuned by "
            f"`hf_integration.BilevelTrainer`. {len(tensor_names)} of its tensors were *outer* parameters, "
            f"learned by implicit hypergradients on a validation objective while the others were trained as "
            f"usual: {shown}.\n\nHow: {how}.\n")


def _hub_base_models(data: ModelCardData) -> None:
    """``data.base_model`` as Hub ids (a machine path is mapped by :func:`hub_model_id` or removed), and PEFT's
    ``base_model:adapter:<path>`` tags likewise."""
    base = data.base_model
    bases = [hub_model_id(b) for b in ([base] if isinstance(base, str) else base or [])]
    bases = [b for b in bases if b]
    data.base_model = bases if len(bases) > 1 else (bases[0] if bases else None)
    tags = []
    for tag in data.tags or []:
        prefix, _, name = str(tag).rpartition(":")
        if prefix.startswith("base_model"):
            if not hub_model_id(name):
                continue
            tag = f"{prefix}:{hub_model_id(name)}"
        tags.append(tag)
    data.tags = tags or None


def model_folder_card(card: str, folder_card: str | None, section: str, tags: list[str]) -> str:
    """The one card of a folder holding a fine-tuned model and its outer parameters, for ``save_model`` and
    ``push_to_hub`` alike: ``card`` (``Trainer``'s model card) with the library and tags of ``folder_card`` (the
    card the model's own ``save_pretrained`` left, e.g. PEFT's ``library_name: peft`` for an adapter, so the
    Hub lists the folder as what it is), ``tags`` added, ``base_model`` a Hub id (never a machine path), and
    ``section`` (:func:`outer_params_card_section` or :func:`model_tensors_card_section`) appended."""
    parsed = ModelCard(card, ignore_metadata_errors=True)
    if folder_card is not None:
        saved = ModelCard(folder_card, ignore_metadata_errors=True).data
        if saved.library_name:
            parsed.data.library_name = saved.library_name
        parsed.data.tags = list(dict.fromkeys([*(saved.tags or []), *(parsed.data.tags or [])]))
        if not parsed.data.base_model:
            parsed.data.base_model = saved.base_model
    parsed.data.tags = list(dict.fromkeys([*(parsed.data.tags or []), *tags]))
    _hub_base_models(parsed.data)
    return f"---\n{parsed.data.to_yaml()}\n---\n\n{parsed.text.rstrip()}\n\n{section.strip()}\n"


def outer_params_card_section(
    module: Any,
    metadata: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
) -> str:
    """A markdown section (``##`` title, no YAML front matter) describing ``module``, to append to another card.

    Used by the trainer to extend ``transformers.Trainer``'s model card, which lives in the same
    ``README.md`` as the model when both are saved to one output folder.

    Args:
        module: An :class:`~hf_integration.outer_modules.OuterModule`.
        metadata: Training metadata (merged over ``module.metadata``).
        repo_id: Repo id or path shown in the loading snippet (default: a placeholder).
    """
    merged = {**getattr(module, "metadata", {}), **normalize_metadata(metadata)}
    return _card_body(module, merged, repo_id=repo_id or "path/or/repo_id", level=2)


def _card_body(module: Any, metadata: Mapping[str, str], *, repo_id: str, level: int) -> str:
    h1, h2 = "#" * level, "#" * (level + 1)
    text: CardText = module.card_text()
    class_name = type(module).__name__
    holder = "This repository holds" if level == 1 else "Alongside the model, this folder holds"
    lines = [f"{h1} {text.title}", "", f"{holder} {text.description}", ""]
    if text.details:
        lines += [text.details, ""]

    shown = dict(metadata)
    if "base_model" in shown:  # a Hub id or nothing: no machine path in a card
        base = hub_model_id(shown.pop("base_model"))
        if base:
            shown["base_model"] = base
    lines += [f"{h2} How they were learned", "", "| | |", "|---|---|"]
    labels = dict(_HOW_FIELDS)
    rows = [(labels[key], shown[key]) for key, _ in _HOW_FIELDS if key in shown]
    rows += [(key, shown[key]) for key in sorted(k for k in shown if k not in labels)]
    lines += [f"| {label} | `{value}` |" for label, value in rows] or ["| (no training metadata recorded) | |"]
    lines.append("")

    stats = module.summary_stats()
    if stats:
        lines += [f"{h2} Summary statistics", "", "| statistic | value |", "|---|---|"]
        lines += [f"| {key} | {_fmt(value)} |" for key, value in stats.items()]
        lines.append("")

    lines += [
        f"{h2} Loading",
        "",
        "```python",
        f"from hf_integration import {class_name}",
        "",
        f'outer = {class_name}.from_pretrained("{repo_id}")',
        text.usage.format(class_name=class_name, repo_id=repo_id),
        "```",
        "",
        f"Files: `{OUTER_PARAMS_NAME}` (tensors; kind, config and the metadata above in its header), "
        f"`{OUTER_CONFIG_NAME}` (human-readable copy). Loading never unpickles.",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
