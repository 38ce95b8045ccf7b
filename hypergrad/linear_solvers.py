"""Linear solvers for ``A x = b`` with ``A`` given only through matrix-vector products.

Each solver is a plain function ``solve_*(matvec, b, **options) -> x`` that knows nothing
about bilevel problems: ``b`` and ``x`` are parameter trees (tuple or dict of tensors) and
``matvec`` maps a tree to a tree. They are tested on random linear systems on their own and
composed with Hessian-vector products in :mod:`hypergrad.approx_hypergrad`.

All work is done leaf by leaf; the only global quantities are scalars and ``k x k``
matrices (``k`` the Nyström rank), so memory is ``O(k p)`` and a distributed caller can
all-reduce those small reductions through ``reduce``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .trees import (tree_axpy, tree_dot, tree_flatten_vector, tree_leaves, tree_map, tree_numel, tree_scale, tree_sub,
                    tree_unflatten, tree_unflatten_vector)
from .utils import ParamsLike, check_positive_float, check_positive_int, identity

__all__ = [
    "NystromFactor",
    "solve_cg",
    "solve_pcg",
    "solve_neumann",
    "solve_nystrom",
    "solve_dense",
    "nystrom_sketch",
    "NYSTROM_SKETCHES",
]

Matvec = Callable[[ParamsLike], ParamsLike]
Reduce = Callable[[Tensor], Tensor]
NYSTROM_SKETCHES: tuple[str, ...] = ("column", "gaussian")


def solve_cg(
    matvec: Matvec,
    b: ParamsLike,
    num_iters: int,
    lr: float = 1.0,
    tol: float = 0.0,
    reduce: Reduce = identity,
    x0: ParamsLike | None = None,
) -> ParamsLike:
    """Textbook conjugate gradient for a symmetric positive-definite ``A``.

    Solves ``(lr A) x = lr b`` (the same ``x``; ``lr`` only rescales the products, which
    helps keep them in a comfortable floating-point range) starting from ``x = 0``, or from
    ``x0`` (a warm start: the residual ``b - A x0`` costs one of the ``num_iters`` products).
    The new search direction is built from the *new* residual, ``p <- r_new + beta p`` with
    ``beta = |r_new|^2 / |r|^2``. Stops after ``num_iters`` products or when
    ``|r| <= tol |b|``.
    """
    check_positive_int(num_iters, "num_iters")
    check_positive_float(lr, "lr")
    x, r, iters = _initial_iterate(matvec, b, x0, num_iters, reduce)
    r = tree_scale(r, lr)
    p = r
    rs = reduce(tree_dot(r, r))
    stop = (tol**2) * (rs if x0 is None else lr**2 * reduce(tree_dot(b, b)))
    for _ in range(iters):
        if rs == 0 or rs <= stop:
            break
        ap = tree_scale(matvec(p), lr)
        alpha = rs / reduce(tree_dot(p, ap))
        x = tree_axpy(alpha, p, x)
        r = tree_axpy(-alpha, ap, r)
        rs_new = reduce(tree_dot(r, r))
        p = tree_axpy(rs_new / rs, p, r)
        rs = rs_new
    return x


def _initial_iterate(matvec: Matvec, b: ParamsLike, x0: ParamsLike | None, num_iters: int,
                     reduce: Reduce) -> tuple[ParamsLike, ParamsLike, int]:
    """The first iterate, its residual ``b - A x`` and the products left: ``(0, b, num_iters)``
    cold; warm, ``(a x0, b - a A x0, num_iters - 1)`` with ``a = <b, x0> / <x0, A x0>``, the
    multiple of ``x0`` closest to ``A^{-1} b`` in the ``A``-norm that CG minimises (so the start
    is never worse than 0 in that norm; ``a = 1`` when ``x0`` is the solution), or
    ``(0, b, num_iters - 1)`` when ``<x0, A x0> <= 0``."""
    if x0 is None:
        return tree_map(torch.zeros_like, b), b, num_iters
    ax0 = matvec(x0)
    curvature = reduce(tree_dot(x0, ax0))
    if not curvature > 0:
        return tree_map(torch.zeros_like, b), b, num_iters - 1
    alpha = reduce(tree_dot(b, x0)) / curvature
    return tree_scale(x0, alpha), tree_axpy(-alpha, ax0, b), num_iters - 1


def solve_neumann(
    matvec: Matvec,
    b: ParamsLike,
    num_iters: int,
    lr: float,
) -> ParamsLike:
    """Truncated Neumann series ``x = lr * sum_{j=0}^{K} (I - lr A)^j b`` with ``K = num_iters``.

    Converges to ``A^{-1} b`` when ``0 < lr < 2 / lambda_max(A)`` and ``A`` is positive
    definite; each term costs one product.
    """
    check_positive_int(num_iters, "num_iters")
    check_positive_float(lr, "lr")
    term = b
    total = b
    for _ in range(num_iters):
        term = tree_sub(term, tree_scale(matvec(term), lr))
        total = tree_map(torch.add, total, term)
    return tree_scale(total, lr)


def _rows(x: Tensor) -> Tensor:
    """A batched leaf as a ``(k, n)`` matrix; works for 0-d leaves (shape ``(k,)``) and for
    empty shards (shape ``(k, 0, ...)``, which ``reshape(k, -1)`` rejects)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def _gram(a: ParamsLike, b: ParamsLike, reduce: Reduce) -> Tensor:
    """``G[i, j] = <a_i, b_j>`` for batched trees (leading dimension = batch)."""
    total = None
    for x, y in zip(tree_leaves(a), tree_leaves(b)):
        part = _rows(x) @ _rows(y).T
        total = part if total is None else total + part
    return reduce(total)


def _batched_dot(a: ParamsLike, v: ParamsLike, reduce: Reduce) -> Tensor:
    """``z[i] = <a_i, v>`` for a batched tree ``a`` and a plain tree ``v``."""
    total = None
    for x, y in zip(tree_leaves(a), tree_leaves(v)):
        part = _rows(x) @ y.reshape(-1)
        total = part if total is None else total + part
    return reduce(total)


def _combine(a: ParamsLike, coef: Tensor) -> ParamsLike:
    """``sum_i coef[i] * a_i`` for a batched tree ``a`` (a plain tree); for a matrix ``coef``,
    the batched tree of rows ``sum_j coef[i, j] a_j``."""
    return tree_map(lambda x: torch.tensordot(coef.to(x.dtype), x, dims=1), a)


def _sample_indices(p: int, k: int, generator: torch.Generator | None, device) -> Tensor:
    """``k`` distinct indices drawn uniformly from ``range(p)`` in ``O(k)`` memory.

    Floyd's algorithm: for ``j = p-k, ..., p-1`` draw ``t`` uniform in ``[0, j]`` and take
    ``t`` unless already taken, in which case take ``j``. Every ``k``-subset is equally likely.
    """
    draws = torch.rand(k, generator=generator, dtype=torch.float64,
                       device=generator.device if generator is not None else "cpu")
    chosen: list[int] = []
    taken: set[int] = set()
    for step, u in enumerate(draws.tolist()):
        j = p - k + step
        t = min(int(u * (j + 1)), j)
        pick = j if t in taken else t
        taken.add(pick)
        chosen.append(pick)
    return torch.tensor(chosen, dtype=torch.long, device=device)


def nystrom_sketch(
    like: ParamsLike,
    rank: int,
    sketch: str = "column",
    generator: torch.Generator | None = None,
    reduce: Reduce = identity,
) -> ParamsLike:
    """A batched tree ``Omega`` of ``rank`` test directions shaped like ``like``.

    ``"column"``: ``rank`` distinct coordinate vectors ``e_i`` drawn uniformly (the column
    sampling of Hataya & Yamada, 2023), so that ``A Omega`` are columns of ``A``.
    ``"gaussian"``: a Gaussian matrix orthonormalised by Cholesky-QR (randomized Nyström,
    Tropp et al. 2017), which captures the leading eigenspace far better per product.
    """
    if sketch not in NYSTROM_SKETCHES:
        raise ValueError(f"`sketch` must be one of {NYSTROM_SKETCHES}, got {sketch!r}.")
    leaves = tree_leaves(like)
    device, dtype = leaves[0].device, leaves[0].dtype
    if sketch == "column":
        p = tree_numel(like)
        idx = _sample_indices(p, rank, generator, device)
        out, offset = [], 0
        rows = torch.arange(rank, device=device)
        for x in leaves:
            n = x.numel()
            block = torch.zeros(rank, n, dtype=x.dtype, device=x.device)
            mask = (idx >= offset) & (idx < offset + n)
            block[rows[mask], idx[mask] - offset] = 1
            out.append(block.reshape(rank, *x.shape))
            offset += n
        return tree_unflatten(like, out)
    omega = tree_unflatten(
        like,
        [
            torch.randn(
                rank, *x.shape, generator=generator, dtype=x.dtype,
                device=generator.device if generator is not None else x.device,
            ).to(x.device)
            for x in leaves
        ],
    )
    # Cholesky-QR: with G = Omega Omega^T = L L^T, the rows of L^{-1} Omega are orthonormal.
    gram = _gram(omega, omega, reduce).to(torch.float64)
    l_inv = torch.linalg.inv(torch.linalg.cholesky(gram)).to(dtype)
    return tree_map(lambda x: torch.tensordot(l_inv, x, dims=1), omega)


def _pinv(m: Tensor) -> Tensor:
    """Pseudo-inverse of the symmetric ``k x k`` matrix ``m`` in float64, so a rank-deficient
    sketch degrades gracefully; all NaN when ``m`` is not finite (callers detect and skip)."""
    m64 = m.to(torch.float64)
    if not torch.isfinite(m64).all():
        return torch.full_like(m64, float("nan"))
    m64 = (m64 + m64.T) / 2
    evals, evecs = torch.linalg.eigh(m64)
    cutoff = evals.abs().max() * m.shape[0] * torch.finfo(torch.float64).eps * 10
    inv = torch.where(evals.abs() > cutoff, 1.0 / evals, torch.zeros_like(evals))
    return (evecs * inv) @ evecs.T


class NystromFactor:
    """A rank-``k`` Nyström approximation ``A_nys = Y W^+ Y^T`` of a symmetric PSD ``A``,
    kept to solve several systems with it (and to precondition CG).

    ``Omega`` holds ``k`` test directions (:func:`nystrom_sketch`) and ``Y = A Omega``
    the ``k`` products, computed in one batched call; ``W = Omega^T Y``. Every global
    quantity is a ``k x k`` matrix, so ``reduce`` (a sum over shards) makes it shard-ready.
    Memory is ``O(k p)``: ``Omega`` and ``Y``.
    """

    def __init__(self, omega: ParamsLike, y: ParamsLike, rho: float, reduce: Reduce = identity) -> None:
        check_positive_float(rho, "rho")
        self.omega, self.y, self.rho, self._reduce = omega, y, float(rho), reduce
        # (rho W + Y^T Y)^+ for the Woodbury form of (A_nys + rho I)^{-1}.
        self.inner = _pinv(rho * _gram(omega, y, reduce) + _gram(y, y, reduce))
        self._eig: tuple[ParamsLike, Tensor] | None = None

    @classmethod
    def sketch(cls, batched_matvec: Matvec, like: ParamsLike, rank: int, rho: float, sketch: str = "column",
               generator: torch.Generator | None = None, reduce: Reduce = identity) -> NystromFactor:
        """Draw ``rank`` test directions shaped like ``like`` and take their products."""
        check_positive_int(rank, "rank")
        check_positive_float(rho, "rho")
        local = tree_numel(like)
        device = tree_leaves(like)[0].device
        p = int(reduce(torch.tensor(float(local), dtype=torch.float64, device=device)).item())  # over shards
        if rank > p:
            raise ValueError(f"`rank` ({rank}) must not exceed the number of inner parameters ({p}).")
        if sketch == "column" and rank > local:
            raise ValueError(f"`rank` ({rank}) exceeds this shard's {local} parameters; use sketch='gaussian'.")
        omega = nystrom_sketch(like, rank, sketch, generator, reduce)
        return cls(omega, batched_matvec(omega), rho, reduce)

    def solve(self, b: ParamsLike) -> ParamsLike:
        """``(A_nys + rho I)^{-1} b``. By the Woodbury identity
        ``(rho I + Y W^+ Y^T)^{-1} b = (b - Y (rho W + Y^T Y)^+ Y^T b) / rho``."""
        z = _batched_dot(self.y, b, self._reduce).to(torch.float64)
        coef = self.inner @ z if torch.isfinite(z).all() else torch.full_like(z, float("nan"))
        return tree_scale(tree_sub(b, _combine(self.y, coef)), 1.0 / self.rho)

    def eig(self) -> tuple[ParamsLike, Tensor]:
        """``A_nys = U^T diag(lam) U`` with orthonormal rows ``U`` (a batched tree) and
        ``lam >= 0``, by the shifted, Cholesky-based construction of Tropp et al. (2017):
        ``Y_nu = Y + nu Omega``, ``W_nu = L L^T``, ``B = L^{-1} Y_nu``, ``B B^T = V S^2 V^T``,
        ``U = S^{-1} V^T B``, ``lam = max(S^2 - nu, 0)``. Needs orthonormal ``Omega`` rows
        (both sketches have them)."""
        if self._eig is None:
            y_norm = torch.sqrt(torch.trace(_gram(self.y, self.y, self._reduce).to(torch.float64)))
            nu = torch.finfo(tree_leaves(self.y)[0].dtype).eps * float(y_norm) + 1e-300
            y_nu = tree_axpy(nu, self.omega, self.y)
            w_nu = _gram(self.omega, y_nu, self._reduce).to(torch.float64)
            w_nu = (w_nu + w_nu.T) / 2
            evals, evecs = torch.linalg.eigh(w_nu)
            keep = evals > evals.max().clamp_min(0) * w_nu.shape[0] * torch.finfo(torch.float64).eps * 10
            # B = W_nu^{-1/2} Y_nu on the numerically positive part (a Cholesky that tolerates
            # a rank-deficient sketch)
            half_inv = evecs[:, keep] / evals[keep].sqrt()
            b_rows = _combine(y_nu, half_inv.T)
            s2, v = torch.linalg.eigh(_gram(b_rows, b_rows, self._reduce).to(torch.float64))
            pos = s2 > s2.max().clamp_min(0) * s2.shape[0] * torch.finfo(torch.float64).eps * 10
            u = _combine(b_rows, (v[:, pos] / s2[pos].sqrt()).T)
            self._eig = (u, (s2[pos] - nu).clamp_min(0))
        return self._eig

    def precondition(self, r: ParamsLike) -> ParamsLike:
        """The Nyström preconditioner of Frangella, Tropp & Udell (2023) applied to ``r``:
        ``P^{-1} r = (lam_min + rho) U^T (diag(lam) + rho)^{-1} U r + (I - U^T U) r``."""
        u, lam = self.eig()
        if lam.numel() == 0:
            return r
        z = _batched_dot(u, r, self._reduce).to(torch.float64)
        scale = (lam.min() + self.rho) / (lam + self.rho) - 1.0
        return tree_map(torch.add, r, _combine(u, scale * z))

    def state_dict(self) -> dict[str, Tensor]:
        """The tensors that rebuild this factor (with ``rho``): ``omega.<i>`` and ``y.<i>``."""
        out = {f"omega.{i}": x for i, x in enumerate(tree_leaves(self.omega))}
        out.update({f"y.{i}": x for i, x in enumerate(tree_leaves(self.y))})
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], like: ParamsLike, rho: float,
                        reduce: Reduce = identity) -> NystromFactor:
        n = len(tree_leaves(like))
        try:
            omega = tree_unflatten(like, [state[f"omega.{i}"] for i in range(n)])
            y = tree_unflatten(like, [state[f"y.{i}"] for i in range(n)])
        except KeyError as err:
            raise ValueError(f"Nyström factor state is missing tensor {err.args[0]!r}.") from None
        for a, x in zip(tree_leaves(y), tree_leaves(like)):
            if tuple(a.shape[1:]) != tuple(x.shape):
                raise ValueError(f"Nyström factor state has a tensor of shape {tuple(a.shape[1:])} where the "
                                 f"parameters have {tuple(x.shape)}: it belongs to another model.")
        return cls(omega, y, rho, reduce)


def solve_nystrom(
    batched_matvec: Matvec,
    b: ParamsLike,
    rank: int,
    rho: float,
    sketch: str = "column",
    generator: torch.Generator | None = None,
    reduce: Reduce = identity,
) -> ParamsLike:
    """``(A_nys + rho I)^{-1} b`` with a fresh rank-``rank`` :class:`NystromFactor`."""
    return NystromFactor.sketch(batched_matvec, b, rank, rho, sketch, generator, reduce).solve(b)


def solve_pcg(
    matvec: Matvec,
    b: ParamsLike,
    num_iters: int,
    precondition: Matvec,
    tol: float = 0.0,
    reduce: Reduce = identity,
    x0: ParamsLike | None = None,
) -> ParamsLike:
    """Preconditioned conjugate gradient for ``A x = b`` from ``x = 0`` (or from ``x0``, whose
    residual costs one of the ``num_iters`` products), with
    ``precondition(r) ~ A^{-1} r`` symmetric positive definite: ``z = P^{-1} r``,
    ``alpha = <r, z> / <p, A p>``, ``p <- z_new + (<r_new, z_new> / <r, z>) p``. Stops after
    ``num_iters`` products or when ``|r| <= tol |b|``."""
    check_positive_int(num_iters, "num_iters")
    check_positive_float(tol, "tol", allow_zero=True)
    x, r, iters = _initial_iterate(matvec, b, x0, num_iters, reduce)
    z = precondition(r)
    p = z
    rz = reduce(tree_dot(r, z))
    stop = (tol**2) * reduce(tree_dot(b, b))
    for _ in range(iters):
        if rz == 0 or reduce(tree_dot(r, r)) <= stop:
            break
        ap = matvec(p)
        alpha = rz / reduce(tree_dot(p, ap))
        x = tree_axpy(alpha, p, x)
        r = tree_axpy(-alpha, ap, r)
        z = precondition(r)
        rz_new = reduce(tree_dot(r, z))
        p = tree_axpy(rz_new / rz, p, z)
        rz = rz_new
    return x


def solve_dense(batched_matvec: Matvec, b: ParamsLike) -> ParamsLike:
    """Exact solve: build the dense ``p x p`` matrix from ``p`` products with the identity
    and call ``torch.linalg.solve``. For small problems and tests only."""
    p = tree_numel(b)
    flat_b = tree_flatten_vector(b)
    eye = torch.eye(p, dtype=flat_b.dtype, device=flat_b.device)
    columns = batched_matvec(tree_unflatten_vector(eye, b))
    a = torch.cat([x.reshape(p, -1) for x in tree_leaves(columns)], dim=1)
    a = (a + a.T) / 2
    return tree_unflatten_vector(torch.linalg.solve(a, flat_b), b)
