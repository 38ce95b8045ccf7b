"""The IHVP method table is the one place a method is declared: a toy method registered there (an options
class, a factory, one entry; CONTRIBUTING.md's recipe) trains through ``BilevelTrainingArguments`` with no
other edit, and the arguments' defaults and checks are read from the table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import torch

from hf_integration import BilevelTrainer, BilevelTrainingArguments, DataWeights
from hypergrad.methods import METHODS, IHVPMethod, argument_default, methods_reading
from hypergrad.trees import tree_scale
from hypergrad.utils import check_positive_float

from .trainer_utils import bilevel_args, datasets_with_ids, tiny_classifier


@dataclass(frozen=True)
class HalvedIdentityOptions:
    """``H^-1 ~ I / damping``: no product (a field without ``"argument"`` keeps its default in the trainer)."""

    damping: float = 2.0

    def __post_init__(self) -> None:
        check_positive_float(self.damping, "damping")


def _halved_identity(options: HalvedIdentityOptions):
    calls = []

    def solve(matvec, batched_matvec, b, reduce=None, generator=None):
        calls.append(1)
        return tree_scale(b, 1.0 / options.damping)

    solve.calls = calls
    return solve


@pytest.fixture
def toy_method(monkeypatch):
    method = IHVPMethod("halved_identity", HalvedIdentityOptions, _halved_identity, "I / damping (toy)",
                        hessian_free=True)
    monkeypatch.setitem(METHODS, method.name, method)
    return method


def _trainer(tmp_path, **overrides) -> tuple[BilevelTrainer, DataWeights]:
    train, val = datasets_with_ids(32, 16)
    weights = DataWeights(len(train))
    with torch.no_grad():
        weights.logits.normal_(generator=torch.Generator().manual_seed(3))
    args = bilevel_args(tmp_path, max_steps=4, unroll_steps=1, hvp_mode="rev_rev", **overrides)
    return BilevelTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=val,
                          outer_module=weights), weights


def test_a_registered_toy_method_trains_through_the_arguments(tmp_path, toy_method):
    trainer, weights = _trainer(tmp_path / "toy", ihvp_method="halved_identity")
    before = weights.logits.detach().clone()
    trainer.train()
    assert len(trainer.ihvp_solver.calls) == trainer.outer_step == 3  # outer steps after inner steps 1, 2, 3
    assert not torch.equal(weights.logits.detach(), before)
    trainer.save_model(str(tmp_path / "saved"))
    loaded = DataWeights.from_pretrained(str(tmp_path / "saved"))
    assert loaded.metadata["method"] == "halved_identity" and loaded.metadata["damping"] == "2.0"


def test_the_toy_methods_hypergradient_is_identitys_at_half_scale(tmp_path, toy_method):
    toy, _ = _trainer(tmp_path / "toy", ihvp_method="halved_identity")
    reference, _ = _trainer(tmp_path / "identity", ihvp_method="identity", identity_scale=0.5)
    train_batch, eval_batch, _ = toy._batches(step=1)
    ours = toy.compute_hypergradient(train_batch, eval_batch, torch.Generator().manual_seed(0))
    theirs = reference.compute_hypergradient(train_batch, eval_batch, torch.Generator().manual_seed(0))
    assert ours["outer_module.logits"].abs().sum() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


def test_argument_defaults_and_checks_come_from_the_table(monkeypatch):
    fields = {f.name: f.default for f in dataclasses.fields(BilevelTrainingArguments)}
    for method in METHODS.values():
        for option in dataclasses.fields(method.options):
            if "argument" in option.metadata:
                assert fields[option.metadata["argument"]] == option.default, (method.name, option.name)
    assert set(methods_reading("ihvp_warm_start")) == {"cg", "nystrom_pcg"}
    with pytest.raises(ValueError, match=r"ihvp_warm_start.*\('nystrom_pcg', 'cg'\)"):
        BilevelTrainingArguments(output_dir="unused", ihvp_method="neumann", ihvp_warm_start=True)

    @dataclass(frozen=True)
    class Disagreeing:
        num_iters: int = field(default=3, metadata={"argument": "ihvp_iters", "key": "iters"})

    monkeypatch.setitem(METHODS, "disagreeing", IHVPMethod("disagreeing", Disagreeing, _halved_identity, "toy"))
    with pytest.raises(ValueError, match="ihvp_iters.*must agree on one"):
        argument_default("ihvp_iters")
