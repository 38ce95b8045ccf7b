"""Learn data weights for a text classifier with label noise, by hypergradients, and compare them with the
cheap rivals.

The inner problem fine-tunes a pretrained encoder (LoRA adapter + classification head) on the *weighted* training
loss ``sum_i w_i l_i / sum_i w_i``; the outer problem tunes the weights so that the fine-tuned model does well on a
clean validation set (`hf_integration.BilevelTrainer` with the library's ``recipe="data_weighting"``). Weightings
(``--weighting``): ``loss`` (default, `LossWeights`: ``w_i = sigmoid(-loss_scale * l_i)``, one shared parameter, the
validation rows also trained on as trusted rows) or ``per_example`` (`DataWeights`, one free weight per example).

Default run (no download, CPU, under a minute): the embedded MiniLM-L6 encoder + LoRA on its last layer, on a
generated sentiment-like dataset with 30% of the training labels flipped where annotators err (``--noise_type
confusable``: the examples a cross-validated TF-IDF model finds most confusable, each given its likeliest wrong class),
a clean validation split (the outer objective) and a clean test split::

    python examples/data_reweighting.py                          # = make demo
    python examples/data_reweighting.py --train_file train.jsonl --validation_file val.jsonl \\
        --test_file test.jsonl --noise_rate 0.4 --noise_type symmetric

Rivals with the same initialisation, seed, data order, optimizer, schedule and inner steps (``--baselines``,
`hf_integration.rivals`): uniform, uniform on train + validation, the loss filter (after ``--loss_filter_epochs``).
Outputs in ``--output_dir``: the adapter and ``outer_params.safetensors``; ``train_with_weights/`` (the training set
with a ``weight`` column and a card); ``metrics.json`` (AUC of "low weight" against the ``corrupted`` flags, every
model's validation/test accuracy and loss, wall times; written last); ``weights.png``. ``--push_to_hub
--hub_model_id user/repo`` uploads the learned outer parameters with a card. The run's guards (output folder, resume,
Hub, one-line errors) are `hf_integration.runs`'.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hf_integration import BilevelTrainer, BilevelTrainingArguments, add_example_ids
from hf_integration.classification import (DataArguments, ModelArguments, accuracy_metrics, build_lora_model,
                                           check_cache_options, check_sequence_length, evaluate_splits, load_splits,
                                           load_tokenizer, tokenize_splits)
from hf_integration.data_files import check_batch_sizes, resolve_noise_rate
from hf_integration.experiment import WeightingArguments, filter_fraction
from hf_integration.frozen_trunk import CachedTrunkClassifier, SharedTrunkCache, add_feature_rows
from hf_integration.holdout_reference import check_reference_labels, holdout_reference
from hf_integration.label_noise import flip_labels
from hf_integration.recipe import steps_per_epoch
from hf_integration.reporting import plot_weights, print_summary, ranking_figures, weights_auc
from hf_integration.rivals import filter_ranking, train_rival
from hf_integration.runs import (InputError, OutputWriter, RunArguments, check_outer_steps, configuring,
                                 parse_arguments, push_outputs, resume_point, run_main, scheduled_outer_steps,
                                 start_run, total_inner_steps, write_json)
from hf_integration.sharding import shard_model
from hf_integration.training_callbacks import NonFiniteGuard
from hf_integration.weights_dataset import render_weights_card, save_weights_dataset

EMBEDDED_NOISE_RATE = 0.3  # on the embedded set only: the user's own data is corrupted only on request
RIVAL_LABELS = {"uniform": "uniform weights", "uniform_train_val": "uniform on train + validation",
                "loss_filter": "loss filter", "reference_filter": "reference filter"}
REFERENCE_COLUMN = "reference_loss"  # --loss_reference holdout_probe: each row's loss under the validation probe
# The demo's settings (a few minutes on a 2-core CPU, see docs/); they fill the fields the command line leaves.
DEMO_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/data_reweighting", "recipe": "data_weighting", "lora_layers": [-1], "hvp_mode": "rev_rev",
    "max_steps": -1, "num_train_epochs": 8, "learning_rate": 3e-3, "warmup_steps": 10,
    "per_device_train_batch_size": 16, "per_device_eval_batch_size": 128, "logging_steps": 20, "save_strategy": "no",
    "report_to": "none", "seed": 0, "nystrom_rank": 5, "nystrom_rho": 0.1, "noise_type": "confusable",
    "baselines": ["uniform", "uniform_train_val", "loss_filter", "reference_filter"],
}


@dataclass
class ExperimentArguments(WeightingArguments):
    """What to run besides the bilevel training, and how."""

    loss_reference_choices = ("none", "holdout_probe")
    default_loss_reference = "holdout_probe"  # measured: docs/data-reweighting.md

    loss_filter_epochs: float = field(
        default=2.0,
        metadata={"help": "Epochs of uniform training before the loss filter ranks and drops examples (measured on "
                  "the real-text sets of benchmarks/reweighting_outcome.py: 2 beat 0.5 and 1)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.loss_filter_epochs) and self.loss_filter_epochs > 0):
            raise InputError(f"--loss_filter_epochs must be > 0, got {self.loss_filter_epochs}.")


def parse_args(args: list[str] | None = None):
    """Parse the command line (``args=None``: ``sys.argv``) into the five argument dataclasses."""
    parsed = parse_arguments((ModelArguments, DataArguments, ExperimentArguments, RunArguments,
                              BilevelTrainingArguments), DEMO_DEFAULTS, __doc__.split("\n\n")[0], args)
    resolve_noise_rate(parsed[1], EMBEDDED_NOISE_RATE)
    parsed[2].configure(parsed[4])
    return parsed


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Run the experiment and return the metrics written to ``metrics.json`` (nothing is written before every
    training has finished; a run that could not train raises and writes nothing)."""
    model_args, data_args, exp_args, run_args, training_args = parse_args(args)
    with start_run(training_args, run_args, "user/data-weights") as run:
        return _experiment(model_args, data_args, exp_args, training_args, run)


def _experiment(model_args, data_args, exp_args, training_args, run) -> dict[str, Any]:
    from transformers import DataCollatorWithPadding

    start = time.perf_counter()
    check_cache_options(exp_args.cache_frozen_layers, training_args, run.fully_shard)
    splits = load_splits(data_args)
    train_raw = add_example_ids(flip_labels(splits.train, data_args.noise_rate, len(splits.label_names),
                                            data_args.dataset_seed, data_args.noise_type))
    check_batch_sizes(len(train_raw), len(splits.validation), training_args,
                      train_argument="--max_train_samples" if data_args.dataset_name is None
                      and data_args.train_file is None else splits.split_names["train"])
    per_epoch = steps_per_epoch(training_args, len(train_raw))
    scheduled_outer_steps(training_args, len(train_raw))  # resolves outer_patience_epochs into steps
    filter_step, total = max(1, int(round(exp_args.loss_filter_epochs * per_epoch))), total_inner_steps(
        training_args, len(train_raw))
    if exp_args.run_baseline and "loss_filter" in exp_args.baselines and filter_step >= total:
        raise InputError(f"--loss_filter_epochs {exp_args.loss_filter_epochs} puts the loss filter at inner step "
                         f"{filter_step}, but training has {total} steps: lower it, or leave loss_filter out of "
                         "--baselines.")
    needs_reference = exp_args.loss_reference == "holdout_probe" or (exp_args.run_baseline
                                                                     and "reference_filter" in exp_args.baselines)
    if needs_reference:
        try:
            check_reference_labels(splits.validation["labels"], train_raw["labels"], len(splits.label_names))
        except ValueError as err:
            raise InputError(f"--loss_reference holdout_probe / --baselines reference_filter: {err}") from err
    tokenizer = load_tokenizer(model_args)
    raw = {"train": train_raw, "validation": splits.validation, **({"test": splits.test} if splits.test else {})}
    tokenized = tokenize_splits(raw, tokenizer, data_args.max_seq_length, keep=("labels", "example_id"))
    if exp_args.cache_frozen_layers:
        tokenized = add_feature_rows(tokenized)
    train_ds, val_ds, test_ds = tokenized["train"], tokenized["validation"], tokenized.get("test")
    cache = SharedTrunkCache(CachedTrunkClassifier, DataCollatorWithPadding(tokenizer),
                             training_args.per_device_eval_batch_size, training_args.device, splits=tokenized)

    def build_model() -> torch.nn.Module:
        model = build_lora_model(model_args, splits.label_names, training_args.seed, tokenizer=tokenizer)
        check_sequence_length(model.config, data_args.max_seq_length)
        if run.fully_shard:
            shard_model(model)
        if not exp_args.cache_frozen_layers:
            return model
        try:
            return cache(model)
        except ValueError as err:
            raise InputError(str(err)) from err

    reference, reference_seconds = None, 0.0
    if needs_reference:
        tic = time.perf_counter()  # the initial model's encoder is the probe's (LoRA starts as the identity)
        probe_model = build_model()
        if not (exp_args.cache_frozen_layers or run.fully_shard):  # a cached or sharded model is placed already
            probe_model.to(training_args.device)
        reference = holdout_reference(probe_model, train_ds, val_ds, DataCollatorWithPadding(tokenizer),
                                      len(splits.label_names), batch_size=training_args.per_device_eval_batch_size,
                                      seed=training_args.seed)  # a cached trunk runs its top layers only
        del probe_model
        reference_seconds = time.perf_counter() - tic - cache.seconds  # the cache is every model's, filled once
    if exp_args.loss_reference == "holdout_probe":
        train_ds = train_ds.add_column(REFERENCE_COLUMN, reference.train.tolist())
        val_ds = val_ds.add_column(REFERENCE_COLUMN, reference.outer.tolist())
        exp_args.configure(training_args, reference_column=REFERENCE_COLUMN,
                           init_reference_scale=exp_args.init_reference_scale)

    # ---------------------------------------------------------------- the bilevel run (trusted rows: the library's)
    with configuring():
        trainer = BilevelTrainer(model=build_model(), args=training_args, train_dataset=train_ds, eval_dataset=val_ds,
                                 dataset_name=data_args.source, dataset_split=splits.split_names["train"],
                                 processing_class=tokenizer, compute_metrics=accuracy_metrics)
    tic = time.perf_counter()
    trainer.train(resume_from_checkpoint=run.resume)
    bilevel_time = time.perf_counter() - tic
    steps = check_outer_steps(trainer, "data weights")
    reweighted = evaluate_splits(trainer, {"validation": val_ds, "test": test_ds})
    w = trainer.example_weights()

    # ---------------------------------------------------------------- the rivals
    corrupted = np.asarray(train_raw["corrupted"], dtype=bool)
    fraction = filter_fraction(exp_args, data_args.noise_rate)
    rivals: dict[str, dict[str, float]] = {}
    base_args = dataclasses.replace(training_args, max_steps=trainer.state.global_step)  # the same inner steps
    for name in exp_args.baselines if exp_args.run_baseline else ():
        rival, seconds = train_rival(
            name, build_model, base_args, train_ds, val_ds, filter_fraction=fraction, filter_step=filter_step,
            callbacks=[NonFiniteGuard()], processing_class=tokenizer, compute_metrics=accuracy_metrics,
            filter_scores=reference.train if name == "reference_filter" else None,
            resume=resume_point(run, os.path.join(training_args.output_dir, f"baseline-{name}"), bilevel=False))
        rivals[name] = {**evaluate_splits(rival, {"validation": val_ds, "test": test_ds}), "wall_time_s": seconds}
        if name in ("loss_filter", "reference_filter"):
            rivals[name].update(filter_ranking(rival, train_raw["example_id"], corrupted))

    # ---------------------------------------------------------------- outputs
    results: dict[str, Any] = {
        "data": data_args.source, "model": model_args.model_name_or_path, "num_train": len(train_ds),
        "num_validation": len(val_ds), "num_test": len(test_ds) if test_ds is not None else 0,
        "noise_rate": data_args.noise_rate, "noise_type": data_args.noise_type, "num_corrupted": int(corrupted.sum()),
        **ranking_figures(w, corrupted), "reweighted": reweighted, "baselines": rivals,
        "baseline_description": "same model initialisation, seed, data order, optimizer, schedule and number of inner "
                                "steps as the bilevel run" if rivals else "not run",
        "loss_reference": exp_args.loss_reference, "outer_parameters": trainer.outer_module.summary_stats(),
        **({"holdout_reference": {
            "auc_high_reference_vs_corrupted": weights_auc(-reference.train, corrupted),
            "inverse_regularization": reference.inverse_regularization,
            "probe_validation_accuracy": reference.outer_accuracy, "time_s": reference_seconds}}
           if reference is not None else {}),
        "inner_steps": trainer.state.global_step, **steps, "hvp_mode": trainer.hvp_mode,
        "cached_frozen_layers": exp_args.cache_frozen_layers, "train_on_validation": exp_args.train_on_validation,
        "trusted_share": getattr(trainer.outer_module, "trusted_share", None), "resumed_from": run.resume,
        "wall_time_bilevel_s": bilevel_time, "wall_time_outer_steps_s": trainer.outer_steps_seconds,
        "wall_time_baselines_s": {n: r["wall_time_s"] for n, r in rivals.items()},
        "wall_time_total_s": math.nan, "torch_threads": torch.get_num_threads(),
    }
    out_dir = training_args.output_dir
    write = OutputWriter(out_dir, ["the model and outer parameters", "train_with_weights/", "weights.png",
                                   "metrics.json"])
    run.commit()  # from here on the outputs are this run's (a previous run's, moved aside, are deleted)
    write("the model and outer parameters", lambda: trainer.save_model(out_dir))  # refuses NaN/inf
    if trainer.is_world_process_zero():
        table = train_raw.add_column("weight", w.astype(float).tolist())
        card = render_weights_card(table, repo_id=os.path.join(out_dir, "train_with_weights"),
                                   description=trainer.outer_module.card_text().description.rstrip("."),
                                   task="text-classification", source_column=None)
        write("train_with_weights/", lambda: save_weights_dataset(table, os.path.join(out_dir, "train_with_weights"),
                                                                  card))
        auc = results["auc_low_weight_vs_corrupted"]
        write("weights.png", lambda: plot_weights(w, corrupted if corrupted.any() else None,
                                                  os.path.join(out_dir, "weights.png"), "Learned data weights"
                                                  + (f" (AUC {auc:.3f})" if corrupted.any() else "")))
        results["wall_time_total_s"] = time.perf_counter() - start
        write("metrics.json", lambda: write_json(os.path.join(out_dir, "metrics.json"), results))  # marks completion
        print_summary(results, rival_labels=RIVAL_LABELS, what="labels",
                      metrics=[("accuracy", "acc", "percent"), ("loss", "loss", "float")])
        if run.push:
            metadata = {**trainer.outer_metadata(), "auc_low_weight_vs_corrupted": f"{auc:.4f}",
                        "noise_rate": str(data_args.noise_rate), **{f"reweighted_{k}": f"{v:.4f}"
                                                                    for k, v in reweighted.items()}}
            results["hub_commit_url"] = push_outputs(trainer.outer_module, training_args, metadata)
            print(f"Pushed the learned weights to {results['hub_commit_url']}\nLoad them with: "
                  f'{type(trainer.outer_module).__name__}.from_pretrained("{training_args.hub_model_id}")')
    return results


if __name__ == "__main__":
    run_main(main)
