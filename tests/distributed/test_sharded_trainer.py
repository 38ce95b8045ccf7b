"""`BilevelTrainer` on a model the user sharded with FSDP2's ``fully_shard``, across 2 (and 4, slow) CPU processes
(gloo): Accelerate's FSDP plugin ignores CPUs, so this is the layout that runs sharded training here.

Ground truth: the single-process trainer on the union of every process's batches (finite-difference products under
sharding against the single process's own: within finite-difference tolerance); every process holds identical
outer parameters; a run resumed from its checkpoint ends where the uninterrupted run ends; the writer's files hold
the gathered (unsharded) tensors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .sharded_trainer_worker import FIXED_STEP, OUTER_NAME, build
from .test_core_distributed import ROOT, _free_port

pytestmark = pytest.mark.distributed


def launch(tmp_path, outer: str, processes: int, name: str, resume: str | None = None,
           extra: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{name}.safetensors"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()),
           os.path.join(ROOT, "tests", "distributed", "sharded_trainer_worker.py"), "--outer", outer, "--out", str(out),
           "--output_dir", str(tmp_path / name if extra else tmp_path / "run"),
           *(["--resume", resume] if resume else []), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return load_file(str(out))


def single_process_hypergradient(tmp_path, outer: str, result: dict[str, torch.Tensor], processes: int,
                                 mode: str) -> torch.Tensor:
    """The hypergradient of what the processes train: the mean over processes of each one's batch objective
    (data weights are normalized per batch, so this is not the objective of the union of the batches), solved by
    the single-process trainer's own solver with ``mode``'s products."""
    from hypergrad.approx_hypergrad import implicit_hypergrad

    trainer = build(str(tmp_path / "single"), outer, shard=False)
    assert trainer.args.world_size == 1 and not trainer.is_sharded
    parts = {name: [{key.split(".", 1)[1]: value.chunk(processes)[rank] for key, value in result.items()
                     if key.startswith(f"{name}.")} for rank in range(processes)] for name in ("train", "eval")}
    _, sketch = trainer._generators(FIXED_STEP)
    phi = {k: v.detach() for k, v in trainer._outer_param_tree().items()}
    with trainer._second_order_context():
        hypergradient = implicit_hypergrad(
            lambda i, o: sum(trainer.inner_forward(i, o, batch) for batch in parts["train"]) / processes,
            lambda i, o: sum(trainer.outer_forward(i, o, batch) for batch in parts["eval"]) / processes,
            trainer._theta(), phi, trainer._solver(sketch), mode)
    return hypergradient[OUTER_NAME[outer]]


def check_run(tmp_path, outer: str, processes: int) -> dict[str, torch.Tensor]:
    result = launch(tmp_path, outer, processes, "sharded")
    exact = single_process_hypergradient(tmp_path, outer, result, processes, "rev_rev")
    assert exact.abs().max() > 0
    if outer == "loss_weights":
        # the stop-gradient's mixed product: the losses' directional derivatives by finite differences on the shards
        torch.testing.assert_close(result["hypergrad"], exact, rtol=1e-2, atol=1e-6)
    else:
        single = single_process_hypergradient(tmp_path, outer, result, processes, "finite_diff")
        if outer == "data_weights":  # only the batches' examples get a gradient, the same ones in both runs
            assert torch.equal(result["hypergrad"] != 0, single != 0) and int((single != 0).sum()) > 0
        # the same products (central differences), taken in place on the shards and reduced across processes
        torch.testing.assert_close(result["hypergrad"], single, rtol=1e-3, atol=1e-4 * float(single.abs().max()))
        # and what finite differences cost against exact products in float32 (three CG steps amplify it)
        assert float((single - exact).abs().max()) < 0.05 * float(exact.abs().max())
    for rank in range(1, processes):  # replicated outer parameters: identical on every process
        assert torch.equal(result["outer0"], result[f"outer{rank}"])
    assert int(result["outer_steps"]) == 2
    saved = load_file(str(tmp_path / "run" / "checkpoint-6" / "adapter_model.safetensors"))
    lora = {k[len("lora."):].replace(".default.", "."): v for k, v in result.items() if k.startswith("lora.")}
    assert lora and set(saved) == set(lora)  # the writer saved the gathered tensors, all of them
    for key, value in lora.items():
        assert torch.equal(saved[key], value), key
    return result


@pytest.mark.parametrize("outer", ["lora", "data_weights", "loss_weights"])
def test_sharded_trainer_equals_single_process_and_resumes(tmp_path, outer):
    result = check_run(tmp_path, outer, 2)
    resumed = launch(tmp_path, outer, 2, "resumed", resume=str(tmp_path / "run" / "checkpoint-4"))
    assert int(result["steps_run"]) == 6 and int(resumed["steps_run"]) == 2  # it went on from step 4
    assert int(resumed["outer_steps"]) == 2  # the checkpoint's outer step, then one more
    torch.testing.assert_close(resumed["outer0"], result["outer0"], rtol=1e-5, atol=1e-7)
    for key in (k for k in result if k.startswith("lora.")):
        torch.testing.assert_close(resumed[key], result[key], rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_defers_the_shards_reduction(tmp_path):
    """Two micro-batches of 4 per optimizer step train the same adapter as one batch of 8 (the same examples in the
    same order): the reduce-scatter waits for the last micro-batch."""
    whole = launch(tmp_path, "lora", 2, "whole", extra=("--batch_size", "8"))
    accumulated = launch(tmp_path, "lora", 2, "accumulated", extra=("--batch_size", "4", "--accumulation", "2"))
    assert int(whole["steps_run"]) == int(accumulated["steps_run"]) == 6
    lora = [k for k in whole if k.startswith("lora.")]
    assert lora
    for key in lora:
        torch.testing.assert_close(accumulated[key], whole[key], rtol=1e-4, atol=1e-6)
    # the outer steps see the float rounding of the adapter through finite-difference products
    torch.testing.assert_close(accumulated["outer0"], whole["outer0"], rtol=2e-3, atol=1e-6)


def test_load_best_model_at_end_loads_the_best_checkpoint_into_the_shards(tmp_path):
    result = launch(tmp_path, "lora", 2, "best", extra=("--best",))
    best = int(result["best_step"])
    saved = load_file(str(tmp_path / "best" / f"checkpoint-{best}" / "adapter_model.safetensors"))
    lora = {k[len("lora."):].replace(".default.", "."): v for k, v in result.items() if k.startswith("lora.")}
    assert lora and set(saved) == set(lora)
    for key, value in lora.items():  # the shards now hold the best checkpoint's adapter
        assert torch.equal(saved[key], value), key
    assert best < 6  # an earlier checkpoint than the last one (the worker ranks by the highest validation loss)
    last = load_file(str(tmp_path / "best" / "checkpoint-6" / "adapter_model.safetensors"))
    assert any(not torch.equal(last[k], saved[k]) for k in saved)


@pytest.mark.slow
def test_sharded_trainer_on_four_processes(tmp_path):
    check_run(tmp_path, "lora", 4)
