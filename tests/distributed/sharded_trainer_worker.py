"""Worker run by `torchrun --nproc_per_node N` in tests/distributed/test_sharded_trainer.py.

Each process builds the same tiny Llama classifier with LoRA, shards it with FSDP2's own ``fully_shard`` (every
decoder layer, then the root: the layout a user writes, which Accelerate's FSDP plugin does not see on CPU) and runs
`BilevelTrainer` with LoRA-regularization strengths (``--outer lora``), per-example weights (``--outer
data_weights``) or loss-based weights (``--outer loss_weights``, a stop-gradient) as outer parameters. Rank 0 saves
(a) the hypergradient at the initial weights for fixed per-process batches and the batches of every process, (b) the
outer parameters after training gathered from every process, and (c) the trained LoRA tensors gathered from the
shards.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import TrainerCallback

from hf_integration import BilevelTrainer, DataWeights, LoraRegularization, LossWeights

_UTILS = runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf",
                                     "trainer_utils.py"))
bilevel_args, datasets_with_ids, tiny_classifier = (_UTILS[name] for name in ("bilevel_args", "datasets_with_ids",
                                                                              "tiny_classifier"))

FIXED_STEP = 3
OUTER_NAME = {"lora": "outer_module.log_strength", "data_weights": "outer_module.logits",
              "loss_weights": "outer_module.loss_scale_raw"}


def build(output_dir: str, outer: str, shard: bool, batch_size: int = 8, accumulation: int = 1, best: bool = False):
    """The trainer of this test (sharded with ``shard``; the single-process reference without)."""
    train, val = datasets_with_ids(64, 32, noise=0.2)
    model = tiny_classifier(train_head=False)
    if shard:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    module = {"lora": lambda: LoraRegularization.from_peft_model(model),
              "data_weights": lambda: DataWeights(len(train)), "loss_weights": LossWeights}[outer]()
    # LossWeights holds a stop-gradient: no Hessian-vector product respects it on shards, so the first-order method
    method = {"ihvp_method": "identity"} if outer == "loss_weights" else {"ihvp_method": "cg", "ihvp_iters": 3}
    args = bilevel_args(output_dir, max_steps=6, unroll_steps=2, per_device_train_batch_size=batch_size,
                        gradient_accumulation_steps=accumulation, hypergrad_train_batch_size=8, outer_batch_size=8,
                        save_strategy="steps", save_steps=2 if best else 4, outer_learning_rate=0.5, **method,
                        **({"eval_strategy": "steps", "eval_steps": 2, "load_best_model_at_end": True,
                            # "best" = the highest validation loss: an early checkpoint, not the last one
                            "metric_for_best_model": "loss", "greater_is_better": True} if best else {}))
    return BilevelTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, outer_module=module)


def gathered(tensor: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return parts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--outer", choices=sorted(OUTER_NAME), required=True)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--best", action="store_true", help="load_best_model_at_end (evaluation every 2 steps)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    trainer = build(args.output_dir, args.outer, shard=True, batch_size=args.batch_size,
                    accumulation=args.accumulation, best=args.best)
    assert trainer.is_sharded and not trainer.is_fsdp_enabled and trainer.args.world_size == dist.get_world_size()
    results = {}
    if args.resume is None:
        train_batch, eval_batch, generator = trainer._batches(FIXED_STEP)
        results["hypergrad"] = trainer.compute_hypergradient(train_batch, eval_batch, generator)[OUTER_NAME[args.outer]]
        for name, batch in (("train", train_batch), ("eval", eval_batch)):
            for key in ("input_ids", "attention_mask", "labels", "example_id"):
                if key in batch:
                    results[f"{name}.{key}"] = torch.cat(gathered(batch[key]))
    steps_run = []
    trainer.add_callback(type("CountSteps", (TrainerCallback,), {
        "on_step_end": lambda self, *a, **k: steps_run.append(1)})())
    trainer.train(resume_from_checkpoint=args.resume)
    results["steps_run"] = torch.tensor([len(steps_run)])  # inner steps taken by this launch
    outer = dict(trainer.outer_module.named_parameters())[OUTER_NAME[args.outer].split(".", 1)[1]]
    for rank, part in enumerate(gathered(outer)):
        results[f"outer{rank}"] = part
    results["outer_steps"] = torch.tensor([trainer.outer_step])
    if args.best:
        results["best_step"] = torch.tensor([int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])])
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            results[f"lora.{name}"] = param.full_tensor().detach() if hasattr(param, "full_tensor") else param.detach()
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in results.items()}, args.out)
    dist.barrier()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads can abort a process at interpreter teardown after all work is done
