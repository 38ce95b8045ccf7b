"""Hessian-vector products and parameter-tree helpers of :mod:`hypergrad.utils`.

Ground truth: dense second derivatives from ``torch.func`` computed on the *flattened*
parameter vector, in float64 (``torch.func.hessian`` for ``hvp``/``batched_hvp`` and
``jacfwd(jacrev)`` for the mixed derivative of ``mixed_vjp``), so the reference does not
share any code path with the products under test.
"""

import pytest
import torch
from torch.func import hessian, jacfwd, jacrev

from hypergrad.autodiff import HVP_MODES, batched_hvp, hvp, mixed_vjp
from hypergrad.trees import check_params, check_same_structure, tree_flatten_vector, tree_leaves, tree_unflatten_vector

DTYPES = [torch.float64, torch.float32]
KINDS = ["tuple", "dict"]


def make_tree(kind, names, tensors):
    return dict(zip(names, tensors)) if kind == "dict" else tuple(tensors)


def rel_err(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


# Tolerances on the relative error of one product. Exact modes only see round-off;
# finite_diff has a relative error ~ u^(2/3) (u = unit round-off) times a constant.
TOL = {
    (torch.float64, "fwd_rev"): 1e-12,
    (torch.float64, "rev_rev"): 1e-12,
    (torch.float64, "finite_diff"): 1e-7,
    (torch.float32, "fwd_rev"): 1e-5,
    (torch.float32, "rev_rev"): 1e-5,
    (torch.float32, "finite_diff"): 1e-3,
}

# Batched vs one-at-a-time products: round-off only.
SAME_TOL = {
    (torch.float64, "fwd_rev"): 1e-13,
    (torch.float64, "rev_rev"): 1e-13,
    (torch.float64, "finite_diff"): 1e-9,
    (torch.float32, "fwd_rev"): 1e-5,
    (torch.float32, "rev_rev"): 1e-5,
    (torch.float32, "finite_diff"): 1e-3,
}


# ------------------------------------------------------------------------ problems
def mlp_problem(kind, dtype, seed=0):
    """A tiny tanh MLP with a squared loss: smooth, non-quadratic, with a 0-d leaf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randn(6, generator=g, dtype=torch.float64)
    names = ["w1", "b1", "w2", "b2"]
    leaves = [torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.7,
              torch.randn(4, generator=g, dtype=torch.float64) * 0.3,
              torch.randn(4, generator=g, dtype=torch.float64),
              torch.randn((), generator=g, dtype=torch.float64)]
    tangent = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in leaves]

    def f(params):
        p = tree_leaves(params)
        xx, yy = x.to(p[0].dtype), y.to(p[0].dtype)
        out = torch.tanh(xx @ p[0] + p[1]) @ p[2] + p[3]
        return ((out - yy) ** 2).mean()

    primal = make_tree(kind, names, [t.to(dtype) for t in leaves])
    tangent = make_tree(kind, names, [t.to(dtype) for t in tangent])
    return f, primal, tangent


def logistic_problem(kind, dtype, seed=1):
    """Mean logistic loss plus a small L2 term, weights split into two leaves."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 5, generator=g, dtype=torch.float64)
    y = (torch.rand(10, generator=g, dtype=torch.float64) > 0.5).to(torch.float64)
    names = ["w", "b"]
    leaves = [torch.randn(5, generator=g, dtype=torch.float64), torch.randn(1, generator=g, dtype=torch.float64)]
    tangent = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in leaves]

    def f(params):
        w, b = tree_leaves(params)
        logits = x.to(w.dtype) @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.to(w.dtype))
        return loss + 0.05 * (w**2).sum()

    primal = make_tree(kind, names, [t.to(dtype) for t in leaves])
    tangent = make_tree(kind, names, [t.to(dtype) for t in tangent])
    return f, primal, tangent


PROBLEMS = {"mlp": mlp_problem, "logistic": logistic_problem}


def dense_hessian(f, primal):
    """Dense float64 Hessian of ``f`` at ``primal`` over the flattened parameters."""
    like = tuple(t.to(torch.float64) for t in tree_leaves(primal))
    like = dict(zip(primal.keys(), like)) if isinstance(primal, dict) else like
    vec = tree_flatten_vector(like)
    return hessian(lambda z: f(tree_unflatten_vector(z, like)))(vec)


def flat64(tree):
    return tree_flatten_vector(tree).to(torch.float64)


# ------------------------------------------------------------------------ hvp
@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("mode", HVP_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_hvp_matches_dense_hessian(problem, mode, dtype, kind):
    f, primal, tangent = PROBLEMS[problem](kind, dtype)
    truth = dense_hessian(f, primal) @ flat64(tangent)
    out = hvp(f, primal, tangent, mode)

    assert type(out) is type(primal)
    if kind == "dict":
        assert list(out.keys()) == list(primal.keys())
    for o, p in zip(tree_leaves(out), tree_leaves(primal)):
        assert o.shape == p.shape and o.dtype == dtype
    assert rel_err(flat64(out), truth) < TOL[dtype, mode]


@pytest.mark.parametrize("mode", HVP_MODES)
def test_hvp_is_linear_in_the_tangent_scale(mode):
    """The finite-difference step is scaled by 1/|v|, so tiny or huge tangents stay accurate."""
    f, primal, tangent = mlp_problem("tuple", torch.float64)
    truth = dense_hessian(f, primal) @ flat64(tangent)
    for scale in (1e-6, 1e6):
        scaled = tuple(t * scale for t in tangent)
        out = flat64(hvp(f, primal, scaled, mode)) / scale
        assert rel_err(out, truth) < TOL[torch.float64, mode]


def test_finite_diff_error_is_about_u_to_two_thirds():
    """finite_diff is not exact: its error is well above round-off but within ~u^(2/3)."""
    f, primal, tangent = mlp_problem("tuple", torch.float64)
    truth = dense_hessian(f, primal) @ flat64(tangent)
    err = rel_err(flat64(hvp(f, primal, tangent, "finite_diff")), truth)
    u = torch.finfo(torch.float64).eps
    assert err < 100 * u ** (2 / 3)


def test_hvp_rejects_unknown_mode():
    f, primal, tangent = mlp_problem("tuple", torch.float64)
    with pytest.raises(ValueError, match="hvp_mode"):
        hvp(f, primal, tangent, "fwd_fwd")
    with pytest.raises(ValueError, match="hvp_mode"):
        batched_hvp(f, primal, tangent, "nope")


# ------------------------------------------------------------------------ batched_hvp
@pytest.mark.parametrize("mode", HVP_MODES)
@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_batched_hvp_equals_separate_hvps(mode, vectorize, dtype, kind):
    f, primal, _ = mlp_problem(kind, dtype)
    k = 4
    g = torch.Generator().manual_seed(5)
    leaves = [torch.randn(k, *p.shape, generator=g, dtype=torch.float64).to(dtype)
              for p in tree_leaves(primal)]
    names = list(primal.keys()) if kind == "dict" else None
    tangents = make_tree(kind, names, leaves)

    out = batched_hvp(f, primal, tangents, mode, vectorize=vectorize)
    assert type(out) is type(primal)
    hess = dense_hessian(f, primal)
    for i in range(k):
        single_tangent = make_tree(kind, names, [x[i] for x in leaves])
        single = hvp(f, primal, single_tangent, mode)
        row = [x[i] for x in tree_leaves(out)]
        for r, s in zip(row, tree_leaves(single)):
            assert r.shape == s.shape
        # Same computation up to the order of floating-point operations: agrees to round-off,
        # which finite_diff amplifies by 1/r ~ u^(-1/3) (about 1e5 in float64).
        row_flat = torch.cat([r.reshape(-1) for r in row]).to(torch.float64)
        assert rel_err(row_flat, flat64(single)) < SAME_TOL[dtype, mode]
        # And both are Hessian products.
        truth = hess @ torch.cat([x[i].reshape(-1) for x in leaves]).to(torch.float64)
        assert rel_err(row_flat, truth) < TOL[dtype, mode]


# ------------------------------------------------------------------------ mixed_vjp
def mixed_problem(kind, dtype, seed=2):
    """f(in, out): MLP loss on inputs rescaled by exp(out_scale) plus exp(out_wd) weight decay,
    so the mixed derivative has both a dense and a diagonal part."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(7, generator=g, dtype=torch.float64)
    in_leaves = [torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.7,
                 torch.randn(4, generator=g, dtype=torch.float64)]
    out_leaves = [torch.randn(3, generator=g, dtype=torch.float64) * 0.3,
                  torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.3]
    v_leaves = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in in_leaves]

    def f(inp, out):
        w1, w2 = tree_leaves(inp)
        scale, wd = tree_leaves(out)
        xx, yy = x.to(w1.dtype), y.to(w1.dtype)
        pred = torch.tanh((xx * torch.exp(scale)) @ w1) @ w2
        return ((pred - yy) ** 2).mean() + 0.5 * (torch.exp(wd) * w1**2).sum()

    cast = lambda ts: [t.to(dtype) for t in ts]  # noqa: E731
    return (f, make_tree(kind, ["w1", "w2"], cast(in_leaves)),
            make_tree(kind, ["scale", "wd"], cast(out_leaves)),
            make_tree(kind, ["w1", "w2"], cast(v_leaves)))


@pytest.mark.parametrize("mode", HVP_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_vjp_matches_dense_mixed_jacobian(mode, dtype, kind):
    f, inp, out, v = mixed_problem(kind, dtype)
    to64 = lambda t: type(t)({k: x.double() for k, x in t.items()}) if isinstance(t, dict) \
        else tuple(x.double() for x in t)  # noqa: E731
    in64, out64 = to64(inp), to64(out)

    def f_flat(zi, zo):
        return f(tree_unflatten_vector(zi, in64), tree_unflatten_vector(zo, out64))

    # J[a, b] = d^2 f / d in_a d out_b
    jac = jacfwd(jacrev(f_flat, argnums=0), argnums=1)(flat64(in64), flat64(out64))
    truth = jac.T @ flat64(v)

    result = mixed_vjp(f, inp, out, v, mode)
    assert type(result) is type(out)
    for r, o in zip(tree_leaves(result), tree_leaves(out)):
        assert r.shape == o.shape and r.dtype == dtype
    assert rel_err(flat64(result), truth) < TOL[dtype, mode]


# ------------------------------------------------------------------------ tree helpers
@pytest.mark.parametrize("kind", KINDS)
def test_flatten_unflatten_round_trip(kind):
    leaves = [torch.arange(6.0).reshape(2, 3), torch.tensor(7.0), torch.arange(4.0) + 10]
    tree = make_tree(kind, ["a", "b", "c"], leaves)
    vec = tree_flatten_vector(tree)
    assert vec.shape == (11,)
    assert torch.equal(vec, torch.cat([torch.arange(6.0), torch.tensor([7.0]), torch.arange(4.0) + 10]))
    back = tree_unflatten_vector(vec, tree)
    assert type(back) is type(tree)
    if kind == "dict":
        assert list(back.keys()) == ["a", "b", "c"]
    for x, y in zip(tree_leaves(back), leaves):
        assert x.shape == y.shape and torch.equal(x, y)

    # A (k, p) matrix becomes a batched tree with leading dimension k.
    mat = torch.stack([vec, 2 * vec, 3 * vec])
    batched = tree_unflatten_vector(mat, tree)
    for x, y in zip(tree_leaves(batched), leaves):
        assert x.shape == (3, *y.shape)
        assert torch.equal(x[2], 3 * y)

    with pytest.raises(ValueError, match="entries"):
        tree_unflatten_vector(torch.zeros(12), tree)


def test_check_same_structure_errors():
    a, b = torch.zeros(2), torch.zeros(3)
    check_same_structure((a, b), (a.clone(), b.clone()), "x", "y")  # fine
    check_same_structure({"a": a}, {"a": a}, "x", "y")  # fine
    with pytest.raises(ValueError, match="both be dicts"):
        check_same_structure((a,), {"a": a}, "x", "y")
    with pytest.raises(ValueError, match="different keys"):
        check_same_structure({"a": a}, {"b": a}, "x", "y")
    with pytest.raises(ValueError, match="different keys"):
        check_same_structure({"a": a, "b": b}, {"b": b, "a": a}, "x", "y")  # order matters
    with pytest.raises(ValueError, match="has 2 tensors but `y` has 1"):
        check_same_structure((a, b), (a,), "x", "y")
    with pytest.raises(ValueError, match=r"shape \(2,\).*shape \(3,\)"):
        check_same_structure((a,), (b,), "x", "y")


def test_check_params_errors():
    check_params((torch.zeros(2),), "p")
    check_params({"w": torch.zeros(2)}, "p")
    with pytest.raises(TypeError, match="`p` must be a tuple/list"):
        check_params(torch.zeros(2), "p")
    with pytest.raises(ValueError, match="`p` is empty"):
        check_params((), "p")
    with pytest.raises(ValueError, match="`p` is empty"):
        check_params({}, "p")
    with pytest.raises(TypeError, match="not a tensor"):
        check_params((torch.zeros(2), 3.0), "p")
    with pytest.raises(TypeError, match="floating-point"):
        check_params((torch.zeros(2, dtype=torch.long),), "p")
    with pytest.raises(TypeError, match="string keys"):
        check_params({0: torch.zeros(2)}, "p")
