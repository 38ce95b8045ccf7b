"""How much does reusing a Nyström factor for several outer steps cost in accuracy?

A bilevel data-reweighting run on a small MLP (random teacher labels, 30% of the training
labels flipped; inner: Adam on the weighted training loss; outer: Adam on per-example weight
logits from the validation loss). Every ``unroll`` inner steps the hypergradient is computed
with a :class:`hypergrad.methods.NystromSolver` that refreshes its factor every ``R`` outer
steps, and, at the same point and with the same sketch seed, with a fresh factor. Reported per
``R``: the mean and minimum cosine between the two, the relative error, the number of
sketches (Hessian-vector products / rank), the AUC of low weight vs flipped label at the end
and the hypergradient time. The run follows the amortized hypergradients, so the AUC is what
a user of ``nystrom_refresh_steps=R`` gets.

    python benchmarks/amortized_nystrom.py            # ~1 minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch.func import functional_call
from torch.nn import functional as F

from hf_integration.reporting import weights_auc
from hypergrad.approx_hypergrad import implicit_hypergrad
from hypergrad.methods import NystromSolver


def make_problem(seed: int = 0, n: int = 512, m: int = 256, features: int = 20, classes: int = 4, noise: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(features, classes, generator=g)
    x, xv = torch.randn(n, features, generator=g), torch.randn(m, features, generator=g)
    y, yv = (x @ teacher).argmax(1), (xv @ teacher).argmax(1)
    flipped = torch.rand(n, generator=g) < noise
    y = torch.where(flipped, (y + torch.randint(1, classes, (n,), generator=g)) % classes, y)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(features, 64), torch.nn.Tanh(), torch.nn.Linear(64, classes))
    theta = {k: v.detach().clone() for k, v in net.named_parameters()}

    def inner(t, o):
        w = torch.sigmoid(o["logits"])
        losses = F.cross_entropy(functional_call(net, t, (x,)), y, reduction="none")
        return (w * losses).sum() / w.sum() + 1e-4 * sum((v ** 2).sum() for v in t.values())

    def outer(t, o):
        return F.cross_entropy(functional_call(net, t, (xv,)), yv)

    return inner, outer, theta, {"logits": torch.zeros(n)}, flipped


def run(refresh: int, args) -> dict:
    inner, outer, theta, phi, flipped = make_problem(args.seed)
    theta = {k: v.requires_grad_(True) for k, v in theta.items()}
    phi = {k: v.requires_grad_(True) for k, v in phi.items()}
    inner_opt, outer_opt = torch.optim.Adam(theta.values(), lr=1e-2), torch.optim.Adam(phi.values(), lr=args.outer_lr)
    amortized = NystromSolver(args.rank, args.rho, refresh_steps=refresh)
    cosines, errors, seconds, sketches = [], [], [], 0
    for step in range(1, args.steps + 1):
        inner_opt.zero_grad()
        inner(theta, {k: v.detach() for k, v in phi.items()}).backward()
        inner_opt.step()
        if step < args.warmup or step % args.unroll:
            continue
        th, ph = {k: v.detach() for k, v in theta.items()}, {k: v.detach() for k, v in phi.items()}
        seed = step
        refreshing = amortized.refresh_due
        start = time.perf_counter()
        hg = implicit_hypergrad(inner, outer, th, ph,
                                lambda mv, bmv, b, r: amortized(mv, bmv, b, r, torch.Generator().manual_seed(seed)))
        seconds.append(time.perf_counter() - start)
        sketches += refreshing
        fresh = implicit_hypergrad(inner, outer, th, ph, lambda mv, bmv, b, r: NystromSolver(args.rank, args.rho)(
            mv, bmv, b, r, torch.Generator().manual_seed(seed)))
        a, b = hg["logits"], fresh["logits"]
        cosines.append(float(F.cosine_similarity(a, b, dim=0)))
        errors.append(float((a - b).norm() / b.norm()))
        outer_opt.zero_grad()
        phi["logits"].grad = hg["logits"]
        outer_opt.step()
    return {"refresh_steps": refresh, "outer_steps": len(cosines), "sketches": sketches,
            "cos_mean": statistics.fmean(cosines), "cos_min": min(cosines), "rel_err_mean": statistics.fmean(errors),
            "auc": weights_auc(phi["logits"].detach().numpy(), flipped.numpy()), "hypergrad_ms_mean": 1e3 * statistics.fmean(seconds)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refresh", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--unroll", type=int, default=5)
    parser.add_argument("--rank", type=int, default=5)
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--outer-lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                     "amortized_nystrom.json"))
    args = parser.parse_args(argv)
    rows = [run(r, args) for r in args.refresh]
    print("| refresh every R outer steps | sketches / outer steps | cosine to fresh (mean, min) | rel. error | "
          "AUC low weight vs flipped | hypergradient ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['refresh_steps']} | {r['sketches']} / {r['outer_steps']} | {r['cos_mean']:.4f}, {r['cos_min']:.4f} "
              f"| {r['rel_err_mean']:.3f} | {r['auc']:.3f} | {r['hypergrad_ms_mean']:.1f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as handle:
        json.dump({"config": vars(args), "results": rows}, handle, indent=1)
    os.replace(args.out + ".tmp", args.out)
    return rows


if __name__ == "__main__":
    main()
