"""Learn one weight per training example of a text classifier, by implicit hypergradients.

The inner problem fine-tunes a pretrained encoder (LoRA adapter + classification head) on the *weighted*
training loss ``sum_i w_i l_i / sum_i w_i``; the outer problem moves the weights ``w_i = sigmoid(s_i)`` so that
the fine-tuned model does well on a clean validation set (`hf_integration.BilevelTrainer` with
`hf_integration.DataWeights`). Training examples whose gradient disagrees with the validation gradient (e.g.
mislabelled ones) get low weights.

Default run (no download, CPU, a few minutes): the embedded MiniLM-L6 encoder + LoRA on a generated
sentiment-like dataset (``examples/synthetic_sentiment.py``) with 30% of the training labels flipped, a clean
validation split (the outer objective) and a clean test split (evaluated once at the end)::

    python examples/data_reweighting.py                          # = make demo
    python examples/data_reweighting.py --dataset_name imdb --validation_split "train[90%:]" \\
        --train_split "train[:90%]" --test_split test --max_train_samples 2000 --noise_rate 0.2

Outputs in ``--output_dir``:

* the LoRA adapter and ``outer_params.safetensors`` (the learned weights; ``trainer.save_model``), loadable
  with ``DataWeights.from_pretrained(output_dir)``;
* ``train_with_weights/``: the training set (``text``, ``labels``, ``corrupted``, ``example_id``) with a
  ``weight`` column (``datasets.load_from_disk``);
* ``metrics.json``: AUC of "low weight" as a detector of the ``corrupted`` flags (when known), validation and
  test accuracy/loss of the reweighted model and of a uniform-weight baseline, wall times;
* ``weights.png``: the weight distributions of clean and corrupted examples.

The uniform-weight baseline is a plain ``transformers.Trainer`` (mean cross-entropy, no outer updates) on the
same training data with the same model initialisation, seed, data order, optimizer, schedule and number of
inner steps; it does not see the validation set at all, while the reweighted model uses it through the outer
objective (so the *test* accuracy is the unbiased comparison). ``--run_baseline False`` skips it.

``--push_to_hub --hub_model_id user/repo`` uploads the learned weights with a model card (not the adapter);
load them back with ``DataWeights.from_pretrained("user/repo")``.

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
from text_classification import (  # noqa: E402
    DataArguments,
    ModelArguments,
    RunArguments,
    accuracy_metrics,
    build_lora_model,
    check_batch_sizes,
    check_outer_steps,
    describe_steps,
    evaluate_splits,
    flip_labels,
    format_table,
    load_splits,
    load_tokenizer,
    parse_arguments,
    push_outputs,
    resume_point,
    run_main,
    scheduled_outer_steps,
    start_run,
    tokenize_splits,
    write_json,
)

logger = logging.getLogger("data_reweighting")

# Defaults of the demo (tuned so that `make demo` finishes in a few minutes on a 2-core CPU, see README).
# They override `BilevelTrainingArguments`' own defaults; any of them can be given on the command line.
DEMO_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/data_reweighting",
    "noise_rate": 0.3,
    "lora_layers": [-1],
    "hvp_mode": "rev_rev",
    "max_steps": 150,
    "learning_rate": 1e-3,
    "warmup_steps": 10,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 128,
    "logging_steps": 20,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
    "unroll_steps": 5,
    "outer_patience_steps": 20,
    "outer_learning_rate": 0.3,
    "nystrom_rank": 5,
    "nystrom_rho": 0.1,
    "hypergrad_train_batch_size": 128,
    "outer_batch_size": 128,
}


@dataclass
class ExperimentArguments:
    """What to run besides the bilevel training."""

    run_baseline: bool = field(
        default=True,
        metadata={"help": "Also train a uniform-weight baseline (plain transformers.Trainer, same budget and seed)."},
    )


def parse_args(args: list[str] | None = None):
    """Parse the command line (``args=None``: ``sys.argv``) into the five argument dataclasses."""
    from hf_integration import BilevelTrainingArguments

    return parse_arguments((ModelArguments, DataArguments, ExperimentArguments, RunArguments,
                            BilevelTrainingArguments), DEMO_DEFAULTS, __doc__.split("\n\n")[0], args)


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
    from transformers import Trainer

    from hf_integration import BilevelTrainer, DataWeights, add_example_ids, num_example_ids
    from hf_integration.trainer import NonFiniteGuard

    start = time.perf_counter()

    # ---------------------------------------------------------------- data (all checks before training)
    splits = load_splits(data_args)
    num_labels = len(splits.label_names)
    train_raw = flip_labels(splits.train, data_args.noise_rate, num_labels, data_args.dataset_seed)
    train_raw = add_example_ids(train_raw)  # stable ids, before the trainer shuffles
    check_batch_sizes(len(train_raw), len(splits.validation), training_args,
                      train_argument="--max_train_samples" if data_args.dataset_name is None
                      and data_args.train_file is None else splits.split_names["train"])
    scheduled_outer_steps(training_args, len(train_raw))
    tokenizer = load_tokenizer(model_args)
    tokenized = tokenize_splits({"train": train_raw, "validation": splits.validation, "test": splits.test}
                                if splits.test is not None else {"train": train_raw, "validation": splits.validation},
                                tokenizer, data_args.max_seq_length, keep=("labels", "example_id"))
    train_ds, val_ds, test_ds = tokenized["train"], tokenized["validation"], tokenized.get("test")
    logger.info("Data: %s; %d training examples (%d corrupted), %d validation, %s test; classes %s",
                data_args.source, len(train_ds), sum(train_raw["corrupted"]), len(val_ds),
                len(test_ds) if test_ds is not None else "no", splits.label_names)

    # ---------------------------------------------------------------- bilevel training
    model = build_lora_model(model_args, splits.label_names, training_args.seed, tokenizer=tokenizer)
    weights = DataWeights(num_example_ids(train_ds))
    trainer = BilevelTrainer(
        model=model, args=training_args, train_dataset=train_ds, eval_dataset=val_ds, outer_module=weights,
        dataset_name=data_args.source, dataset_split=splits.split_names["train"], processing_class=tokenizer,
        compute_metrics=accuracy_metrics,
    )
    tic = time.perf_counter()
    trainer.train(resume_from_checkpoint=run.resume)
    bilevel_time = time.perf_counter() - tic
    steps = check_outer_steps(trainer, "data weights")
    reweighted = evaluate_splits(trainer, {"validation": val_ds, "test": test_ds})
    metadata = trainer.outer_metadata()

    # ---------------------------------------------------------------- uniform-weight baseline
    baseline: dict[str, float] = {}
    baseline_time = math.nan
    if exp_args.run_baseline:
        base_model = build_lora_model(model_args, splits.label_names, training_args.seed, tokenizer=tokenizer)
        base_args = dataclasses.replace(training_args, output_dir=os.path.join(training_args.output_dir, "baseline"))
        base_trainer = Trainer(
            model=base_model, args=base_args, train_dataset=train_ds.remove_columns("example_id"),
            eval_dataset=val_ds, processing_class=tokenizer, compute_metrics=accuracy_metrics,
            callbacks=[NonFiniteGuard()],
        )
        tic = time.perf_counter()
        base_trainer.train(resume_from_checkpoint=resume_point(run, base_args.output_dir, bilevel=False))
        baseline_time = time.perf_counter() - tic
        baseline = evaluate_splits(base_trainer, {"validation": val_ds, "test": test_ds})

    # ---------------------------------------------------------------- outputs
    w = weights.weights().detach().float().cpu().numpy()[np.asarray(train_raw["example_id"])]
    corrupted = np.asarray(train_raw["corrupted"], dtype=bool)
    known = bool(corrupted.any())
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
        "num_corrupted": k,
        "auc_low_weight_vs_corrupted": auc,
        "precision_at_num_corrupted": precision_at_k,
        "mean_weight_clean": float(w[~corrupted].mean()) if (~corrupted).any() else math.nan,
        "mean_weight_corrupted": float(w[corrupted].mean()) if known else math.nan,
        "reweighted": reweighted,
        "uniform_baseline": baseline,
        "baseline_description": "transformers.Trainer, plain mean cross-entropy, same model initialisation, "
                                "seed, data order, optimizer, schedule and number of inner steps; no outer "
                                "updates and no use of the validation set" if baseline else "not run",
        "inner_steps": trainer.state.global_step,
        **steps,
        "hvp_mode": trainer.hvp_mode,
        "resumed_from": run.resume,
        "wall_time_bilevel_s": bilevel_time,
        "wall_time_baseline_s": baseline_time,
        "wall_time_total_s": math.nan,
        "torch_threads": torch.get_num_threads(),
    }
    out_dir = training_args.output_dir
    trainer.save_model(out_dir)  # refuses NaN/inf (BilevelTrainer._save)
    if trainer.is_world_process_zero():
        atomic_write_dir(os.path.join(out_dir, "train_with_weights"),
                         train_raw.add_column("weight", w.tolist()).save_to_disk)
        plot_weights(w, corrupted if known else None, os.path.join(out_dir, "weights.png"),
                     f"Learned data weights (AUC {auc:.3f})" if known else "Learned data weights")
        results["wall_time_total_s"] = time.perf_counter() - start
        write_json(os.path.join(out_dir, "metrics.json"), results)  # last: marks a complete run
        print_summary(results)
        if run.push:
            card_metadata = {**metadata, "auc_low_weight_vs_corrupted": f"{auc:.4f}",
                             "noise_rate": str(data_args.noise_rate),
                             **{f"reweighted_{k}": f"{v:.4f}" for k, v in reweighted.items()}}
            url = push_outputs(weights, training_args, card_metadata)
            results["hub_commit_url"] = url
            print(f"Pushed the learned weights to {url}\n"
                  f'Load them with: DataWeights.from_pretrained("{training_args.hub_model_id}")')
    return results


def print_summary(results: dict[str, Any]) -> None:
    """The end-of-run table: reweighted vs uniform baseline, and how well the weights find corrupted labels."""
    rw, base = results["reweighted"], results["uniform_baseline"]
    roles = [r for r in ("validation", "test") if f"{r}_accuracy" in rw]
    header = ["model"] + [f"{r} acc" for r in roles] + [f"{r} loss" for r in roles] + ["train time (s)"]

    def row(name: str, metrics: dict[str, float], seconds: float) -> list:
        return ([name] + [f"{100 * metrics[f'{r}_accuracy']:.1f}%" for r in roles]
                + [metrics[f"{r}_loss"] for r in roles] + [f"{seconds:.0f}"])

    rows = [row("learned data weights (bilevel)", rw, results["wall_time_bilevel_s"])]
    if base:
        rows.append(row("uniform weights (baseline)", base, results["wall_time_baseline_s"]))
    print()
    print(f"Data: {results['data']}: {results['num_train']} training examples, {results['num_corrupted']} with "
          f"flipped labels; {describe_steps(results)} (hvp_mode {results['hvp_mode']}).")
    print(format_table(header, rows))
    if results["num_corrupted"]:
        print(format_table(
            ["AUC (low weight vs corrupted)", "precision@#corrupted", "mean weight clean", "mean weight corrupted"],
            [[results["auc_low_weight_vs_corrupted"], results["precision_at_num_corrupted"],
              results["mean_weight_clean"], results["mean_weight_corrupted"]]],
        ))
    print(f"Total wall time: {results['wall_time_total_s']:.0f} s.")


if __name__ == "__main__":
    run_main(main)
