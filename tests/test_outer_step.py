"""`hypergrad.outer_step.apply_outer_update`: non-finite and exploding hypergradients dropped, non-finite
results rolled back (parameters and optimizer state), the history's counts; and its use in `BaseSolver`."""

from __future__ import annotations

import math

import pytest
import torch

from hypergrad.outer_step import NonFiniteError, OuterStepHistory, apply_outer_update, first_non_finite

from test_solver import make_ridge_solver


def _params(values=(1.0, 2.0)):
    return {"w": torch.nn.Parameter(torch.tensor(values))}


def _state_copy(optimizer):
    return {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for p, s in optimizer.state.items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        for name in a[key]:
            assert torch.equal(torch.as_tensor(a[key][name]), torch.as_tensor(b[key][name])), name


def test_finite_hypergradient_steps_and_clears_grad():
    params = _params()
    optimizer = torch.optim.SGD(params.values(), lr=0.5)
    history = OuterStepHistory()
    result = apply_outer_update(optimizer, params, {"w": torch.tensor([2.0, -2.0])}, history)
    assert result.applied and result.reason == "" and result.norm == pytest.approx(math.sqrt(8))
    assert torch.equal(params["w"].detach(), torch.tensor([0.0, 3.0]))
    assert params["w"].grad is None
    assert (history.applied, history.skipped, history.norms) == (1, 0, [pytest.approx(math.sqrt(8))])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_hypergradient_changes_nothing(bad):
    params = _params()
    optimizer = torch.optim.Adam(params.values(), lr=0.1)
    history = OuterStepHistory()
    apply_outer_update(optimizer, params, {"w": torch.ones(2)}, history)
    before, state = params["w"].detach().clone(), _state_copy(optimizer)
    result = apply_outer_update(optimizer, params, {"w": torch.tensor([1.0, bad])}, history)
    assert not result.applied and result.cause == "non-finite hypergradient" and math.isnan(result.norm)
    assert torch.equal(params["w"].detach(), before) and params["w"].grad is None
    _assert_same_state(_state_copy(optimizer), state)
    assert history.skip_causes == {"non-finite hypergradient": 1} and history.norms == [2 ** 0.5]


def test_adam_state_overflow_is_rolled_back():
    """A hypergradient of norm ~1e27 (Nyström with rho=1e-30) is finite, but Adam squares it: the float32
    second moment becomes inf and the parameters would freeze forever. Parameters and state are rolled back."""
    params = _params()
    optimizer = torch.optim.Adam(params.values(), lr=0.1)
    apply_outer_update(optimizer, params, {"w": torch.ones(2)})
    before, state = params["w"].detach().clone(), _state_copy(optimizer)
    history = OuterStepHistory()
    result = apply_outer_update(optimizer, params, {"w": torch.tensor([1e27, -1e27])}, history)
    assert not result.applied and result.cause == "non-finite outer optimizer state after the step"
    assert "rolled back" in result.reason
    assert torch.equal(params["w"].detach(), before)
    _assert_same_state(_state_copy(optimizer), state)
    assert apply_outer_update(optimizer, params, {"w": torch.ones(2)}, history).applied  # still usable


def test_non_finite_parameters_after_step_are_rolled_back():
    params = _params((3e38, 1.0))
    optimizer = torch.optim.SGD(params.values(), lr=1.0, momentum=0.9)
    result = apply_outer_update(optimizer, params, {"w": torch.tensor([-3e38, 0.0])})
    assert not result.applied and result.cause == "non-finite outer parameters after the step"
    assert torch.equal(params["w"].detach(), torch.tensor([3e38, 1.0]))
    assert not optimizer.state  # the momentum buffer created by the rolled-back step is gone too


def test_validate_rejects_and_rolls_back():
    params = _params()
    optimizer = torch.optim.SGD(params.values(), lr=1.0)
    result = apply_outer_update(optimizer, params, {"w": torch.ones(2)},
                                validate=lambda: "non-finite inner objective: inf with the new outer parameters")
    assert not result.applied and result.cause == "non-finite inner objective"
    assert torch.equal(params["w"].detach(), torch.tensor([1.0, 2.0]))


def test_exploding_norm_is_refused_then_a_lasting_scale_is_accepted():
    params = _params((0.0, 0.0))
    optimizer = torch.optim.SGD(params.values(), lr=1e-3)
    history = OuterStepHistory(explosion_factor=100.0, min_history=3, window=6)
    for _ in range(3):
        assert apply_outer_update(optimizer, params, {"w": torch.tensor([1.0, 0.0])}, history).applied
    before = params["w"].detach().clone()
    spike = apply_outer_update(optimizer, params, {"w": torch.tensor([1e6, 0.0])}, history)
    assert not spike.applied and spike.cause == "exploding hypergradient" and "median 1" in spike.reason
    assert torch.equal(params["w"].detach(), before)
    assert apply_outer_update(optimizer, params, {"w": torch.tensor([2.0, 0.0])}, history).applied
    # a new scale that persists fills the window and is then accepted
    outcomes = [apply_outer_update(optimizer, params, {"w": torch.tensor([1e6, 0.0])}, history).applied
                for _ in range(4)]
    assert outcomes[:2] == [False, False] and outcomes[-1] is True
    assert history.describe().startswith(f"{history.applied} outer steps applied, {history.skipped} skipped")


def test_history_state_dict_round_trip():
    history = OuterStepHistory()
    params = _params()
    optimizer = torch.optim.SGD(params.values(), lr=0.1)
    apply_outer_update(optimizer, params, {"w": torch.ones(2)}, history)
    apply_outer_update(optimizer, params, {"w": torch.full((2,), math.nan)}, history)
    restored = OuterStepHistory()
    restored.load_state_dict(history.state_dict())
    assert restored.state_dict() == history.state_dict()
    assert restored.describe() == "1 outer steps applied, 1 skipped (non-finite hypergradient: 1)"


def test_without_optimizer_only_accumulates():
    params = _params()
    apply_outer_update(None, params, {"w": torch.ones(2)})
    apply_outer_update(None, params, {"w": torch.ones(2)})
    assert torch.equal(params["w"].grad, torch.full((2,), 2.0))
    assert not apply_outer_update(None, params, {"w": torch.full((2,), math.inf)}).applied
    assert params["w"].grad is None


def test_structure_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        apply_outer_update(None, _params(), {"w": torch.ones(3)})


def test_first_non_finite_names_the_tensor():
    tensors = {"a": torch.ones(3), "ids": torch.arange(3), "b": torch.tensor([1.0, math.inf]), "c": torch.zeros(0)}
    assert first_non_finite(tensors) == "b"
    assert first_non_finite({"a": torch.ones(2)}) is None and first_non_finite({}) is None
    assert issubclass(NonFiniteError, FloatingPointError)


def test_base_solver_apply_outer_grad_counts_and_rolls_back():
    solver = make_ridge_solver(outer_optim=lambda m: torch.optim.Adam(m.parameters(), lr=0.1))
    assert solver.apply_outer_grad((torch.ones(1, 3),)).applied
    before = [p.detach().clone() for p in solver.outer.parameters()]
    result = solver.apply_outer_grad((torch.full((1, 3), 1e30),))
    assert not result.applied and "rolled back" in result.reason
    assert all(torch.equal(a, b) for a, b in zip(before, solver.outer.parameters()))
    assert (solver.applied_outer_steps, solver.skipped_outer_steps) == (1, 1)
    assert solver.recorder.values("skipped_outer_steps") == [1.0]
    assert all(g is None for g in solver.outer_grad)
