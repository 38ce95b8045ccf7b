"""The example scripts under `accelerate launch` with two CPU processes (gloo): `examples/data_reweighting.py`
(tiny BERT) and `examples/instruction_data_weights.py` (tiny Llama, baselines included) complete on a tiny budget,
write their outputs once, and both processes end with bitwise-identical learned outer parameters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from hf_integration import DataWeights, LossWeights

from .test_core_distributed import ROOT, _free_port

pytestmark = pytest.mark.distributed


def launch_two_processes(script: str, gathered, args: list[str]) -> dict[str, torch.Tensor]:
    """``accelerate launch --multi_gpu --num_processes 2`` of ``examples/<script>.py`` (through
    ``reweighting_launch.py``) with ``args``; returns each rank's flattened outer parameters (``rank0``,
    ``rank1``), ``world`` and ``outer_steps``."""
    accelerate = shutil.which("accelerate") or os.path.join(os.path.dirname(os.sys.executable), "accelerate")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "REWEIGHTING_GATHER_OUT": str(gathered), "REWEIGHTING_SCRIPT": script}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(_free_port()),
           os.path.join(ROOT, "tests", "distributed", "reweighting_launch.py"), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return load_file(str(gathered))


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fully_shard"])
def test_data_reweighting_under_accelerate_launch_with_two_processes(tmp_path, tiny_model_dir, sharded):
    """Replicated (DDP) and sharded (``--fully_shard``: FSDP2 on the BERT layers)."""
    out, gathered = tmp_path / "out", tmp_path / "gathered.safetensors"
    sharding = ["--fully_shard", "True", "--hvp_mode", "auto", "--cache_frozen_layers", "False"] if sharded else []
    result = launch_two_processes("data_reweighting", gathered, [*sharding,
        "--model_name_or_path", tiny_model_dir, "--output_dir", str(out), "--max_steps", "6", "--unroll_steps", "2",
        "--outer_patience_steps", "0", "--max_train_samples", "64", "--max_eval_samples", "32",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
        "--hypergrad_train_batch_size", "16", "--outer_batch_size", "16", "--run_baseline", "False",
        "--weighting", "per_example", "--ihvp_method", "nystrom",
        "--use_cpu", "--report_to", "none", "--save_strategy", "no"])
    assert int(result["world"]) == 2 and int(result["outer_steps"]) == 2
    assert torch.equal(result["rank0"], result["rank1"])
    assert result["rank0"].abs().sum() > 0  # the outer updates moved the weights
    saved = DataWeights.from_pretrained(str(out))
    torch.testing.assert_close(saved.logits, result["rank0"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics  # written once, by the main process
    assert (out / "weights.png").stat().st_size > 0


def test_data_reweighting_outer_steps_on_inner_batches_under_accelerate_launch(tmp_path, tiny_model_dir):
    """``--hypergrad_on_inner_batch True`` in the job as written (loss weights, the cached trunk), DDP on 2 processes:
    outer steps of two 8-row batches each, the same outer parameters on both processes, their time recorded."""
    out, gathered = tmp_path / "out", tmp_path / "gathered.safetensors"
    result = launch_two_processes("data_reweighting", gathered, [
        "--model_name_or_path", tiny_model_dir, "--output_dir", str(out), "--max_steps", "6", "--unroll_steps", "2",
        "--outer_patience_steps", "0", "--max_train_samples", "64", "--max_eval_samples", "32",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
        "--hypergrad_train_batch_size", "16", "--outer_batch_size", "16", "--run_baseline", "False",
        "--hypergrad_on_inner_batch", "True", "--use_cpu", "--report_to", "none", "--save_strategy", "no"])
    assert int(result["world"]) == 2 and int(result["outer_steps"]) == 2
    assert torch.equal(result["rank0"], result["rank1"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["outer_steps"] == 2 and 0 < metrics["wall_time_outer_steps_s"] < metrics["wall_time_bilevel_s"]


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fully_shard"])
def test_instruction_data_weights_under_accelerate_launch_with_two_processes(tmp_path, tiny_chat_dir, sharded):
    """The instruction job's default weighting (``loss``, trusted validation rows) and its rivals, replicated (DDP)
    and sharded (``--fully_shard``: FSDP2 on the Llama layers, LossWeights' mixed product from the losses'
    directional derivatives): each process computes the same hypergradient and takes the same outer steps; the main
    process writes the outputs."""
    out, gathered = tmp_path / "out", tmp_path / "gathered.safetensors"
    sharding = ["--fully_shard", "True", "--hvp_mode", "auto", "--cache_frozen_layers", "False"] if sharded else []
    result = launch_two_processes("instruction_data_weights", gathered, [*sharding,
        "--model_name_or_path", tiny_chat_dir, "--output_dir", str(out), "--max_train_samples", "32",
        "--max_eval_samples", "8", "--max_length", "192", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8", "--max_steps", "4", "--unroll_steps", "1", "--outer_patience_steps", "2",
        "--warmup_steps", "0", "--hypergrad_train_batch_size", "8", "--outer_batch_size", "8", "--max_new_tokens", "3",
        "--disable_tqdm", "True", "--use_cpu", "True", "--logging_steps", "100", "--report_to", "none"])
    assert int(result["world"]) == 2 and int(result["outer_steps"]) == 2
    assert torch.equal(result["rank0"], result["rank1"])
    saved = LossWeights.from_pretrained(str(out))
    assert saved.trusted_column == "trusted"
    torch.testing.assert_close(saved.loss_scale_raw.detach().reshape(-1), result["rank0"])
    assert float(saved.loss_scale_raw.detach()) != float(LossWeights().loss_scale_raw.detach())  # outer steps moved it
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["baselines"]) == {"uniform", "loss_filter", "uniform_train_val", "length_filter", "ifd_filter"}
    assert all(0.0 <= metrics["baselines"][f]["auc_ranking_vs_corrupted"] <= 1.0 for f in ("length_filter", "ifd_filter"))
    assert metrics["num_train"] == 32 and metrics["num_test"] == 8
    assert (out / "train_with_weights").is_dir() and (out / "top_weighted.jsonl").stat().st_size > 0
