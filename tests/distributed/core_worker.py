"""Worker run by `torchrun --nproc_per_node 2` in tests/distributed/test_core_distributed.py.

Every process builds the same small regression problem, takes its half of the data and
computes hypergradients either data-parallel (``--layout ddp``: torch.func products averaged
with `DataParallel`) or sharded (``--layout fsdp``: FSDP2 `fully_shard`, in-place
finite-difference products with `sharded_hypergrad`). Rank 0 saves the results with
safetensors for the test to compare against a single process on the full batch.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call

from hypergrad.approx_hypergrad import conjugate_gradient, make_solver, nystrom
from hypergrad.distributed import DataParallel, reshard
from hypergrad.sharded import sharded_hypergrad

N_TRAIN, N_VAL, DIM, HIDDEN, OUT = 16, 8, 4, 6, 2


def problem(dtype=torch.float64):
    """Model, data and outer parameters, identical in every process (fixed seed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT)).to(dtype)
    data = {
        "x": torch.randn(N_TRAIN, DIM, dtype=dtype), "y": torch.randn(N_TRAIN, OUT, dtype=dtype),
        "xv": torch.randn(N_VAL, DIM, dtype=dtype), "yv": torch.randn(N_VAL, OUT, dtype=dtype),
    }
    # outer parameters: an input scaling and one log-weight per training example
    phi = {"scale": 1 + 0.1 * torch.randn(DIM, dtype=dtype), "log_w": 0.3 * torch.randn(N_TRAIN, dtype=dtype)}
    return model, data, phi


def shard(data, rank, world):
    """This process's contiguous slice of every data tensor, with the example indices."""
    out = {}
    for key, value in data.items():
        n = value.shape[0] // world
        out[key] = value[rank * n:(rank + 1) * n]
    n = N_TRAIN // world
    out["idx"] = torch.arange(rank * n, (rank + 1) * n)
    return out


def losses(forward, data, phi):
    """Inner loss (weighted MSE) and outer loss (validation MSE) given ``forward(x)``."""
    w = torch.exp(phi["log_w"][data["idx"]])
    pred = forward(data["x"] * phi["scale"])
    inner = (w * (pred - data["y"]).pow(2).sum(-1)).mean()
    outer = (forward(data["xv"] * phi["scale"]) - data["yv"]).pow(2).sum(-1).mean()
    return inner, outer


def functional_objectives(model, data):
    def inner(theta, phi):
        return losses(lambda x: functional_call(model, theta, (x,)), data, phi)[0]

    def outer(theta, phi):
        return losses(lambda x: functional_call(model, theta, (x,)), data, phi)[1]

    return inner, outer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", choices=["ddp", "fsdp"], required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, data, phi = problem()
    local = shard(data, rank, world)
    p = sum(x.numel() for x in model.parameters())
    results = {}
    if args.layout == "ddp":
        inner, outer = functional_objectives(model, local)
        theta = {k: v.detach() for k, v in model.named_parameters()}
        results["nystrom"] = nystrom(inner, outer, theta, phi, rank=8, rho=0.1,
                                     generator=torch.Generator().manual_seed(0), dist=DataParallel())
        results["cg"] = conjugate_gradient(inner, outer, theta, phi, num_iters=5, dist=DataParallel())
    else:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model)  # the root holds the last layer's parameters

        def inner_loss(phi_):
            return losses(model, local, phi_)[0]

        def outer_loss(phi_):
            return losses(model, local, phi_)[1]

        solve = make_solver("nystrom", rank=p, rho=0.1, sketch="gaussian",
                            generator=torch.Generator().manual_seed(100 + rank))
        before = [x.full_tensor().clone() for x in model.parameters()]
        with torch.no_grad():  # FSDP2 keeps the root's parameters unsharded after a forward without backward
            model(local["x"])
        results["nystrom"] = sharded_hypergrad(model, inner_loss, outer_loss, phi, solve)
        reshard(model)
        after = [x.full_tensor() for x in model.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(before, after)), "parameters were not restored"
        local_numel = sum(x.to_local().numel() for x in model.parameters())
        results["meta"] = {"local_numel": torch.tensor([float(local_numel), float(p)])}
    if rank == 0:
        flat = {f"{method}.{k}": v.contiguous() for method, tree in results.items() for k, v in tree.items()}
        save_file(flat, args.out)
    # every rank must hold the same outer gradients
    for method, tree in results.items():
        if method == "meta":
            continue
        for key, value in tree.items():
            ref = value.clone()
            dist.broadcast(ref, src=0)
            assert torch.allclose(ref, value, rtol=0, atol=0), f"{method}.{key} differs across ranks"
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    # Leave without running interpreter/C++ teardown: gloo's threads can abort a process at exit
    # ("terminate called without an active exception") after all work is done and synchronised.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
