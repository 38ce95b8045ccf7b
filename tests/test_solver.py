"""The bilevel driver of :mod:`hypergrad.solver`.

Ground truth: the user-facing spec (``/work/shared/seed-solver.md``): its ``Solver`` example
is copied below verbatim and must lower the validation loss on a problem where weight
decay helps; the schedule ``i > 0 and i >= outer_patience_iters and i % unroll_steps == 0``
is checked by recording the iterations of every outer update; loaders, gradient
accumulation, non-finite hypergradients, functional-model helpers and metrics are checked
against direct expectations on tiny models.
"""

import copy
import functools
import logging
import math
import warnings

import pytest
import torch

# ---------------------------------------------------------------------------------------
# The spec's example, AS WRITTEN in seed-solver.md (imports included).
# ---------------------------------------------------------------------------------------
from functorch import grad_and_value, make_functional
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim import SGD
from torch.utils.data import DataLoader, TensorDataset

from hypergrad.approx_hypergrad import conjugate_gradient, nystrom
from hypergrad.optimizers import diff_sgd
from hypergrad.solver import BaseImplicitSolver, BaseSolver, count_outer_steps, is_outer_step
from hypergrad.utils import Params


class Solver(BaseImplicitSolver):
    def inner_forward(self,
                      in_params: Params,
                      out_params: Params,
                      input: Tensor,
                      target: Tensor
                      ) -> Tensor:
        # forward computation of the inner problem
        output = self.inner_func(in_params, input)
        loss = F.binary_cross_entropy_with_logits(output, target)
        weight_decay = sum([(_in.pow(2) * _out).sum() 
                            for _in, _out in zip(in_params, out_params)])
        return loss + weight_decay / 2  # (1)

    def inner_update(self) -> None:
        # update rule of the inner problem
        input, target = next(self.inner_loader)  # (2)
        grads, loss = grad_and_value(self.inner_forward)(self.inner_params, 
                                                         tuple(self.outer.parameters()), 
                                                         input,
                                                         target)
        self.inner_params, self.inner_optim_state = self.inner_optimizer(self.inner_params,
                                                                         grads,
                                                                         self.inner_optim_state)

    def outer_forward(self,
                      in_params: Params,
                      out_params: Params,
                      input: Tensor,
                      target: Tensor
                      ) -> Tensor:
        # forward computation of the outer problem
        output = self.inner_func(in_params, input)  # (3)
        return F.binary_cross_entropy_with_logits(output, target)

    def outer_update(self) -> None:
        # update rule of the outer problem
        in_input, in_target = next(self.inner_loader)
        out_input, out_target = next(self.outer_loader)
        _, out_params = make_functional(self.outer, disable_autograd_tracking=True)

        # compute implicit gradients
        implicit_grads = self.approx_ihvp(lambda i, o: self.inner_forward(i, o, in_input, in_target),
                                          lambda i, o: self.outer_forward(i, o, out_input, out_target),
                                          self.inner_params, out_params)

        self.outer_grad = implicit_grads # (4)
        self.outer_optimizer.step()
        self.outer.zero_grad(set_to_none=True)
# ---------------------------------------------------------------------------------------


def build_spec_solver(dim_data, inner_loader, outer_loader, num_iters, unroll_steps, Solver=Solver,
                      outer_lr=1):
    """The spec's model/optimizer set-up, as written (``outer_lr`` only for the baseline)."""
    inner = nn.Linear(dim_data, 1, bias=False)
    nn.init.zeros_(inner.weight)
    outer = copy.deepcopy(inner)
    nn.init.ones_(outer.weight)

    inner_optimizer = functools.partial(diff_sgd, momentum=0, weight_decay=0, lr=0.1)
    outer_optimizer = SGD(outer.parameters(), weight_decay=0, momentum=0.9, lr=outer_lr)

    approx_ihvp = functools.partial(nystrom, rank=5, rho=0.1)
    solver = Solver(inner, outer, inner_loader, outer_loader, approx_ihvp,
                    inner_optimizer=inner_optimizer, outer_optimizer=outer_optimizer,
                    num_iters=num_iters, unroll_steps=unroll_steps, outer_patience_iters=0)
    return solver


# ---------------------------------------------------------------------------------------
# Small helpers for the remaining tests.
# ---------------------------------------------------------------------------------------
def regression_loaders(n=8, dim=3, batch_size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.randn(n, 1, generator=g)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch_size), DataLoader(ds, batch_size=batch_size)


class RidgeSolver(BaseImplicitSolver):
    """Linear regression with per-weight decay exp(outer.weight); functional, tuple or dict."""

    use_dict = False

    def inner_forward(self, in_params, out_params, x, y):
        pred = self.inner_func(in_params, x)
        in_leaves = list(in_params.values()) if isinstance(in_params, dict) else list(in_params)
        out_leaves = list(out_params.values()) if isinstance(out_params, dict) else list(out_params)
        # Not F.mse_loss: its forward-over-reverse derivative fails in PyTorch (pytorch#123996).
        return ((pred - y) ** 2).mean() + 0.5 * (torch.exp(out_leaves[0]) * in_leaves[0] ** 2).sum()

    def outer_forward(self, in_params, out_params, x, y):
        return ((self.inner_func(in_params, x) - y) ** 2).mean()

    def inner_update(self):
        x, y = next(self.inner_loader)
        params = self.inner_params
        if self.use_dict and not isinstance(params, dict):
            params = dict(zip(self._param_names, params))
        out = dict(self.outer.named_parameters()) if self.use_dict else tuple(self.outer.parameters())
        grads, loss = torch.func.grad_and_value(self.inner_forward)(params, out, x, y)
        self.inner_params, self.inner_optim_state = self.inner_optimizer(params, grads, self.inner_optim_state)
        return loss

    def outer_update(self):
        x, y = next(self.inner_loader)
        xv, yv = next(self.outer_loader)
        out = {k: v.detach() for k, v in self.outer.named_parameters()} if self.use_dict \
            else tuple(p.detach() for p in self.outer.parameters())
        self.outer_grad = self.approx_ihvp(lambda i, o: self.inner_forward(i, o, x, y),
                                           lambda i, o: self.outer_forward(i, o, xv, yv),
                                           self.inner_params, out)
        self.outer_optimizer.step()
        self.outer.zero_grad(set_to_none=True)
        return self.outer_forward(self.inner_params, out, xv, yv)


def make_ridge_solver(num_iters=6, unroll_steps=3, patience=0, cls=RidgeSolver, outer_optim=None,
                      inner_loader=None, **kwargs):
    torch.manual_seed(0)
    inner = nn.Linear(3, 1)
    outer = nn.Module()
    outer.weight = nn.Parameter(torch.full((1, 3), -1.0))
    default_inner_loader, outer_loader = regression_loaders()
    inner_loader = default_inner_loader if inner_loader is None else inner_loader
    outer_optimizer = outer_optim(outer) if outer_optim else SGD(outer.parameters(), lr=0.1)
    return cls(inner, outer, inner_loader, outer_loader,
               functools.partial(conjugate_gradient, num_iters=4),
               inner_optimizer=functools.partial(diff_sgd, lr=0.1, momentum=0.9),
               outer_optimizer=outer_optimizer, num_iters=num_iters, unroll_steps=unroll_steps,
               outer_patience_iters=patience, progress_bar=False, **kwargs)


# ---------------------------------------------------------------------------------------
# (a) The spec example learns useful weight decay.
# ---------------------------------------------------------------------------------------
def weight_decay_helps_data(seed, dim=20, k_signal=3, n_train=10, n_val=200, signal=0.2, scale=1.5):
    """Binary labels drawn from a logistic model on ``k_signal`` of ``dim`` features with a weak
    signal, only ``n_train`` training examples: the unregularised fit overfits, so (more, and
    per-feature) weight decay lowers the validation loss. Features are scaled by ``scale``,
    which sets how far one outer step with the spec's lr = 1 and momentum 0.9 moves the
    effective regularisation (and keeps the inner Hessian below 2 / inner lr = 20)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(dim)
    w[:k_signal] = signal
    x = torch.randn(n_train + n_val, dim, generator=g)
    y = (torch.rand(n_train + n_val, generator=g) < torch.sigmoid(x @ w)).float()[:, None]
    x = x * scale
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def test_spec_example_lowers_the_validation_loss():
    """The spec's Solver, unchanged, for 300 iterations (an outer step every 10): the
    validation loss ends below its value at the first outer update and below a run with the
    same schedule whose outer updates do nothing (outer lr = 0, weight decay fixed at 1)."""
    seed, dim_data, num_iters, unroll_steps = 9, 20, 300, 10
    (x_train, y_train), (x_val, y_val) = weight_decay_helps_data(seed, dim_data)

    def val_loss(solver, params):
        with torch.no_grad():
            return F.binary_cross_entropy_with_logits(solver.inner_func(params, x_val), y_val).item()

    class Recording(Solver):  # observes the spec's outer_update without changing it
        def outer_update(self):
            self.val_history.append(val_loss(self, self.inner_params))
            super().outer_update()

    def run(outer_lr):
        torch.manual_seed(seed)  # the Nyström sketch draws from the global generator
        inner_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=len(x_train))
        outer_loader = DataLoader(TensorDataset(x_val, y_val), batch_size=len(x_val))
        solver = build_spec_solver(dim_data, inner_loader, outer_loader, num_iters, unroll_steps,
                                   Solver=Recording, outer_lr=outer_lr)
        solver.val_history = []
        solver.run()
        return solver

    solver = run(outer_lr=1)
    final = val_loss(solver, tuple(solver.inner.parameters()))  # run() synced the module
    assert solver.skipped_outer_steps == 0 and solver.outer_step == 29
    assert len(solver.val_history) == 29 and all(math.isfinite(v) for v in solver.val_history)
    phi = solver.outer.weight.detach()
    assert torch.isfinite(phi).all() and not torch.equal(phi, torch.ones_like(phi))

    baseline = run(outer_lr=0)
    assert torch.equal(baseline.outer.weight.detach(), torch.ones(1, dim_data))
    no_outer = val_loss(baseline, tuple(baseline.inner.parameters()))

    assert final < solver.val_history[0] - 0.03
    assert final < no_outer - 0.03


# ---------------------------------------------------------------------------------------
# (b) The outer schedule.
# ---------------------------------------------------------------------------------------
class ScheduleSolver(BaseImplicitSolver):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events = []

    def inner_update(self):
        self.events.append(("inner", self.iteration))

    def outer_update(self):
        self.events.append(("outer", self.iteration))

    def post_outer_update(self):
        self.events.append(("post", self.iteration))


@pytest.mark.parametrize("num_iters, unroll_steps, patience", [
    (10, 1, 0), (10, 3, 0), (25, 5, 7), (20, 4, 12), (7, 7, 0), (30, 10, 30), (12, 2, 3), (1, 1, 0),
])
def test_outer_updates_follow_the_schedule(num_iters, unroll_steps, patience):
    solver = make_ridge_solver(num_iters, unroll_steps, patience, cls=ScheduleSolver)
    solver.run()
    expected = [i for i in range(num_iters) if i > 0 and i >= patience and i % unroll_steps == 0]
    outer = [i for kind, i in solver.events if kind == "outer"]
    assert outer == expected
    assert [i for kind, i in solver.events if kind == "inner"] == list(range(num_iters))
    # Each outer update directly follows that iteration's inner update and precedes the post hook.
    for i in expected:
        k = solver.events.index(("outer", i))
        assert solver.events[k - 1] == ("inner", i) and solver.events[k + 1] == ("post", i)
    assert [i for kind, i in solver.events if kind == "post"] == expected
    assert solver.outer_step == len(expected)
    assert [solver.is_outer_step(i) for i in range(num_iters)] == [i in expected for i in range(num_iters)]


# ---------------------------------------------------------------------------------------
# (c) Loaders.
# ---------------------------------------------------------------------------------------
class BatchRecorder(ScheduleSolver):
    def inner_update(self):
        self.events.append(("inner_batch", next(self.inner_loader)))


def test_loaders_are_infinite():
    x = torch.arange(4.0)[:, None]
    loader = DataLoader(TensorDataset(x), batch_size=2)  # 2 batches per epoch
    solver = make_ridge_solver(10, 5, cls=BatchRecorder, inner_loader=loader)
    solver.run()
    batches = [b[0] for kind, b in solver.events if kind == "inner_batch"]
    assert len(batches) == 10
    for t, batch in enumerate(batches):
        assert torch.equal(batch, x[(t % 2) * 2:(t % 2) * 2 + 2])
    assert solver.inner_loader.epoch == 4


def test_infinite_loader_reshuffles_each_epoch():
    torch.manual_seed(0)
    x = torch.arange(32.0)
    solver = make_ridge_solver(2, 1)
    loader = type(solver.inner_loader)(DataLoader(TensorDataset(x), batch_size=32, shuffle=True))
    first, second = next(loader)[0], next(loader)[0]
    assert sorted(first.tolist()) == sorted(second.tolist()) == x.tolist()
    assert not torch.equal(first, second)


def test_empty_or_one_shot_loader_gives_a_clear_error():
    inner_loader, outer_loader = regression_loaders()
    empty = DataLoader(TensorDataset(torch.zeros(0, 3), torch.zeros(0, 1)), batch_size=2)
    solver = make_ridge_solver(4, 2)
    solver.inner_loader = type(solver.inner_loader)(empty, "inner_loader")
    with pytest.raises(ValueError, match="inner_loader.*no batch"):
        solver.run()

    one_shot = (b for b in [(torch.zeros(2, 3), torch.zeros(2, 1))])
    solver = make_ridge_solver(4, 2)
    solver.inner_loader = type(solver.inner_loader)(one_shot, "inner_loader")
    next(solver.inner_loader)
    with pytest.raises(ValueError, match="re-iterable"):
        next(solver.inner_loader)

    outer = nn.Linear(3, 1)
    with pytest.raises(TypeError, match="outer_loader"):
        RidgeSolver(nn.Linear(3, 1), outer, inner_loader, 3,
                    functools.partial(conjugate_gradient, num_iters=2),
                    inner_optimizer=diff_sgd, outer_optimizer=SGD(outer.parameters(), lr=0.1),
                    num_iters=2, unroll_steps=1)


def test_empty_loader_through_the_constructor():
    inner_loader, outer_loader = regression_loaders()
    empty = DataLoader(TensorDataset(torch.zeros(0, 3), torch.zeros(0, 1)), batch_size=2)
    inner, outer = nn.Linear(3, 1), nn.Linear(3, 1, bias=False)
    solver = RidgeSolver(inner, outer, empty, outer_loader, functools.partial(conjugate_gradient, num_iters=2),
                         inner_optimizer=functools.partial(diff_sgd, lr=0.1),
                         outer_optimizer=SGD(outer.parameters(), lr=0.1), num_iters=3, unroll_steps=1,
                         progress_bar=False)
    with pytest.raises(ValueError, match="`inner_loader` yielded no batch"):
        solver.run()


# ---------------------------------------------------------------------------------------
# (d) Constructor errors.
# ---------------------------------------------------------------------------------------
def _construct(**overrides):
    inner_loader, outer_loader = regression_loaders()
    inner, outer = nn.Linear(3, 1), nn.Linear(3, 1, bias=False)
    kwargs = dict(inner=inner, outer=outer, inner_loader=inner_loader, outer_loader=outer_loader,
                  approx_ihvp=functools.partial(conjugate_gradient, num_iters=2),
                  inner_optimizer=functools.partial(diff_sgd, lr=0.1),
                  outer_optimizer=SGD(outer.parameters(), lr=0.1),
                  num_iters=10, unroll_steps=2, outer_patience_iters=0, progress_bar=False)
    kwargs.update(overrides)
    return RidgeSolver(**kwargs)


def test_constructor_accepts_valid_arguments():
    solver = _construct()
    assert solver.num_iters == 10 and solver.unroll_steps == 2 and solver.outer_patience_iters == 0


@pytest.mark.parametrize("overrides, exc, match", [
    (dict(num_iters=0), ValueError, "num_iters"),
    (dict(num_iters=-5), ValueError, "num_iters"),
    (dict(num_iters=2.5), ValueError, "num_iters"),
    (dict(unroll_steps=0), ValueError, "unroll_steps"),
    (dict(unroll_steps=-1), ValueError, "unroll_steps"),
    (dict(num_iters=3, unroll_steps=4), ValueError, "smaller than `unroll_steps`"),
    (dict(outer_patience_iters=-1), ValueError, "outer_patience_iters"),
    (dict(outer=nn.ReLU()), ValueError, "`outer` has no parameters"),
    (dict(inner=nn.ReLU()), ValueError, "`inner` has no parameters"),
    (dict(outer_optimizer=SGD(nn.Linear(3, 1).parameters(), lr=0.1)), ValueError, "not in `outer`"),
    (dict(outer_optimizer=functools.partial(SGD, lr=0.1)), TypeError, "outer_optimizer"),
    (dict(inner_optimizer="sgd"), TypeError, "inner_optimizer"),
    (dict(approx_ihvp=None), TypeError, "approx_ihvp"),
    (dict(inner=lambda x: x), TypeError, "`inner` must be an nn.Module"),
])
def test_constructor_errors(overrides, exc, match):
    with pytest.raises(exc, match=match):
        _construct(**overrides)


# ---------------------------------------------------------------------------------------
# (e) Hypergradients: accumulation and non-finite values.
# ---------------------------------------------------------------------------------------
def _outer_values(solver):
    return [p.detach().clone() for p in solver.outer.parameters()]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("optim", ["sgd_momentum", "adam"])
def test_non_finite_hypergradient_is_skipped(bad, optim, caplog):
    make_optim = {"sgd_momentum": lambda m: SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1),
                  "adam": lambda m: torch.optim.Adam(m.parameters(), lr=0.1, weight_decay=0.1)}[optim]
    solver = make_ridge_solver(outer_optim=make_optim)
    # One finite step first, so momentum/Adam state exists and would move the params.
    solver.outer_grad = (torch.ones(1, 3),)
    solver.outer_optimizer.step()
    solver.outer.zero_grad(set_to_none=True)
    before = _outer_values(solver)

    grad = torch.ones(1, 3)
    grad[0, 1] = bad
    with caplog.at_level(logging.WARNING, logger="hypergrad.solver"):
        solver.outer_grad = (grad,)
    assert solver.skipped_outer_steps == 1
    assert any("non-finite hypergradient" in r.getMessage() for r in caplog.records)
    assert solver.recorder.values("skipped_outer_steps") == [1.0]
    assert all(g is None for g in solver.outer_grad)
    solver.outer_optimizer.step()
    for a, b in zip(before, _outer_values(solver)):
        assert torch.equal(a, b)

    # A finite gradient afterwards accumulates again; a non-finite one on top of it drops the
    # whole accumulated gradient (a second skip), so the step still changes nothing.
    solver.outer_grad = (torch.ones(1, 3),)
    assert torch.equal(solver.outer_grad[0], torch.ones(1, 3))
    solver.outer_grad = {"weight": torch.full((1, 3), math.nan)}
    assert solver.skipped_outer_steps == 2
    assert solver.recorder.values("skipped_outer_steps") == [1.0, 2.0]
    assert all(g is None for g in solver.outer_grad)
    solver.outer_optimizer.step()
    for a, b in zip(before, _outer_values(solver)):
        assert torch.equal(a, b)


def test_finite_hypergradients_accumulate():
    solver = make_ridge_solver()
    g1, g2 = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, -1.0, 4.0]])
    solver.outer_grad = (g1,)
    assert torch.equal(solver.outer_grad[0], g1)
    solver.outer_grad = {"weight": g2}  # dict form, by name
    assert torch.equal(solver.outer_grad[0], g1 + g2)
    # The stored .grad is a copy: mutating the argument does not change it.
    g1.zero_()
    assert torch.equal(solver.outer_grad[0], torch.tensor([[1.5, 1.0, 7.0]]))
    norms = solver.recorder.values("hypergrad_norm")
    assert norms == pytest.approx([math.sqrt(14.0), math.sqrt(0.25 + 1 + 16)])
    before = _outer_values(solver)[0]
    solver.outer_optimizer.step()  # plain SGD lr 0.1
    assert torch.allclose(_outer_values(solver)[0], before - 0.1 * torch.tensor([[1.5, 1.0, 7.0]]))
    assert solver.skipped_outer_steps == 0


def test_mismatched_outer_grad_raises():
    solver = make_ridge_solver()
    with pytest.raises(ValueError, match="shape"):
        solver.outer_grad = (torch.ones(3),)
    with pytest.raises(ValueError, match="tensors"):
        solver.outer_grad = (torch.ones(1, 3), torch.ones(1))
    with pytest.raises(ValueError, match="different keys"):
        solver.outer_grad = {"bias": torch.ones(1, 3)}
    assert all(g is None for g in solver.outer_grad)


# ---------------------------------------------------------------------------------------
# (f) Functional model helpers.
# ---------------------------------------------------------------------------------------
def test_inner_func_with_tuple_and_dict_params():
    solver = make_ridge_solver()
    x = torch.randn(5, 3)
    w, b = torch.randn(1, 3), torch.randn(1)
    expected = x @ w.T + b
    assert torch.allclose(solver.inner_func((w, b), x), expected)
    assert torch.allclose(solver.inner_func({"weight": w, "bias": b}, x), expected)
    # The module's own parameters are untouched.
    assert not torch.allclose(solver.inner(x), expected)


@pytest.mark.parametrize("use_dict", [False, True])
def test_sync_inner_and_reset(use_dict):
    cls = type("DictRidge", (RidgeSolver,), {"use_dict": True}) if use_dict else RidgeSolver
    solver = make_ridge_solver(6, 3, cls=cls)
    initial = [p.detach().clone() for p in solver.inner.parameters()]
    for _ in range(3):
        solver.inner_update()
    assert isinstance(solver.inner_params, dict) == use_dict
    trained = [p.detach().clone() for p in
               (solver.inner_params.values() if use_dict else solver.inner_params)]
    assert not torch.allclose(trained[0], initial[0])
    assert solver.inner_optim_state is not None
    # The module still holds the initial values until synced.
    for p, q in zip(solver.inner.parameters(), initial):
        assert torch.equal(p, q)
    solver.sync_inner()
    for p, q in zip(solver.inner.parameters(), trained):
        assert torch.equal(p.detach(), q)

    solver.reset_inner_model()
    assert solver.inner_optim_state is None
    for p, q in zip(solver.inner_params, initial):
        assert torch.equal(p, q)
    # reinitialize=True draws fresh parameters (and makes them the new initial values).
    solver.reset_inner_model(reinitialize=True)
    fresh = [p.detach().clone() for p in solver.inner_params]
    assert not torch.allclose(fresh[0], initial[0])
    for p, q in zip(solver.inner.parameters(), fresh):
        assert torch.equal(p.detach(), q)
    solver.inner_update()
    solver.reset_inner_model()
    for p, q in zip(solver.inner_params, fresh):
        assert torch.equal(p, q)


def test_implicit_solver_detaches_inner_params():
    """With the spec's inner_update the gradients depend on the outer parameters (they require
    grad); BaseImplicitSolver must drop that graph, an unrolled BaseSolver must keep it."""
    x = torch.randn(8, 4)
    y = (torch.rand(8, 1) > 0.5).float()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    solver = build_spec_solver(4, loader, loader, num_iters=3, unroll_steps=3)
    for _ in range(3):
        solver.inner_update()
        assert all(p.grad_fn is None and not p.requires_grad for p in solver.inner_params)

    class Unrolled(BaseSolver):
        inner_forward = Solver.inner_forward
        inner_update = Solver.inner_update

    inner, outer = nn.Linear(4, 1, bias=False), nn.Linear(4, 1, bias=False)
    unrolled = Unrolled(inner, outer, loader, loader, functools.partial(diff_sgd, lr=0.1),
                        SGD(outer.parameters(), lr=0.1), num_iters=3, unroll_steps=3, progress_bar=False)
    unrolled.inner_update()
    assert all(p.grad_fn is not None for p in unrolled.inner_params)


# ---------------------------------------------------------------------------------------
# (g) Metrics.
# ---------------------------------------------------------------------------------------
def test_metrics_are_recorded():
    solver = make_ridge_solver(num_iters=9, unroll_steps=3)
    recorder = solver.run()
    assert recorder is solver.recorder
    history = recorder.history
    outer_iters = [3, 6]
    assert [step for step, _ in history["ihvp_time"]] == outer_iters
    assert [step for step, _ in history["hypergrad_norm"]] == outer_iters
    assert [step for step, _ in history["outer_update_time"]] == outer_iters
    assert [step for step, _ in history["outer_loss"]] == outer_iters
    assert [step for step, _ in history["inner_loss"]] == list(range(9))
    assert all(v >= 0 and math.isfinite(v) for v in recorder.values("ihvp_time"))
    assert all(v > 0 and math.isfinite(v) for v in recorder.values("hypergrad_norm"))
    # outer_update_time covers the whole update, which includes the IHVP.
    for t_ihvp, t_outer in zip(recorder.values("ihvp_time"), recorder.values("outer_update_time")):
        assert t_outer >= t_ihvp
    # The recorded inner loss is the value the inner update returned (a scalar tensor).
    assert recorder.values("inner_loss")[0] > recorder.values("inner_loss")[-1]
    assert recorder.latest()["inner_loss"] == recorder.values("inner_loss")[-1]
    assert recorder.mean("inner_loss", last=2) == pytest.approx(sum(recorder.values("inner_loss")[-2:]) / 2)
    assert math.isnan(recorder.mean("missing"))


def test_recording_a_loss_that_requires_grad_does_not_warn():
    solver = make_ridge_solver()
    loss = (torch.ones(3, requires_grad=True) * 2).sum()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solver.record(inner_loss=loss)
    assert solver.recorder.values("inner_loss") == [6.0]


def test_inner_update_returning_a_dict_is_recorded():
    class DictReturn(RidgeSolver):
        def inner_update(self):
            loss = super().inner_update()
            return {"inner_loss": loss, "lr": 0.1, "note": "ignored"}

    solver = make_ridge_solver(num_iters=4, unroll_steps=2, cls=DictReturn)
    solver.run()
    assert len(solver.recorder.values("inner_loss")) == 4
    assert solver.recorder.values("lr") == [0.1] * 4
    assert "note" not in solver.recorder.history


def test_run_syncs_the_final_inner_params():
    solver = make_ridge_solver(num_iters=6, unroll_steps=3)
    solver.run()
    for p, q in zip(solver.inner.parameters(), solver.inner_params):
        assert torch.equal(p.detach(), q)


class _OriginalLibraryStyle(ScheduleSolver):
    """Code written against the original ``hypergrad`` library reads ``inner_step``,
    ``outer_step`` and ``global_step`` (properties there)."""

    def inner_update(self):
        self.seen.append(("inner", self.inner_step, self.outer_step, self.global_step))
        return super().inner_update()

    def outer_update(self):
        self.seen.append(("outer", self.inner_step, self.outer_step, self.global_step))
        return super().outer_update()


def test_step_counters_have_the_original_library_meaning():
    solver = make_ridge_solver(5, 2, 0, cls=_OriginalLibraryStyle)
    solver.seen = []
    solver.run()
    # iteration i: inner_step == i during the inner update, i + 1 during the outer one; outer
    # updates after iterations 2 and 4; global_step counts finished iterations
    assert solver.seen == [("inner", 0, 0, 0), ("inner", 1, 0, 1), ("inner", 2, 0, 2), ("outer", 3, 0, 2),
                           ("inner", 3, 1, 3), ("inner", 4, 1, 4), ("outer", 5, 1, 4)]
    assert (solver.inner_step, solver.outer_step, solver.global_step) == (5, 2, 5)


@pytest.mark.parametrize("unroll_steps", [1, 2, 3, 7])
@pytest.mark.parametrize("patience", [0, 1, 4, 9, 30])
def test_count_outer_steps_is_the_schedule_counted(unroll_steps, patience):
    for num_iters in range(0, 40):
        brute = sum(is_outer_step(i, unroll_steps, patience) for i in range(num_iters))
        assert count_outer_steps(num_iters, unroll_steps, patience) == brute
    assert count_outer_steps(10**12, unroll_steps, patience) > 0  # O(1): no loop over the steps
