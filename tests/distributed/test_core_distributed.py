"""Hypergradients with two CPU processes (gloo) equal the single-process full-batch ones.

`core_worker.py` runs under `torchrun --nproc_per_node 2`; each process holds half of the
data. Ground truth: the same hypergradient computed here in one process on the full batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hypergrad.approx_hypergrad import conjugate_gradient, exact, nystrom

from .core_worker import N_TRAIN, functional_objectives, problem, shard

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_processes(layout: str, out: str) -> dict[str, torch.Tensor]:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), os.path.join(ROOT, "tests", "distributed", "core_worker.py"),
           "--layout", layout, "--out", out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return load_file(out)


def _full_batch():
    model, data, phi = problem()
    full = shard(data, 0, 1)
    assert len(full["idx"]) == N_TRAIN
    inner, outer = functional_objectives(model, full)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    return inner, outer, theta, phi


def test_data_parallel_hypergradient_equals_full_batch(tmp_path):
    result = run_two_processes("ddp", str(tmp_path / "ddp.safetensors"))
    inner, outer, theta, phi = _full_batch()
    p = sum(v.numel() for v in theta.values())
    expected = {
        "nystrom": nystrom(inner, outer, theta, phi, rank=8, rho=0.1, generator=torch.Generator().manual_seed(0)),
        "cg": conjugate_gradient(inner, outer, theta, phi, num_iters=5),  # H is indefinite: few iterations
    }
    for method, tree in expected.items():
        for key, value in tree.items():
            torch.testing.assert_close(result[f"{method}.{key}"], value, rtol=1e-10, atol=1e-12)
    assert expected["nystrom"]["log_w"].abs().min() > 0  # every example's weight gets a gradient


def test_fsdp2_sharded_finite_difference_nystrom_equals_single_process(tmp_path):
    result = run_two_processes("fsdp", str(tmp_path / "fsdp.safetensors"))
    local_numel, p = result["meta.local_numel"].tolist()
    assert local_numel < p  # each process really holds only a shard
    inner, outer, theta, phi = _full_batch()
    # full rank: (H_nys + rho I)^-1 = (H + rho I)^-1 whatever the sketch
    reference = nystrom(inner, outer, theta, phi, rank=int(p), rho=0.1)
    damped = exact(lambda i, o: inner(i, o) + 0.05 * sum((x ** 2).sum() for x in i.values()), outer, theta, phi)
    torch.testing.assert_close(damped["scale"], reference["scale"])  # the reference is (H + rho I)^-1
    undamped = exact(inner, outer, theta, phi)
    assert not torch.allclose(undamped["scale"], reference["scale"], rtol=1e-3)  # rho matters: a sharp check
    for key, value in reference.items():
        # finite-difference HVPs in float64: relative error ~ u^(2/3) ~ 1e-11, amplified by the solve
        torch.testing.assert_close(result[f"nystrom.{key}"], value, rtol=1e-6, atol=1e-9)
