#!/usr/bin/env python
"""Per-feature weight decay for logistic regression, learned by implicit differentiation.

The bilevel problem of the seed spec (``docs``: "Solver for bilevel optimization"):

* inner problem: ``theta*(lam) = argmin_theta  BCE(x_train theta, y_train) + sum_j lam_j theta_j^2 / 2``,
  a logistic regression whose every weight ``theta_j`` has its own weight decay ``lam_j``;
* outer problem: ``min_lam  BCE(x_val theta*(lam), y_val)``, the validation loss.

The hypergradient ``d BCE_val / d lam`` comes from the implicit function theorem with the
inverse Hessian-vector product approximated by Nyström (default), Neumann series or
conjugate gradient (``--method``). The solver is a :class:`hypergrad.solver.BaseImplicitSolver`
subclass written exactly in the spec's style (``inner_forward``, ``inner_update``,
``outer_forward``, ``outer_update``); after every outer step ``post_outer_update`` projects
the weight decays back onto ``lam >= --min-wd`` (default 1e-3) so that the inner problem
stays strongly convex, as implicit differentiation assumes.

Data: scikit-learn's breast_cancer (30 features, bundled with scikit-learn, no download), or
a binary digits task (``--dataset digits``: 3 vs 8, 64 pixels), standardized with training
statistics. The training split is deliberately small (``--train-size``, default 40) so that
regularization matters; the rest is split into validation (used by the outer problem) and
test (only reported). The script prints the validation loss falling during training and
compares the final model with the same inner training run at the initial weight decay.

Examples::

    python examples/logistic_regression.py
    python examples/logistic_regression.py --method cg --num-iters 3000 --ihvp-iters 20
    python examples/logistic_regression.py --method neumann --neumann-lr 0.5 --dataset digits
"""

from __future__ import annotations

import argparse
import copy
import functools
import time

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad_and_value
from torch.nn import functional as F
from torch.optim import SGD
from torch.utils.data import DataLoader, TensorDataset

from hypergrad.approx_hypergrad import conjugate_gradient, neumann, nystrom
from hypergrad.optimizers import diff_sgd
from hypergrad.solver import BaseImplicitSolver
from hypergrad.utils import Params


class Solver(BaseImplicitSolver):
    def inner_forward(self, in_params: Params, out_params: Params, input: Tensor, target: Tensor) -> Tensor:
        # forward computation of the inner problem: training loss + per-weight decay
        output = self.inner_func(in_params, input).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(output, target)
        weight_decay = sum([(_in.pow(2) * _out).sum() for _in, _out in zip(in_params, out_params)])
        return loss + weight_decay / 2

    def inner_update(self) -> Tensor:
        # update rule of the inner problem: one step of the functional optimizer
        input, target = next(self.inner_loader)
        grads, loss = grad_and_value(self.inner_forward)(self.inner_params, self.out_params(), input, target)
        self.inner_params, self.inner_optim_state = self.inner_optimizer(self.inner_params, grads,
                                                                         self.inner_optim_state)
        return loss

    def outer_forward(self, in_params: Params, out_params: Params, input: Tensor, target: Tensor) -> Tensor:
        # forward computation of the outer problem: validation loss, no regularization
        output = self.inner_func(in_params, input).squeeze(-1)
        return F.binary_cross_entropy_with_logits(output, target)

    def outer_update(self) -> Tensor:
        # update rule of the outer problem
        in_input, in_target = next(self.inner_loader)
        out_input, out_target = next(self.outer_loader)
        out_params = self.out_params()

        # compute implicit gradients
        implicit_grads = self.approx_ihvp(lambda i, o: self.inner_forward(i, o, in_input, in_target),
                                          lambda i, o: self.outer_forward(i, o, out_input, out_target),
                                          self.inner_params, out_params)

        self.apply_outer_grad(implicit_grads)  # steps the outer optimizer; NaN/inf never applied
        with torch.no_grad():
            return self.outer_forward(self.inner_params, out_params, out_input, out_target)

    def post_outer_update(self) -> None:
        # keep the weight decays >= min_wd > 0 (a projected gradient step), so the inner
        # problem stays strongly convex, and report progress
        with torch.no_grad():
            for p in self.outer.parameters():
                p.clamp_(min=self.min_wd)
        if self.print_every and (self.outer_step + 1) % self.print_every == 0:
            lam = self.outer.weight.detach()
            val_loss = self.recorder.values("outer_loss")[-1]
            print(f"outer step {self.outer_step + 1:4d} (inner iter {self.iteration + 1:5d}): "
                  f"val loss {val_loss:.4f}   weight decay mean {lam.mean():.4f} "
                  f"min {lam.min():.4f} max {lam.max():.4f}", flush=True)

    def out_params(self) -> Params:
        # the outer parameters as plain tensors (the seed used functorch.make_functional)
        return tuple(p.detach() for p in self.outer.parameters())

    print_every = 0
    min_wd = 0.0


def load_data(name: str, train_size: int, val_size: int, seed: int):
    from sklearn.datasets import load_breast_cancer, load_digits

    if name == "breast_cancer":
        data = load_breast_cancer()
        x, y = data.data, data.target.astype(np.float64)
    else:  # digits: 3 vs 8, two classes that are easy to confuse
        data = load_digits()
        keep = np.isin(data.target, (3, 8))
        x, y = data.data[keep], (data.target[keep] == 8).astype(np.float64)
    perm = np.random.default_rng(seed).permutation(len(x))
    if train_size + val_size >= len(x):
        raise SystemExit(f"--train-size + --val-size must be < {len(x)} for {name}.")
    idx = {"train": perm[:train_size], "val": perm[train_size:train_size + val_size],
           "test": perm[train_size + val_size:]}
    mu, sd = x[idx["train"]].mean(0), x[idx["train"]].std(0)
    sd[sd == 0] = 1.0
    return {k: (torch.tensor((x[v] - mu) / sd, dtype=torch.float32), torch.tensor(y[v], dtype=torch.float32))
            for k, v in idx.items()}


def evaluate(model: nn.Module, splits: dict) -> dict:
    out = {}
    with torch.no_grad():
        for name, (x, y) in splits.items():
            logits = model(x).squeeze(-1)
            out[name] = (F.binary_cross_entropy_with_logits(logits, y).item(),
                         ((logits > 0).float() == y).float().mean().item())
    return out


def build_solver(args, splits, inner: nn.Module, outer: nn.Module, outer_lr: float) -> Solver:
    g = torch.Generator().manual_seed(args.seed)
    x_tr, y_tr = splits["train"]
    x_va, y_va = splits["val"]
    inner_loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=args.batch_size or len(x_tr), shuffle=True,
                              generator=g)
    outer_loader = DataLoader(TensorDataset(x_va, y_va), batch_size=len(x_va))
    if args.method == "nystrom":
        approx_ihvp = functools.partial(nystrom, rank=args.rank, rho=args.rho,
                                        generator=torch.Generator().manual_seed(args.seed))
    elif args.method == "neumann":
        approx_ihvp = functools.partial(neumann, num_iters=args.ihvp_iters, lr=args.neumann_lr)
    else:
        approx_ihvp = functools.partial(conjugate_gradient, num_iters=args.ihvp_iters)
    inner_optimizer = functools.partial(diff_sgd, momentum=0, weight_decay=0, lr=args.inner_lr)
    outer_optimizer = SGD(outer.parameters(), weight_decay=0, momentum=0.9, lr=outer_lr)
    return Solver(inner, outer, inner_loader, outer_loader, approx_ihvp,
                  inner_optimizer=inner_optimizer, outer_optimizer=outer_optimizer,
                  num_iters=args.num_iters, unroll_steps=args.unroll_steps, outer_patience_iters=0,
                  log_freq=0, progress_bar=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="See the module docstring for the problem and more examples.")
    parser.add_argument("--method", choices=("nystrom", "neumann", "cg"), default="nystrom",
                        help="IHVP approximation (default: nystrom)")
    parser.add_argument("--dataset", choices=("breast_cancer", "digits"), default="breast_cancer")
    parser.add_argument("--train-size", type=int, default=40, help="training examples (default 40)")
    parser.add_argument("--val-size", type=int, default=200, help="validation examples (default 200); "
                        "the remaining ones are the test set")
    parser.add_argument("--batch-size", type=int, default=0, help="inner mini-batch size, 0 = full batch")
    parser.add_argument("--num-iters", type=int, default=2000, help="inner iterations (default 2000)")
    parser.add_argument("--unroll-steps", type=int, default=20,
                        help="inner iterations between outer updates (default 20)")
    parser.add_argument("--inner-lr", type=float, default=0.1, help="inner SGD learning rate (default 0.1)")
    parser.add_argument("--outer-lr", type=float, default=1.0,
                        help="outer SGD learning rate, momentum 0.9 (default 1.0)")
    parser.add_argument("--init-wd", type=float, default=1.0, help="initial weight decay of every weight (default 1)")
    parser.add_argument("--min-wd", type=float, default=1e-3,
                        help="weight decays are projected onto [min_wd, inf) after every outer step (default 1e-3)")
    parser.add_argument("--rank", type=int, default=5, help="Nyström rank (default 5)")
    parser.add_argument("--rho", type=float, default=0.1, help="Nyström regularization rho (default 0.1)")
    parser.add_argument("--ihvp-iters", type=int, default=10,
                        help="iterations (= Hessian-vector products) of cg / neumann (default 10)")
    parser.add_argument("--neumann-lr", type=float, default=0.1, help="Neumann series step size (default 0.1)")
    parser.add_argument("--print-every", type=int, default=10, help="print every N outer steps (default 10)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: this model is tiny, and extra threads only add "
                             "synchronisation overhead, a lot of it on a busy machine)")
    parser.add_argument("--seed", type=int, default=0, help="data split, initialization and sketches (default 0)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    splits = load_data(args.dataset, args.train_size, args.val_size, args.seed)
    dim_data = splits["train"][0].shape[1]
    print(f"{args.dataset}: {dim_data} features, train/val/test = "
          + "/".join(str(len(splits[k][0])) for k in ("train", "val", "test"))
          + f"; method={args.method}, {args.num_iters} inner iterations, an outer step every "
          f"{args.unroll_steps}")

    # models as in the spec: a linear model without bias, one weight decay per weight
    inner = nn.Linear(dim_data, 1, bias=False)
    nn.init.zeros_(inner.weight)
    outer = copy.deepcopy(inner)
    nn.init.constant_(outer.weight, args.init_wd)

    # baseline: the same inner training at the initial weight decay, without outer steps
    baseline_inner = copy.deepcopy(inner)
    baseline_solver = build_solver(args, splits, baseline_inner, copy.deepcopy(outer), outer_lr=0.0)
    start = time.perf_counter()
    for _ in range(args.num_iters):
        baseline_solver.inner_update()
    baseline_solver.sync_inner()
    baseline_time = time.perf_counter() - start
    baseline = evaluate(baseline_inner, splits)

    solver = build_solver(args, splits, inner, outer, outer_lr=args.outer_lr)
    solver.print_every = args.print_every
    solver.min_wd = args.min_wd
    print(f"initial val loss {baseline['val'][0]:.4f} at weight decay {args.init_wd:g} (no tuning)")
    start = time.perf_counter()
    recorder = solver.run()
    tuned_time = time.perf_counter() - start
    tuned = evaluate(inner, splits)

    lam = outer.weight.detach().squeeze(0)
    print(f"\nlearned weight decay: mean {lam.mean():.4f}, median {lam.median():.4f}, "
          f"min {lam.min():.4f}, max {lam.max():.4f}, {int((lam <= args.min_wd).sum())} of {lam.numel()} at "
          f"the floor {args.min_wd:g}; "
          f"{solver.outer_history.describe()}, "
          f"mean hypergradient time {1e3 * recorder.mean('ihvp_time'):.2f} ms")
    print("\n| model | train loss | train acc | val loss | val acc | test loss | test acc | wall time |")
    print("|---|---|---|---|---|---|---|---|")
    for name, res, wall in ((f"weight decay {args.init_wd:g} (no tuning)", baseline, baseline_time),
                            (f"learned per-feature weight decay ({args.method})", tuned, tuned_time)):
        cells = " | ".join(f"{res[s][0]:.4f} | {100 * res[s][1]:.1f}%" for s in ("train", "val", "test"))
        print(f"| {name} | {cells} | {wall:.1f} s |")


if __name__ == "__main__":
    main()
