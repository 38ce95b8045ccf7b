"""The core functions' default ``hvp_mode="auto"``: which mode it resolves to, that it probes once per objective and
shapes, that the probe never holds more than its limit, that the choice is deterministic (two runs of the same seed
give bitwise-identical hypergradients) and that ``BaseImplicitSolver`` records and reuses it."""

from __future__ import annotations

import functools
import gc
import weakref

import pytest
import torch
from repo_scripts import load
from test_solver import Solver, build_spec_solver, make_ridge_solver, regression_loaders
from torch import nn

from hypergrad import mode_probe
from hypergrad.approx_hypergrad import conjugate_gradient, nystrom
from hypergrad.products import SavedBytesLimitExceeded, count_saved_bytes, linearize_inner


@pytest.fixture(autouse=True)
def fresh_cache():
    mode_probe._RESOLVED.clear()
    yield
    mode_probe._RESOLVED.clear()


def ridge(n: int = 6, dim: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, dim, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    xv, yv = torch.randn(n, dim, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)

    def inner(t, o):
        return ((x @ t["w"] - y) ** 2).mean() + (o["log_l2"].exp() * t["w"] ** 2).sum()

    def outer(t, o):
        return ((xv @ t["w"] - yv) ** 2).mean()

    return inner, outer, {"w": torch.zeros(dim, dtype=torch.float64)}, {"log_l2": torch.zeros(dim, dtype=torch.float64)}


def counting_probe(monkeypatch) -> list[str]:
    calls: list[str] = []
    probe = mode_probe.probe_hvp_mode

    def counted(*args, **kwargs):
        calls.append(probe(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(mode_probe, "probe_hvp_mode", counted)
    return calls


def test_a_small_problem_gets_exact_products_and_is_probed_once_per_shapes(monkeypatch):
    calls = counting_probe(monkeypatch)
    inner, outer, theta, phi = ridge()
    expected = conjugate_gradient(inner, outer, theta, phi, num_iters=3, hvp_mode="rev_rev")
    for _ in range(3):  # a training loop: new closures of the same code, same shapes
        again_inner, again_outer, _, _ = ridge()
        result = conjugate_gradient(again_inner, again_outer, theta, phi, num_iters=3)
        torch.testing.assert_close(result, expected, rtol=0, atol=0)
    assert calls == ["rev_rev"]  # within CORE_FREE_BYTES: exact products, one probe
    wider = ridge(dim=4)
    conjugate_gradient(*wider, num_iters=3)
    assert calls == ["rev_rev", "rev_rev"]  # other shapes: probed again


def test_an_explicit_mode_is_never_probed(monkeypatch):
    calls = counting_probe(monkeypatch)
    conjugate_gradient(*ridge(), num_iters=3, hvp_mode="finite_diff")
    assert calls == []
    with pytest.raises(ValueError, match="hvp_mode"):
        conjugate_gradient(*ridge(), num_iters=3, hvp_mode="reverse")
    with pytest.raises(ValueError, match="hvp_max_memory_ratio"):
        conjugate_gradient(*ridge(), num_iters=3, hvp_max_memory_ratio=0)


def test_cache_key_tells_closures_apart_by_what_they_hold():
    def make(t):
        return lambda a, b: (a["w"] * t).sum()

    one, same, other = make(torch.ones(3)), make(torch.zeros(3)), make(torch.ones(4))
    assert mode_probe._callable_key(one) == mode_probe._callable_key(same)  # same code, same shapes
    assert mode_probe._callable_key(one) != mode_probe._callable_key(other)
    model_a, model_b = nn.Linear(2, 2), nn.Linear(2, 2)
    assert (mode_probe._callable_key(functools.partial(model_a.forward))
            != mode_probe._callable_key(functools.partial(model_b.forward)))


def test_a_graph_over_the_limit_is_measured_without_being_kept():
    """The probe stops keeping ``rev_rev``'s graph past its limit, and raises only after autograd is done."""
    x = torch.randn(50, 50, dtype=torch.float64)

    def f(t, _):
        return torch.tanh(x @ t["w"]).pow(3).sum()

    theta = {"w": torch.randn(50, 50, dtype=torch.float64)}
    with count_saved_bytes() as full, torch.enable_grad():
        w = theta["w"].clone().requires_grad_(True)
        torch.autograd.grad(f({"w": w}, None), w, create_graph=True)
    with count_saved_bytes(limit=full[0] / 2) as partial, torch.enable_grad():
        w = theta["w"].clone().requires_grad_(True)
        f({"w": w}, None)
    assert partial[1] is False and partial[0] < full[0] / 2  # the forward alone fits
    linear = linearize_inner(f, theta, {}, "rev_rev", saved_bytes_limit=full[0] / 2)
    with pytest.raises(SavedBytesLimitExceeded):
        linear.hvp(theta)
    assert linear.graph_bytes == full[0]  # counted to the end, kept only up to the limit


def test_a_linearization_frees_its_graph():
    """The saved-bytes count must not keep the graph alive (a pack hook returning its own input makes a saved
    output reference its grad_fn: a cycle through C++ that Python's collector cannot free)."""
    kept: list[weakref.ref] = []
    x = torch.randn(8, 5)

    def f(t, _):
        hidden = torch.exp(x @ t["w"])  # exp saves its output
        kept.append(weakref.ref(hidden))
        return hidden.sum()

    theta = {"w": torch.randn(5, 3) * 0.1}
    linear = linearize_inner(f, theta, {}, "rev_rev")
    linear.hvp(theta)
    del linear
    gc.collect()
    assert kept and all(ref() is None for ref in kept)


def test_the_solver_records_the_mode_and_reuses_it_on_resume(monkeypatch):
    solver = make_ridge_solver(num_iters=6, unroll_steps=3)
    assert solver.hvp_mode is None
    solver.run()
    assert solver.hvp_mode == "rev_rev"

    def refuse(*args, **kwargs):
        raise AssertionError("a mode set on the solver must not be probed again")

    resumed = make_ridge_solver(num_iters=6, unroll_steps=3)
    resumed.hvp_mode = "finite_diff"  # what the checkpoint recorded
    monkeypatch.setattr("hypergrad.solver.resolve_hvp_mode", lambda *a, **k: refuse())
    seen = []
    original = resumed._approx_ihvp

    def spy(*args, **kwargs):
        seen.append(kwargs.get("hvp_mode"))
        return original(*args, **kwargs)

    resumed._approx_ihvp = spy
    resumed.run()
    assert seen and set(seen) == {"finite_diff"}
    with pytest.raises(ValueError, match="hvp_mode"):
        resumed.hvp_mode = "fast"


def test_a_custom_approx_ihvp_without_hvp_mode_is_called_as_before():
    solver = make_ridge_solver(num_iters=3, unroll_steps=3)
    solver._approx_ihvp = lambda inner, outer, i, o: {k: torch.zeros_like(v) for k, v in o.items()}
    solver._bound = {}
    solver.run()
    assert solver.hvp_mode is None
    with pytest.raises(ValueError, match="takes no `hvp_mode`"):
        solver.hvp_mode = "rev_rev"


def test_the_default_on_the_small_llama_is_lean_and_deterministic():
    """The problem of ``benchmarks/core_nystrom_cost.py`` (issue 26): a 4-layer Llama, LoRA on q/v, 8 x 128 tokens.
    Its ``rev_rev`` graph holds ~3x a gradient's memory and ``fwd_rev`` more, so the default takes finite
    differences (measured 1.2x an inner step's peak, benchmarks/results/core_nystrom_cost.md), without building
    either exact graph in full; two runs with the same seed agree bitwise."""
    pytest.importorskip("peft")
    problem = load("benchmarks/core_nystrom_cost.py").problem
    torch.manual_seed(0)
    inner, outer, theta, phi = problem(8, 128, torch.device("cpu"))
    results = []
    for _ in range(2):
        mode_probe._RESOLVED.clear()
        assert mode_probe.resolve_hvp_mode(inner, theta, phi) == "finite_diff"
        results.append(nystrom(inner, outer, theta, phi, rank=2, rho=0.1, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(results[0]["logits"], results[1]["logits"])
    assert results[0]["logits"].abs().min() > 0


def test_the_probe_leaves_the_global_random_state_alone():
    inner, _, theta, phi = ridge()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    mode_probe.resolve_hvp_mode(inner, theta, phi)
    assert torch.equal(torch.rand(3), expected)


def test_spec_example_still_runs_with_the_default():
    """The seed spec's ``functools.partial(nystrom, rank=5, rho=0.1)`` goes through ``auto``."""
    inner_loader, outer_loader = regression_loaders(n=8, dim=6)
    solver = build_spec_solver(6, inner_loader, outer_loader, num_iters=4, unroll_steps=2, Solver=Solver)
    solver.progress_bar = False
    solver.run()
    assert solver.hvp_mode == "rev_rev"
