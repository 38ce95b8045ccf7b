#!/usr/bin/env python
"""Wall-clock time of one implicit hypergradient: hypergrad versus TorchOpt and the seed library.

The question: *same method, same number of Hessian-vector products (HVPs), same problem:
is our hypergradient at least as fast as TorchOpt's?* Each timed call computes one full
hypergradient ``dg/dphi = grad_phi g - (d^2 f / dphi dtheta) H^{-1} grad_theta g`` from an
already-solved inner problem: the outer gradient, the IHVP by the linear solver and the
final mixed second-derivative product are all inside the timer.

Compared (float32, CPU):

* **ours**: ``hypergrad.approx_hypergrad.conjugate_gradient`` / ``neumann`` with
  ``num_iters = N``, once with the library's default ``hvp_mode`` (not passed) and once with
  ``hvp_mode="rev_rev"``.
* **TorchOpt** (``pip install -e .[bench]``, torchopt 0.7.3), the idiomatic way:
  ``torchopt.diff.implicit.custom_root(torch.func.grad(inner, argnums=0), argnums=1,
  solve=...)`` wrapped around an inner "solver" that returns the stored optimum, then
  ``torch.autograd.grad(outer(theta, phi), phi)``. TorchOpt builds its products as
  ``functorch.vjp`` of the optimality condition (reverse-over-reverse, graph built once),
  solves with ``torchopt.linear_solve.solve_cg(maxiter=N, rtol=0, atol=0)`` (no early stop)
  or ``solve_inv(ns=True, maxiter=N, alpha=lr)``.
* **Nyström vs seed**: ``nystrom(..., rank=k, rho=0.1)`` (default sketch, and
  ``sketch="column"``) versus the seed library's formula (Hataya's original ``hypergrad``),
  re-written here with ``torch.func``: ``k`` sampled Hessian rows by ``jacrev`` of the gathered
  inner gradient, the Woodbury solve of ``(rho I + C^T M^-1 C) x = b`` with a ``k x k``
  system, and the mixed term by ``jvp`` of ``grad_phi f`` (a second linearization). The
  requirement checked is ours >= 2x faster than the seed. The sketch's ``k`` products are also
  timed alone, ours (one linearization, ``k`` backward passes through it) and the seed's (the
  ``jacrev`` above): they cost the same, so ``seed / ours' products`` bounds the speed-up any
  fresh-sketch hypergradient built from exact products can reach, even if everything else
  (outer gradient, mixed product, solve) were free.
* **Nyström over a run** (``nystrom_amortized``): ``REFRESH_STEPS`` (10) consecutive points of a bilevel
  run (built untimed: each outer step moves ``phi`` against the hypergradient, at most 0.1 per
  parameter, then 20 warm-started Adam steps follow ``theta``), one hypergradient at each. Ours with
  one :class:`hypergrad.methods.NystromSolver` (``refresh_steps=10``, the trainer's default
  ``nystrom_refresh_steps``: one sketch, then only the stored factor), ours with a fresh sketch at
  every point, and the seed's formula at every point (it has no reuse). Reported per hypergradient,
  with the cosine of each amortized hypergradient to the fresh one at the same point; two references
  for that cosine: our fresh sketch against the seed's (other random directions at the same point)
  and the first point's hypergradient against the last's (how far the run moves).

How products are counted: a product is one application of ``v -> H v`` inside the linear
solver (the outer gradient and the final mixed product, one each in every implementation,
are not counted). The counts in the tables are *measured* by wrapping the solver's
``matvec`` once per configuration outside the timer, through the same public pieces
``conjugate_gradient`` / ``neumann`` are made of (``make_solver`` + ``implicit_hypergrad``)
and through the ``solve`` TorchOpt's ``custom_root`` calls.

* CG: ours does ``N`` products for ``N`` iterations. TorchOpt's ``linalg.cg`` forms the
  initial residual ``b - A x0`` with a product even for ``x0 = 0``, so the same ``N``
  iterations cost it ``N + 1`` products. We keep the iterations equal (so both return the
  same vector and the relative difference checks correctness) and show both counts; the
  extra product is part of TorchOpt's cost.
* Neumann: both compute ``lr * sum_{j=0}^{N} (I - lr H)^j b`` with ``N`` products (TorchOpt's
  ``alpha`` is our ``lr``); ``lr = 1 / lambda_max`` from power iteration (untimed).
* Nyström: ``k`` products; ours one backward each through one shared graph, the seed's by a
  ``jacrev`` (vectorized backward passes).

Problems: (1) ``mlp50k``: a 64-256-128-10 tanh MLP (50,826 inner parameters) on random
data (labels from a random linear teacher with 10% label noise); inner = cross-entropy on
512 training examples + ``sum_i exp(phi_i) |theta_i|^2 / 2`` with one strength per
parameter tensor (6 outer parameters), trained by 300 Adam steps; outer = cross-entropy on
256 validation examples. (2) ``logreg33``: 3-class logistic regression on 10 features
(33 inner parameters) with one L2 strength per feature (10 outer parameters), inner problem
solved by L-BFGS; 200 training / 100 validation examples.

Timing: every implementation is called once untimed (warm-up, and the result used for the
relative difference), then ``--repeats`` rounds run all implementations of a row one after
the other (interleaved) and the minimum per implementation is reported. Torch's thread count
is left at its default (recorded in the output); on a shared 2-core machine timings are
noisy, so compare within a row, not across runs.

TorchOpt on torch 2.13: ``torchopt._C`` (its compiled extension) fails to load against
torch 2.13 (``undefined symbol`` from ``at::_ops::empty_like``); torchopt catches that and
falls back to pure-Python ops (``torchopt.accelerated_op.is_available()`` is False). The
extension only backs the fused Adam operator: ``torchopt.linear_solve.solve_cg`` /
``solve_inv(ns=True)``, ``torchopt.linalg`` and ``torchopt.diff.implicit.custom_root`` are pure
Python (``functorch.vjp`` and optree pytrees) and work; the relative differences against our
results in the tables confirm it.

Run: ``python benchmarks/solver_speed.py [--repeats 5] [--out PATH]`` (well under three
minutes on two CPU cores). Prints markdown tables and writes
``benchmarks/results/solver_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from torch.func import grad, jacrev, jvp
from torch.nn import functional as F

from hypergrad.approx_hypergrad import conjugate_gradient, implicit_hypergrad, make_solver, neumann, nystrom
from hypergrad.linear_solvers import nystrom_sketch
from hypergrad.methods import NystromSolver
from hypergrad.products import linearize_inner

try:
    import torchopt
    from torchopt.diff.implicit import custom_root
    from torchopt.linear_solve import solve_cg as torchopt_solve_cg
    from torchopt.linear_solve import solve_inv as torchopt_solve_inv
except ImportError as exc:  # pragma: no cover - benchmark-only dependency
    raise SystemExit(f"{exc}: install the benchmark extra with `pip install -e .[bench]`.")

DTYPE = torch.float32
PRODUCTS = (10, 20)
NYSTROM_RANKS = (5, 10)
NYSTROM_RHO = 0.1
REFRESH_STEPS = 10  # the trainer's default nystrom_refresh_steps
OUTER_STEP = 0.1  # largest change of an outer parameter per step of the amortized trajectory
Params = tuple[Tensor, ...]

# torchopt 0.7.3 calls the deprecated ``functorch.vjp`` on every backward.
warnings.filterwarnings("ignore", message=r".*functorch\.vjp.*deprecated", category=FutureWarning)


# --------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------


@dataclass
class Problem:
    name: str
    description: str
    inner: Callable[[Params, Params], Tensor]
    outer: Callable[[Params, Params], Tensor]
    theta: Params  # inner parameters at (approximately) the inner optimum
    phi: Params  # outer parameters
    neumann_lr: float = float("nan")

    @property
    def num_inner(self) -> int:
        return sum(t.numel() for t in self.theta)


def _flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _lambda_max(f: Callable[[Params], Tensor], theta: Params, steps: int = 30) -> float:
    """Largest Hessian eigenvalue of ``f`` at ``theta`` by power iteration (not timed)."""
    g = torch.Generator().manual_seed(1)
    v = tuple(torch.randn(t.shape, generator=g, dtype=t.dtype) for t in theta)
    lam = 0.0
    for _ in range(steps):
        norm = _flat(v).norm()
        v = tuple(x / norm for x in v)
        hv = jvp(grad(f), (theta,), (v,))[1]
        lam = float(_flat(hv) @ _flat(v))
        v = hv
    return lam


def _minimize(loss: Callable[[Params], Tensor], theta: Params, optimizer: str, steps: int) -> Params:
    params = [t.clone().requires_grad_() for t in theta]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            loss(tuple(params)).backward()
            opt.step()
    else:
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=steps, tolerance_grad=1e-9,
                                tolerance_change=0.0, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = loss(tuple(params))
            value.backward()
            return value

        opt.step(closure)
    return tuple(p.detach() for p in params)


def _teacher_data(g: torch.Generator, n: int, features: int, classes: int, noise: float):
    x = torch.randn(n, features, generator=g, dtype=DTYPE)
    w = torch.randn(features, classes, generator=g, dtype=DTYPE)
    y = (x @ w).argmax(1)
    flip = torch.rand(n, generator=g) < noise
    y[flip] = torch.randint(classes, (int(flip.sum()),), generator=g)
    return x, y


def mlp_problem(seed: int = 0) -> Problem:
    sizes = (64, 256, 128, 10)
    g = torch.Generator().manual_seed(seed)
    x, y = _teacher_data(g, 512 + 256, sizes[0], sizes[-1], noise=0.1)
    x_tr, y_tr, x_val, y_val = x[:512], y[:512], x[512:], y[512:]
    theta0: list[Tensor] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = 1 / math.sqrt(fan_in)
        theta0.append((torch.rand(fan_out, fan_in, generator=g, dtype=DTYPE) * 2 - 1) * bound)
        theta0.append((torch.rand(fan_out, generator=g, dtype=DTYPE) * 2 - 1) * bound)
    phi = (torch.full((len(theta0),), math.log(1e-2), dtype=DTYPE),)

    def forward(theta: Params, inputs: Tensor) -> Tensor:
        h = inputs
        for i in range(0, len(theta), 2):
            h = F.linear(h, theta[i], theta[i + 1])
            if i + 2 < len(theta):
                h = torch.tanh(h)
        return h

    def inner(theta: Params, phi: Params) -> Tensor:
        strengths = phi[0].exp()
        penalty = sum(strengths[i] * t.pow(2).sum() for i, t in enumerate(theta))
        return F.cross_entropy(forward(theta, x_tr), y_tr) + 0.5 * penalty

    def outer(theta: Params, phi: Params) -> Tensor:
        return F.cross_entropy(forward(theta, x_val), y_val)

    theta = _minimize(lambda t: inner(t, phi), tuple(theta0), "adam", steps=300)
    return Problem("mlp50k", "64-256-128-10 tanh MLP, 512 train / 256 val, per-tensor L2 strengths",
                   inner, outer, theta, phi)


def logreg_problem(seed: int = 0) -> Problem:
    features, classes = 10, 3
    g = torch.Generator().manual_seed(seed)
    x, y = _teacher_data(g, 300, features, classes, noise=0.1)
    x_tr, y_tr, x_val, y_val = x[:200], y[:200], x[200:], y[200:]
    phi = (torch.full((features,), math.log(1e-1), dtype=DTYPE),)

    def inner(theta: Params, phi: Params) -> Tensor:
        w, b = theta
        penalty = (phi[0].exp() * w.pow(2).sum(1)).sum()
        return F.cross_entropy(x_tr @ w + b, y_tr) + 0.5 * penalty

    def outer(theta: Params, phi: Params) -> Tensor:
        w, b = theta
        return F.cross_entropy(x_val @ w + b, y_val)

    theta0 = (torch.zeros(features, classes, dtype=DTYPE), torch.zeros(classes, dtype=DTYPE))
    theta = _minimize(lambda t: inner(t, phi), theta0, "lbfgs", steps=200)
    return Problem("logreg33", "logistic regression, 10 features x 3 classes, per-feature L2 strengths",
                   inner, outer, theta, phi)


# --------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------


def ours_fn(problem: Problem, method: str, n: int, hvp_mode: str | None) -> Callable[[], Params]:
    fn = conjugate_gradient if method == "cg" else neumann
    kwargs: dict = {"num_iters": n}
    if method == "neumann":
        kwargs["lr"] = problem.neumann_lr
    if hvp_mode is not None:
        kwargs["hvp_mode"] = hvp_mode
    return lambda: fn(problem.inner, problem.outer, problem.theta, problem.phi, **kwargs)


def torchopt_solve(problem: Problem, method: str, n: int):
    if method == "cg":
        return torchopt_solve_cg(maxiter=n, rtol=0.0, atol=0.0)
    return torchopt_solve_inv(ns=True, maxiter=n, alpha=problem.neumann_lr)


def torchopt_fn(problem: Problem, solve) -> Callable[[], Params]:
    """TorchOpt's implicit differentiation: ``custom_root`` with the inner gradient as the
    optimality condition around a "solver" that returns the stored inner optimum."""

    @custom_root(grad(problem.inner, argnums=0), argnums=1, solve=solve)
    def inner_solution(theta_init: Params, phi: Params) -> Params:
        return problem.theta

    def hypergrad() -> Params:
        phi = tuple(p.detach().requires_grad_() for p in problem.phi)
        theta = inner_solution(problem.theta, phi)
        return torch.autograd.grad(problem.outer(theta, phi), phi)

    return hypergrad


def counting(solve, counter: list[int]):
    """``solve`` with its first argument (the matvec) counting its calls into ``counter``."""

    def wrapped(matvec, *args, **kwargs):
        def counted(v):
            counter[0] += 1
            return matvec(v)

        return solve(counted, *args, **kwargs)

    return wrapped


def count_products(problem: Problem, method: str, n: int) -> tuple[int, int]:
    """Products made by our solver and by TorchOpt's for ``n`` iterations (untimed)."""
    ours, theirs = [0], [0]
    options = {"num_iters": n} if method == "cg" else {"num_iters": n, "lr": problem.neumann_lr}
    implicit_hypergrad(problem.inner, problem.outer, problem.theta, problem.phi,
                       counting(make_solver(method, **options), ours))
    torchopt_fn(problem, counting(torchopt_solve(problem, method, n), theirs))()
    return ours[0], theirs[0]


def seed_nystrom(problem: Problem, rank: int, rho: float, idx: Tensor | None = None) -> Params:
    """The seed library's Nyström hypergradient, its formula written with ``torch.func``:
    the outer gradient by ``grad``; the ``rank`` sampled Hessian rows by ``jacrev`` of the
    gathered inner gradient (one linearization, the rows vectorized); the Woodbury solve with a
    ``rank x rank`` system; the mixed term by ``jvp`` of ``grad_phi f`` (forward over reverse,
    a second linearization)."""
    theta, phi = tuple(problem.theta), tuple(problem.phi)
    grad_in, grad_out = grad(problem.outer, argnums=(0, 1))(theta, phi)
    if idx is None:
        idx = torch.randperm(sum(t.numel() for t in theta))[:rank]

    c = seed_hessian_rows(problem, idx)
    m = c[:, idx]
    b = _flat(grad_in)
    # Woodbury: (rho I + C^T M^-1 C)^{-1} b = b / rho - C^T (M + C C^T / rho)^{-1} C b / rho^2
    x = b / rho - c.T @ torch.linalg.solve(m + c @ c.T / rho, c @ b) / rho**2
    ihvp, offset = [], 0
    for t in theta:
        ihvp.append(x[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    _, mixed = jvp(lambda t: grad(problem.inner, argnums=1)(t, phi), (theta,), (tuple(ihvp),))
    return tuple(go - mi for go, mi in zip(grad_out, mixed))


def seed_hessian_rows(problem: Problem, idx: Tensor) -> Tensor:
    """The seed's sketch alone: the Hessian rows ``H[idx, :]`` (``k x p``) by ``jacrev`` of the gathered
    inner gradient."""
    phi = tuple(problem.phi)

    def rows(t: Params) -> Tensor:
        return _flat(grad(lambda p: problem.inner(p, phi))(t))[idx]

    return torch.cat([x.reshape(len(idx), -1) for x in jacrev(rows)(tuple(problem.theta))], dim=1)


def column_indices(problem: Problem, rank: int, seed: int) -> Tensor:
    """The flat indices our ``sketch="column"`` draws with ``torch.Generator().manual_seed(seed)``."""
    omega = nystrom_sketch(problem.theta, rank, "column", torch.Generator().manual_seed(seed))
    return torch.cat([x.reshape(rank, -1) for x in omega], dim=1).argmax(1)


# --------------------------------------------------------------------------------------
# Timing and reporting
# --------------------------------------------------------------------------------------


def rel_diff(a: Params, b: Params) -> float:
    fa, fb = _flat(a).double(), _flat(b).double()
    return float((fa - fb).norm() / fb.norm().clamp_min(1e-300))


def time_interleaved(fns: dict[str, Callable[[], Params]], repeats: int) -> tuple[dict, dict]:
    """One untimed warm-up call each (its result is returned), then ``repeats`` interleaved
    rounds; the minimum time per implementation."""
    results = {name: fn() for name, fn in fns.items()}
    best = {name: math.inf for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def bench_solvers(problem: Problem, repeats: int) -> list[dict]:
    rows = []
    for method in ("cg", "neumann"):
        for n in PRODUCTS:
            fns = {
                "ours": ours_fn(problem, method, n, None),
                "ours_rev_rev": ours_fn(problem, method, n, "rev_rev"),
                "torchopt": torchopt_fn(problem, torchopt_solve(problem, method, n)),
            }
            best, res = time_interleaved(fns, repeats)
            ours_products, torchopt_products = count_products(problem, method, n)
            rows.append({
                "method": method, "iterations": n,
                "products_ours": ours_products, "products_torchopt": torchopt_products,
                "ours_s": best["ours"], "ours_rev_rev_s": best["ours_rev_rev"], "torchopt_s": best["torchopt"],
                "ratio_torchopt_over_ours": best["torchopt"] / best["ours"],
                "ratio_torchopt_over_ours_rev_rev": best["torchopt"] / best["ours_rev_rev"],
                "rel_diff": rel_diff(res["ours"], res["torchopt"]),
                "rel_diff_rev_rev": rel_diff(res["ours_rev_rev"], res["torchopt"]),
            })
    return rows


def bench_nystrom(problem: Problem, repeats: int, seed: int = 0) -> list[dict]:
    rows = []
    for rank in NYSTROM_RANKS:
        idx = column_indices(problem, rank, seed)
        args = (problem.inner, problem.outer, problem.theta, problem.phi)
        fns = {
            "ours": lambda: nystrom(*args, rank=rank, rho=NYSTROM_RHO),
            "ours_column": lambda: nystrom(*args, rank=rank, rho=NYSTROM_RHO, sketch="column",
                                           generator=torch.Generator().manual_seed(seed)),
            "seed": lambda: seed_nystrom(problem, rank, NYSTROM_RHO, idx),
        }
        omega = nystrom_sketch(problem.theta, rank, "column", torch.Generator().manual_seed(seed))
        fns["ours_products"] = lambda: linearize_inner(problem.inner, problem.theta, problem.phi).batched_hvp(omega)
        fns["seed_products"] = lambda: seed_hessian_rows(problem, idx)
        best, res = time_interleaved(fns, repeats)
        rows.append({
            "rank": rank, "rho": NYSTROM_RHO,
            "ours_s": best["ours"], "ours_column_s": best["ours_column"], "seed_s": best["seed"],
            "speedup_seed_over_ours": best["seed"] / best["ours"],
            "speedup_seed_over_ours_column": best["seed"] / best["ours_column"],
            "at_least_2x": best["seed"] / best["ours"] >= 2.0,
            "rel_diff_column_vs_seed": rel_diff(res["ours_column"], res["seed"]),
            "ours_products_s": best["ours_products"], "seed_products_s": best["seed_products"],
            "speedup_bound": best["seed"] / best["ours_products"],
        })
    return rows


def outer_trajectory(problem: Problem, steps: int, rank: int, inner_steps: int = 20) -> list[tuple[Params, Params]]:
    """``steps`` consecutive points ``(theta_j, phi_j)`` of a bilevel run (built untimed): from the problem's
    point, each outer step moves ``phi`` against the hypergradient (the seed's Nyström, at most ``OUTER_STEP``
    per parameter) and ``inner_steps`` warm-started Adam steps follow ``theta`` to the new inner problem."""
    theta, phi = tuple(problem.theta), tuple(problem.phi)
    points = [(theta, phi)]
    for _ in range(steps - 1):
        h = seed_nystrom(replace(problem, theta=theta, phi=phi), rank, NYSTROM_RHO)
        scale = OUTER_STEP / max(float(_flat(h).abs().max()), 1e-30)
        phi = tuple(p - scale * g for p, g in zip(phi, h))
        theta = _minimize(lambda t, phi=phi: problem.inner(t, phi), theta, "adam", steps=inner_steps)
        points.append((theta, phi))
    return points


def cosine(a: Params, b: Params) -> float:
    return float(F.cosine_similarity(_flat(a).double(), _flat(b).double(), dim=0))


def bench_nystrom_amortized(problem: Problem, repeats: int, refresh: int = REFRESH_STEPS) -> list[dict]:
    """Time per hypergradient over ``refresh`` consecutive outer steps: ours with one
    :class:`NystromSolver` that sketches at the first and reuses its factor for the others (the trainer's
    default), ours sketching anew at each, and the seed's formula at each (it has no reuse). Also the cosine of
    every amortized hypergradient to the fresh-sketch one at the same point, with two references: the cosine
    between our fresh sketch and the seed's (other random directions, same point) and between the first and the
    last point's hypergradients (how far the trajectory moves)."""
    points = outer_trajectory(problem, refresh, max(NYSTROM_RANKS))
    rows = []
    for rank in NYSTROM_RANKS:
        indices = [torch.randperm(problem.num_inner, generator=torch.Generator().manual_seed(j))[:rank]
                   for j in range(refresh)]

        def amortized() -> list[Params]:
            solver = NystromSolver(rank, NYSTROM_RHO, refresh_steps=refresh)
            torch.manual_seed(0)
            return [implicit_hypergrad(problem.inner, problem.outer, t, p, solver) for t, p in points]

        def fresh() -> list[Params]:
            return [nystrom(problem.inner, problem.outer, t, p, rank=rank, rho=NYSTROM_RHO,
                            generator=torch.Generator().manual_seed(j))
                    for j, (t, p) in enumerate(points)]

        def seed() -> list[Params]:
            return [seed_nystrom(replace(problem, theta=t, phi=p), rank, NYSTROM_RHO, indices[j])
                    for j, (t, p) in enumerate(points)]

        best, res = time_interleaved({"amortized": amortized, "fresh": fresh, "seed": seed}, repeats)
        cosines = [cosine(a, f) for a, f in zip(res["amortized"], res["fresh"])]
        sketch_to_sketch = [cosine(f, b) for f, b in zip(res["fresh"], res["seed"])]
        rows.append({
            "rank": rank, "rho": NYSTROM_RHO, "refresh_steps": refresh, "outer_steps": len(points),
            "sketches": -(-len(points) // refresh),
            "ours_amortized_s": best["amortized"] / len(points), "ours_fresh_s": best["fresh"] / len(points),
            "seed_s": best["seed"] / len(points),
            "speedup_seed_over_ours_amortized": best["seed"] / best["amortized"],
            "speedup_seed_over_ours_fresh": best["seed"] / best["fresh"],
            "at_least_2x": best["seed"] / best["amortized"] >= 2.0,
            "cosine_amortized_vs_fresh_mean": sum(cosines) / len(cosines),
            "cosine_amortized_vs_fresh_min": min(cosines),
            # references: two independent sketches at the same point, and how far the run moved
            "cosine_fresh_vs_seed_mean": sum(sketch_to_sketch) / len(sketch_to_sketch),
            "cosine_first_vs_last_fresh": cosine(res["fresh"][0], res["fresh"][-1]),
        })
    return rows


def markdown(heading: list[str], columns: list[str], rows: list[list[str]]) -> str:
    """``heading`` lines, a blank line, then a markdown table with ``columns`` and one line per row of cells."""
    lines = [*heading, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def solver_table(problem: Problem, rows: list[dict]) -> str:
    return markdown(
        [f"### {problem.name}: {problem.description} ({problem.num_inner} inner parameters)"],
        ["method", "products (ours / TorchOpt)", "ours s", "ours (rev_rev) s", "TorchOpt s", "ratio TorchOpt/ours",
         "ratio TorchOpt/ours (rev_rev)", "rel. diff"],
        [[r["method"], f"{r['products_ours']} / {r['products_torchopt']}", f"{r['ours_s']:.4f}",
          f"{r['ours_rev_rev_s']:.4f}", f"{r['torchopt_s']:.4f}", f"{r['ratio_torchopt_over_ours']:.2f}",
          f"{r['ratio_torchopt_over_ours_rev_rev']:.2f}", f"{r['rel_diff']:.1e}"] for r in rows])


def nystrom_table(results: dict) -> str:
    return markdown(
        [f"### Nyström (rho = {NYSTROM_RHO}): ours vs the seed library's formula"],
        ["problem", "rank = products", "ours s", "ours (column) s", "seed s", "seed/ours", ">= 2x",
         "seed/ours (column)", "rel. diff (column, same indices)", "products only: ours s / seed s",
         "bound: seed / ours' products"],
        [[name, str(r["rank"]), f"{r['ours_s']:.4f}", f"{r['ours_column_s']:.4f}", f"{r['seed_s']:.4f}",
          f"{r['speedup_seed_over_ours']:.2f}", "yes" if r["at_least_2x"] else "NO",
          f"{r['speedup_seed_over_ours_column']:.2f}", f"{r['rel_diff_column_vs_seed']:.1e}",
          f"{r['ours_products_s']:.4f} / {r['seed_products_s']:.4f}", f"{r['speedup_bound']:.2f}"]
         for name, entry in results.items() for r in entry["nystrom"]])


def amortized_table(results: dict) -> str:
    return markdown(
        [f"### Nyström over {REFRESH_STEPS} consecutive outer steps (rho = {NYSTROM_RHO}): seconds per "
         "hypergradient", "",
         "Ours sketches once and reuses the factor (`nystrom_refresh_steps`, the trainer's default); the seed's "
         "formula has no reuse."],
        ["problem", "rank", "sketches", "ours amortized s", "ours fresh s", "seed s", "seed/ours amortized",
         ">= 2x", "seed/ours fresh", "cosine amortized vs fresh (mean, min)", "cosine fresh vs seed",
         "cosine first vs last"],
        [[name, str(r["rank"]), str(r["sketches"]), f"{r['ours_amortized_s']:.4f}", f"{r['ours_fresh_s']:.4f}",
          f"{r['seed_s']:.4f}", f"{r['speedup_seed_over_ours_amortized']:.2f}", "yes" if r["at_least_2x"] else "NO",
          f"{r['speedup_seed_over_ours_fresh']:.2f}",
          f"{r['cosine_amortized_vs_fresh_mean']:.4f}, {r['cosine_amortized_vs_fresh_min']:.4f}",
          f"{r['cosine_fresh_vs_seed_mean']:.4f}", f"{r['cosine_first_vs_last_fresh']:.4f}"]
         for name, entry in results.items() for r in entry["nystrom_amortized"]])


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds (min is reported)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "solver_speed.json")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    torch.manual_seed(0)
    meta = {
        "torch": torch.__version__, "torchopt": torchopt.__version__,
        "torchopt_compiled_extension": torchopt.accelerated_op.is_available(),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "dtype": str(DTYPE), "repeats": args.repeats,
        "timing": "min over interleaved repeats after one warm-up call, seconds per hypergradient",
    }
    print(f"torch {meta['torch']}, torchopt {meta['torchopt']} (compiled extension: "
          f"{meta['torchopt_compiled_extension']}), {meta['torch_threads']} torch threads, "
          f"repeats {args.repeats}\n")

    results = {}
    for build in (mlp_problem, logreg_problem):
        problem = build()
        problem.neumann_lr = 1.0 / _lambda_max(lambda t: problem.inner(t, problem.phi), problem.theta)
        results[problem.name] = {
            "description": problem.description, "inner_parameters": problem.num_inner,
            "neumann_lr": problem.neumann_lr,
            "solvers": bench_solvers(problem, args.repeats),
            "nystrom": bench_nystrom(problem, args.repeats),
            "nystrom_amortized": bench_nystrom_amortized(problem, args.repeats),
        }
        print(solver_table(problem, results[problem.name]["solvers"]) + "\n", flush=True)
    print(nystrom_table(results) + "\n")
    print(amortized_table(results))

    write_json(args.out, {"meta": meta, "problems": results})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
