"""Training a model sharded with FSDP2's own ``fully_shard`` under `Trainer` (the layout Accelerate's FSDP plugin does
not see, e.g. on CPUs): :func:`shard_model` shards a model the way Accelerate's transformer-based wrapping does, and
:class:`ShardedModelTrainerMixin` gives any `Trainer` subclass what such a model needs.

`Trainer` has a route for a model that owns its sharding (``is_distributed_loading_by_transformers``: no DDP wrap,
replicated trainable tensors kept in step), but it saves each process's shards as if they were the model and refuses
to checkpoint the optimizer. The mixin takes that route and makes saves and checkpoints hold full tensors: the writer
process saves the same files as a single-process run (an adapter or model folder, ``optimizer.pt``), gathered with
``torch.distributed.checkpoint.state_dict`` (a collective: every process calls it, the writer gets the tensors on
CPU). `Trainer`'s own loading (a resume, ``load_best_model_at_end``) puts those full tensors back into every
process's shards."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

from hypergrad.distributed import is_distributed, is_fully_sharded
from hypergrad.outer_step import refuse_non_finite

__all__ = ["shard_model", "ShardedModelTrainerMixin"]


def shard_model(model: nn.Module) -> nn.Module:
    """Shard ``model`` across the processes with FSDP2: ``fully_shard`` on every block its base model names as
    not to be split (``_no_split_modules``: the transformer layers), then on the root. Needs a process group of
    several processes (``accelerate launch`` or ``torchrun``)."""
    from torch.distributed.fsdp import fully_shard

    if not is_distributed():
        raise ValueError("--fully_shard shards the model across processes: launch with `accelerate launch "
                         "--num_processes N` or `torchrun --nproc_per_node N` (N > 1).")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"--fully_shard: {type(base).__name__} names no blocks to shard (`_no_split_modules`).")
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _full_state_options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


class ShardedModelTrainerMixin:
    """For a `Trainer` subclass (listed before `Trainer`): a model the user sharded with ``fully_shard`` trains,
    saves, checkpoints and resumes like a single-process one (see the module docstring). Other models are left to
    `Trainer`."""

    _user_sharded = False  # the model was sharded by the user's own fully_shard (set in __init__)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._user_sharded = not self.is_fsdp_enabled and is_fully_sharded(self.model)
        if self._user_sharded:  # set after Trainer.__init__, whose check refuses to checkpoint such a model
            self.is_distributed_loading_by_transformers = True

    @contextlib.contextmanager
    def _defer_fsdp_gradient_reduction(self) -> Iterator[None]:
        """Gradient accumulation: the shards' reduce-scatter waits for the last micro-batch (`Trainer`'s own
        version reads a ``distributed_config`` that only models sharded at load time have)."""
        if not self._user_sharded:
            with super()._defer_fsdp_gradient_reduction():
                yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:
                unit.set_requires_gradient_sync(True, recurse=False)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self._user_sharded and state_dict is None:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            state_dict = get_model_state_dict(self.model, options=_full_state_options(cpu_offload=True))
            if not self.args.should_save:
                return None  # this process's part of the gather is done; the writer saves
            refuse_non_finite(f"save to {output_dir or self.args.output_dir!r}", state_dict)
        return super()._save(output_dir, state_dict)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._user_sharded:
            return super()._save_optimizer_and_scheduler(output_dir)
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(self.model, self.optimizer, options=_full_state_options(cpu_offload=True))
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, OPTIMIZER_NAME))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        return None

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self._user_sharded or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        state = torch.load(os.path.join(checkpoint, OPTIMIZER_NAME), map_location="cpu", weights_only=True)
        set_optimizer_state_dict(self.model, self.optimizer, state, options=_full_state_options())
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))
        return None
