"""Resumable checkpoints: which ``checkpoint-<step>`` folders are complete.

A ``BilevelTrainer`` checkpoint holds ``Trainer``'s files plus the outer optimizer state and, with an outer
module, the outer parameters; a save killed midway leaves a folder that must not be resumed from.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

from transformers.utils import logging

from .serialization import OUTER_OPTIMIZER_NAME, OUTER_PARAMS_NAME, read_safetensors_metadata

logger = logging.get_logger(__name__)

__all__ = ["CheckpointError", "BILEVEL_CHECKPOINT_FILES", "ResumeFinishedRun", "checkpoint_problem", "last_checkpoint",
           "resolve_checkpoint"]

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR + "-<step>"


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from (incomplete, corrupt, or from other data); the message names the
    folder or file and the problem."""


BILEVEL_CHECKPOINT_FILES = (OUTER_OPTIMIZER_NAME, OUTER_PARAMS_NAME)


def checkpoint_problem(folder: str | os.PathLike, *, outer_files: Sequence[str] = BILEVEL_CHECKPOINT_FILES
                       ) -> str | None:
    """Why ``folder`` is not a complete checkpoint (one line), or ``None`` if it is.

    ``Trainer`` writes ``trainer_state.json`` last, so its presence (readable) marks a finished save; the
    model weights and ``outer_files`` must be there too: a ``BilevelTrainer`` checkpoint holds the outer
    optimizer state and, with an outer module, the outer parameters (pass ``()`` for a plain ``Trainer``).
    """
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.utils import (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME,
                                    SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME)

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return f"{folder!r} is not a folder"
    files = set(os.listdir(folder))
    if TRAINER_STATE_NAME not in files:
        return f"{folder!r} has no {TRAINER_STATE_NAME}: the checkpoint save did not finish"
    problem = _trainer_state_problem(folder, TRAINER_STATE_NAME)
    if problem is not None:
        return problem
    weights = {ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME,
               WEIGHTS_NAME, WEIGHTS_INDEX_NAME}
    if not files & weights and not any(f.startswith("pytorch_model_fsdp") for f in files):
        return f"{folder!r} holds no model weights (none of {sorted(weights)})"
    for name in sorted(files):
        if name.endswith(".safetensors"):
            try:
                read_safetensors_metadata(os.path.join(folder, name))
            except (OSError, ValueError) as err:
                return f"{folder!r}: {name} is corrupt ({err})"
    for name in outer_files:
        if name not in files:
            return (f"{folder!r} has no {name}: a BilevelTrainer checkpoint needs it to resume "
                    "(without it the outer problem would restart from scratch)")
    return _rng_state_problem(folder, files)


def _trainer_state_problem(folder: str, name: str) -> str | None:
    """Why ``trainer_state.json`` cannot describe this checkpoint: unreadable, not a JSON object, or a
    ``global_step`` that is not an integer >= 0 equal to the step in the folder's name (``checkpoint-<step>``)."""
    try:
        with open(os.path.join(folder, name), encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError, RecursionError) as err:
        return f"{folder!r}: {name} is unreadable ({type(err).__name__}: {str(err)[:200]})"
    if not isinstance(state, dict):
        return f"{folder!r}: {name} is not a JSON object; the file is corrupt"
    step = state.get("global_step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"{folder!r}: {name} holds global_step={step!r:.40}, not an integer >= 0; the file is corrupt"
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(folder)))
    if match is not None and int(match.group(1)) != step:
        return (f"{folder!r}: {name} holds global_step={step}, but the folder is the checkpoint of step "
                f"{match.group(1)}; the file is corrupt or belongs to another checkpoint")
    max_steps = state.get("max_steps")
    if isinstance(max_steps, int) and not isinstance(max_steps, bool) and 0 < max_steps < step:
        return f"{folder!r}: {name} holds global_step={step} beyond its max_steps={max_steps}; the file is corrupt"
    return None


def _rng_state_problem(folder: str, files: set[str]) -> str | None:
    """Why the random-number states cannot be restored: no ``rng_state*.pth`` file (``Trainer`` would go on with
    fresh random states, a run that differs from the one interrupted), or one that does not load."""
    import torch
    from transformers.trainer_pt_utils import safe_globals  # the numpy types Trainer's own loading allows

    found = sorted(f for f in files if f.startswith("rng_state") and f.endswith(".pth"))
    if not found:
        return (f"{folder!r} has no rng_state.pth: without the random-number states a resumed run would not "
                "continue the interrupted one")
    for name in found:
        try:
            with safe_globals():
                state = torch.load(os.path.join(folder, name), weights_only=True)
        except Exception as err:  # noqa: BLE001 - a truncated zip, a pickle torch refuses, ...
            return f"{folder!r}: {name} is corrupt ({type(err).__name__}: {str(err).strip().splitlines()[0][:200]})"
        if not isinstance(state, dict) or not {"python", "numpy", "cpu"} <= set(state):
            return f"{folder!r}: {name} does not hold the python/numpy/torch random states; the file is corrupt"
    return None


def last_checkpoint(folder: str | os.PathLike, *, outer_files: Sequence[str] = BILEVEL_CHECKPOINT_FILES
                    ) -> str | None:
    """The complete ``checkpoint-<step>`` folder of ``folder`` with the highest step (``None`` if there is none).

    Like ``transformers.trainer_utils.get_last_checkpoint``, but incomplete folders (a save killed midway,
    see :func:`checkpoint_problem`) are skipped with a warning instead of being returned.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return None
    steps = sorted(((int(m.group(1)), name) for name in os.listdir(folder) if (m := _CHECKPOINT_RE.match(name))),
                   reverse=True)
    for _, name in steps:
        path = os.path.join(folder, name)
        problem = checkpoint_problem(path, outer_files=outer_files)
        if problem is None:
            return path
        if os.path.isdir(path):
            logger.warning("Skipping incomplete checkpoint: %s", problem)
    return None


def resolve_checkpoint(value: str | os.PathLike | bool | None, output_dir: str, *,
                       outer_files: Sequence[str] = BILEVEL_CHECKPOINT_FILES) -> str | None:
    """The checkpoint a ``resume_from_checkpoint`` value names: ``True`` (or ``"true"``) the last complete one of
    ``output_dir``, a path that folder (which must be complete, :func:`checkpoint_problem`), ``None``/``False``/
    ``"false"``/``""`` none. Raises :class:`CheckpointError` (one line) otherwise."""
    if value is None or value is False or str(value).lower() in ("", "false"):
        return None
    if value is True or str(value).lower() == "true":
        found = last_checkpoint(output_dir, outer_files=outer_files)
        if found is None:
            raise CheckpointError(f"resume_from_checkpoint=True, but {output_dir!r} holds no complete "
                                  "checkpoint-<step> folder to resume from (save some with save_strategy='steps')")
        return found
    problem = checkpoint_problem(value, outer_files=outer_files)
    if problem is not None:
        raise CheckpointError(f"cannot resume: {problem}")
    return os.fspath(value)


class ResumeFinishedRun:
    """A `transformers.Trainer` mixin: resuming from a checkpoint of the run's last step trains nothing more.

    `Trainer` trains one step too many when ``max_steps`` ends inside an epoch and the checkpoint resumed from is
    that last step (it counts the finished epochs, re-enters the partial one, and checks ``max_steps`` only after
    a step): a script resumed after its last checkpoint, e.g. killed while evaluating or writing its outputs,
    would end one step past the run it continues. Here such a resume restores the checkpoint -- model, optimizer
    and scheduler, random states, and whatever a subclass's ``_load_optimizer_and_scheduler`` adds -- and returns
    without a training step; a checkpoint beyond ``max_steps`` is refused."""

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:  # the last complete checkpoint (interrupted saves skipped)
            resume_from_checkpoint = resolve_checkpoint(True, self.args.output_dir, outer_files=())
        if isinstance(resume_from_checkpoint, (str, os.PathLike)) and self.args.max_steps > 0:
            from transformers.trainer import TRAINER_STATE_NAME

            checkpoint = os.fspath(resume_from_checkpoint)
            problem = _trainer_state_problem(checkpoint, TRAINER_STATE_NAME)
            if problem is not None:
                raise CheckpointError(f"cannot resume: {problem}")
            with open(os.path.join(checkpoint, TRAINER_STATE_NAME), encoding="utf-8") as handle:
                step = json.load(handle)["global_step"]
            if step > self.args.max_steps:
                raise CheckpointError(f"cannot resume from {checkpoint!r}: it is the checkpoint of step {step}, beyond "
                                      f"max_steps={self.args.max_steps}; raise max_steps or resume from an earlier one")
            if step == self.args.max_steps:
                return self._restore_finished_run(checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _restore_finished_run(self, checkpoint: str):
        from transformers.trainer import TRAINER_STATE_NAME
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        self._load_from_checkpoint(checkpoint)
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        self.create_optimizer_and_scheduler(num_training_steps=self.args.max_steps)
        self._load_optimizer_and_scheduler(checkpoint)
        self._load_rng_state(checkpoint)
        losses = [entry["loss"] for entry in self.state.log_history if "loss" in entry]
        logger.info("Resumed from %s, the checkpoint of the run's last step (%d): nothing left to train.",
                    checkpoint, self.state.global_step)
        return TrainOutput(self.state.global_step, float(losses[-1]) if losses else 0.0, {})
