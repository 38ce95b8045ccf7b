"""`BilevelTrainer` under DDP with two CPU processes (gloo, through Accelerate).

Ground truth: the single-process hypergradient on the union of both processes' batches, with
the same Nyström sketch; replicas must hold bitwise-identical outer parameters.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .test_core_distributed import ROOT, _free_port
from .trainer_worker import FIXED_STEP, build, build_inner_batch

pytestmark = pytest.mark.distributed


def test_ddp_trainer_hypergradient_and_replicated_outer_parameters(tmp_path):
    out = tmp_path / "result.safetensors"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), os.path.join(ROOT, "tests", "distributed", "trainer_worker.py"),
           "--out", str(out), "--output_dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = load_file(str(out))

    assert torch.equal(result["log_strength0"], result["log_strength1"])
    assert int(result["outer_steps"]) == 2
    checkpoint = tmp_path / "run" / "checkpoint-6"
    assert (checkpoint / "outer_params.safetensors").exists() and (checkpoint / "outer_optimizer.safetensors").exists()

    trainer, _ = build(str(tmp_path / "single"))
    assert trainer.args.world_size == 1
    union = {name: {key: result[f"{name}.{key}"] for key in ("input_ids", "attention_mask", "labels")}
             for name in ("train", "eval")}
    _, sketch = trainer._generators(FIXED_STEP)
    single = trainer.compute_hypergradient(union["train"], union["eval"], sketch)["outer_module.log_strength"]
    assert single.abs().min() > 0
    torch.testing.assert_close(result["hypergrad"], single, rtol=1e-4, atol=1e-10)


def test_ddp_outer_steps_on_inner_batches(tmp_path):
    """`hypergrad_on_inner_batch` under DDP: the mixed product from each process's own inner forward pass (before
    DDP's gradient reduction), averaged, equals the single-process hypergradient of the processes' mean objective;
    the inner gradients are still reduced (identical adapters) and the outer parameters replicated."""
    from hypergrad.approx_hypergrad import implicit_hypergrad
    from hypergrad.solver import count_outer_steps

    out = tmp_path / "result.safetensors"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), os.path.join(ROOT, "tests", "distributed", "trainer_worker.py"),
           "--inner_batch", "--out", str(out), "--output_dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = load_file(str(out))
    assert int(result["outer_steps"]) == count_outer_steps(6, 2, 0) == 2
    assert torch.equal(result["outer"][0], result["outer"][1])
    assert torch.equal(result["adapter"][0], result["adapter"][1])

    trainer = build_inner_batch(str(tmp_path / "single"))
    theta, offset = {}, 0
    for name, value in trainer._theta().items():
        theta[name] = result["theta"][offset:offset + value.numel()].view_as(value)
        offset += value.numel()
    parts = {name: [{key: result[f"{name}.{key}"][rank] for key in ("input_ids", "attention_mask", "labels")}
                    for rank in range(2)] for name in ("train", "eval")}
    phi = {k: v.detach() for k, v in trainer._outer_param_tree().items()}
    with trainer._second_order_context():
        single = implicit_hypergrad(
            lambda i, o: sum(trainer.inner_forward(i, o, batch) for batch in parts["train"]) / 2,
            lambda i, o: sum(trainer.outer_forward(i, o, batch) for batch in parts["eval"]) / 2,
            theta, phi, trainer._solver(torch.Generator()), "rev_rev")["outer_module.loss_scale_raw"]
    assert single.abs().max() > 0
    torch.testing.assert_close(result["hypergrad"], single, rtol=1e-6, atol=1e-12)
