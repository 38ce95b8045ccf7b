#!/usr/bin/env python
"""Dataset distillation on scikit-learn digits with implicit hypergradients.

Learn a tiny synthetic training set, ``--ipc`` images per class (10 classes, 8x8 pixels),
such that a classifier trained *only* on it does well on real data:

* outer parameters: the distilled images ``X_syn`` (labels fixed, ``--ipc`` per class);
* inner problem: ``theta*(X_syn) = argmin_theta CE(model_theta(X_syn), y_syn) + wd |theta|^2 / 2``,
  a softmax regression (``--model linear``, default) or a one-hidden-layer MLP
  (``--model mlp``) trained on the distilled images alone;
* outer problem: ``min_{X_syn} CE(model_{theta*(X_syn)}(X_real), y_real)`` on real training
  images (a fresh random mini-batch, ``--outer-batch``, at every outer step).

``d outer / d X_syn`` flows only through ``theta*``; it is computed by implicit differentiation
with a Nyström (default) or conjugate-gradient inverse-Hessian-vector product. As is usual
in dataset distillation, the inner model is re-initialised every ``--reset-every`` outer
steps (``reset_inner_model(reinitialize=True)`` in ``post_outer_update``) so that the
images work for fresh models rather than for one particular trajectory.

The digits (1797 images, shipped with scikit-learn, no download) are split into training
(outer objective), validation (progress printouts) and test sets, and standardized with
training statistics. At the end a fresh model is trained from several random
initialisations on (a) the distilled images and (b) the same number of random real
training images (the initialisation of the distilled set, and several other draws), and
its test accuracy is reported. ``--save-png`` draws the distilled images.

Examples::

    python examples/dataset_distillation.py
    python examples/dataset_distillation.py --method cg --ipc 2 --save-png distilled.png
    python examples/dataset_distillation.py --model mlp --num-iters 20000
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad_and_value
from torch.nn import functional as F
from torch.optim import Adam

from hypergrad.approx_hypergrad import conjugate_gradient, nystrom
from hypergrad.optimizers import diff_sgd
from hypergrad.solver import BaseImplicitSolver
from hypergrad.utils import Params


class DistilledData(nn.Module):
    """The outer parameters: ``ipc`` learnable images per class and their fixed labels."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        super().__init__()
        self.images = nn.Parameter(images.clone())
        self.register_buffer("labels", labels.clone())


class RandomBatches:
    """An endless source of random mini-batches (``batch_size`` rows of ``x``, ``y``)."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.x, self.y, self.batch_size, self.generator = x, y, batch_size, generator

    def __iter__(self):
        while True:
            idx = torch.randperm(len(self.x), generator=self.generator)[: self.batch_size]
            yield self.x[idx], self.y[idx]


class Solver(BaseImplicitSolver):
    def inner_forward(self, in_params: Params, out_params: Params) -> Tensor:
        # the inner model trained on the distilled images alone (out_params = (images,))
        (images,) = out_params
        loss = F.cross_entropy(self.inner_func(in_params, images), self.outer.labels)
        return loss + self.weight_decay / 2 * sum(p.pow(2).sum() for p in in_params)

    def inner_update(self) -> Tensor:
        grads, loss = grad_and_value(self.inner_forward)(self.inner_params, self.out_params())
        self.inner_params, self.inner_optim_state = self.inner_optimizer(self.inner_params, grads,
                                                                         self.inner_optim_state)
        return loss

    def outer_forward(self, in_params: Params, out_params: Params, input: Tensor, target: Tensor) -> Tensor:
        # the loss of the inner model on real images
        return F.cross_entropy(self.inner_func(in_params, input), target)

    def outer_update(self) -> Tensor:
        input, target = next(self.outer_loader)
        out_params = self.out_params()
        implicit_grads = self.approx_ihvp(self.inner_forward,
                                          lambda i, o: self.outer_forward(i, o, input, target),
                                          self.inner_params, out_params)
        self.apply_outer_grad(implicit_grads)  # steps the outer optimizer; NaN/inf never applied
        with torch.no_grad():
            return self.outer_forward(self.inner_params, out_params, input, target)

    def post_outer_update(self) -> None:
        step = self.outer_step + 1
        if self.print_every and step % self.print_every == 0:
            x_val, y_val = self.val_data
            with torch.no_grad():
                logits = self.inner_func(self.inner_params, x_val)
                val_loss = F.cross_entropy(logits, y_val).item()
                val_acc = (logits.argmax(-1) == y_val).float().mean().item()
            recent = statistics.fmean(self.recorder.values("outer_loss")[-self.print_every:])
            print(f"outer step {step:4d}: outer loss (real train batches, last {self.print_every}) "
                  f"{recent:.4f}   val loss {val_loss:.4f}   val acc {100 * val_acc:.1f}%", flush=True)
        if self.reset_every and step % self.reset_every == 0:
            self.reset_inner_model(reinitialize=True)

    def out_params(self) -> Params:
        return (self.outer.images.detach(),)

    weight_decay = 0.0
    print_every = 0
    reset_every = 0
    val_data: tuple[Tensor, Tensor]


def make_model(kind: str, hidden: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(64, 10)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def train_and_test(images: Tensor, labels: Tensor, test: tuple[Tensor, Tensor], args, seeds) -> list[float]:
    """Test accuracy of fresh models trained on ``images`` only (the inner objective, with the
    same weight decay, minimised by full-batch L-BFGS), one per seed in ``seeds``."""
    accs = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = make_model(args.model, args.hidden)
        opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=args.eval_iters, tolerance_grad=1e-7,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss = loss + args.weight_decay / 2 * sum(p.pow(2).sum() for p in model.parameters())
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            accs.append((model(test[0]).argmax(-1) == test[1]).float().mean().item())
    return accs


def save_png(path: str, images: Tensor, initial: Tensor, mean: np.ndarray, std: np.ndarray, ipc: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("random real (init)", initial), ("distilled", images)]
    fig, axes = plt.subplots(2 * ipc, 10, figsize=(10, 2.2 * ipc + 0.6), squeeze=False)
    for r, (title, imgs) in enumerate(rows):
        pix = imgs.detach().numpy() * std + mean
        for j in range(ipc):
            for c in range(10):
                ax = axes[r * ipc + j, c]
                ax.imshow(pix[c * ipc + j].reshape(8, 8), cmap="gray_r", vmin=0, vmax=16)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0 and c == 0:
                    ax.set_ylabel(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="See the module docstring for the problem and more examples.")
    parser.add_argument("--method", choices=("nystrom", "cg"), default="nystrom", help="IHVP approximation")
    parser.add_argument("--model", choices=("linear", "mlp"), default="linear",
                        help="inner classifier: softmax regression or a 64-H-10 tanh MLP (default linear)")
    parser.add_argument("--hidden", type=int, default=32, help="hidden units of --model mlp (default 32)")
    parser.add_argument("--ipc", type=int, default=1, help="distilled images per class (default 1)")
    parser.add_argument("--num-iters", type=int, default=20000, help="inner iterations (default 20000)")
    parser.add_argument("--unroll-steps", type=int, default=50,
                        help="inner iterations between outer updates (default 50)")
    parser.add_argument("--reset-every", type=int, default=10,
                        help="re-initialise the inner model every N outer steps, 0 = never (default 10)")
    parser.add_argument("--inner-lr", type=float, default=0.1, help="inner SGD learning rate (default 0.1)")
    parser.add_argument("--weight-decay", type=float, default=1e-2, help="inner weight decay (default 1e-2)")
    parser.add_argument("--outer-lr", type=float, default=0.01, help="Adam learning rate of the images (default 0.01)")
    parser.add_argument("--outer-batch", type=int, default=256, help="real images per outer step (default 256)")
    parser.add_argument("--rank", type=int, default=10, help="Nyström rank (default 10)")
    parser.add_argument("--rho", type=float, default=0.01, help="Nyström rho (default 0.01)")
    parser.add_argument("--sketch", choices=("column", "gaussian"), default=None,
                        help="Nyström sketch (default: the library's DEFAULT_NYSTROM_SKETCH)")
    parser.add_argument("--cg-iters", type=int, default=10, help="conjugate-gradient iterations (default 10)")
    parser.add_argument("--eval-iters", type=int, default=500,
                        help="L-BFGS iterations when training fresh models for the final comparison (default 500)")
    parser.add_argument("--eval-inits", type=int, default=5, help="fresh initialisations averaged (default 5)")
    parser.add_argument("--print-every", type=int, default=20, help="print every N outer steps (default 20)")
    parser.add_argument("--save-png", metavar="PATH", default=None, help="save a picture of the distilled images")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: this model is tiny, and extra threads only add "
                             "synchronisation overhead, a lot of it on a busy machine)")
    parser.add_argument("--seed", type=int, default=0, help="split, initial images, models, batches (default 0)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sklearn.datasets import load_digits

    torch.manual_seed(args.seed)
    data = load_digits()
    x_all, y_all = data.data.astype(np.float32), data.target
    perm = np.random.default_rng(args.seed).permutation(len(x_all))
    tr, va, te = perm[:1000], perm[1000:1300], perm[1300:]
    mean, std = x_all[tr].mean(0), x_all[tr].std(0)
    std[std == 0] = 1.0

    def tensors(idx):
        return torch.tensor((x_all[idx] - mean) / std), torch.tensor(y_all[idx])

    train, val, test = tensors(tr), tensors(va), tensors(te)

    # initial distilled set: ipc random real training images per class
    gen = torch.Generator().manual_seed(args.seed)

    def random_real(g: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.cat([torch.nonzero(train[1] == c).squeeze(1)[
            torch.randperm(int((train[1] == c).sum()), generator=g)[: args.ipc]] for c in range(10)])
        return train[0][idx], train[1][idx]

    init_images, labels = random_real(gen)
    outer = DistilledData(init_images, labels)
    inner = make_model(args.model, args.hidden)

    if args.method == "nystrom":
        sketch = {} if args.sketch is None else {"sketch": args.sketch}
        approx_ihvp = functools.partial(nystrom, rank=args.rank, rho=args.rho, generator=gen, **sketch)
    else:
        approx_ihvp = functools.partial(conjugate_gradient, num_iters=args.cg_iters)
    # the inner "data" are the distilled images themselves (outer parameters): no inner loader needed
    solver = Solver(inner, outer, inner_loader=[None], outer_loader=RandomBatches(*train, args.outer_batch, gen),
                    approx_ihvp=approx_ihvp,
                    inner_optimizer=functools.partial(diff_sgd, momentum=0.9, lr=args.inner_lr),
                    outer_optimizer=Adam(outer.parameters(), lr=args.outer_lr),
                    num_iters=args.num_iters, unroll_steps=args.unroll_steps, log_freq=0, progress_bar=False)
    solver.weight_decay, solver.print_every, solver.reset_every = args.weight_decay, args.print_every, args.reset_every
    solver.val_data = val
    n_params = sum(p.numel() for p in inner.parameters())
    print(f"digits: train/val/test = {len(tr)}/{len(va)}/{len(te)}; distilling {10 * args.ipc} images "
          f"({args.ipc} per class) for a {args.model} model ({n_params} parameters); method={args.method}, "
          f"{args.num_iters // args.unroll_steps} outer steps")

    start = time.perf_counter()
    recorder = solver.run()
    elapsed = time.perf_counter() - start
    print(f"distillation took {elapsed:.1f} s ({solver.outer_history.describe()}, "
          f"mean hypergradient time {1e3 * recorder.mean('ihvp_time'):.1f} ms)")

    # final comparison: fresh models trained only on 10*ipc images
    seeds = range(100, 100 + args.eval_inits)
    distilled = outer.images.detach()
    acc_distilled = train_and_test(distilled, labels, test, args, seeds)
    acc_init = train_and_test(init_images, labels, test, args, seeds)
    acc_random = []
    for draw in range(10):
        imgs, labs = random_real(torch.Generator().manual_seed(1000 + draw))
        acc_random += train_and_test(imgs, labs, test, args, [seeds[draw % len(seeds)]])
    acc_full = train_and_test(train[0], train[1], test, args, seeds[:1])

    def fmt(accs):
        return f"{100 * statistics.fmean(accs):.1f}% ± {100 * statistics.pstdev(accs):.1f}"

    print(f"\ntest accuracy of a fresh {args.model} model trained to convergence (L-BFGS, weight decay "
          f"{args.weight_decay:g}) on each set; mean ± std over {args.eval_inits} initialisations "
          f"(over the 10 draws for the random real images):")
    print("| training data | images | test accuracy |")
    print("|---|---|---|")
    print(f"| distilled images | {10 * args.ipc} | {fmt(acc_distilled)} |")
    print(f"| random real images (the distilled set's initialisation) | {10 * args.ipc} | {fmt(acc_init)} |")
    print(f"| random real images (10 other draws) | {10 * args.ipc} | {fmt(acc_random)} |")
    print(f"| full training set (reference) | {len(tr)} | {fmt(acc_full)} |")
    if args.save_png:
        save_png(args.save_png, distilled, init_images, mean, std, args.ipc)


if __name__ == "__main__":
    main()
