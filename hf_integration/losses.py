"""Per-example losses from model outputs, the quantity that data weights reweight."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["per_example_loss", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def per_example_loss(logits: Tensor, labels: Tensor, causal_lm: bool, label_smoothing: float = 0.0) -> Tensor:
    """Loss of each example of a batch, shape ``(batch,)``, as ``transformers`` models compute their mean loss.

    * sequence classification (``logits`` ``(B, C)``, integer ``labels`` ``(B,)``): cross-entropy;
      multi-label classification (float ``labels`` ``(B, C)``, ``C > 1``; ``problem_type=
      "multi_label_classification"``): binary cross-entropy of each class's logit, averaged over the ``C``
      classes; regression (``C == 1``, or float ``labels`` ``(B,)``): squared error;
    * token-level outputs (``logits`` ``(B, T, V)``, ``labels`` ``(B, T)``): per-token
      cross-entropy averaged over each example's tokens whose label is not ``-100``; for causal
      language models (``causal_lm=True``) position ``t`` predicts label ``t + 1``, as in
      ``transformers``' own loss. An example without any labelled token contributes 0.

    ``label_smoothing`` (``TrainingArguments.label_smoothing_factor``, ``eps``): every cross-entropy takes the
    target ``(1 - eps) onehot(y) + eps / C``, i.e. ``(1 - eps) CE + eps mean_c(-log p_c)``, as `Trainer`'s
    ``LabelSmoother`` does for classification; regression and multi-label losses are not smoothed.
    """
    # bf16/fp16 logits are upcast so the loss is accurate; float64 stays float64.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logits.dim() == 2:
        if labels.is_floating_point() and labels.shape == logits.shape and logits.shape[-1] > 1:
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").mean(-1)
        if labels.dim() != 1:
            raise ValueError(f"labels of shape {tuple(labels.shape)} do not fit logits of shape {tuple(logits.shape)}: "
                             "use one class index per example, or (multi-label) float labels of the logits' shape.")
        if labels.is_floating_point() or logits.shape[-1] == 1:
            return (logits.squeeze(-1) - labels.to(logits.dtype)).pow(2)
        return F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    if logits.dim() != 3:
        raise ValueError(f"expected logits of shape (batch, classes) or (batch, seq, vocab), got {tuple(logits.shape)}.")
    if causal_lm:
        logits, labels = logits[:, :-1], labels[:, 1:]
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none", label_smoothing=label_smoothing,
    ).reshape(labels.shape)
    mask = (labels != IGNORE_INDEX).to(token_loss.dtype)
    return (token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
