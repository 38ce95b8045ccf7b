"""The data-weighting recipe as `BilevelTrainer` options: a separate outer dataset, trusted outer rows, example ids
and outer modules from the arguments, the named presets, the weights out, and what a run says about its weights."""

from __future__ import annotations

import logging
import re
from unittest import mock

import numpy as np
import pytest
import torch

from hf_integration import (RECIPES, TRUSTED_COLUMN, BilevelTrainer, BilevelTrainingArguments, DataWeights,
                            LoraRegularization, LossWeights)
from hf_integration.losses import per_example_loss
from hf_integration.recipe import resolve_outer_patience

from .trainer_utils import bilevel_args, datasets_with_ids, tiny_classifier, token_task


def _trainer(tmp_path, train=None, outer=None, **overrides):
    if train is None:
        train, outer = datasets_with_ids(32, 16)
    options = {"max_steps": 6, "unroll_steps": 2, "per_device_train_batch_size": 8, **overrides}
    return BilevelTrainer(model=tiny_classifier(), args=bilevel_args(tmp_path, **options), train_dataset=train,
                          eval_dataset=outer)


def test_a_recipe_fills_the_fields_left_at_their_defaults(tmp_path):
    args = BilevelTrainingArguments(output_dir=str(tmp_path), use_cpu=True, recipe="data_weighting",
                                    outer_learning_rate=0.05, ihvp_method="nystrom")
    mine = {"outer_learning_rate": 0.05, "ihvp_method": "nystrom"}  # what the user set stays, a plain default too
    for name, value in RECIPES["data_weighting"].items():
        assert getattr(args, name) == mine.get(name, value), name
    plain = BilevelTrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    assert (plain.ihvp_method, plain.outer_learning_rate, plain.unroll_steps, plain.train_on_outer_data) == (
        "nystrom", 0.1, 10, False)
    other = BilevelTrainingArguments(output_dir=str(tmp_path), use_cpu=True, recipe="sft_data_weighting")
    other.outer_module_options["init_loss_scale"] = 7.0  # a copy: the preset itself is untouched
    assert RECIPES["sft_data_weighting"]["outer_module_options"]["init_loss_scale"] == 1.0
    with pytest.raises(ValueError, match=r"`recipe` must be one of \['data_weighting', 'lora_regularization', "
                                         r"'sft_data_weighting'\]"):
        BilevelTrainingArguments(output_dir=str(tmp_path), use_cpu=True, recipe="fast")


def test_the_data_weighting_recipe_trains_on_trusted_outer_rows(tmp_path):
    """One argument instead of concatenating the sets by hand: the outer rows join the inner problem flagged
    trusted, LossWeights is built with that column, and the first outer step waits half an epoch."""
    train, outer = datasets_with_ids(32, 16)
    trainer = _trainer(tmp_path, train, outer, recipe="data_weighting", hvp_mode="rev_rev", unroll_steps=2,
                       outer_learning_rate=0.3)
    module = trainer.outer_module
    assert isinstance(module, LossWeights) and module.trusted_column == TRUSTED_COLUMN
    assert len(trainer.train_dataset) == 48 and trainer.num_training_rows == 32
    assert trainer.train_dataset[TRUSTED_COLUMN] == [0] * 32 + [1] * 16
    assert trainer.train_dataset["input_ids"][32:] == outer["input_ids"]  # the outer rows, as they are
    assert trainer.args.outer_patience_steps == 2  # half of the 4 steps of an epoch of 32 training rows (batches of 8)
    assert trainer.outer_dataset is trainer.eval_dataset
    trainer.train()
    assert trainer.outer_step >= 1 and float(module.loss_scale) != pytest.approx(0.1)


def test_outer_modules_described_by_kind_are_built_from_the_data_and_the_model(tmp_path):
    train = token_task(32, 0.3, 0)  # no example ids: added in the rows' order
    _, outer = datasets_with_ids(32, 16)
    weights = _trainer(tmp_path, train, outer, outer_module="data_weights", outer_module_options={"init": 1.0})
    assert isinstance(weights.outer_module, DataWeights) and weights.outer_module.num_examples == 32
    assert weights.train_dataset["example_id"] == list(range(32))
    assert torch.equal(weights.outer_module.logits.detach(), torch.ones(32))
    lora = _trainer(tmp_path, train, outer, outer_module="lora_regularization",
                    outer_module_options={"granularity": "layer"})
    assert isinstance(lora.outer_module, LoraRegularization) and lora.outer_module.group_names[0] == "layer.0"
    with pytest.raises(ValueError, match=r"`outer_module_options` \{'typo': 1\} do not fit outer_module='loss_weights'"):
        _trainer(tmp_path, train, outer, outer_module="loss_weights", outer_module_options={"typo": 1})
    with pytest.raises(ValueError, match=r"train_on_outer_data needs an outer module that leaves trusted rows out"):
        _trainer(tmp_path, train, outer, outer_module="data_weights", train_on_outer_data=True)
    with pytest.raises(ValueError, match=r"pass `outer_module` or set `args.outer_module` \('data_weights'\), not both"):
        BilevelTrainer(model=tiny_classifier(), args=bilevel_args(tmp_path, outer_module="data_weights"),
                       train_dataset=train, eval_dataset=outer, outer_module=DataWeights(32))


def test_the_lora_regularization_recipe_builds_strengths_that_wait_a_third_of_the_run(tmp_path):
    """One argument for the PEFT job's settings: one strength per LoRA module at 1e-3, built from the PEFT model,
    and no outer step before a third of the run (4 of 12 steps: the first follows inner step 5)."""
    train, outer = datasets_with_ids(32, 16)
    trainer = _trainer(tmp_path, train, outer, recipe="lora_regularization", max_steps=12, hvp_mode="rev_rev",
                       hypergrad_train_batch_size=8, outer_batch_size=8)
    module = trainer.outer_module
    assert isinstance(module, LoraRegularization) and module.granularity == "module"
    assert len(module.group_names) == 4  # q and v of 2 layers (the head is trained, not LoRA-adapted)
    assert module.strengths().tolist() == pytest.approx([1e-3] * 4)
    settings = trainer.args
    assert (settings.outer_patience_steps, settings.unroll_steps, settings.outer_learning_rate) == (4, 2, 0.3)
    steps = []
    original = trainer._run_outer_step_now

    def record(*args, **kwargs):
        steps.append(trainer.state.global_step)
        return original(*args, **kwargs)

    with mock.patch.object(trainer, "_run_outer_step_now", record):
        trainer.train()
    assert steps == [5, 7, 9, 11] and trainer.outer_step == 4
    assert module.strengths().tolist() != pytest.approx([1e-3] * 4)


@pytest.mark.parametrize(("settings", "steps"), [
    ({"outer_patience_ratio": 0.25}, 3),  # a quarter of the 12 steps
    ({"outer_patience_ratio": 0.25, "num_train_epochs": 3, "max_steps": -1}, 3),  # 3 epochs of 4 steps
    ({"outer_patience_ratio": 0.25, "outer_patience_epochs": 0.5}, 2),  # epochs first: half of 4 steps
    ({"outer_patience_ratio": 0.25, "outer_patience_steps": 5}, 5),  # what the user set stays
    ({}, 0),
])
def test_outer_patience_resolves_into_steps_once(tmp_path, settings, steps):
    args = bilevel_args(tmp_path, **{"max_steps": 12, "per_device_train_batch_size": 8, **settings})
    assert resolve_outer_patience(args, 32) == steps and args.outer_patience_steps == steps
    if steps:  # resolved once: a later call (the trainer's, after the script's) keeps the steps
        args.outer_patience_ratio, args.outer_patience_epochs = 0.5, None
        assert resolve_outer_patience(args, 32) == steps


@pytest.mark.parametrize("ratio", [1.0, -0.1, float("nan")])
def test_outer_patience_ratio_is_a_fraction(tmp_path, ratio):
    with pytest.raises(ValueError, match=r"`outer_patience_ratio` must be (in \[0, 1\) or None|a finite number)"):
        BilevelTrainingArguments(output_dir=str(tmp_path), use_cpu=True, outer_patience_ratio=ratio)


def test_the_outer_data_is_separate_from_the_evaluation_sets(tmp_path):
    """`eval_dataset` used to be the outer objective too: a dict of evaluation sets was refused."""
    train, outer = datasets_with_ids(32, 16)
    test = token_task(24, 0.0, seed=9)
    trainer = BilevelTrainer(model=tiny_classifier(), args=bilevel_args(tmp_path, max_steps=4, unroll_steps=2),
                             train_dataset=train, eval_dataset={"dev": outer, "test": test}, outer_dataset=outer,
                             outer_module=DataWeights(32))
    assert trainer.outer_dataset is outer and set(trainer.eval_dataset) == {"dev", "test"}
    trainer.train()
    metrics = trainer.evaluate()
    assert {"eval_dev_loss", "eval_test_loss"} <= set(metrics)
    only_outer = BilevelTrainer(model=tiny_classifier(), args=bilevel_args(tmp_path), train_dataset=train,
                                outer_dataset=outer, outer_module=DataWeights(32))
    assert only_outer.eval_dataset is only_outer.outer_dataset is outer
    with pytest.raises(ValueError, match="a dict of evaluation sets: pass the outer objective's data as `outer_dataset`"):
        BilevelTrainer(model=tiny_classifier(), args=bilevel_args(tmp_path), train_dataset=train,
                       eval_dataset={"dev": outer}, outer_module=DataWeights(32))


def test_example_weights_of_every_kind_are_those_the_inner_loss_uses(tmp_path):
    train, outer = datasets_with_ids(32, 16)
    free = _trainer(tmp_path, train, outer, outer_module="data_weights")
    with torch.no_grad():
        free.outer_module.logits.copy_(torch.linspace(-2, 2, 32))
    np.testing.assert_allclose(free.example_weights(), torch.sigmoid(torch.linspace(-2, 2, 32)).numpy(), rtol=1e-6)
    shuffled = free.train_dataset.shuffle(seed=1)  # ids travel with their rows
    np.testing.assert_allclose(free.example_weights(shuffled),
                               torch.sigmoid(torch.linspace(-2, 2, 32))[shuffled["example_id"]].numpy(), rtol=1e-6)

    loss = _trainer(tmp_path, train, outer, recipe="data_weighting", hvp_mode="rev_rev")
    got = loss.example_weights()
    assert got.shape == (32,)  # the training rows only, not the trusted ones
    model = loss._unwrapped.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(train["input_ids"]),
                       attention_mask=torch.tensor(train["attention_mask"])).logits
        expected = loss.outer_module.weights_for(per_example_loss(logits, torch.tensor(train["label"]), False))
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5)
    table = loss.weighted_dataset()
    assert table.column_names == [*train.column_names, "weight"] and len(table) == 32
    np.testing.assert_allclose(table["weight"], got, rtol=1e-6)


def test_the_weighted_dataset_is_saved_with_a_card_of_the_right_task(tmp_path):
    import datasets
    from huggingface_hub import DatasetCard

    trainer = _trainer(tmp_path, outer_module="data_weights", max_steps=2, unroll_steps=1)
    trainer.train()
    table = trainer.save_weights_dataset(str(tmp_path / "weights"))
    assert datasets.load_from_disk(str(tmp_path / "weights"))["weight"] == table["weight"]
    card = DatasetCard.load(tmp_path / "weights" / "README.md")
    assert card.data.task_categories == ["text-classification"]  # a classifier's data, not text generation
    assert "DataWeights" in card.text


def test_a_run_says_when_its_weights_carry_no_signal(tmp_path, caplog):
    """LossWeights drifted to uniform and 76 of 256 free weights never moved, and nothing said so."""
    train, outer = datasets_with_ids(32, 16)
    quiet = _trainer(tmp_path, train, outer, outer_module="data_weights", max_steps=3, unroll_steps=2,
                     hypergrad_train_batch_size=4)
    with caplog.at_level(logging.WARNING, logger="hf_integration.trainer"):
        quiet.train()
    messages = [r.getMessage() for r in caplog.records]
    assert any(re.search(r"After training, \d+ of 32 example weights never moved", m) for m in messages), messages

    caplog.clear()
    flat = _trainer(tmp_path, train, outer, outer_module="loss_weights", outer_module_options={"init_loss_scale": 1e-3},
                    hvp_mode="rev_rev", outer_learning_rate=1e-4, max_steps=4, unroll_steps=2)
    with caplog.at_level(logging.WARNING, logger="hf_integration.trainer"):
        flat.train()
    assert any("the learned data weights are nearly uniform (std/mean 0.00" in r.getMessage()
               for r in caplog.records)

    caplog.clear()
    none = _trainer(tmp_path, train, outer, outer_module="data_weights", max_steps=2, unroll_steps=5)
    with caplog.at_level(logging.WARNING, logger="hf_integration.trainer"):
        none.train()
    assert any("No outer step is scheduled: 2 inner steps" in r.getMessage() for r in caplog.records)


def test_outer_metrics_follow_logging_steps(tmp_path):
    """They were logged at every outer step, whatever logging_steps and logging_strategy said."""
    train, outer = datasets_with_ids(32, 16)
    every_third = _trainer(tmp_path, train, outer, outer_module="data_weights", max_steps=6, unroll_steps=1,
                           logging_steps=3)
    every_third.train()
    logged = [entry for entry in every_third.state.log_history if "outer/loss" in entry]
    assert [entry["step"] for entry in logged] == [3, 6] and all("loss" in entry for entry in logged)
    assert logged[-1]["outer/step"] == 5.0  # the counters of the last outer step (after steps 2..6)
    silent = _trainer(tmp_path, train, outer, outer_module="data_weights", max_steps=4, unroll_steps=1,
                      logging_strategy="no")
    silent.train()
    assert not [entry for entry in silent.state.log_history if any(k.startswith("outer/") for k in entry)]


def test_library_log_lines_follow_log_level(tmp_path, caplog):
    train, outer = datasets_with_ids(32, 16)
    trainer = _trainer(tmp_path, train, outer, outer_module="data_weights", max_steps=2, unroll_steps=5,
                       log_level="error")
    with caplog.at_level(logging.NOTSET):
        logging.getLogger("hf_integration.trainer").setLevel(logging.ERROR)  # as the trainer set it
        trainer.train()
    assert not any("No outer step is scheduled" in r.getMessage() for r in caplog.records)
    assert logging.getLogger("hf_integration").level == logging.ERROR
