"""Learn data weights for a text classifier with label noise, by hypergradients, and compare them with the
cheap rivals.

The inner problem fine-tunes a pretrained encoder (LoRA adapter + classification head) on the *weighted*
training loss ``sum_i w_i l_i / sum_i w_i``; the outer problem tunes the weights so that the fine-tuned model
does well on a clean validation set (`hf_integration.BilevelTrainer`). Two kinds of weights
(``--weighting``):

* ``loss`` (default, `hf_integration.LossWeights`): ``w_i = sigmoid(-loss_scale * l_i)`` of each example's
  current loss, one outer parameter ``loss_scale > 0`` shared by all examples (Meta-Weight-Net's idea). Every
  outer step moves every weight, and 150 validation examples cannot be fit example by example;
* ``per_example`` (`hf_integration.DataWeights`): one free weight per example, ``sigmoid(s_i)``.

Default run (no download, CPU, under a minute): the embedded MiniLM-L6 encoder + LoRA on its last layer, on a
generated sentiment-like dataset (``examples/synthetic_sentiment.py``) with 30% of the training labels
flipped, a clean validation split (the outer objective) and a clean test split (evaluated once at the end);
8 epochs, outer steps every 10 inner steps after half an epoch, first-order hypergradients (measured with an
earlier two-parameter form of the weighting, they gave the same accuracy as Nyström for less time; see README)::

    python examples/data_reweighting.py                          # = make demo
    python examples/data_reweighting.py --train_file train.jsonl --validation_file val.jsonl \\
        --test_file test.jsonl --noise_rate 0.4 --noise_type symmetric

The frozen embeddings and layers below the first LoRA layer run once per example before training
(``--cache_frozen_layers``, exact; `frozen_features.py`), for every model of the run.

Rivals, with the same model initialisation, seed, data order, optimizer, schedule and number of inner steps
(``--baselines``, `reweighting_baselines.py`): uniform weights; uniform on train + validation (the bilevel
run learns from the validation set, so this is the fair rival); the loss filter (drop the highest-loss
fraction, the true noise rate by default, after ``--loss_filter_epochs``). The test split is the unbiased
comparison.

Outputs in ``--output_dir``:

* the LoRA adapter and ``outer_params.safetensors`` (``trainer.save_model``), loadable with
  ``LossWeights.from_pretrained(output_dir)`` (``DataWeights`` with ``--weighting per_example``);
* ``train_with_weights/``: the training set (``text``, ``labels``, ``corrupted``, ``example_id``) with a
  ``weight`` column (for ``loss`` weighting, the learned function at each example's loss under the trained
  model) (``datasets.load_from_disk``);
* ``metrics.json``: AUC of "low weight" as a detector of the ``corrupted`` flags (when known), the loss
  filter's AUC, validation and test accuracy/loss of every model, wall times;
* ``weights.png``: the weight distributions of clean and corrupted examples.

``--push_to_hub --hub_model_id user/repo`` uploads the learned outer parameters with a model card (not the
adapter); load them back with ``OuterModule.from_pretrained("user/repo")``.

Runs are guarded (``text_classification.start_run``): an ``--output_dir`` holding another run is refused unless
``--overwrite_output_dir``, and is locked while a run uses it; ``--resume_from_checkpoint True`` (or a
``checkpoint-<step>`` path) continues an interrupted run saved with ``--save_strategy steps``; with
``--push_to_hub`` the Hub is checked before any work. A NaN/inf training batch is skipped (persistent ones stop
the run), an outer step that would make anything non-finite is rolled back, and a run that could not train
exits with one ``error:`` line and status 1, writing nothing; the summary counts applied and skipped steps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling helper modules

from hf_integration.hub import atomic_write, atomic_write_dir  # noqa: E402
from frozen_features import CachedTrunkBilevelTrainer, CachedTrunkClassifier, add_feature_rows  # noqa: E402
from reweighting_baselines import BASELINES, inner_training_set, per_example_losses, train_baseline  # noqa: E402
from text_classification import (  # noqa: E402
    TRAIN_ON_VALIDATION_HELP,
    TRUSTED_SHARE_HELP,
    TRUSTED_SHARES,
    check_experiment_arguments,
    loss_weights,
    InputError,
    OutputWriter,
    DataArguments,
    ModelArguments,
    RunArguments,
    accuracy_metrics,
    build_lora_model,
    check_batch_sizes,
    check_cache_options,
    check_sequence_length,
    configuring,
    check_outer_steps,
    describe_steps,
    evaluate_splits,
    flip_labels,
    format_table,
    load_splits,
    load_tokenizer,
    parse_arguments,
    resolve_noise_rate,
    push_outputs,
    resume_point,
    run_main,
    scheduled_outer_steps,
    start_run,
    steps_per_epoch,
    total_inner_steps,
    tokenize_splits,
    write_json,
)

logger = logging.getLogger("data_reweighting")

BASELINE_DESCRIPTIONS = {
    "uniform": "plain mean cross-entropy on the training set, no use of the validation set",
    "uniform_train_val": "plain mean cross-entropy on training + validation examples",
    "loss_filter": "uniform for --loss_filter_epochs, then the highest-loss --loss_filter_fraction of the "
                   "training set (under the model of that step) is dropped",
}
WEIGHTINGS = ("loss", "per_example")
# std/mean of the learned weights below which they are reported as carrying no signal
NO_SIGNAL_SPREAD = 0.05

# Defaults of the demo (tuned so that `make demo` finishes in a few minutes on a 2-core CPU, see README).
# They override `BilevelTrainingArguments`' own defaults; any of them can be given on the command line.
# --noise_rate on the embedded generated data (the demo's controlled experiment); the user's own data is never
# corrupted unless --noise_rate says so.
EMBEDDED_NOISE_RATE = 0.3
DEMO_DEFAULTS: dict[str, Any] = {
    "outer_patience_epochs": 0.5,
    "output_dir": "outputs/data_reweighting",
    "lora_layers": [-1],
    "hvp_mode": "rev_rev",
    "max_steps": -1,
    "num_train_epochs": 8,
    "learning_rate": 3e-3,
    "warmup_steps": 10,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 128,
    "logging_steps": 20,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
    "unroll_steps": 10,
    "outer_patience_steps": 0,
    "outer_learning_rate": 0.3,
    "ihvp_method": "identity",
    "nystrom_rank": 5,
    "nystrom_rho": 0.1,
    "hypergrad_train_batch_size": 32,
    "outer_batch_size": 32,
}


@dataclass
class ExperimentArguments:
    """What to run besides the bilevel training, and how."""

    weighting: str = field(
        default="loss",
        metadata={"help": "What the outer problem learns: 'loss' = a weighting function of each example's current "
                  "loss, w_i = sigmoid(-loss_scale * l_i), one number loss_scale > 0 shared by all examples "
                  "(hf_integration.LossWeights; cannot fit a small validation set example by example); "
                  "'per_example' = one free weight per example (hf_integration.DataWeights).",
                  "choices": WEIGHTINGS},
    )
    run_baseline: bool = field(
        default=True,
        metadata={"help": "Also train the --baselines (same model initialisation, seed, data order, optimizer, "
                  "schedule and number of inner steps as the bilevel run)."},
    )
    baselines: list[str] = field(
        default_factory=lambda: list(BASELINES),
        metadata={"help": "Which rivals to train: 'uniform' (plain mean loss), 'uniform_train_val' (plain mean "
                  "loss on training + validation data: the validation set is what the bilevel run learns from), "
                  "'loss_filter' (drop the highest-loss --loss_filter_fraction of the training set after "
                  "--loss_filter_epochs).", "nargs": "+", "choices": BASELINES},
    )
    loss_filter_fraction: float | None = field(
        default=None,
        metadata={"help": "Fraction of the training set the loss filter drops (default: --noise_rate when labels "
                  "are corrupted on purpose, i.e. the filter is told the true noise rate; else 0.2)."},
    )
    loss_filter_epochs: float = field(
        default=2.0,
        metadata={"help": "Epochs of uniform training before the loss filter ranks and drops examples (measured on "
                  "the real-text sets of benchmarks/reweighting_outcome.py: 2 beat 0.5 and 1)."},
    )
    train_on_validation: bool | None = field(default=None, metadata={"help": TRAIN_ON_VALIDATION_HELP})
    trusted_share: str = field(default="max_weight", metadata={"help": TRUSTED_SHARE_HELP, "choices": TRUSTED_SHARES})
    cache_frozen_layers: bool = field(
        default=True,
        metadata={"help": "Run the frozen embeddings and layers below the lowest LoRA layer once per example "
                  "before training and train from their cached outputs (exact, minus the frozen layers' "
                  "dropout; examples/frozen_features.py). Every model of the run, baselines included, does so."},
    )

    def __post_init__(self) -> None:
        check_experiment_arguments(self, WEIGHTINGS, BASELINES)
        if not (math.isfinite(self.loss_filter_epochs) and self.loss_filter_epochs > 0):
            raise InputError(f"--loss_filter_epochs must be > 0, got {self.loss_filter_epochs}.")


def parse_args(args: list[str] | None = None):
    """Parse the command line (``args=None``: ``sys.argv``) into the five argument dataclasses."""
    from hf_integration import BilevelTrainingArguments

    parsed = parse_arguments((ModelArguments, DataArguments, ExperimentArguments, RunArguments,
                            BilevelTrainingArguments), DEMO_DEFAULTS, __doc__.split("\n\n")[0], args)
    resolve_noise_rate(parsed[1], EMBEDDED_NOISE_RATE)
    return parsed


def weights_auc(weights: np.ndarray, corrupted: np.ndarray) -> float:
    """ROC AUC of ``-weight`` as a score for ``corrupted`` (1 = every corrupted example has a lower weight than
    every clean one, 0.5 = chance); NaN when only one group is present."""
    from sklearn.metrics import roc_auc_score

    if corrupted.all() or not corrupted.any():
        return math.nan
    return float(roc_auc_score(corrupted.astype(int), -weights))


def plot_weights(weights: np.ndarray, corrupted: np.ndarray | None, path: str, title: str) -> None:
    """Histogram of the learned weights, clean and corrupted examples separately (PNG, matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    bins = np.linspace(0.0, 1.0, 41)
    if corrupted is not None and corrupted.any():
        ax.hist(weights[~corrupted], bins=bins, alpha=0.6, label=f"clean ({(~corrupted).sum()})", color="tab:blue")
        ax.hist(weights[corrupted], bins=bins, alpha=0.6, label=f"corrupted ({corrupted.sum()})", color="tab:red")
        ax.legend()
    else:
        ax.hist(weights, bins=bins, color="tab:blue", label=f"all ({len(weights)})")
        ax.legend()
    ax.set_xlabel("learned weight sigmoid(s_i)")
    ax.set_ylabel("training examples")
    ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Run the experiment (see the module docstring) and return the metrics written to ``metrics.json``.

    Nothing is written before both trainings have finished; ``metrics.json`` is written last. A run that could
    not train (NaN/inf it could not skip, no outer step applied) raises and writes nothing."""
    model_args, data_args, exp_args, run_args, training_args = parse_args(args)
    with start_run(training_args, run_args, "user/data-weights") as run:
        return _experiment(model_args, data_args, exp_args, training_args, run)


def _experiment(model_args, data_args, exp_args, training_args, run) -> dict[str, Any]:
    from transformers import DataCollatorWithPadding

    from hf_integration import DataWeights, add_example_ids, num_example_ids
    from hf_integration.trainer import NonFiniteGuard

    start = time.perf_counter()

    # ---------------------------------------------------------------- data (all checks before training)
    check_cache_options(exp_args.cache_frozen_layers, training_args)
    splits = load_splits(data_args)
    num_labels = len(splits.label_names)
    train_raw = flip_labels(splits.train, data_args.noise_rate, num_labels, data_args.dataset_seed,
                            data_args.noise_type)
    train_raw = add_example_ids(train_raw)  # stable ids, before the trainer shuffles
    check_batch_sizes(len(train_raw), len(splits.validation), training_args,
                      train_argument="--max_train_samples" if data_args.dataset_name is None
                      and data_args.train_file is None else splits.split_names["train"])
    per_epoch = steps_per_epoch(training_args, len(train_raw))
    if training_args.outer_patience_epochs is not None and training_args.outer_patience_steps == 0:
        training_args.outer_patience_steps = int(round(training_args.outer_patience_epochs * per_epoch))
    scheduled_outer_steps(training_args, len(train_raw))
    filter_step = max(1, int(round(exp_args.loss_filter_epochs * per_epoch)))
    total_steps = total_inner_steps(training_args, len(train_raw))
    if exp_args.run_baseline and "loss_filter" in exp_args.baselines and filter_step >= total_steps:
        raise InputError(f"--loss_filter_epochs {exp_args.loss_filter_epochs} puts the loss filter at inner step "
                         f"{filter_step}, but training has {total_steps} steps: lower it, or leave loss_filter out "
                         "of --baselines.")
    tokenizer = load_tokenizer(model_args)
    raw = {"train": train_raw, "validation": splits.validation}
    if splits.test is not None:
        raw["test"] = splits.test
    tokenized = tokenize_splits(raw, tokenizer, data_args.max_seq_length, keep=("labels", "example_id"))
    if exp_args.cache_frozen_layers:
        tokenized = add_feature_rows(tokenized)
    train_ds, val_ds, test_ds = tokenized["train"], tokenized["validation"], tokenized.get("test")
    logger.info("Data: %s; %d training examples (%d corrupted, %s noise), %d validation, %s test; classes %s",
                data_args.source, len(train_ds), sum(train_raw["corrupted"]), data_args.noise_type, len(val_ds),
                len(test_ds) if test_ds is not None else "no", splits.label_names)

    features: list[torch.Tensor] = []  # the frozen trunk's outputs, computed by the first model built

    def build_model() -> torch.nn.Module:
        model = build_lora_model(model_args, splits.label_names, training_args.seed, tokenizer=tokenizer)
        check_sequence_length(model.config, data_args.max_seq_length)
        if not exp_args.cache_frozen_layers:
            return model
        try:
            cached = CachedTrunkClassifier(model)
        except ValueError as err:
            raise InputError(str(err)) from err
        cached.to(training_args.device)  # the frozen layers run where the training will (Trainer would move it)
        if not features:
            tic = time.perf_counter()
            cached.cache_features(tokenized, DataCollatorWithPadding(tokenizer),
                                  batch_size=training_args.per_device_eval_batch_size)
            features.append(cached.features)
            logger.info("Cached the frozen layers 0..%d for %d examples in %.1f s", cached.first_layer - 1,
                        cached.features.shape[0], time.perf_counter() - tic)
        cached.features = features[0]
        return cached

    # ---------------------------------------------------------------- bilevel training
    model = build_model()
    inner_ds, trusted = inner_training_set(train_ds, val_ds, exp_args.train_on_validation)
    weights = (loss_weights(trusted, exp_args.trusted_share) if exp_args.weighting == "loss"
               else DataWeights(num_example_ids(train_ds)))
    with configuring():
        trainer = CachedTrunkBilevelTrainer(
            model=model, args=training_args, train_dataset=inner_ds, eval_dataset=val_ds, outer_module=weights,
            dataset_name=data_args.source, dataset_split=splits.split_names["train"], processing_class=tokenizer,
            compute_metrics=accuracy_metrics,
        )
    tic = time.perf_counter()
    trainer.train(resume_from_checkpoint=run.resume)
    bilevel_time = time.perf_counter() - tic
    steps = check_outer_steps(trainer, "data weights")
    reweighted = evaluate_splits(trainer, {"validation": val_ds, "test": test_ds})
    metadata = trainer.outer_metadata()

    # ---------------------------------------------------------------- baselines
    corrupted = np.asarray(train_raw["corrupted"], dtype=bool)
    known = bool(corrupted.any())
    filter_fraction = exp_args.loss_filter_fraction
    if filter_fraction is None:
        filter_fraction = data_args.noise_rate if data_args.noise_rate > 0 else 0.2
    baselines: dict[str, dict[str, float]] = {}
    if exp_args.run_baseline:
        # the same number of inner steps as the bilevel run (training + validation has more batches per epoch)
        base_args = dataclasses.replace(training_args, max_steps=trainer.state.global_step)
        for name in exp_args.baselines:
            base_dir = os.path.join(training_args.output_dir, f"baseline-{name}")
            base_trainer, seconds = train_baseline(
                name, build_model, base_args, train_ds, val_ds, filter_fraction=filter_fraction,
                filter_step=filter_step,
                callbacks=[NonFiniteGuard()], resume=resume_point(run, base_dir, bilevel=False),
                processing_class=tokenizer, compute_metrics=accuracy_metrics)
            baselines[name] = {**evaluate_splits(base_trainer, {"validation": val_ds, "test": test_ds}),
                               "wall_time_s": seconds}
            losses = getattr(base_trainer, "losses", None)
            if name == "loss_filter" and losses is not None and known:
                ids = np.asarray(train_raw["example_id"])
                baselines[name]["auc_high_loss_vs_corrupted"] = weights_auc(-losses[ids], corrupted)
                baselines[name]["fraction_dropped"] = filter_fraction

    # ---------------------------------------------------------------- outputs
    w = learned_weights(trainer, weights, train_ds)
    auc = weights_auc(w, corrupted) if known else math.nan
    k = int(corrupted.sum())
    precision_at_k = float(corrupted[np.argsort(w)[:k]].mean()) if known else math.nan
    results: dict[str, Any] = {
        "data": data_args.source,
        "model": model_args.model_name_or_path,
        "num_train": len(train_ds),
        "num_validation": len(val_ds),
        "num_test": len(test_ds) if test_ds is not None else 0,
        "noise_rate": data_args.noise_rate,
        "noise_type": data_args.noise_type,
        "num_corrupted": k,
        "auc_low_weight_vs_corrupted": auc,
        "precision_at_num_corrupted": precision_at_k,
        "mean_weight_clean": float(w[~corrupted].mean()) if (~corrupted).any() else math.nan,
        "mean_weight_corrupted": float(w[corrupted].mean()) if known else math.nan,
        "weight_spread": float(np.std(w) / max(float(np.mean(w)), 1e-12)),
        "reweighted": reweighted,
        "baselines": baselines,
        "baseline_description": "same model initialisation, seed, data order, optimizer, schedule and number of "
                                "inner steps as the bilevel run; " + "; ".join(
                                    f"{name}: {BASELINE_DESCRIPTIONS[name]}" for name in baselines)
                                if baselines else "not run",
        "inner_steps": trainer.state.global_step,
        **steps,
        "hvp_mode": trainer.hvp_mode,
        "cached_frozen_layers": exp_args.cache_frozen_layers,
        "train_on_validation": exp_args.train_on_validation,
        "trusted_share": getattr(weights, "trusted_share", None),
        "resumed_from": run.resume,
        "wall_time_bilevel_s": bilevel_time,
        "wall_time_baselines_s": {name: b["wall_time_s"] for name, b in baselines.items()},
        "wall_time_total_s": math.nan,
        "torch_threads": torch.get_num_threads(),
    }
    if results["weight_spread"] < NO_SIGNAL_SPREAD:
        logger.warning("The learned weights are nearly uniform (std/mean %.3f < %.2f): they carry little signal. "
                       "Train longer (--num_train_epochs), start outer steps later (--outer_patience_steps) or "
                       "raise --outer_learning_rate.", results["weight_spread"], NO_SIGNAL_SPREAD)
    out_dir = training_args.output_dir
    write = OutputWriter(out_dir, ["the model and outer parameters", "train_with_weights/", "weights.png",
                                   "metrics.json"])
    run.commit()  # from here on the outputs are this run's (a previous run's, moved aside, are deleted)
    # refuses NaN/inf; a cached-trunk model saves its adapter
    write("the model and outer parameters", lambda: trainer.save_model(out_dir))
    if trainer.is_world_process_zero():
        write("train_with_weights/", lambda: atomic_write_dir(os.path.join(out_dir, "train_with_weights"),
                                                              train_raw.add_column("weight", w.tolist()).save_to_disk))
        write("weights.png", lambda: plot_weights(
            w, corrupted if known else None, os.path.join(out_dir, "weights.png"),
            f"Learned data weights (AUC {auc:.3f})" if known else "Learned data weights"))
        results["wall_time_total_s"] = time.perf_counter() - start
        write("metrics.json", lambda: write_json(os.path.join(out_dir, "metrics.json"), results))  # marks completion
        print_summary(results)
        if run.push:
            card_metadata = {**metadata, "auc_low_weight_vs_corrupted": f"{auc:.4f}",
                             "noise_rate": str(data_args.noise_rate),
                             **{f"reweighted_{k}": f"{v:.4f}" for k, v in reweighted.items()}}
            url = push_outputs(weights, training_args, card_metadata)
            results["hub_commit_url"] = url
            print(f"Pushed the learned weights to {url}\n"
                  f'Load them with: {type(weights).__name__}.from_pretrained("{training_args.hub_model_id}")')
    return results


def learned_weights(trainer: Any, weights: Any, train_ds: Any) -> np.ndarray:
    """The learned weight of every training example, in the rows' order: ``sigmoid(s_i)`` of free weights, or
    the weighting function at each example's loss under the trained model (evaluation mode)."""
    if hasattr(weights, "weights_for"):
        losses = per_example_losses(trainer, train_ds, prefix="weights")
        return weights.weights_for(losses).detach().float().cpu().numpy()
    return weights.weights().detach().float().cpu().numpy()[np.asarray(train_ds["example_id"])]


BASELINE_LABELS = {"uniform": "uniform weights", "uniform_train_val": "uniform on train + validation",
                   "loss_filter": "loss filter"}


def print_summary(results: dict[str, Any]) -> None:
    """The end-of-run table: reweighted vs the baselines, and how well the weights find corrupted labels."""
    rw = results["reweighted"]
    roles = [r for r in ("validation", "test") if f"{r}_accuracy" in rw]
    header = ["model"] + [f"{r} acc" for r in roles] + [f"{r} loss" for r in roles] + ["train time (s)"]

    def row(name: str, metrics: dict[str, float], seconds: float) -> list:
        return ([name] + [f"{100 * metrics[f'{r}_accuracy']:.1f}%" for r in roles]
                + [metrics[f"{r}_loss"] for r in roles] + [f"{seconds:.0f}"])

    rows = [row("learned data weights (bilevel)", rw, results["wall_time_bilevel_s"])]
    for name, metrics in results["baselines"].items():
        rows.append(row(BASELINE_LABELS[name], metrics, metrics["wall_time_s"]))
    print()
    print(f"Data: {results['data']}: {results['num_train']} training examples, {results['num_corrupted']} with "
          f"corrupted labels ({results['noise_type']}); {describe_steps(results)} (hvp_mode {results['hvp_mode']}).")
    print(format_table(header, rows))
    if results["num_corrupted"]:
        header = ["AUC (low weight vs corrupted)", "precision@#corrupted", "mean weight clean",
                  "mean weight corrupted"]
        row_values = [results["auc_low_weight_vs_corrupted"], results["precision_at_num_corrupted"],
                      results["mean_weight_clean"], results["mean_weight_corrupted"]]
        loss_auc = results["baselines"].get("loss_filter", {}).get("auc_high_loss_vs_corrupted")
        if loss_auc is not None:
            header.append("AUC of the loss filter's ranking")
            row_values.append(loss_auc)
        print(format_table(header, [row_values]))
    print(f"Total wall time: {results['wall_time_total_s']:.0f} s.")


if __name__ == "__main__":
    run_main(main)
