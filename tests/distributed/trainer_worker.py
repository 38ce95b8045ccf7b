"""Worker run by `torchrun --nproc_per_node 2` in tests/distributed/test_trainer_distributed.py.

Each process runs `BilevelTrainer` (DDP on gloo through Accelerate) with LoRA-regularization
strengths as outer parameters. Rank 0 saves (a) the hypergradient at the initial weights for
fixed per-process batches (and the batches of both processes), (b) the outer parameters after a few steps gathered from every
process, (c) which files the run wrote.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from hf_integration import BilevelTrainer, LoraRegularization, LossWeights

# the tests' tiny model and task, read from their file (this worker runs as a script of its own)
_UTILS = runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf",
                                     "trainer_utils.py"))
bilevel_args, datasets_with_ids, tiny_classifier = (_UTILS[name] for name in ("bilevel_args", "datasets_with_ids",
                                                                              "tiny_classifier"))

FIXED_STEP = 3


def build(output_dir):
    train, val = datasets_with_ids(64, 32, noise=0.2)
    model = tiny_classifier()
    reg = LoraRegularization.from_peft_model(model)
    args = bilevel_args(output_dir, max_steps=6, unroll_steps=2, per_device_train_batch_size=8,
                        hypergrad_train_batch_size=16, outer_batch_size=8, save_strategy="steps", save_steps=6,
                        hvp_mode="fwd_rev", outer_learning_rate=0.5)
    return BilevelTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, outer_module=reg), reg


def build_inner_batch(output_dir):
    """Loss-based weights whose outer steps run inside the next inner step, on its batch (a float64 model: the
    processes' products and the single-process reference agree to rounding)."""
    train, val = datasets_with_ids(64, 32, noise=0.2)
    args = bilevel_args(output_dir, max_steps=6, unroll_steps=2, per_device_train_batch_size=8, outer_batch_size=8,
                        save_strategy="no", ihvp_method="identity", hvp_mode="rev_rev", hypergrad_on_inner_batch=True)
    return BilevelTrainer(model=tiny_classifier(dtype=torch.float64), args=args, train_dataset=train, eval_dataset=val,
                          outer_module=LossWeights(init_loss_scale=0.8).double())


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.stack(parts)


def main_inner_batch(out: str, output_dir: str) -> None:
    """Rank 0 saves the first in-step hypergradient, every process's inner batch and validation batch of that step,
    and the outer parameters and adapter every process ends with."""
    trainer = build_inner_batch(output_dir)
    assert trainer.takes_outer_steps_on_inner_batches and trainer.args.world_size == 2
    saved = {}
    apply, objective = trainer._apply_hypergradient, trainer._inner_objective_with_outer_step

    def first_step(model, inputs):
        if not saved:
            _, eval_batch, _ = trainer._batches(trainer.state.global_step, with_training=False)
            for name, batch in (("train", inputs), ("eval", eval_batch)):
                saved.update({f"{name}.{k}": gathered(batch[k]) for k in ("input_ids", "attention_mask", "labels")})
            saved["theta"] = torch.cat([v.detach().reshape(-1) for v in trainer._inner_param_tree().values()])
        return objective(model, inputs)

    def capture(step, grads, batch, outer_loss, ihvp_time):
        saved.setdefault("hypergrad", grads["outer_module.loss_scale_raw"].clone())
        return apply(step, grads, batch, outer_loss, ihvp_time)

    trainer._inner_objective_with_outer_step, trainer._apply_hypergradient = first_step, capture
    trainer.train()
    outer = gathered(torch.cat([v.reshape(-1) for v in trainer._outer_param_tree().values()]))
    adapter = gathered(torch.cat([v.reshape(-1) for v in trainer._inner_param_tree().values()]))
    if dist.get_rank() == 0:
        save_file({**saved, "outer": outer, "adapter": adapter, "outer_steps": torch.tensor([trainer.outer_step])},
                  out)
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--inner_batch", action="store_true")
    args = parser.parse_args()
    if args.inner_batch:
        return main_inner_batch(args.out, args.output_dir)
    trainer, reg = build(args.output_dir)
    assert dist.is_initialized() and dist.get_world_size() == 2 and trainer.args.world_size == 2
    rank = dist.get_rank()
    train_batch, eval_batch, generator = trainer._batches(FIXED_STEP)
    hypergrad = trainer.compute_hypergradient(train_batch, eval_batch, generator)["outer_module.log_strength"]
    batches = {}
    for name, batch in (("train", train_batch), ("eval", eval_batch)):
        for key in ("input_ids", "attention_mask", "labels"):
            parts = [torch.zeros_like(batch[key]) for _ in range(2)]
            dist.all_gather(parts, batch[key].contiguous())
            batches[f"{name}.{key}"] = torch.cat(parts)
    trainer.train()
    strengths = [torch.zeros_like(reg.log_strength) for _ in range(2)]
    dist.all_gather(strengths, reg.log_strength.detach().contiguous())
    if rank == 0:
        save_file({
            "hypergrad": hypergrad, **batches,
            "log_strength0": strengths[0], "log_strength1": strengths[1],
            "outer_steps": torch.tensor([trainer.outer_step]),
        }, args.out)
    dist.barrier()


if __name__ == "__main__":
    main()
    # Leave without running interpreter/C++ teardown: gloo's threads can abort a process at exit
    # ("terminate called without an active exception") after all work is done and synchronised.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
