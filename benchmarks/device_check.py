"""Every IHVP method on an accelerator, against the ridge-regression closed form.

Ridge regression with per-feature weight decay has the hypergradient
``dg/dphi = -theta* * H^{-1} grad g`` in closed form. This runs each method of
:mod:`hypergrad.approx_hypergrad` with a full budget, on the given device, in float32 and
float64, with tuple and dict parameters and every ``hvp_mode``, prints the relative errors
and exits non-zero if one exceeds its tolerance (1e-6 in float64; 1e-3 in float32, 1e-2 for
finite differences, Neumann and full-rank Nyström, whose round-off is larger).

    python benchmarks/device_check.py --device cuda
"""

from __future__ import annotations

import argparse
import sys

import torch

from hypergrad.approx_hypergrad import conjugate_gradient, exact, neumann, nystrom


def ridge(device, dtype, d=12, n=64, m=48):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    xv = torch.randn(m, d, generator=gen, dtype=torch.float64)
    yv = torch.randn(m, generator=gen, dtype=torch.float64)
    phi = torch.rand(d, generator=gen, dtype=torch.float64) + 0.5
    h = x.T @ x / n + torch.diag(phi)
    theta = torch.linalg.solve(h, x.T @ y / n)
    truth = -theta * torch.linalg.solve(h, xv.T @ (xv @ theta - yv) / m)
    lam_max = float(torch.linalg.eigvalsh(h).max())
    to = dict(device=device, dtype=dtype)
    x, y, xv, yv, phi, theta = (t.to(**to) for t in (x, y, xv, yv, phi, theta))

    def leaf(p):
        return p["w"] if isinstance(p, dict) else p[0]

    def inner(i, o):
        w = leaf(i)
        return ((x @ w - y) ** 2).sum() / (2 * n) + 0.5 * (leaf(o) * w ** 2).sum()

    def outer(i, o):
        return ((xv @ leaf(i) - yv) ** 2).sum() / (2 * m)

    return inner, outer, theta, phi, truth, lam_max


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    failures, rows = 0, []
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-3)):
        inner, outer, theta, phi, truth, lam_max = ridge(device, dtype)
        d = theta.numel()
        gen = torch.Generator(device=device).manual_seed(0)
        methods = {
            "exact": lambda i, o, mode: exact(inner, outer, i, o, hvp_mode=mode),
            "cg": lambda i, o, mode: conjugate_gradient(inner, outer, i, o, num_iters=2 * d, hvp_mode=mode),
            "neumann": lambda i, o, mode: neumann(inner, outer, i, o, num_iters=3000, lr=1 / lam_max, hvp_mode=mode),
            "nystrom-column": lambda i, o, mode: nystrom(inner, outer, i, o, rank=d, rho=1e-8 if dtype == torch.float64
                                                         else 1e-4, sketch="column", generator=gen, hvp_mode=mode),
            "nystrom-gaussian": lambda i, o, mode: nystrom(inner, outer, i, o, rank=d, rho=1e-8 if dtype == torch.float64
                                                           else 1e-4, sketch="gaussian", generator=gen, hvp_mode=mode),
        }
        for name, fn in methods.items():
            for structure in ("tuple", "dict"):
                i, o = ((theta,), (phi,)) if structure == "tuple" else ({"w": theta}, {"w": phi})
                for mode in ("fwd_rev", "rev_rev", "finite_diff"):
                    out = fn(i, o, mode)
                    got = (out[0] if structure == "tuple" else out["w"]).double().cpu()
                    assert out_device(out) == device.type, f"{name} returned a tensor on another device"
                    err = float((got - truth).norm() / truth.norm())
                    # float32: finite differences lose ~u^(2/3) ~ 2e-5 per product, and full-rank
                    # Nyström's Woodbury form cancels to ~u * cond^2 / rho (see linear_solvers)
                    loose = mode == "finite_diff" or name in ("neumann", "nystrom-column", "nystrom-gaussian")
                    bound = tol * (10 if loose and dtype == torch.float32 else 1)
                    ok = err < bound
                    failures += not ok
                    rows.append((str(dtype).replace("torch.", ""), name, structure, mode, err, "ok" if ok else "FAIL"))
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), torch {torch.__version__}")
    print("| dtype | method | params | hvp_mode | rel. error | |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]} | {row[4]:.1e} | {row[5]} |")
    print(f"{len(rows) - failures} passed, {failures} failed")
    return 1 if failures else 0


def out_device(tree) -> str:
    leaves = list(tree.values()) if isinstance(tree, dict) else list(tree)
    return leaves[0].device.type


if __name__ == "__main__":
    sys.exit(main())
