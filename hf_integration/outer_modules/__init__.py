"""Outer-parameter modules: what the bilevel trainer learns on the outer (held-out) objective.

An :class:`OuterModule` turns the per-example losses of a training batch into the scalar *inner* objective
that the model's trainable (inner) parameters minimize. Its own parameters (the *outer* parameters) are
tuned by implicit hypergradients so that the inner solution does well on held-out data.

The modules provided:

* :class:`DataWeights` -- one learned weight per training example (down-weights noisy or harmful
  examples); inner loss = ``sum_i w_i l_i / sum_i w_i`` over the batch.
* :class:`LossWeights` -- data weights as a learned one-parameter function of each example's current loss;
  inner loss = ``sum_i w_i l_i / sum_i w_i`` with ``w_i = sigmoid(-loss_scale * stop_grad(l_i))``.
* :class:`LoraRegularization` -- one learned L2 strength per LoRA module (or per transformer layer);
  inner loss = ``mean_i l_i + sum_m 1/2 exp(s_m) (|A_m|^2 + |B_m|^2)``.
* :class:`SourceWeights` -- one learned weight per data source (domain), ``w_s = S * softmax(a)_s``, each example
  weighted by its source's weight; inner loss = ``sum_i w_s(i) l_i / sum_i w_s(i)``.
* :class:`CombinedWeights` -- the product of several weightings (e.g. per-source times per-example weights);
  inner loss = ``sum_i w_i l_i / sum_i w_i`` with ``w_i = prod_k w^(k)_i``.

The trainer evaluates the module functionally::

    inner_obj = torch.func.functional_call(outer_module, outer_params, (per_example_loss, batch, inner_params))

so ``forward`` is a pure function of the module's parameters and its inputs (no in-place updates, no
state), which makes it usable under ``torch.func.grad``, ``jvp`` and ``vmap`` over tangents of
``inner_params``.

One file per kind; :mod:`.base` declares the contract every kind fulfils (:class:`OuterModule`: the inner
objective, :meth:`~OuterModule.batch_columns`, statistics, config, card text) and :mod:`.weighting` the shared
part of the data weightings. Persistence (``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``) builds on
:mod:`hf_integration.serialization` (file layout, validation on load), :mod:`hf_integration.model_card`
(each kind describes itself in its card with :meth:`OuterModule.card_text`),
:mod:`hf_integration.optimizer_state` and :mod:`hf_integration.hub` (upload).
"""

from .base import OuterModule
from .combined import CombinedWeights
from .data_weights import DataWeights
from .lora import LoraRegularization, find_lora_modules, parse_layer_index
from .loss_weights import LossWeights
from .source_weights import SourceWeights
from .weighting import ExampleWeighting, IndexedWeighting

__all__ = ["CombinedWeights", "DataWeights", "ExampleWeighting", "IndexedWeighting", "LoraRegularization",
           "LossWeights", "OuterModule", "SourceWeights", "find_lora_modules", "parse_layer_index"]
