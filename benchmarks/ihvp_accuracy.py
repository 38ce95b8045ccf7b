#!/usr/bin/env python
"""Accuracy of the inverse-Hessian-vector-product (IHVP) approximations versus HVP budget.

For three bilevel problems whose true hypergradient is known to machine precision, this
script measures how close the approximate hypergradients of :mod:`hypergrad.approx_hypergrad`
get for a given number of Hessian-vector products (the *budget*):

* ``conjugate_gradient``: ``num_iters = budget``;
* ``neumann``: ``num_iters = budget``, ``lr = 1 / lambda_max`` with ``lambda_max`` estimated
  by 50 steps of power iteration (those products are not counted in the budget);
* ``nystrom`` with ``sketch="column"`` and ``sketch="gaussian"``: ``rank = budget``, ``rho``
  swept over ``{1e-4, 1e-3, 1e-2, 1e-1} x lambda_max`` and averaged over several seeds.
  The main table shows, per problem and sketch, the one ``rho`` (fixed across budgets) with
  the smallest mean log-error: an oracle choice made on the very problem it is evaluated
  on, so it flatters Nyström slightly. Every ``rho`` is in the JSON and in the sketch table.

Problems (all float64; a-c as asked, d added because its spectrum differs):

a. ``ridge``: ridge regression, 100 features with a covariance spectrum decaying from 1
   to 1e-3, per-feature weight decay in [1e-3, 1e-1] as outer parameters; closed form.
b. ``logreg``: L2-regularised logistic regression on scikit-learn digits (0-4 vs 5-9,
   standardized, 300 training images, 64 weights), per-feature weight decay; solved by
   Newton to a gradient norm ~1e-17; ground truth ``hypergrad.approx_hypergrad.exact``,
   checked once against the explicit formula ``-theta * H^{-1} grad_theta g``.
c. ``mlp``: a 30-8-1 tanh MLP (257 parameters) on scikit-learn breast_cancer
   (standardized, 200 training points) with one weight decay per parameter as outer
   parameters, trained by L-BFGS then polished by Newton steps; ground truth ``exact``.
d. ``distill``: the dataset-distillation problem of ``examples/dataset_distillation.py``:
   softmax regression (650 parameters) trained on 10 learnable standardized digits images
   (the 640 outer parameters) with weight decay 1e-2, outer loss on 1000 real images. Its
   Hessian is a rank <= 90 data term plus ``1e-2 I``, a flat tail: the regime Nyström is
   built for (a-c have spread-out spectra). Ground truth ``exact``, checked against the
   formula with the dense mixed Jacobian.

It also times one hypergradient per method at a fixed budget and compares batched
(``batched_hvp(..., vectorize=True)``, one ``vmap``) with looped (``vectorize=False``)
Hessian-vector products for k = 5, 20, 50 on the MLP and on a ~51k-parameter MLP.

Run ``python benchmarks/ihvp_accuracy.py`` (about 2 minutes on a 2-core CPU) or with
``--quick`` (under a minute); tables are printed as markdown and everything is written
to ``benchmarks/results/ihvp_accuracy.json``. Timings use one torch thread by default
(``--threads``) and report the best of several interleaved repeats.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian
from torch.nn import functional as F

from hypergrad.approx_hypergrad import (DEFAULT_NYSTROM_SKETCH, conjugate_gradient, exact, identity,
                                        implicit_hypergrad, make_solver, neumann, nystrom, nystrom_pcg)
from hypergrad.autodiff import batched_hvp, hvp
from hypergrad.trees import tree_flatten_vector, tree_unflatten_vector

DTYPE = torch.float64
RHO_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
SKETCHES = ("column", "gaussian")
NYSTROM_VARIANTS = ("column", "gaussian", "eigen")  # "eigen": exact top-k eigenvectors (oracle)


# --------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------


@dataclass
class Problem:
    name: str
    description: str
    inner_obj: Callable
    outer_obj: Callable
    in_params: tuple[Tensor, ...]
    out_params: tuple[Tensor, ...]
    true_hg: Tensor  # flat
    hessian: Tensor  # dense, for the spectrum summary and the eigen oracle only
    info: dict = field(default_factory=dict)

    @property
    def eig(self) -> tuple[Tensor, Tensor]:
        if "_eig" not in self.__dict__:
            self.__dict__["_eig"] = torch.linalg.eigh(self.hessian)
        return self.__dict__["_eig"]


def _flat_hessian(f: Callable, params: tuple[Tensor, ...]) -> Tensor:
    """Dense Hessian by reverse-over-reverse (``exact`` uses forward-over-reverse products, so
    the two are independent computations)."""
    v = tree_flatten_vector(params)
    h = torch.func.jacrev(torch.func.jacrev(lambda x: f(tree_unflatten_vector(x, params))))(v)
    return (h + h.T) / 2


def _newton(f: Callable, params: tuple[Tensor, ...], steps: int = 100, tol: float = 1e-15):
    """Damped Newton's method (backtracking on ``f``) on the flattened parameters, until the
    gradient norm is below ``tol`` or stops decreasing."""
    v = tree_flatten_vector(params)
    ff = lambda x: f(tree_unflatten_vector(x, params))  # noqa: E731
    g = grad(ff)(v)
    for _ in range(steps):
        if g.norm() < tol:
            break
        d = torch.linalg.solve(hessian(ff)(v), g)
        t, f0 = 1.0, ff(v)
        while t > 1e-8 and ff(v - t * d) > f0 + 1e-12 * abs(float(f0)):
            t /= 2
        v_new = v - t * d
        g_new = grad(ff)(v_new)
        if t == 1.0 and g_new.norm() >= g.norm():
            break  # converged to round-off
        v, g = v_new, g_new
    return tree_unflatten_vector(v, params), float(g.norm())


def _split(n: int, sizes: tuple[int, ...], seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for s in sizes:
        out.append(perm[start:start + s])
        start += s
    return out


def _standardize(x_train: np.ndarray, *others: np.ndarray) -> list[Tensor]:
    mu, sd = x_train.mean(0), x_train.std(0)
    sd[sd == 0] = 1.0
    return [torch.tensor((x - mu) / sd, dtype=DTYPE) for x in (x_train, *others)]


def ridge_problem(seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    n, m, d = 200, 200, 100
    spectrum = torch.logspace(0, -3, d, dtype=DTYPE)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DTYPE))

    def sample(k: int) -> Tensor:
        return (torch.randn(k, d, generator=g, dtype=DTYPE) * spectrum.sqrt()) @ q.T

    w_true = torch.randn(d, generator=g, dtype=DTYPE)
    x, xv = sample(n), sample(m)
    y = x @ w_true + 0.5 * torch.randn(n, generator=g, dtype=DTYPE)
    yv = xv @ w_true + 0.5 * torch.randn(m, generator=g, dtype=DTYPE)
    lam = 10 ** (torch.rand(d, generator=g, dtype=DTYPE) * 2 - 3)

    def inner(i, o):
        return 0.5 * (x @ i[0] - y).pow(2).mean() + 0.5 * (o[0] * i[0].pow(2)).sum()

    def outer(i, o):
        return 0.5 * (xv @ i[0] - yv).pow(2).mean()

    h = x.T @ x / n + torch.diag(lam)
    w = torch.linalg.solve(h, x.T @ y / n)
    g_w = xv.T @ (xv @ w - yv) / m
    true = -w * torch.linalg.solve(h, g_w)  # closed form: d^2f/dlam dw = diag(w)
    in_params, out_params = (w,), (lam,)
    check = tree_flatten_vector(exact(inner, outer, in_params, out_params))
    return Problem(
        "ridge", "ridge regression, 100 features, per-feature weight decay (closed form)",
        inner, outer, in_params, out_params, true, h,
        {"grad_norm_at_solution": float(grad(inner)(in_params, out_params)[0].norm()),
         "exact_vs_formula_rel_err": float((check - true).norm() / true.norm())},
    )


def logreg_problem(seed: int = 0) -> Problem:
    from sklearn.datasets import load_digits

    data = load_digits()
    x_all, y_all = data.data, (data.target >= 5).astype(np.float64)
    tr, va = _split(len(x_all), (300, 500), seed)
    x, xv = _standardize(x_all[tr], x_all[va])
    y, yv = torch.tensor(y_all[tr], dtype=DTYPE), torch.tensor(y_all[va], dtype=DTYPE)
    d = x.shape[1]
    g = torch.Generator().manual_seed(seed)
    lam = 10 ** (torch.rand(d, generator=g, dtype=DTYPE) * 2 - 3)

    def inner(i, o):
        return F.binary_cross_entropy_with_logits(x @ i[0], y) + 0.5 * (o[0] * i[0].pow(2)).sum()

    def outer(i, o):
        return F.binary_cross_entropy_with_logits(xv @ i[0], yv)

    out_params = (lam,)
    in_params, gnorm = _newton(lambda i: inner(i, out_params), (torch.zeros(d, dtype=DTYPE),))
    true = tree_flatten_vector(exact(inner, outer, in_params, out_params))
    # Explicit formula: H = X^T diag(s(1-s)) X / n + diag(lam), grad_w g = Xv^T (sv - yv) / m,
    # d^2 f / dlam dw = diag(w), so dg/dlam = -w * H^{-1} grad_w g.
    w = in_params[0]
    s = torch.sigmoid(x @ w)
    h = x.T @ ((s * (1 - s))[:, None] * x) / len(y) + torch.diag(lam)
    g_w = xv.T @ (torch.sigmoid(xv @ w) - yv) / len(yv)
    formula = -w * torch.linalg.solve(h, g_w)
    return Problem(
        "logreg", "L2 logistic regression, digits 0-4 vs 5-9, 64 weights, per-feature weight decay",
        inner, outer, in_params, out_params, true, h,
        {"grad_norm_at_solution": gnorm,
         "exact_vs_formula_rel_err": float((true - formula).norm() / formula.norm())},
    )


def _functional(net: nn.Module):
    names = [n for n, _ in net.named_parameters()]
    return lambda params, inp: functional_call(net, dict(zip(names, params)), (inp,))


def mlp_problem(seed: int = 0) -> Problem:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x_all, y_all = data.data, data.target.astype(np.float64)
    tr, va = _split(len(x_all), (200, len(x_all) - 200), seed)
    x, xv = _standardize(x_all[tr], x_all[va])
    y, yv = torch.tensor(y_all[tr], dtype=DTYPE), torch.tensor(y_all[va], dtype=DTYPE)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(30, 8), nn.Tanh(), nn.Linear(8, 1)).to(DTYPE)
    call = _functional(net)
    g = torch.Generator().manual_seed(seed)
    init = tuple(p.detach().clone() for p in net.parameters())
    # one weight decay per parameter, log-uniform in [10^-2.5, 10^-1.5]
    lam = tuple(10 ** (torch.rand(p.shape, generator=g, dtype=DTYPE) - 2.5) for p in init)

    def inner(i, o):
        loss = F.binary_cross_entropy_with_logits(call(i, x).squeeze(-1), y)
        return loss + 0.5 * sum((l * p.pow(2)).sum() for l, p in zip(o, i))

    def outer(i, o):
        return F.binary_cross_entropy_with_logits(call(i, xv).squeeze(-1), yv)

    ps = [p.clone().requires_grad_() for p in init]
    opt = torch.optim.LBFGS(ps, lr=1, max_iter=5000, tolerance_grad=1e-12, tolerance_change=0,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = inner(tuple(ps), lam)
        loss.backward()
        return loss

    opt.step(closure)
    in_params, gnorm = _newton(lambda i: inner(i, lam), tuple(p.detach() for p in ps), steps=5)
    true = tree_flatten_vector(exact(inner, outer, in_params, lam))
    h = _flat_hessian(lambda i: inner(i, lam), in_params)
    formula = -tree_flatten_vector(in_params) * torch.linalg.solve(
        h, tree_flatten_vector(grad(outer)(in_params, lam)))
    return Problem(
        "mlp", "30-8-1 tanh MLP on breast_cancer, 257 parameters, per-parameter weight decay",
        inner, outer, in_params, lam, true, h,
        {"grad_norm_at_solution": gnorm,
         "exact_vs_formula_rel_err": float((true - formula).norm() / formula.norm())},
    )


def distill_problem(seed: int = 0) -> Problem:
    """Dataset distillation (``examples/dataset_distillation.py``): softmax regression trained on
    10 learnable digits images (one per class) with weight decay 1e-2, outer loss on 1000 real
    images. The Hessian is a low-rank data term plus ``1e-2 I``: a flat tail, Nyström's case."""
    from sklearn.datasets import load_digits

    data = load_digits()
    (tr,) = _split(len(data.data), (1000,), seed)
    (x,) = _standardize(data.data[tr])
    y = torch.tensor(data.target[tr])
    g = torch.Generator().manual_seed(seed)
    pick = torch.stack([torch.nonzero(y == c).squeeze(1)[torch.randint(int((y == c).sum()), (1,), generator=g)]
                        for c in range(10)]).squeeze(1)
    images, labels = x[pick].clone(), y[pick].clone()
    wd = 1e-2
    torch.manual_seed(seed)
    net = nn.Linear(64, 10).to(DTYPE)
    call = _functional(net)

    def inner(i, o):
        return F.cross_entropy(call(i, o[0]), labels) + wd / 2 * sum(p.pow(2).sum() for p in i)

    def outer(i, o):
        return F.cross_entropy(call(i, x), y)

    out_params = (images,)
    in_params, gnorm = _newton(lambda i: inner(i, out_params), tuple(p.detach() for p in net.parameters()))
    true = tree_flatten_vector(exact(inner, outer, in_params, out_params))
    # explicit formula with the dense mixed Jacobian d(grad_theta f)/dX
    h = _flat_hessian(lambda i: inner(i, out_params), in_params)
    grad_theta = lambda img: tree_flatten_vector(grad(inner)(in_params, (img,)))  # noqa: E731
    mixed = torch.func.jacrev(grad_theta)(images).reshape(h.shape[0], -1)  # (p_in, p_out)
    g_theta = tree_flatten_vector(grad(outer)(in_params, out_params))
    formula = -mixed.T @ torch.linalg.solve(h, g_theta)
    return Problem(
        "distill", "softmax regression on 10 learnable digits images, weight decay 1e-2, outer = images",
        inner, outer, in_params, out_params, true, h,
        {"grad_norm_at_solution": gnorm,
         "exact_vs_formula_rel_err": float((true - formula).norm() / formula.norm())},
    )


# --------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------


def power_iteration(problem: Problem, iters: int = 50, seed: int = 0) -> float:
    """Estimate of the largest Hessian eigenvalue from ``iters`` Hessian-vector products."""
    f = lambda i: problem.inner_obj(i, problem.out_params)  # noqa: E731
    g = torch.Generator().manual_seed(seed)
    v = tree_unflatten_vector(
        torch.randn(sum(p.numel() for p in problem.in_params), generator=g, dtype=DTYPE),
        problem.in_params)
    est = 0.0
    for _ in range(iters):
        flat = tree_flatten_vector(v)
        flat = flat / flat.norm()
        hv = tree_flatten_vector(hvp(f, problem.in_params, tree_unflatten_vector(flat, v)))
        est = float(flat @ hv)
        v = tree_unflatten_vector(hv, v)
    return est


def errors(approx, true: Tensor) -> tuple[float, float]:
    a = tree_flatten_vector(approx)
    rel = float((a - true).norm() / true.norm())
    cos = float(a @ true / (a.norm() * true.norm()))
    return rel, cos


def run_method(problem: Problem, method: str, budget: int, lam_max: float,
               rho_rel: float | None = None, seed: int = 0):
    args = (problem.inner_obj, problem.outer_obj, problem.in_params, problem.out_params)
    if method == "cg":
        return conjugate_gradient(*args, num_iters=budget)
    if method == "neumann":
        return neumann(*args, num_iters=budget, lr=1.0 / lam_max)
    if method == "nystrom-eigen":
        rho = rho_rel * lam_max
        evals, evecs = problem.eig
        v = evecs[:, -budget:]  # top-`budget` eigenvectors: the best rank-k Nyström approximation

        def solve(_, __, b, *unused, **unused_kw):
            flat = tree_flatten_vector(b)
            proj = v.T @ flat
            x = v @ (proj / (evals[-budget:] + rho)) + (flat - v @ proj) / rho
            return tree_unflatten_vector(x, b)

        return implicit_hypergrad(*args, solve)
    if method.startswith("nystrom-"):
        gen = torch.Generator().manual_seed(seed)
        return nystrom(*args, rank=budget, rho=rho_rel * lam_max, sketch=method.split("-", 1)[1],
                       generator=gen)
    if method == "exact":
        return exact(*args)
    raise ValueError(method)


PCG_RANKS = (2, 5)
REUSED_PCG_RANKS = (10, 30)  # preconditioners reused over outer steps: sketched once per refresh
REFRESH_STEPS = 10  # the trainer's default nystrom_refresh_steps: a reused sketch costs rank / 10 products per step
DRIFT = 0.05  # relative size of the step between the sketch's point and the current one


PCG_BUDGETS = (10, 20)


def drifted(params: tuple[Tensor, ...], scale: float, generator: torch.Generator) -> tuple[Tensor, ...]:
    """Each tensor moved by Gaussian noise of norm ``scale * |t|``: the point of an earlier outer step."""
    out = []
    for t in params:
        noise = torch.randn(t.shape, generator=generator, dtype=t.dtype)
        out.append(t + noise * (scale * t.norm() / noise.norm().clamp_min(1e-30)))
    return tuple(out)


def reused_pcg(problem: Problem, rank: int, budget: int, rho: float, seed: int):
    """Nyström-PCG whose preconditioner was sketched at an earlier point (``theta`` and ``phi``
    each moved by :data:`DRIFT` of their norm), as the trainer reuses it between refreshes
    (``nystrom_refresh_steps``): the current hypergradient spends ``budget`` CG products only."""
    gen = torch.Generator().manual_seed(seed)
    solver = make_solver("nystrom_pcg", rank=rank, num_iters=budget, rho=rho, refresh_steps=2, generator=gen)
    earlier = (drifted(problem.in_params, DRIFT, gen), drifted(problem.out_params, DRIFT, gen))
    implicit_hypergrad(problem.inner_obj, problem.outer_obj, *earlier, solver)  # sketches (rank + budget products)
    return implicit_hypergrad(problem.inner_obj, problem.outer_obj, problem.in_params, problem.out_params,
                              solver)  # reuses the factor: budget products


def warm_chain(problem: Problem, method: str, seed: int, **options):
    """The solver ``method`` (``warm_start=True``) carried through the ``REFRESH_STEPS`` outer steps of one
    refresh interval, ending at the problem's point: a walk back from it by ``DRIFT / REFRESH_STEPS`` per step
    (so the first point is about :data:`DRIFT` away, as for ``reused_pcg``), solved in order, each solve
    starting from the previous solution (and, for ``nystrom_pcg``, the preconditioner sketched at the first
    point). The last hypergradient is returned; each step costs ``num_iters`` products after the sketch."""
    gen = torch.Generator().manual_seed(seed)
    points = [(problem.in_params, problem.out_params)]
    for _ in range(REFRESH_STEPS - 1):
        theta, phi = points[-1]
        points.append((drifted(theta, DRIFT / REFRESH_STEPS, gen), drifted(phi, DRIFT / REFRESH_STEPS, gen)))
    solver = make_solver(method, warm_start=True, generator=gen, **options)
    for theta, phi in reversed(points):
        out = implicit_hypergrad(problem.inner_obj, problem.outer_obj, theta, phi, solver)
    return out


def pcg_comparison(problem: Problem, budgets, seeds: int, lam_max: float, rho_rel: float) -> dict:
    """At equal product budgets: CG, Nyström-preconditioned CG (rank ``k`` sketch + ``budget - k``
    CG steps, damping ``rho_rel * lam_max``, mean over seeds), the same with a preconditioner
    reused from an earlier point (``budget`` CG steps; its sketch is amortized over the refresh
    interval), that reused one with ``budget - ceil(k / REFRESH_STEPS)`` CG steps (its amortized sketch
    counted in the budget), CG and that in-budget PCG warm-started along a refresh interval
    (:func:`warm_chain`) and the first-order ``identity`` method (no HVP; ``scale = 1 / lam_max``)."""
    args = (problem.inner_obj, problem.outer_obj, problem.in_params, problem.out_params)
    p = sum(x.numel() for x in problem.in_params)
    out: dict = {"identity": dict(zip(("rel_err", "cos"), errors(identity(*args, scale=1.0 / lam_max),
                                                                     problem.true_hg)))}

    def mean_errors(runs):
        return {"rel_err": statistics.fmean(r for r, _ in runs), "cos": statistics.fmean(c for _, c in runs)}

    for budget in budgets:
        row = {"cg": dict(zip(("rel_err", "cos"), errors(run_method(problem, "cg", budget, lam_max),
                                                          problem.true_hg)))}
        for rank in PCG_RANKS:
            if rank >= budget or rank > p:
                continue
            row[f"pcg-{rank}"] = mean_errors([errors(nystrom_pcg(*args, rank=rank, num_iters=budget - rank,
                                                                 rho=rho_rel * lam_max,
                                                                 generator=torch.Generator().manual_seed(s)),
                                                     problem.true_hg) for s in range(seeds)])
        for rank in REUSED_PCG_RANKS:
            if rank > p:
                continue
            row[f"reused-{rank}"] = mean_errors([errors(reused_pcg(problem, rank, budget, rho_rel * lam_max, s),
                                                        problem.true_hg) for s in range(seeds)])
            # the same with its amortized sketch inside the budget: fewer CG steps, equal products per outer step
            iters = budget - math.ceil(rank / REFRESH_STEPS)
            row[f"reused-{rank} in budget"] = mean_errors([errors(reused_pcg(problem, rank, iters, rho_rel * lam_max, s),
                                                                  problem.true_hg) for s in range(seeds)])
            row[f"reused-{rank} in budget, warm"] = mean_errors([errors(
                warm_chain(problem, "nystrom_pcg", s, rank=rank, num_iters=iters, rho=rho_rel * lam_max,
                           refresh_steps=REFRESH_STEPS), problem.true_hg) for s in range(seeds)])
        row["cg warm"] = mean_errors([errors(warm_chain(problem, "cg", s, num_iters=budget), problem.true_hg)
                                      for s in range(seeds)])
        out[budget] = row
    return out


def pcg_table(results: dict, budgets) -> str:
    cols = (["cg"] + [f"pcg-{k}" for k in PCG_RANKS] + [f"reused-{k}" for k in REUSED_PCG_RANKS]
            + [f"reused-{k} in budget" for k in REUSED_PCG_RANKS] + ["cg warm"]
            + [f"reused-{k} in budget, warm" for k in REUSED_PCG_RANKS])
    lines = ["| problem | budget | " + " | ".join(cols) + " | identity (0 HVPs) |",
             "|---|---|" + "---|" * (len(cols) + 1)]
    for name, res in results.items():
        pcg = res["pcg"]
        ident = pcg["identity"]
        for b in budgets:
            cells = [fmt_cell(pcg[b].get(c)) for c in cols]
            lines.append(f"| {name} | {b} | " + " | ".join(cells) + f" | {fmt_cell(ident)} |")
    return "\n".join(lines)


def accuracy(problem: Problem, budgets, seeds: int, lam_max: float) -> dict:
    p = sum(x.numel() for x in problem.in_params)
    out: dict = {"cg": {}, "neumann": {}}
    for method in ("cg", "neumann"):
        for b in budgets:
            rel, cos = errors(run_method(problem, method, b, lam_max), problem.true_hg)
            out[method][b] = {"rel_err": rel, "cos": cos}
    for sketch in NYSTROM_VARIANTS:
        method = f"nystrom-{sketch}"
        out[method] = {}
        for rho_rel in RHO_GRID:
            per_budget = {}
            for b in budgets:
                if b > p:
                    continue
                rels, coss = [], []
                for s in range(seeds if sketch in SKETCHES else 1):
                    rel, cos = errors(run_method(problem, method, b, lam_max, rho_rel, s),
                                      problem.true_hg)
                    rels.append(rel)
                    coss.append(cos)
                per_budget[b] = {"rel_err": statistics.fmean(rels), "cos": statistics.fmean(coss),
                                 "rel_err_std": statistics.pstdev(rels),
                                 "rel_err_min": min(rels), "rel_err_max": max(rels)}
            out[method][rho_rel] = per_budget
        # best fixed rho: smallest mean over budgets of log10(mean relative error)
        score = {r: statistics.fmean(math.log10(max(v["rel_err"], 1e-300)) for v in out[method][r].values())
                 for r in RHO_GRID}
        out[method]["best_rho_rel"] = min(score, key=score.get)
        out[method]["score_by_rho_rel"] = score
        # the (more optimistic) best rho chosen separately for every budget
        out[method]["best_rho_per_budget"] = {
            b: min(((r, out[method][r][b]) for r in RHO_GRID), key=lambda t: t[1]["rel_err"])
            for b in budgets if b <= p}
    return out


def _best_times(fns: dict[str, Callable], repeats: int) -> dict[str, dict[str, float]]:
    """Time several functions interleaved (round-robin, after one warm-up call each) and keep
    the minimum and the median of ``repeats`` calls. The minimum is what the tables show: it
    is the least sensitive to other processes competing for the CPU."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"min_s": min(t), "median_s": statistics.median(t)} for name, t in times.items()}


def timing(problem: Problem, budget: int, lam_max: float, best_rho: dict, repeats: int) -> dict:
    fns = {}
    for method in ("cg", "neumann", "nystrom-column", "nystrom-gaussian", "exact"):
        fns[method] = (lambda m=method: run_method(problem, m, budget, lam_max, best_rho.get(m), 0))
    return _best_times(fns, repeats)


def big_mlp_setup(seed: int = 0, dtype: torch.dtype = DTYPE):
    """A 64-256-128-10 MLP (51k parameters) on 1000 digits images, softmax + weight decay."""
    from sklearn.datasets import load_digits

    data = load_digits()
    (tr,) = _split(len(data.data), (1000,), seed)
    (x,) = _standardize(data.data[tr])
    x = x.to(dtype)
    y = torch.tensor(data.target[tr])
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 128), nn.Tanh(),
                        nn.Linear(128, 10)).to(dtype)
    call = _functional(net)
    params = tuple(p.detach().clone() for p in net.parameters())

    def f(i):
        return F.cross_entropy(call(i, x), y) + 0.5e-3 * sum(p.pow(2).sum() for p in i)

    return f, params


def batched_speedup(name: str, f: Callable, params: tuple[Tensor, ...], ks, repeats: int) -> dict:
    out = {"num_params": sum(p.numel() for p in params)}
    g = torch.Generator().manual_seed(0)
    for k in ks:
        tangents = tuple(torch.randn(k, *p.shape, generator=g, dtype=p.dtype) for p in params)
        t = _best_times({"vmap": lambda: batched_hvp(f, params, tangents, vectorize=True),
                         "loop": lambda: batched_hvp(f, params, tangents, vectorize=False)}, repeats)
        vec, loop = t["vmap"]["min_s"], t["loop"]["min_s"]
        a = tree_flatten_vector(batched_hvp(f, params, tangents, vectorize=True))
        b = tree_flatten_vector(batched_hvp(f, params, tangents, vectorize=False))
        out[k] = {"vmap_s": vec, "loop_s": loop, "speedup": loop / vec,
                  "vmap_median_s": t["vmap"]["median_s"], "loop_median_s": t["loop"]["median_s"],
                  "max_rel_diff": float((a - b).abs().max() / b.abs().max())}
    return out


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def fmt_cell(entry: dict | None) -> str:
    if entry is None:
        return "n/a"
    return f"{entry['rel_err']:.1e} ({entry['cos']:.3f})"


def accuracy_table(name: str, acc: dict, budgets, seeds: int) -> str:
    lines = [f"| {name} | " + " | ".join(f"{b}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    lines.append("| CG | " + " | ".join(fmt_cell(acc["cg"].get(b)) for b in budgets) + " |")
    lines.append("| Neumann (lr=1/λmax) | " + " | ".join(fmt_cell(acc["neumann"].get(b)) for b in budgets) + " |")
    for sketch in NYSTROM_VARIANTS:
        m = acc[f"nystrom-{sketch}"]
        r = m["best_rho_rel"]
        label = "Nyström top-k eigvecs (oracle)" if sketch == "eigen" else f"Nyström {sketch}"
        lines.append(f"| {label} (ρ={r:g}·λmax) | "
                     + " | ".join(fmt_cell(m[r].get(b)) for b in budgets) + " |")
    return "\n".join(lines)


def sketch_table(results: dict, budgets) -> str:
    lines = ["| problem | ρ/λmax | " + " | ".join(f"{b}" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for name, res in results.items():
        acc = res["accuracy"]
        for r in RHO_GRID:
            cells = []
            for b in budgets:
                c = acc["nystrom-column"][r].get(b)
                g = acc["nystrom-gaussian"][r].get(b)
                cells.append("n/a" if c is None else f"{c['rel_err']:.2g} / {g['rel_err']:.2g}")
            lines.append(f"| {name} | {r:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _geomean(xs) -> float:
    xs = list(xs)
    return 10 ** statistics.fmean(math.log10(x) for x in xs) if xs else math.nan


def sketch_verdict(results: dict, budgets) -> dict:
    """Column vs Gaussian sketch, per problem: (i) at equal rho over the whole grid, (ii) in
    the cells where either is better than the trivial zero hypergradient (rel. error < 1),
    (iii) each at its own best fixed rho (geometric mean over budgets)."""
    out = {}
    for name, res in results.items():
        acc = res["accuracy"]
        ratios, useful, wins = [], [], 0
        for r in RHO_GRID:
            for b in budgets:
                c = acc["nystrom-column"][r].get(b)
                g = acc["nystrom-gaussian"][r].get(b)
                if c is None:
                    continue
                ratio = c["rel_err"] / g["rel_err"]
                ratios.append(ratio)
                wins += ratio > 1
                if min(c["rel_err"], g["rel_err"]) < 1:
                    useful.append(ratio)
        best = {}
        for v in NYSTROM_VARIANTS:
            m = acc[f"nystrom-{v}"]
            cells = [m[m["best_rho_rel"]][b] for b in budgets if b in m[m["best_rho_rel"]]]
            best[v] = {"rho_rel": m["best_rho_rel"], "geomean_rel_err": _geomean(e["rel_err"] for e in cells),
                       "mean_cos": statistics.fmean(e["cos"] for e in cells),
                       "mean_seed_std": statistics.fmean(e["rel_err_std"] for e in cells),
                       "geomean_rel_err_best_rho_per_budget": _geomean(
                           e["rel_err"] for _, e in m["best_rho_per_budget"].values())}
        out[name] = {"gaussian_better_cells": wins, "cells": len(ratios),
                     "geomean_ratio_column_over_gaussian": _geomean(ratios),
                     "useful_cells": len(useful),
                     "geomean_ratio_column_over_gaussian_useful": _geomean(useful),
                     "at_best_rho": best}
    return out


def verdict_table(verdict: dict) -> str:
    lines = ["| problem | gaussian better (cells) | err ratio col/gauss: all ρ | cells with err<1 | "
             "geo-mean err, best fixed ρ: col / gauss / eig-oracle | best ρ per budget: col / gauss / eig-oracle | "
             "seed std col / gauss | cos col / gauss |",
             "|---|---|---|---|---|---|---|---|"]
    for name, v in verdict.items():
        b = v["at_best_rho"]
        col, gau, eig = b["column"], b["gaussian"], b["eigen"]
        lines.append(
            f"| {name} | {v['gaussian_better_cells']}/{v['cells']} | {v['geomean_ratio_column_over_gaussian']:.2f} | "
            f"{v['geomean_ratio_column_over_gaussian_useful']:.2f} ({v['useful_cells']}) | "
            f"{col['geomean_rel_err']:.3f} / {gau['geomean_rel_err']:.3f} / {eig['geomean_rel_err']:.3f} | "
            f"{col['geomean_rel_err_best_rho_per_budget']:.3f} / {gau['geomean_rel_err_best_rho_per_budget']:.3f} / "
            f"{eig['geomean_rel_err_best_rho_per_budget']:.3f} | "
            f"{col['mean_seed_std']:.3f} / {gau['mean_seed_std']:.3f} | {col['mean_cos']:.3f} / {gau['mean_cos']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer budgets, seeds and repeats (~1 minute)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "ihvp_accuracy.json",
                        help="where to write the JSON results (default: benchmarks/results/ihvp_accuracy.json)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds for the randomized Nyström sketches "
                        "(default 20, 3 with --quick)")
    parser.add_argument("--timing-budget", type=int, default=20, help="HVP budget of the timing table (default 20)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: the timed operations are small, and with more "
                             "threads their timings on a shared machine are dominated by thread contention)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budgets = (1, 5, 20) if args.quick else (1, 2, 5, 10, 20, 50)
    seeds = args.seeds or (3 if args.quick else 20)
    repeats = 3 if args.quick else 10
    ks = (5, 20) if args.quick else (5, 20, 50)
    start = time.perf_counter()
    load_before = os.getloadavg()[0]

    results: dict = {}
    problems = {}
    for build in (ridge_problem, logreg_problem, mlp_problem, distill_problem):
        t0 = time.perf_counter()
        prob = build(0)
        problems[prob.name] = prob
        ev = torch.linalg.eigvalsh(prob.hessian)
        lam_max = power_iteration(prob)
        info = dict(prob.info)
        info.update(description=prob.description, num_inner_params=sum(p.numel() for p in prob.in_params),
                    num_outer_params=sum(p.numel() for p in prob.out_params),
                    eig_min=float(ev[0]), eig_max=float(ev[-1]), condition=float(ev[-1] / ev[0]),
                    lam_max_power_iteration=lam_max, true_hypergrad_norm=float(prob.true_hg.norm()),
                    setup_s=time.perf_counter() - t0)
        acc = accuracy(prob, budgets, seeds, lam_max)
        results[prob.name] = {"info": info, "accuracy": acc}
        best_rho = {m: acc[m]["best_rho_rel"] for m in acc if m.startswith("nystrom")}
        results[prob.name]["pcg"] = pcg_comparison(prob, PCG_BUDGETS, seeds, lam_max, best_rho["nystrom-gaussian"])
        results[prob.name]["time_per_hypergrad_s"] = timing(prob, min(args.timing_budget, info["num_inner_params"]),
                                                            lam_max, best_rho, repeats)
        print(f"[{prob.name}] done in {time.perf_counter() - t0:.1f}s", flush=True)

    mlp = problems["mlp"]
    speed = {"mlp": batched_speedup("mlp", lambda i: mlp.inner_obj(i, mlp.out_params), mlp.in_params, ks, repeats)}
    f_big, p_big = big_mlp_setup(0)
    speed["mlp-51k"] = batched_speedup("mlp-51k", f_big, p_big, ks, max(3, repeats // 2))
    f_big, p_big = big_mlp_setup(0, torch.float32)
    speed["mlp-51k-float32"] = batched_speedup("mlp-51k-float32", f_big, p_big, ks, max(3, repeats // 2))
    verdict = sketch_verdict(results, budgets)
    elapsed = time.perf_counter() - start

    # ------------------------------------------------------------------ print
    print("\n## Problems\n")
    print("| problem | inner params | outer params | λmin(H) | λmax(H) | cond | ‖∇θf‖ at θ* | exact vs formula |")
    print("|---|---|---|---|---|---|---|---|")
    for name, res in results.items():
        i = res["info"]
        print(f"| {name} | {i['num_inner_params']} | {i['num_outer_params']} | {i['eig_min']:.2e} | "
              f"{i['eig_max']:.3f} | {i['condition']:.0f} | {i['grad_norm_at_solution']:.1e} | "
              f"{i['exact_vs_formula_rel_err']:.1e} |")
    print("\n## Relative error of the hypergradient (cosine similarity) vs HVP budget\n")
    print(f"Nyström: mean over {seeds} seeds, ρ = the best fixed value of {{{', '.join(f'{r:g}' for r in RHO_GRID)}}}·λmax "
          f"per problem and sketch; Neumann lr = 1/λmax (power iteration). n/a: rank > #params.\n")
    for name, res in results.items():
        print(accuracy_table(name, res["accuracy"], budgets, seeds))
        print()
    print("## Nyström-preconditioned CG vs CG at equal product budgets (relative error, cosine)\n")
    print(f"pcg-k: rank-k Gaussian sketch (ρ = the best fixed Nyström ρ) + (budget - k) CG steps, mean over {seeds} "
          f"seeds; reused-k: a rank-k preconditioner sketched at an earlier point (θ and φ moved by "
          f"{DRIFT:.0%} of their norm) + budget CG steps, the sketch amortized over the refresh interval "
          f"(k/refresh_steps products per step); reused-k in budget: the same with budget - k/{REFRESH_STEPS} CG "
          f"steps, so that the amortized sketch is inside the budget; warm: the solver carried through the "
          f"{REFRESH_STEPS} outer steps of one refresh interval (a walk of {DRIFT:.0%} in all), each solve started "
          f"from the previous solution (its residual one of the budget's products), error at the last step; "
          f"identity: first-order H^-1 ~ I/λmax, no HVP.\n")
    print(pcg_table(results, PCG_BUDGETS))
    print()
    print("## Nyström sketches at equal ρ: relative error column / gaussian\n")
    print(sketch_table(results, budgets))
    print("\n## Column vs Gaussian sketch: summary\n")
    print("Error ratios are geometric means over (ρ, budget) cells of mean-error(column) / mean-error(gaussian): "
          "> 1 favours gaussian. Then the geometric-mean relative error over budgets, each variant at its own "
          "best fixed ρ and at the best ρ for every budget (eig-oracle: Nyström built from the exact top-k "
          "eigenvectors, i.e. the best rank-k approximation of H), the mean over budgets of the std of the error across seeds and of the cosine "
          "similarity, at the best fixed ρ.\n")
    print(verdict_table(verdict))
    print(f"\n## Time per hypergradient (ms, best of {repeats}), budget {args.timing_budget}\n")
    methods = ("cg", "neumann", "nystrom-column", "nystrom-gaussian", "exact")
    print("| problem | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for name, res in results.items():
        t = res["time_per_hypergrad_s"]
        print(f"| {name} | " + " | ".join(f"{1e3 * t[m]['min_s']:.1f}" for m in methods) + " |")
    print("\n## Batched (vmap) vs looped Hessian-vector products (ms, best of several)\n")
    print("| model | params | k | vmap | loop | speedup |")
    print("|---|---|---|---|---|---|")
    for name, s in speed.items():
        for k in ks:
            e = s[k]
            print(f"| {name} | {s['num_params']} | {k} | {1e3 * e['vmap_s']:.1f} | {1e3 * e['loop_s']:.1f} | "
                  f"{e['speedup']:.1f}x |")
    load_after = os.getloadavg()[0]
    print(f"\nTotal time {elapsed:.0f}s on {torch.get_num_threads()} torch thread(s) ({os.cpu_count()} CPUs, "
          f"1-minute load average {load_before:.1f} before / {load_after:.1f} after), torch {torch.__version__}, "
          f"library default sketch = {DEFAULT_NYSTROM_SKETCH!r}.")

    payload = {"config": {"budgets": list(budgets), "seeds": seeds, "rho_grid_rel": list(RHO_GRID),
                          "quick": args.quick, "timing_budget": args.timing_budget, "ks": list(ks),
                          "dtype": "float64", "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "platform": platform.platform(), "elapsed_s": elapsed,
                          "cpus": os.cpu_count(), "load_avg_1min_before_after": [load_before, load_after]},
               "problems": results, "batched_hvp": speed, "sketch_verdict": verdict}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1, default=str))
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
