"""Runs an example script unchanged under `accelerate launch` -- `examples/data_reweighting.py`, or the script
named by ``REWEIGHTING_SCRIPT`` (e.g. ``instruction_data_weights``), read from its file -- then gathers every process's learned outer
parameters (flattened) so that the test can check they agree; rank 0 writes them to ``REWEIGHTING_GATHER_OUT``."""

from __future__ import annotations

import os
import runpy
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.utils import parameters_to_vector

from hf_integration import BilevelTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

trainers: list[BilevelTrainer] = []
_train = BilevelTrainer.train


def _capture(self, *args, **kwargs):
    trainers.append(self)
    return _train(self, *args, **kwargs)


def main() -> None:
    out = os.environ["REWEIGHTING_GATHER_OUT"]
    BilevelTrainer.train = _capture
    name = os.environ.get("REWEIGHTING_SCRIPT", "data_reweighting")
    runpy.run_path(os.path.join(ROOT, "examples", f"{name}.py"))["main"](sys.argv[1:])
    (trainer,) = trainers
    outer_params = parameters_to_vector(trainer.outer_module.parameters()).detach().contiguous()
    gathered = [torch.zeros_like(outer_params) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, outer_params)
    if dist.get_rank() == 0:
        save_file({f"rank{i}": t for i, t in enumerate(gathered)} | {
            "outer_steps": torch.tensor([trainer.outer_step]), "world": torch.tensor([dist.get_world_size()])}, out)
    dist.barrier()


if __name__ == "__main__":
    main()
    # Leave without running interpreter/C++ teardown: gloo's threads can abort a process at exit
    # ("terminate called without an active exception") after all work is done and synchronised.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
