"""`BilevelTrainer` under Accelerate's FSDP2 against the unsharded trainer (GPU).

Trains a tiny LoRA Llama with `DataWeights` for a few steps with `fsdp="full_shard"`
(Accelerate wraps the model with FSDP2; outer updates then use in-place finite-difference
HVPs on the shards), takes one hypergradient with the sharded trainer at the last step, and
compares it with exact (torch.func) products on an unsharded copy of the same weights, with
the same batches and the same Nyström sketch. Accelerate ignores FSDP on CPU, so run it on a GPU:

    torchrun --nproc_per_node 1 benchmarks/fsdp_check.py        # or --nproc_per_node N
"""

from __future__ import annotations

import os
import runpy
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import TrainerCallback

from hf_integration import BilevelTrainer, DataWeights
from hypergrad.approx_hypergrad import implicit_hypergrad

# the tests' tiny model and task, read from their file (the tests are not an installed package)
_UTILS = runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "hf",
                                     "trainer_utils.py"))
bilevel_args, datasets_with_ids, tiny_classifier = (_UTILS[name] for name in ("bilevel_args", "datasets_with_ids",
                                                                              "tiny_classifier"))


def main() -> int:
    train, val = datasets_with_ids(64, 32)
    common = dict(max_steps=4, unroll_steps=1, use_cpu=not torch.cuda.is_available(), nystrom_rank=4,
                  hypergrad_train_batch_size=32, outer_batch_size=16, outer_learning_rate=0.3)
    with tempfile.TemporaryDirectory() as tmp:
        weights = DataWeights(len(train))
        sharded = BilevelTrainer(model=tiny_classifier(hidden=64), outer_module=weights, train_dataset=train,
                                 eval_dataset=val, args=bilevel_args(os.path.join(tmp, "fsdp"), fsdp="full_shard",
                                                                     fsdp_config={"version": 2}, **common))
        captured = {}

        class Capture(TrainerCallback):
            """Take the sharded hypergradient inside training, while Accelerate holds the
            FSDP2 model as it trains it (after `train()` returns it is finalised)."""

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == state.max_steps:
                    captured["batches"] = sharded._batches(step=7)
                    captured["got"] = sharded.compute_hypergradient(*captured["batches"])["outer_module.logits"].cpu()
                    model = sharded.accelerator.unwrap_model(sharded.model_wrapped)
                    captured["full"] = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
                                        for n, p in model.named_parameters()}
                    captured["weights"] = {k: v.detach().cpu().clone() for k, v in weights.state_dict().items()}

        sharded.add_callback(Capture())
        sharded.train()
        print(f"fsdp enabled: {sharded.is_fsdp_enabled}, hvp_mode: {sharded.hvp_mode}, "
              f"outer steps: {sharded.outer_step}, model: {type(sharded.model_wrapped).__name__}")
        batches, got, full = captured["batches"], captured["got"], captured["full"]

        # Reference: the same weights unsharded, products by torch.func (exact), same batches,
        # same sketch. (A second Trainer would share Accelerate's FSDP state, so call the core.)
        reference_model = tiny_classifier(hidden=64).to(sharded.args.device).eval()
        loaded = reference_model.load_state_dict(full, strict=False)
        assert not loaded.unexpected_keys, loaded.unexpected_keys[:3]
        theta = {n: p.detach() for n, p in reference_model.named_parameters() if p.requires_grad}
        phi = {"outer_module.logits": captured["weights"]["logits"].to(sharded.args.device)}
        train_batch, eval_batch, _ = batches
        _, sketch = sharded._generators(7)
        with sdpa_kernel(SDPBackend.MATH):
            want = implicit_hypergrad(
                lambda i, o: sharded._objective(reference_model, i, o, train_batch, weighted=True)[0],
                lambda i, o: sharded._objective(reference_model, i, o, eval_batch, weighted=False)[0],
                theta, phi, sharded._solver(sketch), "fwd_rev")["outer_module.logits"]
        rel = float((got.cpu() - want.cpu()).norm() / want.norm())
        cosine = float(torch.nn.functional.cosine_similarity(got.cpu(), want.cpu(), dim=0))
        print(f"sharded finite-difference vs unsharded exact hypergradient: relative difference {rel:.2e}, "
              f"cosine {cosine:.6f}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if sharded.is_fsdp_enabled and rel < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
