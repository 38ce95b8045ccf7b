"""The hypergradient of a data weighting by weighted-gradient mixed products (`BilevelTrainer._weighted_gradient_hypergradient`):
equal to the general path's double-backward product for every module that weights examples by values of their
losses, not taken where it would be wrong, and its post-step check equal to a fresh forward pass."""

from __future__ import annotations

import pytest
import torch

from hf_integration import BilevelTrainer, CombinedWeights, DataWeights, LossWeights
from hf_integration.outer_modules import ExampleWeighting

from .trainer_utils import bilevel_args, datasets_with_ids, tiny_classifier


def _trainer(tmp_path, module, trusted: bool = False, **overrides):
    train, val = datasets_with_ids(32, 16)
    if trusted:
        train = train.add_column("trusted", [0] * 24 + [1] * 8)
    if getattr(module, "reference_column", None):
        train = train.add_column(module.reference_column, [0.25 + 0.1 * (i % 7) for i in range(32)])
    args = bilevel_args(tmp_path, **{"ihvp_method": "identity", "hvp_mode": "rev_rev", **overrides})
    return BilevelTrainer(model=tiny_classifier(dtype=torch.float64), args=args, train_dataset=train,
                          eval_dataset=val, outer_module=module)


def _both_paths(trainer, monkeypatch):
    train_batch, eval_batch, generator = trainer._batches(step=3)
    fast = trainer.compute_hypergradient(train_batch, eval_batch, generator)
    took_fast = "_hypergradient_losses" in trainer.__dict__
    trainer.__dict__.pop("_hypergradient_losses", None)
    with monkeypatch.context() as patch:  # the general path: implicit_hypergrad's double-backward mixed product
        patch.setattr(trainer, "_takes_weighted_gradient_mixed_product", lambda: False)
        general = trainer.compute_hypergradient(train_batch, eval_batch, generator)
    return fast, general, took_fast


MODULES = {
    "loss_weights": lambda: LossWeights(init_loss_scale=0.8),
    "loss_weights_trusted_uniform": lambda: LossWeights(init_loss_scale=0.8, trusted_column="trusted",
                                                        trusted_share="uniform"),
    "loss_weights_trusted_max_weight": lambda: LossWeights(init_loss_scale=0.8, trusted_column="trusted"),
    "loss_weights_trusted_reference": lambda: LossWeights(init_loss_scale=0.8, trusted_column="trusted",
                                                          trusted_share="uniform", reference_column="reference",
                                                          init_reference_scale=0.3),
    "two_numbers": lambda: CombinedWeights([LossWeights(init_loss_scale=0.5), LossWeights(init_loss_scale=1.5)]),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_weighted_gradient_mixed_product_equals_the_double_backward_one(tmp_path, monkeypatch, name):
    module = MODULES[name]().double()  # float64 like the model: the two paths agree to rounding
    trainer = _trainer(tmp_path, module, trusted="trusted" in name)
    fast, general, took_fast = _both_paths(trainer, monkeypatch)
    assert took_fast
    assert list(fast) == list(general)
    for key in fast:
        assert fast[key].abs().max() > 0
        # PEFT keeps the adapter in float32 (the model is float64): the paths sum float32 products in other orders
        torch.testing.assert_close(fast[key], general[key], rtol=1e-5, atol=1e-10)


class _DifferentiatedTilt(ExampleWeighting):
    """Weights that differentiate through the losses: the per-example product would miss a term."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def example_weights(self, per_example_loss, batch):
        return torch.sigmoid(-self.scale * per_example_loss)


def test_weights_that_differentiate_the_losses_take_the_general_path(tmp_path):
    trainer = _trainer(tmp_path, _DifferentiatedTilt())
    train_batch, eval_batch, generator = trainer._batches(step=3)
    trainer.compute_hypergradient(train_batch, eval_batch, generator)
    assert "_hypergradient_losses" not in trainer.__dict__
    nystrom = _trainer(tmp_path / "n", LossWeights(init_loss_scale=0.8), ihvp_method="nystrom")
    train_batch, eval_batch, generator = nystrom._batches(step=3)
    nystrom.compute_hypergradient(train_batch, eval_batch, generator)  # products needed: the general path
    assert "_hypergradient_losses" not in nystrom.__dict__


def test_the_post_step_check_is_the_objective_of_a_fresh_forward_pass(tmp_path):
    weights = LossWeights(init_loss_scale=0.8)
    trainer = _trainer(tmp_path, weights, outer_patience_steps=0)
    trainer.state.global_step = 3
    metrics = trainer.outer_update()
    assert "_hypergradient_losses" not in trainer.__dict__  # used once, by the check
    train_batch, _, _ = trainer._batches(step=3)
    with torch.no_grad(), trainer._second_order_context():
        phi = {k: v.detach() for k, v in trainer._outer_param_tree().items()}
        fresh, _ = trainer._objective(trainer._unwrapped, None, phi, train_batch, weighted=True)
    assert metrics["outer/inner_loss"] == pytest.approx(float(fresh), rel=1e-9)
    assert metrics["outer/weight_spread"] > 0


def test_weightings_with_more_numbers_take_the_general_path(tmp_path):
    weights = DataWeights(32)
    with torch.no_grad():
        weights.logits.copy_(torch.linspace(-1, 1, 32, dtype=weights.logits.dtype))
    trainer = _trainer(tmp_path, weights)
    assert not trainer._takes_weighted_gradient_mixed_product()
    train_batch, eval_batch, generator = trainer._batches(step=3)
    assert trainer.compute_hypergradient(train_batch, eval_batch, generator)["outer_module.logits"].abs().max() > 0
    assert "_hypergradient_losses" not in trainer.__dict__
