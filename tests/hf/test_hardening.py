"""Hardening of `BilevelTrainingArguments` and `BilevelTrainer`: every float finite, no silent no-op run,
NaN/inf inner steps skipped and bounded, outer steps rolled back, nothing non-finite saved or logged, and
resume refusing incomplete, corrupt or foreign checkpoints with a message naming the file."""

from __future__ import annotations

import math
import os
import shutil
from unittest import mock

import pytest
import torch

from hf_integration import BilevelTrainer, BilevelTrainingArguments, DataWeights, LoraRegularization
from hf_integration.checkpoints import CheckpointError
from hf_integration.serialization import OUTER_OPTIMIZER_NAME
from hf_integration.training_callbacks import NonFiniteGuard
from hypergrad.outer_step import NonFiniteError

from .trainer_utils import bilevel_args, datasets_with_ids, tiny_classifier

# ---------------------------------------------------------------------- arguments


@pytest.mark.parametrize("bad, match", [
    ({"outer_learning_rate": math.inf}, r"`outer_learning_rate` must be a finite number, got inf"),
    ({"nystrom_rho": math.inf}, r"`nystrom_rho` must be a finite number"),
    ({"nystrom_rho": math.nan}, r"`nystrom_rho` must be a finite number"),
    ({"learning_rate": math.nan}, r"`learning_rate` must be a finite number"),
    ({"max_grad_norm": math.inf}, r"`max_grad_norm` must be a finite number"),
    ({"learning_rate": 0.0}, r"`learning_rate` must be > 0"),
    ({"weight_decay": -0.1}, r"`weight_decay` must be >= 0"),
    ({"adam_beta2": 1.0}, r"`adam_beta2` must be in \[0, 1\)"),
    ({"outer_momentum": -0.5}, r"`outer_momentum` must be in \[0, 1\)"),
    ({"per_device_train_batch_size": 0}, r"`per_device_train_batch_size` must be a positive integer"),
    ({"per_device_eval_batch_size": 0}, r"`per_device_eval_batch_size` must be a positive integer"),
    ({"gradient_accumulation_steps": 0}, r"`gradient_accumulation_steps` must be a positive integer"),
    ({"max_steps": 0}, r"no training step would run \(max_steps=0"),
    ({"num_train_epochs": 0.0}, r"no training step would run \(max_steps=-1, num_train_epochs=0.0\)"),
])
def test_arguments_refuse_non_finite_non_positive_and_no_op_values(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        BilevelTrainingArguments(output_dir=str(tmp_path), use_cpu=True, **bad)


# ---------------------------------------------------------------------- non-finite inner steps


def _nan_loss_at(steps):
    """Patch `compute_loss` so that training batches of the given global steps have a NaN loss."""
    original = BilevelTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        if model.training and (steps == "all" or self.state.global_step in steps):
            return loss * math.nan
        return loss

    return mock.patch.object(BilevelTrainer, "compute_loss", compute_loss)


def _trainer(tmp_path, train=None, val=None, **overrides):
    if train is None:
        train, val = datasets_with_ids(32, 16)
    args = bilevel_args(tmp_path, **{"max_steps": 6, "unroll_steps": 2, "per_device_train_batch_size": 8,
                                     "logging_steps": 1, **overrides})
    return BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=val,
                          outer_module=DataWeights(len(train)))


def test_one_nan_batch_is_skipped_and_poisons_nothing(tmp_path, caplog):
    trainer = _trainer(tmp_path)
    with _nan_loss_at({2}), caplog.at_level("WARNING", logger="hf_integration.trainer"):
        trainer.train()
    assert trainer.state.global_step == 6 and trainer.nonfinite_guard.skipped == 1
    assert any("Inner step 3 skipped: non-finite training loss (nan)" in r.getMessage() for r in caplog.records)
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    assert all(bool(torch.isfinite(p).all()) for p in trainer.outer_module.parameters())
    logged = [v for entry in trainer.state.log_history for v in entry.values() if isinstance(v, float)]
    assert all(math.isfinite(v) for v in logged)  # the skipped step's grad_norm (NaN) is not logged
    assert any(entry.get("inner/skipped_steps") == 1.0 for entry in trainer.state.log_history)
    trainer.save_model(str(tmp_path / "saved"))
    assert DataWeights.from_pretrained(str(tmp_path / "saved")).num_examples == 32


def test_persistent_nan_stops_training_with_the_step_and_cause(tmp_path):
    trainer = _trainer(tmp_path, max_steps=20)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    match = r"training stopped at inner step 5: 5 steps in a row had NaN/inf values \(last: non-finite training loss"
    with _nan_loss_at("all"), pytest.raises(NonFiniteError, match=match):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_a_run_without_any_applied_step_fails(tmp_path):
    trainer = _trainer(tmp_path, max_steps=3, unroll_steps=1)
    with _nan_loss_at("all"), pytest.raises(NonFiniteError, match="no inner step could be applied: all 3"):
        trainer.train()


def test_guard_stops_when_an_optimizer_step_makes_a_parameter_non_finite(tmp_path):
    guard = NonFiniteGuard()
    model = torch.nn.Linear(2, 1)
    args = BilevelTrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    state = mock.Mock(global_step=6)
    guard.on_optimizer_step(args, state, None, model=model)  # finite: nothing happens
    with torch.no_grad():
        model.bias.fill_(math.inf)
    with pytest.raises(NonFiniteError, match=r"inner step 7: the optimizer step made bias non-finite"):
        guard.on_optimizer_step(args, state, None, model=model)


def test_guard_skips_non_finite_gradients_of_a_plain_trainer_step(tmp_path):
    guard = NonFiniteGuard(max_consecutive=2)
    model = torch.nn.Linear(2, 1)
    model.weight.grad = torch.tensor([[1.0, math.nan]])
    model.bias.grad = torch.ones(1)
    args = BilevelTrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    guard.on_pre_optimizer_step(args, mock.Mock(global_step=0), None, model=model, optimizer=None)
    assert model.weight.grad is None and model.bias.grad is None and guard.skipped == 1
    model.weight.grad = torch.full((1, 2), math.inf)
    with pytest.raises(NonFiniteError, match=r"inner step 2: 2 steps in a row .*non-finite gradient of weight"):
        guard.on_pre_optimizer_step(args, mock.Mock(global_step=1), None, model=model, optimizer=None)


def test_save_refuses_non_finite_parameters(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.train()
    name, param = next((n, p) for n, p in trainer.model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        param[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match=rf"refusing to save to .*saved.*: {name} holds NaN/inf"):
        trainer.save_model(str(tmp_path / "saved"))
    assert not (tmp_path / "saved").exists() or not os.listdir(tmp_path / "saved")


# ---------------------------------------------------------------------- outer safeguards (wired in outer_update)


def test_exploding_hypergradient_steps_are_rolled_back_and_counted(tmp_path):
    """nystrom_rho=1e-30 gives hypergradient norms ~1e27; Adam's squared average overflows float32, which would
    freeze the weights silently. Every such step is rolled back and counted as skipped."""
    trainer = _trainer(tmp_path, nystrom_rho=1e-30)
    trainer.train()
    assert trainer.outer_step == 2
    assert (trainer.outer_history.applied, trainer.outer_history.skipped) == (0, 2)
    assert trainer.skipped_outer_steps == 2
    assert torch.equal(trainer.outer_module.logits.detach(), torch.zeros(32))
    assert all(bool(torch.isfinite(v).all()) for s in trainer.outer_optimizer.state.values()
               for v in s.values() if torch.is_tensor(v))


def test_outer_step_making_the_inner_objective_non_finite_is_rolled_back(tmp_path):
    train, val = datasets_with_ids(32, 16)
    model = tiny_classifier()
    reg = LoraRegularization.from_peft_model(model, granularity="global", init_log_strength=0.0)
    args = bilevel_args(tmp_path, max_steps=6, unroll_steps=2, per_device_train_batch_size=8,
                        outer_learning_rate=1000.0, outer_optim="sgd", outer_momentum=0.0)
    trainer = BilevelTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, outer_module=reg)
    with mock.patch.object(BilevelTrainer, "compute_hypergradient",
                           lambda self, *a, **k: {"outer_module.log_strength": torch.tensor([-1.0])}):
        trainer.train()  # each step would move log_strength to +1000: exp overflows, the penalty is inf
    assert trainer.outer_history.skip_causes == {"non-finite inner objective": 2}
    assert torch.equal(reg.log_strength.detach(), torch.zeros(1))


# ---------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A finished run with checkpoints at steps 2 and 4 (and its data)."""
    out = tmp_path_factory.mktemp("checkpointed")
    train, val = datasets_with_ids(32, 16)
    trainer = _trainer(out, train, val, max_steps=4, save_strategy="steps", save_steps=2)
    trainer.train()
    return out, train, val


def _copy(checkpointed, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(checkpointed[0], out)
    return out


def test_resume_refuses_a_checkpoint_without_outer_optimizer_state(checkpointed, tmp_path):
    out = _copy(checkpointed, tmp_path)
    os.remove(out / "checkpoint-2" / OUTER_OPTIMIZER_NAME)
    trainer = _trainer(out, *checkpointed[1:], max_steps=4)
    with pytest.raises(CheckpointError, match=rf"checkpoint-2' has no {OUTER_OPTIMIZER_NAME}"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))


def test_resume_refuses_a_checkpoint_learned_on_other_data_of_the_same_size(checkpointed, tmp_path):
    out = _copy(checkpointed, tmp_path)
    other, val = datasets_with_ids(32, 16, seed=5)
    trainer = _trainer(out, other, val, max_steps=4)
    with pytest.raises(CheckpointError, match=r"fingerprint was saved as '\w+' but '\w+' is expected"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))


def test_resume_names_a_corrupt_optimizer_file(checkpointed, tmp_path):
    out = _copy(checkpointed, tmp_path)
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"not a pickle")
    trainer = _trainer(out, *checkpointed[1:], max_steps=4)
    with pytest.raises(CheckpointError, match=r"checkpoint-2'.*optimizer.pt, scheduler.pt\) failed"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    (out / "checkpoint-4" / OUTER_OPTIMIZER_NAME).write_bytes(b"\x00" * 5)
    trainer = _trainer(out, *checkpointed[1:], max_steps=4)
    with pytest.raises(CheckpointError, match=r"outer_optimizer.safetensors' is not a valid safetensors file \(.*header too small"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))


def test_resume_true_skips_an_incomplete_last_checkpoint(checkpointed, tmp_path, caplog):
    out = _copy(checkpointed, tmp_path)
    os.remove(out / "checkpoint-4" / "trainer_state.json")  # a save killed midway
    trainer = _trainer(out, *checkpointed[1:], max_steps=4)
    loaded = []
    original = BilevelTrainer._load_optimizer_and_scheduler
    with caplog.at_level("WARNING", logger="hf_integration.checkpoints"), mock.patch.object(
            BilevelTrainer, "_load_optimizer_and_scheduler",
            lambda self, checkpoint: (loaded.append(checkpoint), original(self, checkpoint))):
        trainer.train(resume_from_checkpoint=True)
    assert any("Skipping incomplete checkpoint" in r.getMessage() and "checkpoint-4" in r.getMessage()
               for r in caplog.records)
    assert loaded == [str(out / "checkpoint-2")] and trainer.state.global_step == 4
    shutil.rmtree(out)
    out.mkdir()
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        _trainer(out, *checkpointed[1:], max_steps=4).train(resume_from_checkpoint=True)


def test_resume_restores_the_skip_counts(checkpointed, tmp_path):
    out = tmp_path / "nan"
    train, val = checkpointed[1:]
    with _nan_loss_at({1}):
        _trainer(out, train, val, max_steps=4, save_strategy="steps", save_steps=2).train()
    resumed = _trainer(out, train, val, max_steps=4)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert resumed.nonfinite_guard.skipped == 1


def test_resume_refuses_a_checkpoint_without_random_states(checkpointed, tmp_path):
    """Without rng_state.pth Trainer would resume with fresh random states (a run that differs by 1e-3)."""
    out = _copy(checkpointed, tmp_path)
    os.remove(out / "checkpoint-2" / "rng_state.pth")
    with pytest.raises(CheckpointError, match=r"checkpoint-2' has no rng_state.pth"):
        _trainer(out, *checkpointed[1:], max_steps=4).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    trainer = _trainer(out, *checkpointed[1:], max_steps=4)
    (out / "checkpoint-4" / "rng_state.pth").rename(out / "checkpoint-4" / "rng_state_0.pth")  # two processes saved
    shutil.copy(out / "checkpoint-4" / "rng_state_0.pth", out / "checkpoint-4" / "rng_state_1.pth")
    with pytest.raises(CheckpointError, match=r"no rng_state.pth for 1 process\(es\) \(it holds \['rng_state_0.pth', "
                                              r"'rng_state_1.pth'\]\); resume with as many processes"):
        trainer._load_rng_state(str(out / "checkpoint-4"))


@pytest.mark.parametrize("lr, message", [(math.nan, "learning rate nan"), (math.inf, "learning rate inf"),
                                         ("0.3", "learning rate '0.3'")])
def test_resume_refuses_a_poisoned_outer_learning_rate(checkpointed, tmp_path, lr, message):
    """A NaN outer learning rate used to roll back every later outer step and exit 0 (and re-save NaN)."""
    from hf_integration import load_optimizer_state, save_optimizer_state

    out = _copy(checkpointed, tmp_path)
    path = out / "checkpoint-2" / OUTER_OPTIMIZER_NAME
    state = load_optimizer_state(path)
    state["param_groups"][0]["lr"] = lr
    save_optimizer_state(state, path)
    with pytest.raises(CheckpointError, match=rf"checkpoint-2.*parameter group 0 has {message}.*corrupt"):
        _trainer(out, *checkpointed[1:], max_steps=4).train(resume_from_checkpoint=str(out / "checkpoint-2"))


@pytest.mark.parametrize("step, message", [(-5, "global_step=-5, not an integer >= 0"),
                                           (10**12, "but the folder is the checkpoint of step 2")])
def test_resume_refuses_an_impossible_step(checkpointed, tmp_path, step, message):
    """global_step -5 used to train from step -5 and write checkpoint--2; 1e12 hung recounting outer steps."""
    import json

    out = _copy(checkpointed, tmp_path)
    path = out / "checkpoint-2" / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "global_step": step}))
    with pytest.raises(CheckpointError, match=message):
        _trainer(out, *checkpointed[1:], max_steps=4).train(resume_from_checkpoint=str(out / "checkpoint-2"))


def test_resume_with_loss_weights_refuses_other_data(tmp_path):
    """LossWeights index no examples, but what they learned depends on the data: the fingerprint is checked."""
    from hf_integration import LossWeights

    def trainer(out, train, val):
        args = bilevel_args(out, max_steps=4, unroll_steps=2, per_device_train_batch_size=8, save_strategy="steps",
                            save_steps=2, hvp_mode="rev_rev")
        return BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=val,
                              outer_module=LossWeights())

    train, val = datasets_with_ids(32, 16)
    trainer(tmp_path, train, val).train()
    other, _ = datasets_with_ids(32, 16, seed=5)
    with pytest.raises(CheckpointError, match=r"fingerprint was saved as '\w+' but '\w+' is expected"):
        trainer(tmp_path, other, val).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    trainer(tmp_path, train, val).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))  # the same data


def test_data_weights_refuse_shared_example_ids(tmp_path):
    """Every row with the same id used to share one weight, silently."""
    train, val = datasets_with_ids(32, 16)
    same = train.remove_columns("example_id").add_column("example_id", [0] * len(train))
    with pytest.raises(ValueError, match=r"gives 31 row\(s\) the id of another row \(id 0 is shared by 32 rows, the "
                                         r"first at row 0\).*add_example_ids"):
        BilevelTrainer(model=tiny_classifier(), args=bilevel_args(tmp_path), train_dataset=same, eval_dataset=val,
                       outer_module=DataWeights(32))


def test_saved_metadata_never_holds_a_local_path(tmp_path):
    """A training file's absolute path used to reach the safetensors header, outer_config.json and the card."""
    train, val = datasets_with_ids(32, 16)
    secret = str(tmp_path / "home" / "alice" / "private" / "train.csv")
    args = bilevel_args(tmp_path / "run", max_steps=2, unroll_steps=1, per_device_train_batch_size=8)
    trainer = BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=val,
                             outer_module=DataWeights(len(train)), dataset_name=secret)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    for name in ("outer_params.safetensors", "outer_config.json", "README.md"):  # Trainer's own files aside
        data = (tmp_path / "saved" / name).read_bytes()
        assert b"alice" not in data and str(tmp_path).encode() not in data, name
    assert DataWeights.from_pretrained(str(tmp_path / "saved")).metadata["dataset_name"] == "train.csv"


def test_an_iterable_dataset_is_refused_in_one_line(tmp_path):
    train, val = datasets_with_ids(32, 16)
    with pytest.raises(TypeError, match=r"`train_dataset` must be a map-style dataset .* got IterableDataset: the outer "
                                        r"problem draws random batches by index"):
        BilevelTrainer(model=tiny_classifier(), args=bilevel_args(tmp_path), train_dataset=train.to_iterable_dataset(),
                       eval_dataset=val, outer_module=DataWeights(32))


def test_resuming_from_the_last_steps_checkpoint_trains_no_step_more(tmp_path):
    """Trainer trains one extra step when max_steps ends inside an epoch (6 steps of 4 a epoch here) and the run is
    resumed from its last checkpoint: a script killed after that checkpoint ended one step past the run."""
    from transformers import Trainer

    train, val = datasets_with_ids(32, 16)
    full = _trainer(tmp_path, train, val, max_steps=6, save_strategy="steps", save_steps=2)
    full.train()
    resumed = _trainer(tmp_path, train, val, max_steps=6)
    with mock.patch.object(Trainer, "training_step", side_effect=AssertionError("trained")):
        output = resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert output.global_step == resumed.state.global_step == 6 and resumed.outer_step == full.outer_step
    assert torch.equal(resumed.outer_module.logits, full.outer_module.logits)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match=r"checkpoint of step 6, beyond max_steps=4"):
        _trainer(tmp_path, train, val, max_steps=4).train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
