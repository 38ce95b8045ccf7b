"""A data-weighting experiment's own options, shared by the example jobs: what the outer problem learns, the rivals
to train beside it, and the frozen-trunk cache; :meth:`WeightingArguments.configure` turns them into the
`BilevelTrainingArguments` of the recipe (the outer module by kind and options, trusted outer rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .filters import SCORE_FILTERS
from .outer_modules import LossWeights
from .rivals import RIVALS
from .runs import InputError

__all__ = ["WEIGHTINGS", "WeightingArguments", "filter_fraction"]

# --weighting -> the outer module kind it builds (hf_integration.recipe.OUTER_MODULE_KINDS)
WEIGHTINGS = {"loss": "loss_weights", "per_example": "data_weights"}

TRAIN_ON_VALIDATION_HELP = (
    "Inner problem on training + validation examples (BilevelTrainingArguments' train_on_outer_data); the outer "
    "objective stays the validation loss. The validation rows are flagged trusted and are not weighted by their loss "
    "(--trusted_share sets how much they count), so the learned function only decides how much the training "
    "examples count next to them. The fair rival, uniform training on train + validation, learns from the validation "
    "examples too; this lets the bilevel model do the same. Default: on with --weighting loss (one shared parameter, "
    "which cannot memorize the validation set), refused with --weighting per_example (free weights of validation "
    "examples would fit the set they are scored on).")

TRUSTED_SHARE_HELP = (
    "--weighting loss with --train_on_validation: how much the trusted (validation) rows count in the inner loss "
    "(LossWeights' trusted_share): 'max_weight' = the weight 1/2 of a zero-loss example, normalized with the rest "
    "(down-weighting then also shifts the batch's mass onto the outer objective's own rows); 'uniform' = their "
    "uniform share of each batch, the weights only divide the rest among the training rows.")

LOSS_REFERENCE_HELP = (
    "--weighting loss: what each example's loss is measured against (LossWeights' reference_column), so that the "
    "weights tilt against l_i - reference_scale * ref_i with reference_scale learned too. 'none' = the loss alone; "
    "'holdout_probe' (classification) = the loss of the example's label under a linear probe of the initial "
    "encoder fitted on the validation rows (hf_integration.holdout_reference); 'prompt_free' (instruction data) = "
    "the response's loss without its prompt under the initial model (hf_integration.filters). Default: the job's "
    "own with --weighting loss (holdout_probe on classification data, none on instruction data), else none.")


@dataclass
class WeightingArguments:
    """What the outer problem learns, and what else the experiment trains."""

    weighting: str = field(
        default="loss",
        metadata={"help": "What the outer problem learns: 'loss' = a weighting function of each example's current "
                  "loss, w_i = sigmoid(-loss_scale * l_i), one number loss_scale > 0 shared by all examples "
                  "(hf_integration.LossWeights; cannot fit a small validation set example by example); "
                  "'per_example' = one free weight per example (hf_integration.DataWeights).",
                  "choices": tuple(WEIGHTINGS)},
    )
    run_baseline: bool = field(
        default=True,
        metadata={"help": "Also train the --baselines (same model initialisation, seed, data order, optimizer, "
                  "schedule and number of inner steps as the bilevel run)."},
    )
    baselines: list[str] = field(
        default_factory=lambda: ["uniform", "uniform_train_val", "loss_filter"],
        metadata={"help": "Which rivals to train: 'uniform' (plain mean loss), 'uniform_train_val' (plain mean "
                  "loss on training + validation data: the validation set is what the bilevel run learns from), "
                  "'loss_filter' (drop the highest-loss --loss_filter_fraction of the training set); on classification "
                  "data also 'reference_filter' (drop the labels a linear probe fitted on the validation rows finds "
                  "least likely, hf_integration.holdout_reference); on instruction data also 'length_filter' (drop "
                  "the shortest responses) and 'ifd_filter' (drop the highest instruction-following difficulty under "
                  "the initial model), dropping as many (hf_integration.filters).", "nargs": "+", "choices": RIVALS},
    )
    loss_filter_fraction: float | None = field(
        default=None,
        metadata={"help": "Fraction of the training set the loss filter drops (default: --noise_rate when the data "
                  "is corrupted on purpose, i.e. the filter is told the true noise rate; else 0.2)."},
    )
    train_on_validation: bool | None = field(default=None, metadata={"help": TRAIN_ON_VALIDATION_HELP})
    trusted_share: str = field(default="max_weight", metadata={"help": TRUSTED_SHARE_HELP,
                                                               "choices": LossWeights.TRUSTED_SHARES})
    cache_frozen_layers: bool = field(
        default=True,
        metadata={"help": "Run the frozen embeddings and layers below the lowest LoRA layer once per example before "
                  "training and train from their cached outputs (exact, minus the frozen layers' dropout; "
                  "hf_integration.frozen_trunk). Every model of the run, the rivals included, does so."},
    )

    loss_reference: str | None = field(default=None, metadata={"help": LOSS_REFERENCE_HELP})
    init_reference_scale: float = field(
        default=0.0, metadata={"help": "--loss_reference other than none: the initial reference_scale (any finite "
                                       "number; 0 starts from the loss alone)."})

    # the --weighting choices; one that is not a key of WEIGHTINGS is built by the script (e.g. per-source weights)
    weighting_choices: ClassVar[tuple[str, ...]] = tuple(WEIGHTINGS)
    # the rivals this job can train (the response filters need prompt/response rows)
    rival_choices: ClassVar[tuple[str, ...]] = tuple(r for r in RIVALS if r not in SCORE_FILTERS)
    # the --loss_reference choices this job computes, and its default with --weighting loss
    loss_reference_choices: ClassVar[tuple[str, ...]] = ("none",)
    default_loss_reference: ClassVar[str] = "none"

    def __post_init__(self) -> None:
        if self.weighting not in self.weighting_choices:
            raise InputError(f"--weighting must be one of {self.weighting_choices}, got {self.weighting!r}.")
        unknown = [b for b in self.baselines if b not in self.rival_choices]
        if unknown:
            raise InputError(f"--baselines: {unknown} cannot run here; choose from {list(self.rival_choices)}.")
        if self.loss_filter_fraction is not None and not 0.0 <= self.loss_filter_fraction < 1.0:
            raise InputError(f"--loss_filter_fraction must be in [0, 1), got {self.loss_filter_fraction}.")
        if self.loss_reference is None:
            self.loss_reference = self.default_loss_reference if self.weighting == "loss" else "none"
        if self.loss_reference not in self.loss_reference_choices:
            raise InputError(f"--loss_reference must be one of {list(self.loss_reference_choices)} here, got "
                             f"{self.loss_reference!r}.")
        if self.loss_reference != "none" and self.weighting != "loss":
            raise InputError(f"--loss_reference {self.loss_reference} needs --weighting loss, got --weighting "
                             f"{self.weighting}.")
        if not math.isfinite(self.init_reference_scale):
            raise InputError(f"--init_reference_scale must be a finite number, got {self.init_reference_scale}.")
        if self.train_on_validation is None:
            self.train_on_validation = self.weighting == "loss"
        if self.train_on_validation and self.weighting != "loss":
            raise InputError("--train_on_validation needs --weighting loss: per-example weights of validation "
                             "examples would let the outer problem fit the set they are scored on.")

    def configure(self, training_args: Any, **loss_options: Any) -> None:
        """Set ``training_args``' outer module (kind and options, ``loss_options`` added for loss weights; none for a
        weighting the script builds itself) and trusted outer rows from these arguments."""
        training_args.train_on_outer_data = bool(self.train_on_validation)
        if self.weighting not in WEIGHTINGS:
            training_args.outer_module = training_args.outer_module_options = None
            return
        training_args.outer_module = WEIGHTINGS[self.weighting]
        options = dict(training_args.outer_module_options or {})
        if self.weighting == "loss":
            options.update(loss_options)
            if self.train_on_validation:
                options["trusted_share"] = self.trusted_share
        training_args.outer_module_options = options or None


def filter_fraction(args: WeightingArguments, noise_rate: float) -> float:
    """The loss filter's dropped fraction: ``--loss_filter_fraction``, else the true noise rate of data corrupted on
    purpose, else 0.2."""
    if args.loss_filter_fraction is not None:
        return args.loss_filter_fraction
    return noise_rate if noise_rate > 0 else 0.2
