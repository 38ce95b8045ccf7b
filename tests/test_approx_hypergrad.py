"""Implicit hypergradients of :mod:`hypergrad.approx_hypergrad` against closed forms.

Ground truth:
  * ridge regression with per-feature weight decay ``phi``: ``theta*`` by a dense solve and
    ``dg/dphi = -theta* * H^{-1} grad g`` with the dense Hessian ``H = X^T X / n + diag(phi)``,
    cross-checked against a central finite difference of the validation loss after
    re-solving the inner problem;
  * logistic regression with weight decay ``exp(phi)``: ``theta*`` by Newton's method with
    the explicit Hessian, hypergradient by the same explicit dense formula.
All references are computed in float64 with ``torch.linalg``, independently of the
library's Hessian-vector products.
"""

import functools

import pytest
import torch
from torch.nn import functional as F

from hypergrad.approx_hypergrad import conjugate_gradient, exact, neumann, nystrom
from hypergrad.autodiff import HVP_MODES
from hypergrad.trees import tree_flatten_vector, tree_leaves, tree_unflatten_vector

KINDS = ["tuple", "dict"]
DTYPES = [torch.float64, torch.float32]


def rel_err(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def flat64(tree):
    return tree_flatten_vector(tree).to(torch.float64)


def make_like(kind, dtype, names, shapes):
    leaves = [torch.zeros(s, dtype=dtype) for s in shapes]
    return dict(zip(names, leaves)) if kind == "dict" else tuple(leaves)


IN_NAMES, IN_SHAPES = ["w", "b"], [(2, 2), (2,)]  # p = 6 inner parameters, two leaves
OUT_NAMES = ["phi_w", "phi_b"]                      # one weight decay per inner parameter
P = 6


# ------------------------------------------------------------------------ ridge
class Ridge:
    """f = 1/(2n) |X theta - y|^2 + 1/2 sum_j phi_j theta_j^2,  g = 1/(2m) |Xv theta - yv|^2."""

    def __init__(self, kind="tuple", dtype=torch.float64, seed=0, n=40, m=30, p=P,
                 low_rank=None, noise=0.05, phi=None):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, p, generator=g, dtype=torch.float64)
        self.xv = torch.randn(m, p, generator=g, dtype=torch.float64)
        if low_rank is not None:  # features = low-rank signal + small isotropic noise
            basis = torch.randn(low_rank, p, generator=g, dtype=torch.float64)
            self.x = torch.randn(n, low_rank, generator=g, dtype=torch.float64) @ basis + noise * self.x
            self.xv = torch.randn(m, low_rank, generator=g, dtype=torch.float64) @ basis + noise * self.xv
        w_true = torch.randn(p, generator=g, dtype=torch.float64)
        self.y = self.x @ w_true + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
        self.yv = self.xv @ w_true + 0.5 * torch.randn(m, generator=g, dtype=torch.float64)
        self.phi64 = phi if phi is not None else 0.5 + torch.rand(p, generator=g, dtype=torch.float64)
        self.kind, self.dtype = kind, dtype
        shapes = IN_SHAPES if p == P else [(p,)]
        self.in_like = make_like(kind, dtype, IN_NAMES[: len(shapes)], shapes)
        self.out_like = make_like(kind, dtype, OUT_NAMES[: len(shapes)], shapes)
        self.theta64 = self.solve_inner(self.phi64)
        self.theta = tree_unflatten_vector(self.theta64.to(dtype), self.in_like)
        self.phi = tree_unflatten_vector(self.phi64.to(dtype), self.out_like)

    def hessian(self, phi64):
        n = self.x.shape[0]
        return self.x.T @ self.x / n + torch.diag(phi64)

    def solve_inner(self, phi64):
        return torch.linalg.solve(self.hessian(phi64), self.x.T @ self.y / self.x.shape[0])

    def val_loss64(self, theta64):
        return ((self.xv @ theta64 - self.yv) ** 2).sum() / (2 * self.xv.shape[0])

    def inner_obj(self, in_params, out_params):
        theta, phi = tree_flatten_vector(in_params), tree_flatten_vector(out_params)
        x, y = self.x.to(theta.dtype), self.y.to(theta.dtype)
        return ((x @ theta - y) ** 2).sum() / (2 * x.shape[0]) + 0.5 * (phi * theta**2).sum()

    def outer_obj(self, in_params, out_params):
        theta = tree_flatten_vector(in_params)
        xv, yv = self.xv.to(theta.dtype), self.yv.to(theta.dtype)
        return ((xv @ theta - yv) ** 2).sum() / (2 * xv.shape[0])

    def truth(self, rho=0.0):
        """dg/dphi with H replaced by H + rho I (rho = 0: the exact hypergradient)."""
        th = self.theta64
        grad_g = self.xv.T @ (self.xv @ th - self.yv) / self.xv.shape[0]
        h = self.hessian(self.phi64) + rho * torch.eye(len(th), dtype=torch.float64)
        return -th * torch.linalg.solve(h, grad_g)

    def lambda_max(self):
        return torch.linalg.eigvalsh(self.hessian(self.phi64)).max().item()


# name -> (factory(problem, dtype) -> method with options bound, rho of its exact target,
#          relative tolerance in float64, relative tolerance in float32)
def _nystrom(sketch, rho64, rho32):
    def make(prob, dtype):
        rho = rho64 if dtype == torch.float64 else rho32
        return functools.partial(nystrom, rank=P, rho=rho, sketch=sketch,
                                 generator=torch.Generator().manual_seed(0)), rho
    return make


METHODS = {
    "exact": (lambda prob, dtype: (exact, 0.0), 1e-10, 1e-4),
    "cg": (lambda prob, dtype: (functools.partial(conjugate_gradient, num_iters=P), 0.0), 1e-8, 1e-3),
    # Full rank with a tiny rho is the exact solve (float64). In float32 the Woodbury
    # cancellation costs ~u kappa^2 / rho, so a float32 user takes rho = 1e-2 and gets
    # (H + rho I)^{-1}; we compare against exactly that.
    "nystrom_column": (_nystrom("column", 1e-8, 1e-2), 1e-6, 1e-3),
    "nystrom_gaussian": (_nystrom("gaussian", 1e-8, 1e-2), 1e-6, 1e-3),
    "neumann": (lambda prob, dtype: (functools.partial(neumann, num_iters=80,
                                                       lr=1.0 / prob.lambda_max()), 0.0), 1e-8, 1e-3),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("hvp_mode", HVP_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_ridge_full_budget_matches_closed_form(method, hvp_mode, dtype, kind):
    prob = Ridge(kind, dtype)
    factory, tol64, tol32 = METHODS[method]
    fn, rho = factory(prob, dtype)
    out = fn(prob.inner_obj, prob.outer_obj, prob.theta, prob.phi, hvp_mode=hvp_mode)

    assert type(out) is type(prob.phi)
    if kind == "dict":
        assert list(out.keys()) == OUT_NAMES
    for o, ph in zip(tree_leaves(out), tree_leaves(prob.phi)):
        assert o.shape == ph.shape and o.dtype == dtype
    tol = tol64 if dtype == torch.float64 else tol32
    assert rel_err(flat64(out), prob.truth(rho)) < tol


def test_ridge_truth_matches_finite_difference_of_resolved_inner_problem():
    """The closed form, and the library, agree with a central difference of
    phi -> g(theta*(phi)) with the inner problem re-solved exactly at phi +- h e_j."""
    prob = Ridge("tuple", torch.float64)
    h = 1e-5
    fd = torch.zeros(P, dtype=torch.float64)
    for j in range(P):
        e = torch.zeros(P, dtype=torch.float64)
        e[j] = h
        fd[j] = (prob.val_loss64(prob.solve_inner(prob.phi64 + e))
                 - prob.val_loss64(prob.solve_inner(prob.phi64 - e))) / (2 * h)
    assert rel_err(prob.truth(), fd) < 1e-8
    for fn in (exact, functools.partial(conjugate_gradient, num_iters=P)):
        out = flat64(fn(prob.inner_obj, prob.outer_obj, prob.theta, prob.phi))
        assert rel_err(out, fd) < 1e-8


def test_truncated_budgets_are_approximate_but_converge():
    """Sanity of the budgets: fewer CG/Neumann iterations give a worse hypergradient, more
    give a better one (so the full-budget tests are not trivially satisfied)."""
    prob = Ridge("dict", torch.float64)
    truth = prob.truth()
    lr = 1.0 / prob.lambda_max()
    errs_cg = [rel_err(flat64(conjugate_gradient(prob.inner_obj, prob.outer_obj, prob.theta, prob.phi,
                                                 num_iters=k)), truth) for k in (1, 3, P)]
    errs_nm = [rel_err(flat64(neumann(prob.inner_obj, prob.outer_obj, prob.theta, prob.phi,
                                      num_iters=k, lr=lr)), truth) for k in (1, 10, 100)]
    assert errs_cg[0] > 1e-3 and errs_cg[0] > errs_cg[1] > errs_cg[2]
    assert errs_nm[0] > 1e-2 and errs_nm[0] > errs_nm[1] > errs_nm[2]


# ------------------------------------------------------------------------ logistic
class Logistic:
    """f = mean BCE(X theta, y) + 1/2 sum exp(phi_j) theta_j^2,  g = mean BCE(Xv theta, yv)."""

    def __init__(self, kind, seed=3, n=30, m=25):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, P, generator=g, dtype=torch.float64)
        self.xv = torch.randn(m, P, generator=g, dtype=torch.float64)
        w = 2 * torch.randn(P, generator=g, dtype=torch.float64)
        flip = lambda z: (torch.rand(z.shape[0], generator=g, dtype=torch.float64)  # noqa: E731
                          < torch.sigmoid(z @ w)).to(torch.float64)
        self.y, self.yv = flip(self.x), flip(self.xv)
        self.phi64 = torch.randn(P, generator=g, dtype=torch.float64) * 0.5 - 1.0
        self.theta64 = self.newton()
        self.theta = tree_unflatten_vector(self.theta64, make_like(kind, torch.float64, IN_NAMES, IN_SHAPES))
        self.phi = tree_unflatten_vector(self.phi64, make_like(kind, torch.float64, OUT_NAMES, IN_SHAPES))

    def grad_hess(self, theta):
        n = self.x.shape[0]
        s = torch.sigmoid(self.x @ theta)
        lam = torch.exp(self.phi64)
        grad = self.x.T @ (s - self.y) / n + lam * theta
        hess = (self.x.T * (s * (1 - s))) @ self.x / n + torch.diag(lam)
        return grad, hess

    def newton(self):
        theta = torch.zeros(P, dtype=torch.float64)
        for _ in range(50):
            grad, hess = self.grad_hess(theta)
            theta = theta - torch.linalg.solve(hess, grad)
            if torch.linalg.vector_norm(grad) < 1e-15:
                break
        grad, _ = self.grad_hess(theta)
        assert torch.linalg.vector_norm(grad) < 1e-13, "Newton did not converge"
        return theta

    def inner_obj(self, in_params, out_params):
        theta, phi = tree_flatten_vector(in_params), tree_flatten_vector(out_params)
        loss = F.binary_cross_entropy_with_logits(self.x @ theta, self.y)
        return loss + 0.5 * (torch.exp(phi) * theta**2).sum()

    def outer_obj(self, in_params, out_params):
        theta = tree_flatten_vector(in_params)
        return F.binary_cross_entropy_with_logits(self.xv @ theta, self.yv)

    def lambda_max(self):
        return torch.linalg.eigvalsh(self.grad_hess(self.theta64)[1]).max().item()

    def truth(self):
        th = self.theta64
        grad_g = self.xv.T @ (torch.sigmoid(self.xv @ th) - self.yv) / self.xv.shape[0]
        _, hess = self.grad_hess(th)
        # d^2 f / dphi_j dtheta_k = delta_jk exp(phi_j) theta_j
        return -(torch.exp(self.phi64) * th) * torch.linalg.solve(hess, grad_g)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("hvp_mode", HVP_MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_logistic_full_budget_matches_explicit_formula(method, hvp_mode, kind):
    prob = Logistic(kind)
    factory, tol64, _ = METHODS[method]
    fn, rho = factory(prob, torch.float64)
    assert rho < 1e-6
    out = fn(prob.inner_obj, prob.outer_obj, prob.theta, prob.phi, hvp_mode=hvp_mode)
    assert type(out) is type(prob.phi)
    assert rel_err(flat64(out), prob.truth()) < tol64


# ------------------------------------------------------------------------ low-rank Nyström
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sketch", ["column", "gaussian"])
def test_nystrom_low_rank_points_the_right_way(sketch, seed):
    """p = 20, rank 5, on a Hessian with 3 large eigenvalues and a flat tail at ~1e-2 (features
    = rank-3 signal + small noise, weight decay 1e-2): the hypergradient is finite and its
    cosine to the truth is > 0.9. Ignoring the curvature (IHVP = grad g / rho) is not."""
    p, noise, wd = 20, 0.05, 1e-2
    prob = Ridge("tuple", torch.float64, seed=seed, n=100, m=100, p=p, low_rank=3, noise=noise,
                 phi=torch.full((p,), wd, dtype=torch.float64))
    eigs = torch.linalg.eigvalsh(prob.hessian(prob.phi64))
    assert eigs[-3] > 100 * eigs[-4]  # the spectrum does decay fast
    truth = prob.truth()
    rho = noise**2 + wd  # the level of the tail
    out = flat64(nystrom(prob.inner_obj, prob.outer_obj, prob.theta, prob.phi, rank=5, rho=rho,
                         sketch=sketch, generator=torch.Generator().manual_seed(seed)))
    assert torch.isfinite(out).all()

    def cosine(v):
        return (v @ truth / (v.norm() * truth.norm())).item()

    assert cosine(out) > 0.9
    grad_g = prob.xv.T @ (prob.xv @ prob.theta64 - prob.yv) / prob.xv.shape[0]
    assert cosine(-prob.theta64 * grad_g / rho) < 0.5


# ------------------------------------------------------------------------ bad input
ALL_METHODS = {
    "exact": exact,
    "cg": functools.partial(conjugate_gradient, num_iters=3),
    "neumann": functools.partial(neumann, num_iters=3, lr=0.1),
    "nystrom_column": functools.partial(nystrom, rank=2, rho=0.1, sketch="column"),
    "nystrom_gaussian": functools.partial(nystrom, rank=2, rho=0.1, sketch="gaussian"),
}


class Counting:
    """Wraps an objective and counts calls (to show validation happens before any work)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_non_scalar_objectives_are_named(method):
    prob = Ridge("tuple", torch.float64)
    fn = ALL_METHODS[method]

    def inner_vec(i, o):
        return prob.inner_obj(i, o) * torch.ones(3, dtype=torch.float64)

    def outer_vec(i, o):
        return prob.outer_obj(i, o) * torch.ones(2, dtype=torch.float64)

    with pytest.raises(ValueError, match="inner_obj"):
        fn(inner_vec, prob.outer_obj, prob.theta, prob.phi)
    with pytest.raises(ValueError, match="outer_obj"):
        fn(prob.inner_obj, outer_vec, prob.theta, prob.phi)
    with pytest.raises(TypeError, match="inner_obj"):
        fn(lambda i, o: 1.0, prob.outer_obj, prob.theta, prob.phi)
    # A (1,)-shaped loss is accepted as a scalar.
    out = fn(lambda i, o: prob.inner_obj(i, o).reshape(1), prob.outer_obj, prob.theta, prob.phi)
    assert torch.isfinite(flat64(out)).all()


@pytest.mark.parametrize("method", ALL_METHODS)
def test_bad_params_raise_before_any_work(method):
    prob = Ridge("dict", torch.float64)
    fn = ALL_METHODS[method]
    inner, outer = Counting(prob.inner_obj), Counting(prob.outer_obj)
    theta_vec = flat64(prob.theta)
    cases = [
        ((theta_vec, prob.phi), TypeError, "in_params"),
        ((prob.theta, flat64(prob.phi)), TypeError, "out_params"),
        (([theta_vec.numpy()], prob.phi), TypeError, "in_params"),
        (((), prob.phi), ValueError, "in_params` is empty"),
        (({}, prob.phi), ValueError, "in_params` is empty"),
        ((prob.theta, {}), ValueError, "out_params` is empty"),
    ]
    for (i, o), exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn(inner, outer, i, o)
    with pytest.raises(ValueError, match="hvp_mode"):
        fn(inner, outer, prob.theta, prob.phi, hvp_mode="fwd_fwd")
    assert inner.calls == 0 and outer.calls == 0


def test_bad_options_raise_before_any_work():
    prob = Ridge("tuple", torch.float64)
    inner, outer = Counting(prob.inner_obj), Counting(prob.outer_obj)
    args = (inner, outer, prob.theta, prob.phi)
    for rank in (0, -1, P + 1, 2.0):
        with pytest.raises(ValueError, match="rank"):
            nystrom(*args, rank=rank, rho=0.1)
    for rho in (0, 0.0, -1e-3):
        with pytest.raises(ValueError, match="rho"):
            nystrom(*args, rank=2, rho=rho)
    with pytest.raises(ValueError, match="sketch"):
        nystrom(*args, rank=2, rho=0.1, sketch="svd")
    for k in (0, -3):
        with pytest.raises(ValueError, match="num_iters"):
            conjugate_gradient(*args, num_iters=k)
        with pytest.raises(ValueError, match="num_iters"):
            neumann(*args, num_iters=k, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        neumann(*args, num_iters=3, lr=0.0)
    with pytest.raises(ValueError, match="lr"):
        conjugate_gradient(*args, num_iters=3, lr=-1.0)
    with pytest.raises(ValueError, match="tol"):
        conjugate_gradient(*args, num_iters=3, tol=-1.0)
    assert inner.calls == 0 and outer.calls == 0


def test_inputs_are_not_modified():
    prob = Ridge("dict", torch.float64)
    theta = {k: v.clone().requires_grad_(True) for k, v in prob.theta.items()}
    phi = {k: v.clone() for k, v in prob.phi.items()}
    before = flat64(theta).detach().clone(), flat64(phi).clone()
    out = exact(prob.inner_obj, prob.outer_obj, theta, phi)
    assert torch.equal(flat64(theta).detach(), before[0]) and torch.equal(flat64(phi), before[1])
    assert rel_err(flat64(out).detach(), prob.truth()) < 1e-10


def test_nystrom_hvp_chunks_give_the_same_hypergradient():
    """Vectorizing the Nyström products a few at a time only bounds memory."""
    torch.manual_seed(0)
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    theta, phi = (torch.randn(6, dtype=torch.float64),), (torch.rand(6, dtype=torch.float64) + 0.5,)

    def inner(i, o):
        return ((x @ i[0] - y) ** 2).mean() + 0.5 * (o[0] * i[0] ** 2).sum()

    def outer(i, o):
        return ((x @ i[0] - 1.0) ** 2).mean()

    results = [
        nystrom(inner, outer, theta, phi, rank=5, rho=0.1, generator=torch.Generator().manual_seed(3),
                hvp_chunk_size=chunk)[0]
        for chunk in (None, 2, 1)
    ]
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(results[2], results[0], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="hvp_chunk_size"):
        nystrom(inner, outer, theta, phi, rank=5, rho=0.1, hvp_chunk_size=0)
