"""The bilevel trainer's callbacks: the outer step after the scheduled inner steps, the guard that skips and
counts non-finite inner steps, and the merge of the outer steps' metrics into `Trainer`'s logs."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback
from transformers.utils import logging

from hypergrad.distributed import any_process
from hypergrad.outer_step import NonFiniteError, first_non_finite
from hypergrad.solver import is_outer_step

__all__ = ["NonFiniteGuard"]

logger = logging.get_logger(__name__)


class _OuterStepCallback(TrainerCallback):
    """Runs the outer update after each inner optimizer step that the schedule names (or leaves it to the next inner
    step, :mod:`~hf_integration.inner_batch_outer`).

    `on_step_end` comes after the inner optimizer step and before `Trainer` logs, evaluates
    and saves, so checkpoints hold the outer state of the same step."""

    def __init__(self, trainer: Any) -> None:  # a BilevelTrainer (its outer_update)
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        iteration = state.global_step - 1
        self.trainer._close_outer_window_at_the_end(state)
        if is_outer_step(iteration, args.unroll_steps, args.outer_patience_steps) and self.trainer._run_outer_step_now(
                state):
            self.trainer.outer_update()  # otherwise the next inner step takes it, on its own batch
        return control


class NonFiniteGuard(TrainerCallback):
    """Skips inner optimizer steps whose loss or gradients hold NaN/inf, and stops training when they persist.

    Before each optimizer step (after gradient clipping) the gradients of the trainable parameters, and the
    losses passed to :meth:`note_loss` since the previous step, are checked, with one verdict for all
    processes. A non-finite value clears every gradient, so the optimizer leaves the parameters and its state
    as they were (the learning-rate schedule still advances). Training stops with :class:`NonFiniteError`,
    naming the step and the cause, after ``max_consecutive`` skipped steps in a row, when a run ends without
    a single applied step, or when an optimizer step makes a parameter non-finite (nothing can be rolled back
    then). With a gradient scaler (fp16) gradients are left to the scaler, which skips overflowing steps itself.

    `BilevelTrainer` installs one; pass one in ``callbacks`` to guard a plain `Trainer` too.
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        self.max_consecutive = max_consecutive
        self.skipped = 0  # over the whole run, resumes included (BilevelTrainer checkpoints it)
        self.consecutive = 0
        self._this_call = [0, 0]  # steps applied and skipped by the current train() call
        self._loss_problem: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._this_call = [0, 0]
        self.consecutive = 0
        return control

    def note_loss(self, loss: Tensor) -> None:
        """Remember a non-finite training loss until the next optimizer step."""
        if self._loss_problem is None and not bool(torch.isfinite(loss.detach()).all()):
            self._loss_problem = f"non-finite training loss ({float(loss.detach().float().sum())})"

    @staticmethod
    def _trainable(model: nn.Module) -> list[tuple[str, Tensor]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        params = self._trainable(model)
        problem, self._loss_problem = self._loss_problem, None
        if problem is None and getattr(optimizer, "scaler", None) is None:
            bad = first_non_finite((n, p.grad) for n, p in params if p.grad is not None)
            problem = None if bad is None else f"non-finite gradient of {bad}"
        if not any_process(problem is not None, args.device):
            self._this_call[0] += 1
            self.consecutive = 0
            return control
        problem = problem or "non-finite loss or gradient on another process"
        for _, p in params:
            p.grad = None
        self.skipped += 1
        self._this_call[1] += 1
        self.consecutive += 1
        step = state.global_step + 1
        logger.warning("Inner step %d skipped: %s; the parameters were not updated (%d skipped so far).",
                       step, problem, self.skipped)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"training stopped at inner step {step}: {self.consecutive} steps in a row had NaN/inf values "
                f"(last: {problem}); they were not applied. Lower --learning_rate, set --max_grad_norm, or check "
                "the data.")
        return control

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        bad = first_non_finite(self._trainable(model))
        if any_process(bad is not None, args.device):
            raise NonFiniteError(
                f"training stopped at inner step {state.global_step + 1}: the optimizer step made "
                f"{bad or 'a parameter on another process'} non-finite (--learning_rate {args.learning_rate:g} "
                "too high?); nothing was saved from it.")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        applied, skipped = self._this_call
        if skipped and not applied:
            raise NonFiniteError(f"no inner step could be applied: all {skipped} had NaN/inf values; "
                                 "the model is untrained. Check the data and --learning_rate.")
        return control

_AVERAGED_OUTER_METRICS = ("outer/loss", "outer/inner_loss", "outer/hypergrad_norm", "outer/ihvp_time",
                           "outer/weight_spread")

def _merged_outer_metrics(steps: list[dict[str, float]]) -> dict[str, float]:
    """The metrics of the outer steps since the last training log, as one log entry: the mean over the steps of
    their losses, norms, times and weight spreads (finite values only), the last step's counters and statistics."""
    merged: dict[str, float] = {}
    for key in dict.fromkeys(k for step in steps for k in step):
        values = [step[key] for step in steps if key in step and math.isfinite(step[key])]
        if values:
            merged[key] = sum(values) / len(values) if key in _AVERAGED_OUTER_METRICS else values[-1]
    return merged
