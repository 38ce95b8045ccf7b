"""Runs `examples/data_reweighting.py` unchanged under `accelerate launch`, then checks that
every process holds the same learned weights (rank 0 writes the gathered weights)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]

import data_reweighting  # noqa: E402

from hf_integration import BilevelTrainer  # noqa: E402

trainers: list[BilevelTrainer] = []
_train = BilevelTrainer.train


def _capture(self, *args, **kwargs):
    trainers.append(self)
    return _train(self, *args, **kwargs)


def main() -> None:
    out = os.environ["REWEIGHTING_GATHER_OUT"]
    BilevelTrainer.train = _capture
    data_reweighting.main(sys.argv[1:])
    (trainer,) = trainers
    logits = trainer.outer_module.logits.detach().contiguous()
    gathered = [torch.zeros_like(logits) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, logits)
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
