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
from .trainer_worker import FIXED_STEP, build

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
