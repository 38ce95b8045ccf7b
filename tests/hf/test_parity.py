"""`BilevelTrainer` keeps `Trainer`'s contract where the outer problem does not change it: label smoothing,
multi-label losses, `compute_loss_func`, and `load_best_model_at_end` (which must bring back the best checkpoint's
outer parameters with its model)."""

from __future__ import annotations

import pytest
import torch
from transformers.trainer_pt_utils import LabelSmoother

from hf_integration import OUTER_PARAMS_NAME, BilevelTrainer, DataWeights
from hf_integration.losses import IGNORE_INDEX, per_example_loss

from .trainer_utils import bilevel_args, datasets_with_ids, tiny_classifier


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_label_smoothing_matches_trainers_label_smoother(eps):
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 5, (6,))
    ours = per_example_loss(logits, labels, causal_lm=False, label_smoothing=eps).mean()
    torch.testing.assert_close(ours, LabelSmoother(epsilon=eps)({"logits": logits}, labels).to(ours.dtype))
    tokens, targets = torch.randn(3, 7, 11, dtype=torch.float64), torch.randint(0, 11, (3, 7))
    targets[:, :2] = IGNORE_INDEX  # a prompt
    ours = per_example_loss(tokens, targets, causal_lm=True, label_smoothing=eps)
    theirs = torch.stack([LabelSmoother(epsilon=eps)({"logits": tokens[i:i + 1]}, targets[i:i + 1], shift_labels=True)
                          for i in range(3)])  # a per-example token mean, as ours
    torch.testing.assert_close(ours, theirs.to(ours.dtype))


def test_multi_label_loss_is_the_per_example_mean_of_transformers_bce():
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 3), torch.randint(0, 2, (4, 3)).float()
    ours = per_example_loss(logits, labels, causal_lm=False)
    assert ours.shape == (4,)
    torch.testing.assert_close(ours.mean(), torch.nn.BCEWithLogitsLoss()(logits, labels))  # transformers' loss
    with pytest.raises(ValueError, match=r"labels of shape \(4, 2\) do not fit logits of shape \(4, 3\)"):
        per_example_loss(logits, torch.zeros(4, 2, dtype=torch.long), causal_lm=False)


def test_the_inner_objective_is_smoothed_and_the_outer_one_is_not(tmp_path):
    train, val = datasets_with_ids(32, 16)
    trainer = BilevelTrainer(model=tiny_classifier(), args=bilevel_args(tmp_path, label_smoothing_factor=0.5),
                             train_dataset=train, eval_dataset=val, outer_module=DataWeights(32))
    batch, eval_batch, _ = trainer._batches(step=1)
    theta = trainer._theta()
    phi = {k: v.detach() for k, v in trainer._outer_param_tree().items()}
    with torch.no_grad():
        logits = torch.func.functional_call(trainer.model, theta, (), {
            k: v for k, v in batch.items() if k not in ("labels", "example_id")}, strict=False).logits
        smoothed = per_example_loss(logits, batch["labels"], causal_lm=False, label_smoothing=0.5).mean()
        torch.testing.assert_close(trainer.inner_forward(theta, phi, batch), smoothed)  # uniform weights: a mean
        logits = torch.func.functional_call(trainer.model, theta, (), {
            k: v for k, v in eval_batch.items() if k != "labels"}, strict=False).logits
        plain = per_example_loss(logits, eval_batch["labels"], causal_lm=False).mean()
        torch.testing.assert_close(trainer.outer_forward(theta, phi, eval_batch), plain)
    assert not torch.allclose(smoothed, per_example_loss(logits, eval_batch["labels"], causal_lm=False,
                                                         label_smoothing=0.5).mean())  # it matters here


def test_compute_loss_func_is_refused_in_one_line(tmp_path):
    train, val = datasets_with_ids(32, 16)
    with pytest.raises(ValueError, match=r"`compute_loss_func` is not supported: BilevelTrainer needs each example's "
                                         r"loss.*label_smoothing_factor is honoured"):
        BilevelTrainer(model=tiny_classifier(), args=bilevel_args(tmp_path), train_dataset=train, eval_dataset=val,
                       outer_module=DataWeights(32), compute_loss_func=lambda outputs, labels, **kw: outputs.loss)


def test_load_best_model_at_end_brings_back_that_checkpoints_outer_parameters(tmp_path):
    """It used to restore the best checkpoint's adapter and keep the last step's outer parameters: a saved folder
    then paired weights with a model they were not learned with."""
    train, val = datasets_with_ids(32, 16)
    weights = DataWeights(32)
    args = bilevel_args(tmp_path, max_steps=8, unroll_steps=1, per_device_train_batch_size=8, eval_strategy="steps",
                        eval_steps=2, save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                        metric_for_best_model="score", greater_is_better=True)
    trainers = []
    trainer = BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=val,
                             outer_module=weights,  # a score that peaks at step 4, so the best is not the last
                             compute_metrics=lambda _: {"score": -abs(trainers[0].state.global_step - 4)})
    trainers.append(trainer)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-4")
    saved = DataWeights.from_pretrained(best)
    assert torch.equal(weights.logits.detach().cpu(), saved.logits)
    trainer.save_model(str(tmp_path / "final"))
    final = DataWeights.from_pretrained(str(tmp_path / "final"))
    assert torch.equal(final.logits, saved.logits) and final.metadata["best_step"] == best.rsplit("-", 1)[1]
    assert (tmp_path / "final" / OUTER_PARAMS_NAME).is_file()
