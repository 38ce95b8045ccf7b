"""Linearized products (:mod:`hypergrad.products`) against the per-product ones of
:mod:`hypergrad.utils` and dense float64 Hessians, and the HVP-mode probe."""

import pytest
import torch
from torch.func import functional_call

from hypergrad.autodiff import HVP_MODES, hvp, mixed_vjp
from hypergrad.mode_probe import probe_hvp_mode
from hypergrad.products import linearize_inner, mixed_reverse_over_forward
from hypergrad.trees import tree_leaves, tree_map


def _mlp_problem(kind, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)
    x, y = torch.randn(20, 5, dtype=dtype), torch.randint(0, 3, (20,))
    theta = {k: v.detach() for k, v in net.named_parameters()}
    names = list(theta)
    phi = {"log_decay": torch.randn(len(theta), dtype=dtype), "w": torch.rand(20, dtype=dtype)}

    def inner(t, o):
        t = dict(zip(names, tree_leaves(t)))
        losses = torch.nn.functional.cross_entropy(functional_call(net, t, (x,)), y, reduction="none")
        decay = sum(torch.exp(d) * (v**2).sum() for d, v in zip(o["log_decay"], t.values()))
        return (o["w"] * losses).mean() + 1e-2 * decay

    if kind == "tuple":
        theta = tuple(theta.values())
    return inner, theta, phi


@pytest.mark.parametrize("kind", ["tuple", "dict"])
@pytest.mark.parametrize("mode", HVP_MODES)
def test_linearized_products_equal_per_product_ones(kind, mode):
    inner, theta, phi = _mlp_problem(kind)
    products = linearize_inner(inner, theta, phi, mode)
    g = torch.Generator().manual_seed(1)
    vs = tree_map(lambda x: torch.randn(3, *x.shape, generator=g, dtype=x.dtype), theta)
    tol = 1e-6 if mode == "finite_diff" else 1e-11
    rows = [tree_map(lambda x, i=i: x[i], vs) for i in range(3)]
    batched = products.batched_hvp(vs)
    for i, v in enumerate(rows):
        reference = hvp(lambda t: inner(t, phi), theta, v, "fwd_rev")
        for a, b, c in zip(tree_leaves(products.hvp(v)), tree_leaves(reference), tree_leaves(batched)):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
            torch.testing.assert_close(c[i], b, rtol=tol, atol=tol)
        mixed_ref = mixed_vjp(inner, theta, phi, v, "fwd_rev")
        for a, b in zip(tree_leaves(products.mixed(v)), tree_leaves(mixed_ref)):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert type(products.hvp(rows[0])) is type(theta)


def test_reverse_linearization_builds_one_graph_for_all_products():
    inner, theta, phi = _mlp_problem("dict")
    calls = []

    def counted(t, o):
        calls.append(1)
        return inner(t, o)

    products = linearize_inner(counted, theta, phi, "rev_rev")
    v = tree_map(torch.ones_like, theta)
    for _ in range(4):
        products.hvp(v)
    products.batched_hvp(tree_map(lambda x: torch.stack([x, 2 * x]), v))
    products.mixed(v)
    assert len(calls) == 1  # one forward for five products and the mixed one


@pytest.mark.parametrize("chunk_size, budget", [(None, None), (1, None), (2, None), (None, 1), (None, 10**12)])
def test_reverse_chunking_and_memory_budget_do_not_change_products(chunk_size, budget):
    inner, theta, phi = _mlp_problem("dict")
    g = torch.Generator().manual_seed(2)
    vs = tree_map(lambda x: torch.randn(5, *x.shape, generator=g, dtype=x.dtype), theta)
    reference = linearize_inner(inner, theta, phi, "fwd_rev").batched_hvp(vs)
    products = linearize_inner(inner, theta, phi, "rev_rev", chunk_size=chunk_size, memory_budget=budget)
    for a, b in zip(tree_leaves(products.batched_hvp(vs)), tree_leaves(reference)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    assert products.graph_bytes > 0
    if budget is not None:  # a tiny budget means one product in flight, a huge one all of them
        assert products._products_in_flight(5) == (1 if budget == 1 else 5)


def test_reverse_products_vectorize_by_default_only_on_small_problems(monkeypatch):
    """Without a chunk size or budget: all products at once up to VECTORIZE_MAX_PARAMS inner
    parameters (overhead-bound), one at a time above (compute-bound); same products either way."""
    import hypergrad.products as products_module

    inner, theta, phi = _mlp_problem("dict")
    n = sum(x.numel() for x in theta.values())
    g = torch.Generator().manual_seed(3)
    vs = tree_map(lambda x: torch.randn(4, *x.shape, generator=g, dtype=x.dtype), theta)
    small = linearize_inner(inner, theta, phi, "rev_rev")
    assert n <= products_module.VECTORIZE_MAX_PARAMS and small._products_in_flight(4) == 4
    monkeypatch.setattr(products_module, "VECTORIZE_MAX_PARAMS", n - 1)
    large = linearize_inner(inner, theta, phi, "rev_rev")
    assert large._products_in_flight(4) == 1
    for a, b in zip(tree_leaves(small.batched_hvp(vs)), tree_leaves(large.batched_hvp(vs))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_linearize_refuses_bad_chunking():
    inner, theta, phi = _mlp_problem("dict")
    with pytest.raises(ValueError, match="memory_budget"):
        linearize_inner(inner, theta, phi, "rev_rev", memory_budget=0)
    with pytest.raises(ValueError, match="hvp_mode"):
        linearize_inner(inner, theta, phi, "sideways")


class _NoDoubleBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - x.tanh() ** 2)


def test_probe_picks_an_exact_mode_that_runs_and_falls_back_otherwise():
    inner, theta, phi = _mlp_problem("dict", torch.float32)
    assert probe_hvp_mode(lambda t: inner(t, phi), theta, "auto", max_memory_ratio=None) == "rev_rev"
    assert probe_hvp_mode(lambda t: inner(t, phi), theta, "fwd_rev") == "fwd_rev"

    def broken(t):  # neither forward-mode AD nor double backward
        return _NoDoubleBackward.apply(t["0.weight"]).pow(2).sum() + sum((v**2).sum() for v in t.values())

    assert probe_hvp_mode(broken, theta, "auto") == "finite_diff"
    with pytest.raises(ValueError, match="hvp_mode='rev_rev' cannot run"):
        probe_hvp_mode(broken, theta, "rev_rev")


@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_reverse_over_forward_mixed_product_matches_the_graph(kind):
    inner, theta, phi = _mlp_problem(kind)
    v = tree_map(lambda x: torch.randn_like(x), theta)
    lean = mixed_reverse_over_forward(inner, theta, phi, v)
    exact = mixed_vjp(inner, theta, phi, v, "rev_rev")
    for a, b in zip(tree_leaves(lean), tree_leaves(exact)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_reverse_over_forward_mixed_product_is_zero_where_phi_does_not_reach_the_slope():
    inner, theta, phi = _mlp_problem("dict")
    v = tree_map(lambda x: torch.randn_like(x), theta)
    # phi only shifts f by a constant: the slope along v does not depend on it
    out = mixed_reverse_over_forward(lambda t, p: inner(t, tree_map(torch.zeros_like, p)) + sum(
        x.sum() for x in tree_leaves(p)), theta, phi, v)
    assert all(torch.equal(x, torch.zeros_like(x)) for x in tree_leaves(out))


def test_mixed_product_without_a_graph_is_reverse_over_forward_above_the_vectorize_size(monkeypatch):
    import hypergrad.products as products_module

    inner, theta, phi = _mlp_problem("dict")
    v = tree_map(lambda x: torch.randn_like(x), theta)
    small = linearize_inner(inner, theta, phi, "rev_rev")
    through_graph = small.mixed(v)  # a small problem: the graph, overhead-bound otherwise
    assert small._grads is not None
    monkeypatch.setattr(products_module, "VECTORIZE_MAX_PARAMS", 0)
    large = linearize_inner(inner, theta, phi, "rev_rev")
    lean = large.mixed(v)  # no HVP taken yet: reverse over forward, no create_graph gradient
    assert large._grads is None
    for a, b in zip(tree_leaves(lean), tree_leaves(through_graph)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_probe_respects_the_memory_limit():
    inner, theta, phi = _mlp_problem("dict", torch.float32)
    f = lambda t: inner(t, phi)  # noqa: E731
    assert probe_hvp_mode(f, theta, "auto", max_memory_ratio=None) == "rev_rev"
    # within 2x a gradient's memory rev_rev's graph does not fit here, fwd_rev (estimated at 2x) does
    assert probe_hvp_mode(f, theta, "auto", max_memory_ratio=2.0) == "fwd_rev"
    # the shared rev_rev graph saves more than a gradient does; fwd_rev is taken at ~2x a gradient
    assert probe_hvp_mode(f, theta, "auto", max_memory_ratio=1.0) == "finite_diff"
    assert probe_hvp_mode(f, theta, "rev_rev", max_memory_ratio=1.0) == "rev_rev"  # explicit: no limit


def _stop_gradient_objective():
    """A weighted least-squares loss whose weights are computed from the residuals under a stop-gradient (as
    `LossWeights` does): exact modes hold the weights constant, finite differences of gradients do not."""
    torch.manual_seed(0)
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)

    def f(theta):
        residual = (x @ theta["w"] - y) ** 2
        weights = torch.sigmoid(1.0 - 2.0 * residual.detach())
        return (weights * residual).sum() / weights.sum()

    return f, {"w": torch.randn(3, dtype=torch.float64)}


def test_probe_never_times_its_candidates(monkeypatch):
    """The choice is a function of the model, the batch's shapes and the memory limit: no clock is read, so two
    runs of the same seed (and a resumed run) cannot choose different modes on a loaded machine."""
    import time

    inner, theta, phi = _mlp_problem("dict", torch.float32)
    monkeypatch.setattr(time, "perf_counter", lambda: (_ for _ in ()).throw(AssertionError("timed")))
    modes = {probe_hvp_mode(lambda t: inner(t, phi), theta, "auto", max_memory_ratio=ratio)
             for ratio in (None, None, 2.0, 2.0)}
    assert modes == {"rev_rev", "fwd_rev"}


def test_probe_with_a_stop_gradient_uses_exact_modes_checked_against_each_other():
    f, theta = _stop_gradient_objective()
    # finite differences see the weights move: the plain probe rejects both exact modes for them
    assert probe_hvp_mode(f, theta, "auto") == "finite_diff"
    assert probe_hvp_mode(f, theta, "auto", exact_only=True) in ("rev_rev", "fwd_rev")
    assert probe_hvp_mode(f, theta, "rev_rev", exact_only=True) == "rev_rev"
    # the memory limit cannot send such an objective to finite differences
    assert probe_hvp_mode(f, theta, "auto", max_memory_ratio=1e-9, exact_only=True) in ("rev_rev", "fwd_rev")
    with pytest.raises(ValueError, match="hvp_mode='finite_diff' cannot compute this objective's Hessian"):
        probe_hvp_mode(f, theta, "finite_diff", exact_only=True)
