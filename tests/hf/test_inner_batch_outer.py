"""Outer steps taken inside the next inner step, on its batch (`hypergrad_on_inner_batch`,
`hf_integration.inner_batch_outer`): the hypergradient equals the sampled-batch path's on the same batches, the inner
step's loss is the objective with the new outer parameters (and backpropagates), the schedule and checkpoints are
kept, and where it cannot apply it is refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hf_integration import OUTER_OPTIMIZER_NAME, BilevelTrainer, LossWeights
from hf_integration.optimizer_state import load_optimizer_state
from hypergrad.solver import count_outer_steps

from .trainer_utils import bilevel_args, datasets_with_ids, tiny_classifier


def _trainer(tmp_path, **overrides):
    train, val = datasets_with_ids(48, 16)
    args = bilevel_args(tmp_path, **{"ihvp_method": "identity", "hvp_mode": "rev_rev", "outer_patience_steps": 0,
                                     "hypergrad_on_inner_batch": True, **overrides})
    return BilevelTrainer(model=tiny_classifier(dtype=torch.float64), args=args, train_dataset=train, eval_dataset=val,
                          outer_module=LossWeights(init_loss_scale=0.8).double())


def _captured(trainer, monkeypatch):
    captured = {}
    apply = trainer._apply_hypergradient

    def capture(step, grads, batch, outer_loss, ihvp_time):
        captured.update(step=step, grads={k: v.clone() for k, v in grads.items()}, outer_loss=outer_loss)
        return apply(step, grads, batch, outer_loss, ihvp_time)

    monkeypatch.setattr(trainer, "_apply_hypergradient", capture)
    return captured


def test_the_inner_step_takes_the_outer_step_on_its_batch(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)
    assert trainer.takes_outer_steps_on_inner_batches
    trainer.resolve_hvp_mode()
    trainer.state.global_step = 3  # the step after inner iteration 2, which unroll_steps=2 schedules
    batch = trainer._sample_batch(trainer.train_dataset, 16, torch.Generator().manual_seed(5), "training")
    _, eval_batch, generator = trainer._batches(3, with_training=False)
    expected = trainer.compute_hypergradient(batch, eval_batch, generator)  # the sampled-batch path, same batches
    trainer.__dict__.pop("_hypergradient_losses", None)
    trainer.__dict__.pop("_last_outer_loss", None)
    captured = _captured(trainer, monkeypatch)
    model = trainer.model.train()
    before = {k: v.detach().clone() for k, v in trainer._outer_param_tree().items()}

    loss = trainer.compute_loss(model, batch)

    assert captured["step"] == 3 and trainer.outer_step == 1
    for key, value in expected.items():
        assert value.abs().max() > 0
        torch.testing.assert_close(captured["grads"][key], value, rtol=1e-6, atol=1e-12)
    after = {k: v.detach() for k, v in trainer._outer_param_tree().items()}
    assert any(not torch.equal(before[k], after[k]) for k in after)  # the outer optimizer stepped
    # the returned loss: the objective of the batch with the new outer parameters, with its graph intact
    params = trainer._inner_param_tree()
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    fresh, _ = trainer._objective(model, None, after, batch, weighted=True)
    torch.testing.assert_close(loss, fresh, rtol=1e-12, atol=0)
    for g, f in zip(grads, torch.autograd.grad(fresh, list(params.values()), allow_unused=True)):
        assert (g is None) == (f is None)
        if g is not None:
            torch.testing.assert_close(g, f, rtol=1e-10, atol=1e-14)
    assert not trainer._outer_step_due_in_inner_step()  # once per optimizer step (gradient accumulation)
    trainer.state.global_step = 4  # after iteration 3: nothing scheduled
    assert not trainer._outer_step_due_in_inner_step()


def test_an_outer_step_gathers_hypergrad_train_batch_size_rows_from_consecutive_batches(tmp_path, monkeypatch):
    # 32 rows from two batches of 16: the first leaves the outer step open, the second applies it
    trainer = _trainer(tmp_path, hypergrad_train_batch_size=32)
    trainer.resolve_hvp_mode()
    trainer.state.global_step = 3
    batches = [trainer._sample_batch(trainer.train_dataset, 16, torch.Generator().manual_seed(s), "training")
               for s in (5, 6)]
    _, eval_batch, generator = trainer._batches(3, with_training=False)
    # at the same inner weights the window's rule is the mean of the sampled path's hypergradients of its batches
    expected = [trainer.compute_hypergradient(b, eval_batch, generator) for b in batches]
    trainer.__dict__.pop("_hypergradient_losses", None)
    captured = _captured(trainer, monkeypatch)
    model = trainer.model.train()
    before = {k: v.detach().clone() for k, v in trainer._outer_param_tree().items()}

    trainer.compute_loss(model, batches[0])
    assert not captured and trainer.outer_window_state()["rows"] == 16 and trainer._outer_step_pending()
    assert all(torch.equal(before[k], v) for k, v in trainer._outer_param_tree().items())
    trainer.state.global_step = 4  # the next inner step (its weights unchanged here: compute_loss takes no step)
    trainer.compute_loss(model, batches[1])

    assert captured["step"] == 3 and trainer.outer_window_state() is None and trainer.outer_step == 1
    for key in expected[0]:
        torch.testing.assert_close(captured["grads"][key], (expected[0][key] + expected[1][key]) / 2, rtol=1e-6,
                                   atol=1e-12)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_run_takes_every_scheduled_outer_step(tmp_path, accumulation):
    # iterations 2, 4, 6 are taken inside the next inner step; 8, the last, after it on a sampled batch
    trainer = _trainer(tmp_path, max_steps=9, per_device_train_batch_size=16 // accumulation,
                       gradient_accumulation_steps=accumulation)
    calls = []
    sampled = trainer.outer_update
    trainer.outer_update = lambda: calls.append(trainer.state.global_step) or sampled()
    trainer.train()
    assert trainer.outer_step == count_outer_steps(9, 2, 0) == 4
    assert calls == [9]
    assert trainer.outer_history.applied == 4
    assert trainer.outer_steps_seconds > 0  # both kinds of outer step are timed


@pytest.mark.parametrize("rows, save", [(None, 3), (32, 4)])
def test_a_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path, rows, save):
    # rows=None: the checkpoint at step 3 is saved before the outer step scheduled after iteration 2, which the
    # resumed run's first inner step then takes. rows=32: that outer step's window takes the batches of iterations 3
    # and 4, and the checkpoint after iteration 3 holds it open, with its first batch's mixed product.
    kwargs = {"max_steps": 8, "save_strategy": "steps", "save_steps": save, "hypergrad_train_batch_size": rows}
    full = _trainer(tmp_path / "full", **kwargs)
    full.train()
    checkpoint = tmp_path / "full" / f"checkpoint-{save}"
    window = load_optimizer_state(checkpoint / OUTER_OPTIMIZER_NAME)["bilevel_counters"].get("outer_window")
    assert (window is None) if rows is None else (window["step"] == 3 and window["rows"] == 16)
    # either way the checkpoint holds the outer state before that step: the initial loss scale
    saved = load_file(str(checkpoint / "outer_params.safetensors"))
    initial = LossWeights(init_loss_scale=0.8).double().state_dict()
    assert saved.keys() == initial.keys() and all(torch.equal(saved[k], initial[k]) for k in saved)
    resumed = _trainer(tmp_path / "resumed", **kwargs)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.outer_step == full.outer_step == count_outer_steps(8, 2, 0)
    # the adapter is float32 (PEFT's), and a resumed run reloads float32 optimizer state: tolerances that hold across
    # CPUs, far below what one outer step moves (the loss scale) or one inner step moves (the adapter)
    for key, value in full._outer_param_tree().items():
        torch.testing.assert_close(resumed._outer_param_tree()[key], value, rtol=1e-5, atol=1e-9)
    for key, value in full._inner_param_tree().items():
        torch.testing.assert_close(resumed._inner_param_tree()[key], value, rtol=1e-4, atol=1e-8)


def test_it_is_refused_where_it_cannot_apply(tmp_path):
    with pytest.raises(ValueError, match="hypergrad_on_inner_batch=True does not apply with .*ihvp_method='nystrom'"):
        _trainer(tmp_path, ihvp_method="nystrom")
    args = bilevel_args(tmp_path, recipe="data_weighting", hvp_mode="rev_rev")
    assert args.hypergrad_on_inner_batch is False  # not the recipe's: it costs outcome under pairwise noise
