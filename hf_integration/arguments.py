"""`BilevelTrainingArguments`: `TrainingArguments` plus the outer problem's knobs."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from hypergrad.linear_solvers import NYSTROM_SKETCHES
from hypergrad.methods import METHODS, argument_default, methods_reading, options_from_arguments

from .recipe import OUTER_MODULE_KINDS, RECIPES, apply_recipe

__all__ = ["BilevelTrainingArguments", "IHVP_METHODS", "HVP_MODE_CHOICES", "OUTER_OPTIMIZERS"]

IHVP_METHODS = tuple(METHODS)
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

    recipe: str | None = field(
        default=None,
        metadata={"help": "A named preset of measured settings, filling the fields left at their defaults: "
                  "'data_weighting' (loss-based weights, the outer data also trained on as trusted rows, first-order "
                  "hypergradients every 10 steps after half an epoch), 'sft_data_weighting' (the same for SFT, as "
                  "the instruction job measured it) or 'lora_regularization' (one L2 strength per LoRA module, outer "
                  "steps every 2 inner steps after a third of the run); see hf_integration.recipe.RECIPES.",
                  "choices": tuple(RECIPES)},
    )
    outer_module: str | None = field(
        default=None,
        metadata={"help": "The outer module to build when the trainer gets none: " + ", ".join(OUTER_MODULE_KINDS)
                  + " (data_weights sized from the training set's example ids, added when missing; "
                  "lora_regularization from the model after PEFT wrapping).", "choices": OUTER_MODULE_KINDS},
    )
    outer_module_options: dict | str | None = field(
        default=None,
        metadata={"help": "Options of --outer_module, as a JSON object, e.g. '{\"init_loss_scale\": 1.0, "
                  "\"trusted_share\": \"uniform\"}' for loss_weights, '{\"granularity\": \"layer\"}' for "
                  "lora_regularization."},
    )
    train_on_outer_data: bool | None = field(
        default=None,
        metadata={"help": "Train on the outer data too: its rows join the training rows, flagged trusted (column "
                  "'trusted'), and the loss-based weighting leaves them out (loss_weights only: free weights of the "
                  "outer rows would fit the set they are scored on). The fair rival then trains on both sets too. "
                  "Default: the recipe's, else False."},
    )
    outer_patience_epochs: float | None = field(
        default=None,
        metadata={"help": "No outer step during the first this many epochs of the training rows (the trusted outer "
                  "rows of train_on_outer_data aside; sets outer_patience_steps when that is 0): the model first fits "
                  "the clean signal."},
    )
    outer_patience_ratio: float | None = field(
        default=None,
        metadata={"help": "No outer step during the first this fraction (in [0, 1)) of the run's inner steps (sets "
                  "outer_patience_steps when that and outer_patience_epochs leave it 0): for regularization strengths, "
                  "whose hypergradient pushes them down until the model can overfit. Default: the recipe's, if any."},
    )
    outer_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the outer optimizer (default: the recipe's, else 0.1)."})
    outer_optim: str = field(
        default="adam", metadata={"help": f"Outer optimizer, one of {OUTER_OPTIMIZERS}.", "choices": OUTER_OPTIMIZERS}
    )
    outer_momentum: float = field(default=0.9, metadata={"help": "Momentum of the outer SGD optimizer."})
    outer_weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the outer optimizer."})
    unroll_steps: int | None = field(
        default=None,
        metadata={"help": "Inner optimizer steps between two outer updates (default: the recipe's, else 10)."})
    outer_patience_steps: int = field(
        default=0, metadata={"help": "No outer update before this many inner steps (lets the inner model warm up)."}
    )
    ihvp_method: str | None = field(
        default=None,
        metadata={"help": "Inverse-Hessian-vector product method (default: the recipe's, else 'nystrom'): "
                  + "; ".join(f"'{m.name}': {m.summary}" for m in METHODS.values()) + ".",
                  "choices": IHVP_METHODS},
    )
    nystrom_rank: int = field(default=argument_default("nystrom_rank"), metadata={"help": "Rank (number of HVPs) of the Nyström approximation."})
    nystrom_rho: float = field(default=argument_default("nystrom_rho"), metadata={"help": "Damping rho > 0 of the Nyström inverse (H + rho I)^-1."})
    nystrom_sketch: str = field(
        default=argument_default("nystrom_sketch"),
        metadata={"help": f"Nyström test directions, one of {NYSTROM_SKETCHES}.", "choices": NYSTROM_SKETCHES},
    )
    nystrom_refresh_steps: int = field(
        default=argument_default("nystrom_refresh_steps"),
        metadata={"help": "Reuse one Nyström sketch for this many outer steps (1 = a fresh sketch every step). "
                  "Between refreshes an outer step needs no Hessian-vector product: one outer gradient and "
                  "one mixed product (accuracy of a reused sketch: docs/ihvp-methods.md). With ihvp_method='nystrom_pcg' the sketch is the "
                  "CG preconditioner, reused on the same schedule (a stale preconditioner slows CG but does "
                  "not bias it)."},
    )
    ihvp_iters: int = field(default=argument_default("ihvp_iters"), metadata={
        "help": "Iterations (HVPs) of the iterative methods: " + ", ".join(methods_reading("ihvp_iters")) + "."})
    ihvp_warm_start: bool = field(
        default=argument_default("ihvp_warm_start"),
        metadata={"help": "ihvp_method in " + str(methods_reading("ihvp_warm_start")) + ": start each solve from "
                  "the previous outer step's solution instead of 0 (its residual costs one of the ihvp_iters "
                  "products). Consecutive outer steps solve nearby systems, so the products go to the change. Saved "
                  "with checkpoints (under FSDP each process holds shards of it, so a resumed run starts its first "
                  "solve at 0). When it helps and when it does not: docs/ihvp-methods.md."})
    identity_scale: float = field(
        default=argument_default("identity_scale"),
        metadata={"help": "ihvp_method='identity': the scale s of the first-order approximation H^-1 ~ s I."})
    neumann_lr: float = field(default=argument_default("neumann_lr"),
                              metadata={"help": "Step size of the Neumann series (< 2 / lambda_max)."})
    hvp_mode: str = field(
        default="auto",
        metadata={
            "help": "How Hessian-vector products are computed: 'fwd_rev', 'rev_rev', 'finite_diff', or 'auto' "
            "(probe the model at the start of training and use the first exact mode, rev_rev then fwd_rev, that "
            "runs, agrees with an independent product and fits hvp_max_memory_ratio, else finite differences; "
            "deterministic, and a resumed run reuses the mode its checkpoint recorded).",
            "choices": HVP_MODE_CHOICES,
        },
    )
    hvp_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Vectorize at most this many Hessian-vector products at once (default: from "
                  "`hvp_memory_budget_mb`; one at a time for hvp_mode='rev_rev' without a budget)."},
    )
    hvp_max_memory_ratio: float | None = field(
        default=1.5,
        metadata={"help": "hvp_mode='auto' takes an exact mode only if its products need at most this multiple of "
                  "a training step's activation memory (estimated by the probe), else finite differences, which "
                  "need about one step's. None: no limit."},
    )
    hvp_memory_budget_mb: float | None = field(
        default=None,
        metadata={"help": "Memory (MiB) for Hessian-vector products in flight: with hvp_mode='rev_rev' and no "
                  "`hvp_chunk_size`, as many products are vectorized as fit, each estimated at the size of the "
                  "tensors its gradient graph saved. Default: one at a time (the lean choice; on CPU as fast)."},
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
    hypergrad_on_inner_batch: bool = field(
        default=False,
        metadata={"help": "Take each outer step inside the next inner steps, its mixed product from their own batches "
                  "and forward passes instead of a sampled batch of hypergrad_train_batch_size rows (one forward pass "
                  "fewer per outer step; hf_integration.inner_batch_outer). For example weights read from the losses "
                  "(loss_weights) with ihvp_method='identity', unsharded, without gradient checkpointing. Off by "
                  "default: rows from one side of the epoch change the loss scale's course; at the default "
                  "init_loss_scale it lost under pairwise label noise in 3 of 9 runs, at 0.5 it gained accuracy but "
                  "lost test loss (docs/data-reweighting.md)."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.outer_module_options, str) and self.outer_module_options.lstrip().startswith("{"):
            try:  # a JSON object from the command line or a YAML file
                self.outer_module_options = json.loads(self.outer_module_options)
            except ValueError as err:
                raise ValueError(f"`outer_module_options` is not valid JSON ({err}): "
                                 f"{self.outer_module_options!r:.80}.") from None
        apply_recipe(self)  # first: the preset's values are checked like the user's
        # Every float finite; what must be positive, positive; a run that trains at all (checked first, so a bad
        # value gets this message rather than a failure wherever it is first used).
        for f in dataclasses.fields(self):
            value = getattr(self, f.name, None)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"`{f.name}` must be a finite number, got {value!r}.")
        bounds = {"learning_rate": (0, False), "adam_epsilon": (0, False), "weight_decay": (0, True),
                  "outer_weight_decay": (0, True), "max_grad_norm": (0, True)}
        for name, (low, inclusive) in bounds.items():
            value = getattr(self, name)
            if not (value >= low if inclusive else value > low):
                raise ValueError(f"`{name}` must be {'>=' if inclusive else '>'} {low}, got {value!r}.")
        for name in ("adam_beta1", "adam_beta2", "outer_momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be in [0, 1), got {getattr(self, name)!r}.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name in ("seed", "data_seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32):
                raise ValueError(f"`{name}` must be an integer in [0, 2**32 - 1] (numpy and torch seeds), got {value!r}.")
        if self.max_steps == 0 or (self.max_steps < 0 and not self.num_train_epochs > 0):
            raise ValueError(f"no training step would run (max_steps={self.max_steps}, num_train_epochs="
                             f"{self.num_train_epochs}): pass `max_steps` > 0, or `max_steps` -1 and "
                             "`num_train_epochs` > 0.")
        super().__post_init__()
        positive_ints = {"unroll_steps": self.unroll_steps}
        for name, value in positive_ints.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name in ("outer_batch_size", "hypergrad_train_batch_size", "hvp_chunk_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
        if not isinstance(self.outer_patience_steps, int) or self.outer_patience_steps < 0:
            raise ValueError(f"`outer_patience_steps` must be an integer >= 0, got {self.outer_patience_steps!r}.")
        for name in ("hvp_memory_budget_mb", "hvp_max_memory_ratio"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a finite number > 0 or None, got {value!r}.")
        for name in ("outer_learning_rate",):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)!r}.")
        choices = {"ihvp_method": tuple(METHODS), "hvp_mode": HVP_MODE_CHOICES, "outer_optim": OUTER_OPTIMIZERS,
                   "nystrom_sketch": NYSTROM_SKETCHES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}.")
        # the chosen method's own options (rank, rho, iterations, ...), validated by the method table
        options_from_arguments(self.ihvp_method, self)
        if self.outer_patience_epochs is not None and not self.outer_patience_epochs >= 0:
            raise ValueError(f"`outer_patience_epochs` must be >= 0 or None, got {self.outer_patience_epochs!r}.")
        if self.outer_patience_ratio is not None and not 0 <= self.outer_patience_ratio < 1:
            raise ValueError(f"`outer_patience_ratio` must be in [0, 1) or None (a fraction of the inner steps), got "
                             f"{self.outer_patience_ratio!r}.")
        if isinstance(self.outer_module_options, str):  # a path or a JSON object that is not one
            raise ValueError(f"`outer_module_options` must be a JSON object such as '{{\"trusted_share\": "
                             f"\"uniform\"}}', got {self.outer_module_options!r:.80}.")
        if self.outer_module_options is not None and self.outer_module is None:
            raise ValueError("`outer_module_options` needs `outer_module` (the kind they are options of).")
        if self.outer_module is not None and self.outer_module not in OUTER_MODULE_KINDS:
            raise ValueError(f"`outer_module` must be one of {OUTER_MODULE_KINDS}, got {self.outer_module!r}.")
        if self.ihvp_warm_start is True and self.ihvp_method not in methods_reading("ihvp_warm_start"):
            raise ValueError(f"`ihvp_warm_start` only applies to iterative solves: use ihvp_method in "
                             f"{methods_reading('ihvp_warm_start')}, or leave it off (ihvp_method={self.ihvp_method!r}).")
