"""`BilevelTrainingArguments`: `TrainingArguments` plus the outer problem's knobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from hypergrad.approx_hypergrad import DEFAULT_NYSTROM_SKETCH
from hypergrad.linear_solvers import NYSTROM_SKETCHES

__all__ = ["BilevelTrainingArguments", "IHVP_METHODS", "HVP_MODE_CHOICES", "OUTER_OPTIMIZERS"]

IHVP_METHODS = ("nystrom", "cg", "neumann", "exact")
HVP_MODE_CHOICES = ("auto", "fwd_rev", "rev_rev", "finite_diff")
OUTER_OPTIMIZERS = ("adam", "sgd")


@dataclass
class BilevelTrainingArguments(TrainingArguments):
    """Arguments of :class:`~hf_integration.BilevelTrainer`.

    The inherited fields configure the inner problem (fine-tuning the model) exactly as for
    `transformers.Trainer`; the fields below configure the outer problem (learning the outer
    parameters by implicit differentiation). Every field has a `help` so `HfArgumentParser`
    prints a real `--help`.
    """

    outer_learning_rate: float = field(default=0.1, metadata={"help": "Learning rate of the outer optimizer."})
    outer_optim: str = field(
        default="adam", metadata={"help": f"Outer optimizer, one of {OUTER_OPTIMIZERS}.", "choices": OUTER_OPTIMIZERS}
    )
    outer_momentum: float = field(default=0.9, metadata={"help": "Momentum of the outer SGD optimizer."})
    outer_weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the outer optimizer."})
    unroll_steps: int = field(
        default=10, metadata={"help": "Inner optimizer steps between two outer updates."}
    )
    outer_patience_steps: int = field(
        default=0, metadata={"help": "No outer update before this many inner steps (lets the inner model warm up)."}
    )
    ihvp_method: str = field(
        default="nystrom",
        metadata={"help": f"Inverse-Hessian-vector product method, one of {IHVP_METHODS}.", "choices": IHVP_METHODS},
    )
    nystrom_rank: int = field(default=5, metadata={"help": "Rank (number of HVPs) of the Nyström approximation."})
    nystrom_rho: float = field(default=0.1, metadata={"help": "Damping rho > 0 of the Nyström inverse (H + rho I)^-1."})
    nystrom_sketch: str = field(
        default=DEFAULT_NYSTROM_SKETCH,
        metadata={"help": f"Nyström test directions, one of {NYSTROM_SKETCHES}.", "choices": NYSTROM_SKETCHES},
    )
    ihvp_iters: int = field(default=10, metadata={"help": "Iterations (HVPs) of the CG and Neumann methods."})
    neumann_lr: float = field(default=0.01, metadata={"help": "Step size of the Neumann series (< 2 / lambda_max)."})
    hvp_mode: str = field(
        default="auto",
        metadata={
            "help": "How Hessian-vector products are computed: 'fwd_rev', 'rev_rev', 'finite_diff', or 'auto' "
            "(probe the model at the start of training and use the first exact mode that runs and agrees "
            "with finite differences, else finite differences).",
            "choices": HVP_MODE_CHOICES,
        },
    )
    hvp_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Vectorize at most this many Hessian-vector products at once (default: all `nystrom_rank`); "
                  "lower it to cut the hypergradient's peak memory."},
    )
    outer_batch_size: int | None = field(
        default=None,
        metadata={"help": "Validation batch size of the outer objective (default: per_device_eval_batch_size)."},
    )
    hypergrad_train_batch_size: int | None = field(
        default=None,
        metadata={"help": "Training batch size of the inner objective inside the hypergradient "
                  "(default: per_device_train_batch_size)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_ints = {"unroll_steps": self.unroll_steps, "nystrom_rank": self.nystrom_rank,
                         "ihvp_iters": self.ihvp_iters}
        for name, value in positive_ints.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name in ("outer_batch_size", "hypergrad_train_batch_size", "hvp_chunk_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
        if not isinstance(self.outer_patience_steps, int) or self.outer_patience_steps < 0:
            raise ValueError(f"`outer_patience_steps` must be an integer >= 0, got {self.outer_patience_steps!r}.")
        for name in ("outer_learning_rate", "nystrom_rho", "neumann_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)!r}.")
        choices = {"ihvp_method": IHVP_METHODS, "hvp_mode": HVP_MODE_CHOICES, "outer_optim": OUTER_OPTIMIZERS,
                   "nystrom_sketch": NYSTROM_SKETCHES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}.")
