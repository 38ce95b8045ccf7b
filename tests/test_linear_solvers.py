"""Matrix-free linear solvers of :mod:`hypergrad.linear_solvers` on random SPD systems.

Ground truth: ``torch.linalg.solve`` on the dense float64 matrix (and, for Nyström with
``rank < p``, the closed form ``(A_nys + rho I)^{-1} b`` built from the dense matrix and the
sketch drawn with the same seeded generator). The matrix is only exposed to the solvers
through (batched) matrix-vector products on parameter trees (tuple or dict).
"""

import itertools

import pytest
import torch

from hypergrad.linear_solvers import (NYSTROM_SKETCHES, _initial_iterate, _sample_indices, nystrom_sketch, solve_cg,
                                      solve_dense, solve_neumann, solve_nystrom, solve_pcg)
from hypergrad.trees import tree_flatten_vector, tree_leaves, tree_unflatten, tree_unflatten_vector

KINDS = ["tuple", "dict"]
SHAPES = {"a": (2, 3), "b": (), "c": (5,)}  # 12 unknowns, one 0-d leaf
N = 12


def rel_err(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def spd(n, eigs, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return ((q * torch.as_tensor(eigs, dtype=torch.float64)) @ q.T).to(dtype)


def like_tree(kind, dtype=torch.float64):
    leaves = [torch.zeros(s, dtype=dtype) for s in SHAPES.values()]
    return dict(zip(SHAPES, leaves)) if kind == "dict" else tuple(leaves)


def batched_flat(tree):
    leaves = tree_leaves(tree)
    return torch.cat([x.reshape(x.shape[0], -1) for x in leaves], dim=1)


class System:
    """``A`` as matvec / batched matvec on trees shaped like ``like``; counts products."""

    def __init__(self, a, like):
        self.a, self.like, self.products = a, like, 0

    def matvec(self, v):
        self.products += 1
        return tree_unflatten_vector(self.a @ tree_flatten_vector(v), self.like)

    def batched_matvec(self, v):
        flat = batched_flat(v)
        self.products += flat.shape[0]
        return tree_unflatten_vector(flat @ self.a.T, self.like)


def random_rhs(like, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tree_unflatten(like, [torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)
                                 for x in tree_leaves(like)])


# ------------------------------------------------------------------------ CG
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lr", [1.0, 0.05])
def test_cg_exact_after_n_iterations(kind, lr):
    like = like_tree(kind)
    a = spd(N, torch.linspace(1, 20, N))
    b = random_rhs(like)
    sys = System(a, like)
    x = solve_cg(sys.matvec, b, num_iters=N, lr=lr)
    assert type(x) is type(b)
    truth = torch.linalg.solve(a, tree_flatten_vector(b))
    assert rel_err(tree_flatten_vector(x), truth) < 1e-10
    assert sys.products == N


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("solver", ["cg", "pcg"])
def test_warm_start_is_cold_cg_on_the_residual_system_within_the_same_products(kind, solver):
    """From ``x0``, CG is ``a x0 + CG(A, b - a A x0)`` with one product fewer (the residual takes
    it), so the budget stays ``num_iters`` products; ``a = <b, x0> / <x0, A x0>`` minimises the
    A-norm error of ``a x0``; from the exact solution nothing moves."""
    like = like_tree(kind)
    a = spd(N, torch.logspace(0, 2, N))
    b, x0 = random_rhs(like, seed=1), random_rhs(like, seed=2)
    flat_b, flat_x0 = tree_flatten_vector(b), tree_flatten_vector(x0)
    scale = (flat_b @ flat_x0) / (flat_x0 @ a @ flat_x0)
    residual = tree_unflatten_vector(flat_b - scale * (a @ flat_x0), like)
    precondition = (lambda r: r) if solver == "cg" else (
        lambda r: tree_unflatten_vector(torch.linalg.solve(a + torch.eye(N, dtype=a.dtype), tree_flatten_vector(r)),
                                        like))

    def solve(system, rhs, iters, start=None):
        if solver == "cg":
            return solve_cg(system.matvec, rhs, iters, x0=start)
        return solve_pcg(system.matvec, rhs, iters, precondition, x0=start)

    warm_system = System(a, like)
    warm = solve(warm_system, b, 5, x0)
    assert type(warm) is type(b) and warm_system.products == 5
    shifted = tree_flatten_vector(solve(System(a, like), residual, 4))
    torch.testing.assert_close(tree_flatten_vector(warm), scale * flat_x0 + shifted, rtol=1e-12, atol=1e-12)
    truth = torch.linalg.solve(a, flat_b)

    def energy_error(x):
        return float((x - truth) @ a @ (x - truth))

    assert energy_error(scale * flat_x0) <= min(energy_error(flat_x0), energy_error(torch.zeros_like(truth)))
    flipped = tree_unflatten_vector(-flat_x0 if flat_b @ flat_x0 > 0 else flat_x0, like)  # points away
    start, _, left = _initial_iterate(System(a, like).matvec, b, flipped, 5, lambda t: t)
    assert left == 4 and float(tree_flatten_vector(start) @ flat_b) >= 0
    exact_start = tree_unflatten_vector(truth, like)
    torch.testing.assert_close(tree_flatten_vector(solve(System(a, like), b, 3, exact_start)), truth,
                               rtol=1e-10, atol=1e-10)


def test_warm_start_without_positive_curvature_starts_at_zero():
    like = (torch.zeros(3, dtype=torch.float64),)
    a = torch.diag(torch.tensor([-1.0, 2.0, 3.0], dtype=torch.float64))  # not SPD along x0
    b, x0 = (torch.ones(3, dtype=torch.float64),), (torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),)
    start, residual, left = _initial_iterate(System(a, like).matvec, b, x0, 3, lambda t: t)
    assert left == 2 and torch.equal(start[0], torch.zeros(3, dtype=torch.float64)) and torch.equal(residual[0], b[0])


def test_warm_start_near_the_solution_beats_a_cold_start_at_equal_products():
    like = (torch.zeros(N, dtype=torch.float64),)
    a = spd(N, torch.logspace(0, 3, N), seed=5)
    b = random_rhs(like, seed=6)
    truth = torch.linalg.solve(a, b[0])
    near = (truth + 1e-3 * truth.norm() * torch.randn(N, generator=torch.Generator().manual_seed(7),
                                                      dtype=torch.float64) / N**0.5,)
    cold = solve_cg(System(a, like).matvec, b, 4)[0]
    warm = solve_cg(System(a, like).matvec, b, 4, x0=near)[0]
    assert rel_err(warm, truth) < 1e-3 < rel_err(cold, truth)


def _cg_old_residual(matvec_flat, b, num_iters):
    """A WRONG variant: the new direction is built from the OLD residual (p <- r_old + beta p)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = r @ r
    for _ in range(num_iters):
        ap = matvec_flat(p)
        alpha = rs / (p @ ap)
        x = x + alpha * p
        r_old = r
        r = r - alpha * ap
        rs_new = r @ r
        p = r_old + (rs_new / rs) * p
        rs = rs_new
    return x


@pytest.mark.parametrize("log_cond, num_iters, tol", [(2, 1, 1e-7), (4, 2, 1e-10), (6, 3, 1e-8)])
def test_cg_is_textbook_on_ill_conditioned_system(log_cond, num_iters, tol):
    """Eigenvalues log-spaced over ``log_cond`` decades: textbook CG reaches a tiny residual in
    n products (kappa = 1e2), or a small multiple of n once round-off has cost the Krylov
    basis its orthogonality (kappa = 1e4, 1e6: a finite-precision effect of *textbook* CG,
    seen in any implementation). The old-residual variant never gets anywhere."""
    n = 10
    a = spd(n, torch.logspace(0, log_cond, n), seed=3)
    like = (torch.zeros(n, dtype=torch.float64),)
    b = random_rhs(like, seed=4)
    bf = tree_flatten_vector(b)

    def residual(x):
        return (torch.linalg.vector_norm(a @ x - bf) / torch.linalg.vector_norm(bf)).item()

    x = tree_flatten_vector(solve_cg(System(a, like).matvec, b, num_iters=num_iters * n))
    assert residual(x) < tol
    for iters in (n, num_iters * n, 5 * n):
        assert residual(_cg_old_residual(lambda v: a @ v, bf, iters)) > 0.5


def test_cg_tol_stops_early():
    n = 50
    like = (torch.zeros(n, dtype=torch.float64),)
    a = spd(n, torch.linspace(1, 10, n), seed=5)
    b = random_rhs(like)
    bf = tree_flatten_vector(b)

    def residual(x):
        return (torch.linalg.vector_norm(a @ tree_flatten_vector(x) - bf) / torch.linalg.vector_norm(bf)).item()

    sys = System(a, like)
    x = solve_cg(sys.matvec, b, num_iters=100, tol=1e-3)
    assert residual(x) <= 1e-3
    assert 1 <= sys.products < n // 2  # stopped long before n products
    # ... and not too late: one product fewer does not reach the tolerance.
    assert residual(solve_cg(System(a, like).matvec, b, num_iters=sys.products - 1)) > 1e-3
    # tol=0 runs every iteration.
    sys0 = System(a, like)
    solve_cg(sys0.matvec, b, num_iters=n)
    assert sys0.products == n


def test_cg_zero_rhs_returns_zero_without_products():
    like = like_tree("dict")
    sys = System(spd(N, torch.linspace(1, 2, N)), like)
    x = solve_cg(sys.matvec, like, num_iters=5)
    assert sys.products == 0
    assert all(torch.equal(v, torch.zeros_like(v)) for v in tree_leaves(x))


def test_cg_fewer_iterations_reduce_the_error_monotonically_in_a_norm():
    """CG minimises the A-norm of the error over growing Krylov spaces."""
    like = like_tree("tuple")
    a = spd(N, torch.logspace(0, 2, N), seed=6)
    b = random_rhs(like)
    truth = torch.linalg.solve(a, tree_flatten_vector(b))
    errs = []
    for k in range(1, N + 1):
        e = tree_flatten_vector(solve_cg(System(a, like).matvec, b, num_iters=k)) - truth
        errs.append((e @ a @ e).item())
    assert all(e2 <= e1 * (1 + 1e-9) for e1, e2 in zip(errs, errs[1:]))
    assert errs[-1] < 1e-14 * errs[0]


# ------------------------------------------------------------------------ Neumann
@pytest.mark.parametrize("kind", KINDS)
def test_neumann_converges_below_two_over_lambda_max(kind):
    like = like_tree(kind)
    a = spd(N, torch.linspace(1, 4, N))
    b = random_rhs(like)
    truth = torch.linalg.solve(a, tree_flatten_vector(b))
    for lr in (0.25, 0.45):  # 1/lambda_max and just below 2/lambda_max = 0.5
        sys = System(a, like)
        x = solve_neumann(sys.matvec, b, num_iters=400, lr=lr)
        assert type(x) is type(b)
        assert sys.products == 400
        assert rel_err(tree_flatten_vector(x), truth) < 1e-10


def test_neumann_truncation_error_and_divergence():
    like = like_tree("tuple")
    a = spd(N, torch.linspace(1, 4, N))
    b = random_rhs(like)
    bf = tree_flatten_vector(b)
    # K terms: x_K = A^{-1} (I - (I - lr A)^{K+1}) b exactly.
    lr, k = 0.25, 7
    m = torch.eye(N, dtype=torch.float64) - lr * a
    closed = torch.linalg.solve(a, bf - torch.linalg.matrix_power(m, k + 1) @ bf)
    x = tree_flatten_vector(solve_neumann(System(a, like).matvec, b, num_iters=k, lr=lr))
    assert rel_err(x, closed) < 1e-12
    # Above 2 / lambda_max the series diverges.
    x = tree_flatten_vector(solve_neumann(System(a, like).matvec, b, num_iters=200, lr=0.6))
    assert torch.linalg.vector_norm(x) > 1e6


# ------------------------------------------------------------------------ Nyström
@pytest.mark.parametrize("sketch", NYSTROM_SKETCHES)
@pytest.mark.parametrize("kind", KINDS)
def test_nystrom_full_rank_is_exact(sketch, kind):
    """rank = p: A_nys = A, so the result is (A + rho I)^{-1} b up to round-off, and with a
    tiny rho it is the exact solve.

    The Woodbury form x = (b - Y (rho W + Y^T Y)^+ Y^T b) / rho cancels b almost exactly
    before dividing by rho, so its round-off is about u kappa(A)^2 / rho relative (u the
    unit round-off): ~1e-11 for rho = 1e-3 and ~1e-7 for rho = 1e-8 with kappa(A) = 4.
    """
    like = like_tree(kind)
    a = spd(N, torch.linspace(1, 4, N))
    b = random_rhs(like)
    bf = tree_flatten_vector(b)
    eye = torch.eye(N, dtype=torch.float64)
    for rho, tol, truth in ((1e-3, 1e-10, torch.linalg.solve(a + 1e-3 * eye, bf)),
                            (1e-8, 1e-6, torch.linalg.solve(a, bf))):
        sys = System(a, like)
        x = solve_nystrom(sys.batched_matvec, b, rank=N, rho=rho, sketch=sketch,
                          generator=torch.Generator().manual_seed(0))
        assert type(x) is type(b)
        assert sys.products == N
        assert rel_err(tree_flatten_vector(x), truth) < tol


def nystrom_closed_form(a, omega_flat, rho, b):
    """(A_nys + rho I)^{-1} b with A_nys = (A Om^T) (Om A Om^T)^+ (Om A)."""
    y = a @ omega_flat.T
    a_nys = y @ torch.linalg.pinv(omega_flat @ y, hermitian=True) @ y.T
    return torch.linalg.solve(a_nys + rho * torch.eye(a.shape[0], dtype=a.dtype), b)


@pytest.mark.parametrize("rank", [1, 4, 9])
@pytest.mark.parametrize("kind", KINDS)
def test_nystrom_column_low_rank_matches_closed_form(rank, kind):
    like = like_tree(kind)
    a = spd(N, torch.logspace(0, 2, N), seed=7)
    b = random_rhs(like)
    bf = tree_flatten_vector(b)
    rho = 0.3

    omega = batched_flat(nystrom_sketch(like, rank, "column", torch.Generator().manual_seed(11)))
    k = omega.argmax(dim=1)  # the sampled columns K
    # Column-sampling Nyström: A[:, K] A[K, K]^+ A[K, :].
    a_nys = a[:, k] @ torch.linalg.pinv(a[k][:, k], hermitian=True) @ a[k, :]
    truth = torch.linalg.solve(a_nys + rho * torch.eye(N, dtype=torch.float64), bf)
    assert rel_err(nystrom_closed_form(a, omega, rho, bf), truth) < 1e-10  # same object

    x = solve_nystrom(System(a, like).batched_matvec, b, rank=rank, rho=rho, sketch="column",
                      generator=torch.Generator().manual_seed(11))
    assert rel_err(tree_flatten_vector(x), truth) < 1e-9


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_nystrom_gaussian_low_rank_matches_closed_form(rank):
    like = like_tree("dict")
    a = spd(N, torch.logspace(0, 2, N), seed=8)
    b = random_rhs(like)
    bf = tree_flatten_vector(b)
    omega = batched_flat(nystrom_sketch(like, rank, "gaussian", torch.Generator().manual_seed(3)))
    truth = nystrom_closed_form(a, omega, 0.3, bf)
    x = solve_nystrom(System(a, like).batched_matvec, b, rank=rank, rho=0.3, sketch="gaussian",
                      generator=torch.Generator().manual_seed(3))
    assert rel_err(tree_flatten_vector(x), truth) < 1e-9


def test_nystrom_low_rank_captures_dominant_spectrum():
    """Rank k + 5 Gaussian sketch of a matrix with k large eigenvalues and a negligible tail:
    close to (A + rho I)^{-1} b although the sketch sees only 15 of 40 directions."""
    n, k = 40, 10
    eigs = torch.cat([torch.logspace(3, 1, k), torch.full((n - k,), 1e-6)])
    a = spd(n, eigs, seed=9)
    like = (torch.zeros(n, dtype=torch.float64),)
    b = random_rhs(like, seed=2)
    rho = 1e-2
    truth = torch.linalg.solve(a + rho * torch.eye(n, dtype=torch.float64), tree_flatten_vector(b))
    x = solve_nystrom(System(a, like).batched_matvec, b, rank=k + 5, rho=rho, sketch="gaussian",
                      generator=torch.Generator().manual_seed(0))
    assert rel_err(tree_flatten_vector(x), truth) < 1e-3
    # Whereas ignoring the top eigenspace (x = b / rho) is far off.
    assert rel_err(tree_flatten_vector(b) / rho, truth) > 0.1


def test_nystrom_is_seeded_by_generator():
    like = like_tree("tuple")
    a = spd(N, torch.logspace(0, 2, N))
    b = random_rhs(like)
    run = lambda seed: tree_flatten_vector(solve_nystrom(  # noqa: E731
        System(a, like).batched_matvec, b, rank=3, rho=0.1, generator=torch.Generator().manual_seed(seed)))
    assert torch.equal(run(5), run(5))
    assert not torch.allclose(run(5), run(6))


@pytest.mark.parametrize("kind", KINDS)
def test_column_sketch_rows_are_distinct_one_hot(kind):
    like = like_tree(kind)
    for rank in (1, 5, N):
        sk = nystrom_sketch(like, rank, "column", torch.Generator().manual_seed(rank))
        assert type(sk) is type(like)
        for s, x in zip(tree_leaves(sk), tree_leaves(like)):
            assert s.shape == (rank, *x.shape) and s.dtype == x.dtype
        flat = batched_flat(sk)
        assert torch.all((flat == 0) | (flat == 1))
        assert torch.equal(flat.sum(dim=1), torch.ones(rank, dtype=flat.dtype))
        assert len(set(flat.argmax(dim=1).tolist())) == rank
    # rank = p: a permutation matrix.
    assert torch.equal(batched_flat(nystrom_sketch(like, N, "column")).sum(0), torch.ones(N, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_gaussian_sketch_rows_are_orthonormal(dtype, kind):
    like = like_tree(kind, dtype)
    for rank in (1, 6, N):
        sk = nystrom_sketch(like, rank, "gaussian", torch.Generator().manual_seed(rank))
        assert type(sk) is type(like)
        flat = batched_flat(sk)
        assert flat.dtype == dtype and flat.shape == (rank, N)
        gram = flat.double() @ flat.double().T
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert torch.allclose(gram, torch.eye(rank, dtype=torch.float64), atol=tol)


def test_sample_indices_distinct_and_uniform():
    """Floyd's sampling: k distinct indices, every index with marginal k/p and every
    k-subset equally likely (loose chi-square checks, fixed seed)."""
    p, k, trials = 6, 2, 6000
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(p)
    subsets = {s: 0 for s in itertools.combinations(range(p), k)}
    for _ in range(trials):
        idx = _sample_indices(p, k, gen, "cpu")
        assert idx.dtype == torch.long and idx.shape == (k,)
        chosen = idx.tolist()
        assert len(set(chosen)) == k and all(0 <= i < p for i in chosen)
        counts[chosen] += 1
        subsets[tuple(sorted(chosen))] += 1
    expected = trials * k / p
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 20.5  # 99.9% quantile of chi^2 with 5 dof
    exp_s = trials / len(subsets)
    chi2_s = sum((c - exp_s) ** 2 / exp_s for c in subsets.values())
    assert chi2_s < 36.1  # 99.9% quantile of chi^2 with 14 dof
    # k = p is a permutation.
    assert sorted(_sample_indices(9, 9, gen, "cpu").tolist()) == list(range(9))


# ------------------------------------------------------------------------ dense
@pytest.mark.parametrize("kind", KINDS)
def test_solve_dense_exact(kind):
    like = like_tree(kind)
    a = spd(N, torch.logspace(0, 3, N), seed=10)
    b = random_rhs(like)
    x = solve_dense(System(a, like).batched_matvec, b)
    assert type(x) is type(b)
    assert rel_err(tree_flatten_vector(x), torch.linalg.solve(a, tree_flatten_vector(b))) < 1e-12


# ------------------------------------------------------------------------ validation
def test_validation_errors():
    like = like_tree("tuple")
    sys = System(spd(N, torch.linspace(1, 2, N)), like)
    b = random_rhs(like)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_iters"):
            solve_cg(sys.matvec, b, num_iters=bad)
        with pytest.raises(ValueError, match="num_iters"):
            solve_neumann(sys.matvec, b, num_iters=bad, lr=0.1)
        with pytest.raises(ValueError, match="rank"):
            solve_nystrom(sys.batched_matvec, b, rank=bad, rho=0.1)
    for bad in (0, -0.1, 0.0):
        with pytest.raises(ValueError, match="rho"):
            solve_nystrom(sys.batched_matvec, b, rank=2, rho=bad)
        with pytest.raises(ValueError, match="lr"):
            solve_neumann(sys.matvec, b, num_iters=2, lr=bad)
        with pytest.raises(ValueError, match="lr"):
            solve_cg(sys.matvec, b, num_iters=2, lr=bad)
    with pytest.raises(ValueError, match="rank"):
        solve_nystrom(sys.batched_matvec, b, rank=N + 1, rho=0.1)
    with pytest.raises(ValueError, match="sketch"):
        solve_nystrom(sys.batched_matvec, b, rank=2, rho=0.1, sketch="rademacher")
    with pytest.raises(ValueError, match="sketch"):
        nystrom_sketch(b, 2, "rademacher")
    assert sys.products == 0  # every error was raised before any product
