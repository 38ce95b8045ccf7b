"""Resumable checkpoints: which ``checkpoint-<step>`` folders are complete.

A ``BilevelTrainer`` checkpoint holds ``Trainer``'s files plus the outer optimizer state and, with an outer
module, the outer parameters; a save killed midway leaves a folder that must not be resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence

from .serialization import OUTER_OPTIMIZER_NAME, OUTER_PARAMS_NAME

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "BILEVEL_CHECKPOINT_FILES", "checkpoint_problem", "last_checkpoint"]

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
    try:
        with open(os.path.join(folder, TRAINER_STATE_NAME), encoding="utf-8") as handle:
            json.load(handle)
    except (OSError, ValueError) as err:
        return f"{folder!r}: {TRAINER_STATE_NAME} is unreadable ({type(err).__name__}: {err})"
    weights = {ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME,
               WEIGHTS_NAME, WEIGHTS_INDEX_NAME}
    if not files & weights and not any(f.startswith("pytorch_model_fsdp") for f in files):
        return f"{folder!r} holds no model weights (none of {sorted(weights)})"
    for name in outer_files:
        if name not in files:
            return (f"{folder!r} has no {name}: a BilevelTrainer checkpoint needs it to resume "
                    "(without it the outer problem would restart from scratch)")
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
