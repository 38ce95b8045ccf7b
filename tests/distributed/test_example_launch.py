"""`examples/data_reweighting.py` under `accelerate launch` with two CPU processes (gloo):
it completes on a tiny budget, writes its outputs once, and both processes end with
bitwise-identical learned weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from hf_integration import DataWeights

from .test_core_distributed import ROOT, _free_port

pytestmark = pytest.mark.distributed


def test_data_reweighting_under_accelerate_launch_with_two_processes(tmp_path, tiny_model_dir):
    accelerate = shutil.which("accelerate") or os.path.join(os.path.dirname(os.sys.executable), "accelerate")
    model = tiny_model_dir
    out, gathered = tmp_path / "out", tmp_path / "gathered.safetensors"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "REWEIGHTING_GATHER_OUT": str(gathered)}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(_free_port()),
           os.path.join(ROOT, "tests", "distributed", "reweighting_launch.py"),
           "--model_name_or_path", model, "--output_dir", str(out), "--max_steps", "6", "--unroll_steps", "2",
           "--outer_patience_steps", "0", "--max_train_samples", "64", "--max_eval_samples", "32",
           "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
           "--hypergrad_train_batch_size", "16", "--outer_batch_size", "16", "--run_baseline", "False",
           "--weighting", "per_example", "--ihvp_method", "nystrom",
           "--use_cpu", "--report_to", "none", "--save_strategy", "no"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    result = load_file(str(gathered))
    assert int(result["world"]) == 2 and int(result["outer_steps"]) == 2
    assert torch.equal(result["rank0"], result["rank1"])
    assert result["rank0"].abs().sum() > 0  # the outer updates moved the weights
    saved = DataWeights.from_pretrained(str(out))
    torch.testing.assert_close(saved.logits, result["rank0"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics  # written once, by the main process
    assert (out / "weights.png").stat().st_size > 0
