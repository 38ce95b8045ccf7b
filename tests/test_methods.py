"""The method table (:mod:`hypergrad.methods`): Nyström-preconditioned CG and the first-order
``identity`` method against closed forms, the amortized Nyström solver's refresh schedule
and state, and option validation in one place."""

import functools

import pytest
import torch
from test_approx_hypergrad import P, Ridge, flat64, rel_err

from hypergrad.approx_hypergrad import identity, implicit_hypergrad, make_solver, nystrom, nystrom_pcg
from hypergrad.linear_solvers import NystromFactor, solve_pcg
from hypergrad.methods import METHODS, NystromSolver, check_problem_size, get_method, method_options, options_metadata
from hypergrad.trees import tree_flatten_vector


@pytest.mark.parametrize("kind", ["tuple", "dict"])
@pytest.mark.parametrize("hvp_mode", ["rev_rev", "fwd_rev"])
def test_nystrom_pcg_matches_closed_form(kind, hvp_mode):
    prob = Ridge(kind, torch.float64, low_rank=2)
    out = nystrom_pcg(prob.inner_obj, prob.outer_obj, prob.theta, prob.phi, rank=2, num_iters=P, rho=1e-2,
                      generator=torch.Generator().manual_seed(0), hvp_mode=hvp_mode)
    assert rel_err(flat64(out), prob.truth()) < 1e-8  # CG on H itself: exact after p steps


def test_pcg_with_a_good_preconditioner_beats_cg_at_equal_steps():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64))
    evals = torch.cat([torch.logspace(3, 1, 5, dtype=torch.float64), 0.5 + torch.rand(45, generator=g, dtype=torch.float64)])
    a = (q * evals) @ q.T
    b = (torch.randn(50, generator=g, dtype=torch.float64),)
    truth = torch.linalg.solve(a, b[0])
    matvec = lambda v: (a @ v[0],)  # noqa: E731
    factor = NystromFactor.sketch(lambda vs: (vs[0] @ a,), b, 8, 1.0, "gaussian", g)
    pcg = solve_pcg(matvec, b, 6, factor.precondition)[0]
    cg = solve_pcg(matvec, b, 6, lambda r: r)[0]
    assert rel_err(pcg, truth) < 0.05 * rel_err(cg, truth)
    u, lam = factor.eig()  # U^T diag(lam) U is the Nyström approximation Y W^-1 Y^T
    y, omega = factor.y[0], factor.omega[0]
    dense = y.T @ torch.linalg.solve(omega @ y.T, y)
    torch.testing.assert_close((u[0].T * lam) @ u[0], dense, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(u[0] @ u[0].T, torch.eye(len(lam), dtype=torch.float64))


def test_reused_pcg_preconditioner_costs_no_product_and_stays_unbiased():
    """A preconditioner sketched on a *different* Hessian (the previous outer step's) is reused:
    the second call spends only its CG products, and CG run to ``p`` steps still solves the
    current system exactly; with a few steps it beats unpreconditioned CG when the Hessian
    drifted little."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    evals = torch.cat([torch.logspace(3, 1, 6, dtype=torch.float64), 0.5 + torch.rand(34, generator=g, dtype=torch.float64)])
    a_old = (q * evals) @ q.T
    drift = torch.randn(40, 40, generator=g, dtype=torch.float64) * 0.05
    a_new = a_old + drift @ drift.T  # nearby SPD matrix
    b = (torch.randn(40, generator=g, dtype=torch.float64),)
    truth = torch.linalg.solve(a_new, b[0])
    products = []

    def products_of(a):
        def mv(v):
            products.append(1)
            return (a @ v[0],)

        def bmv(vs):
            products.append(len(vs[0]))
            return (vs[0] @ a,)
        return mv, bmv

    solver = METHODS["nystrom_pcg"].build(method_options("nystrom_pcg", rank=8, rho=1.0, num_iters=6,
                                                          refresh_steps=2))
    solver(*products_of(a_old), b, generator=g)  # call 0: sketch (8) + 6 CG products
    assert sum(products) == 8 + 6
    products.clear()
    reused = solver(*products_of(a_new), b)[0]  # call 1: the old factor preconditions the new system
    assert sum(products) == 6 and solver.calls == 2
    cg = solve_pcg(lambda v: (a_new @ v[0],), b, 6, lambda r: r)[0]
    assert rel_err(reused, truth) < 0.1 * rel_err(cg, truth)
    stale = solver.factor.precondition
    exact = solve_pcg(lambda v: (a_new @ v[0],), b, 40, stale)[0]
    assert rel_err(exact, truth) < 1e-8  # unbiased: any SPD preconditioner converges to H^-1 b
    assert solver.refresh_due  # call 2 sketches anew


def test_identity_method_has_its_known_bias():
    """On the ridge problem ``H^{-1}`` is replaced by ``scale * I``: the result is
    ``-theta * scale * grad g`` in closed form (exact when ``H = I / scale``)."""
    prob = Ridge("tuple", torch.float64)
    out = identity(prob.inner_obj, prob.outer_obj, prob.theta, prob.phi, scale=0.3)
    th = prob.theta64
    grad_g = prob.xv.T @ (prob.xv @ th - prob.yv) / prob.xv.shape[0]
    torch.testing.assert_close(flat64(out), -th * 0.3 * grad_g, rtol=1e-12, atol=1e-12)
    assert rel_err(flat64(out), prob.truth()) > 0.05  # biased, as documented


def test_amortized_nystrom_refreshes_on_schedule_and_round_trips():
    prob = Ridge("dict", torch.float64)
    solver = NystromSolver(rank=3, rho=0.1, refresh_steps=3)
    sketches = []

    def run(phi, seed):
        def solve(mv, bmv, b, reduce=lambda x: x):
            def counted(vs):
                sketches.append(1)
                return bmv(vs)
            return solver(mv, counted, b, reduce, generator=torch.Generator().manual_seed(seed))
        return implicit_hypergrad(prob.inner_obj, prob.outer_obj, prob.theta, phi, solve)

    outs = [run(prob.phi, seed) for seed in range(7)]
    assert len(sketches) == 3 and solver.calls == 7  # calls 0, 3 and 6 sketch
    fresh = nystrom(prob.inner_obj, prob.outer_obj, prob.theta, prob.phi, rank=3, rho=0.1,
                    generator=torch.Generator().manual_seed(0))
    for i in (0, 1, 2):  # the same point: a reused factor gives the fresh hypergradient of call 0
        torch.testing.assert_close(tree_flatten_vector(outs[i]), tree_flatten_vector(fresh))
    restored = NystromSolver(rank=3, rho=0.1, refresh_steps=3)
    restored.load_state_dict(solver.state_dict(), like=prob.theta)
    assert restored.calls == 7 and not restored.refresh_due
    b = {k: torch.randn_like(v) for k, v in prob.theta.items()}
    for x, y in zip(restored.factor.solve(b).values(), solver.factor.solve(b).values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    with pytest.raises(ValueError, match="another model"):
        restored.load_state_dict(solver.state_dict(), like={k: torch.zeros(2, 9) for k in prob.theta})


def test_a_poisoned_factor_is_never_reused():
    solver = NystromSolver(rank=1, rho=0.1, refresh_steps=10)
    b = (torch.ones(3),)
    out = solver(None, lambda vs: (torch.full_like(vs[0], float("nan")),), b)
    assert not torch.isfinite(out[0]).all() and solver.refresh_due


def test_options_are_validated_once_with_their_names():
    with pytest.raises(ValueError, match="refresh_steps"):
        make_solver("nystrom", rank=2, rho=0.1, refresh_steps=0)
    with pytest.raises(TypeError, match="no option"):
        make_solver("cg", num_iters=3, rank=2)
    with pytest.raises(ValueError, match="unknown IHVP method"):
        make_solver("newton")
    with pytest.raises(ValueError, match="rank"):
        check_problem_size("nystrom_pcg", method_options("nystrom_pcg", rank=9), 5)
    assert options_metadata("nystrom", method_options("nystrom", rank=4))["rank"] == "4"
    assert {"nystrom", "nystrom_pcg", "cg", "neumann", "identity", "exact"} == set(METHODS)


def _solver(method, **options):
    """The stateful solver itself (``make_solver`` wraps it in a ``functools.partial``)."""
    return get_method(method).build(method_options(method, **options))


@pytest.mark.parametrize("method", ["cg", "nystrom_pcg"])
def test_warm_started_solver_starts_each_call_from_the_last_solution_and_round_trips(method):
    """On a ridge bilevel problem whose phi moves a little between calls, the warm solver's second
    hypergradient is closer to the closed form than a cold start with the same products (CG), and a
    solver restored from ``state_dict`` continues identically."""
    prob = Ridge("dict", torch.float64, low_rank=3)
    options = {"num_iters": 4} if method == "cg" else {"num_iters": 3, "rank": 2, "rho": 1e-2, "refresh_steps": 5}
    warm, cold = _solver(method, warm_start=True, **options), _solver(method, **options)

    def solve(problem, solver):
        return implicit_hypergrad(problem.inner_obj, problem.outer_obj, problem.theta, problem.phi,
                                  functools.partial(solver, generator=torch.Generator().manual_seed(0)))

    solve(prob, warm)
    solve(prob, cold)
    saved = {k: v.clone() for k, v in warm.state_dict().items()}
    assert any(k.startswith("warm_start.") for k in saved) and not any(k.startswith("warm_start.")
                                                                       for k in cold.state_dict())
    restored = _solver(method, warm_start=True, **options)
    restored.load_state_dict(saved, like=prob.theta)
    moved = Ridge("dict", torch.float64, low_rank=3, phi=prob.phi64 * 1.01)
    second, again, cold_second = solve(moved, warm), solve(moved, restored), solve(moved, cold)
    torch.testing.assert_close(flat64(again), flat64(second), rtol=0, atol=0)
    assert rel_err(flat64(second), moved.truth()) < 0.5 * rel_err(flat64(cold_second), moved.truth())
    with pytest.raises(ValueError, match="another model"):
        _solver(method, warm_start=True, **options).load_state_dict(saved, like={"w": torch.zeros(3)})


def test_a_non_finite_solution_is_never_a_warm_start():
    solver = _solver("cg", num_iters=2, warm_start=True)
    b = (torch.ones(3),)
    out = solver(lambda v: (torch.full_like(v[0], float("nan")),), None, b)
    assert not torch.isfinite(out[0]).all() and solver.state_dict() == {}
    assert solver.warm.start(b) is None


def test_warm_start_option_is_validated_and_recorded():
    with pytest.raises(ValueError, match="warm_start"):
        make_solver("cg", num_iters=3, warm_start="yes")
    with pytest.raises(TypeError, match="no option"):
        make_solver("nystrom", rank=2, rho=0.1, warm_start=True)
    assert options_metadata("cg", method_options("cg", warm_start=True))["warm_start"] == "True"
    assert _solver("cg", num_iters=3).state_dict() == {}  # off: nothing kept
