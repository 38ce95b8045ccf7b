"""Learn one L2 strength per LoRA module in one training run, and compare with a grid search.

Fine-tuning on a few examples overfits. An L2 penalty on the LoRA factors, ``1/2 lambda_m (|A_m|^2 + |B_m|^2)``,
limits it, but which strength, and should every module get the same one? This script learns one strength per
LoRA module by implicit hypergradients of the validation loss, during a single training run
(`hf_integration.BilevelTrainer` with the library's ``recipe="lora_regularization"``, which builds
``LoraRegularization.from_peft_model(model, granularity="module")`` and holds the measured settings), and
compares it with the usual alternative: a grid search over one global strength, one full training run per grid
value, keeping the best validation loss.

Default run (no download, CPU, a few minutes): the embedded MiniLM-L6 encoder with LoRA on every attention
query/value projection and on the (frozen, randomly initialised) classification head, 13 LoRA modules in all,
trained on 64 examples of the generated sentiment data with 20% flipped labels (so that it overfits), a clean
validation split (the outer objective, and the grid search's selection criterion) and a clean test split::

    python examples/peft_regularization.py
    python examples/peft_regularization.py --grid 0 1e-3 1e-2 1e-1 --max_steps 300

Every run (the bilevel one and each grid point) uses the same `BilevelTrainer`, model initialisation, seed, data
order, optimizer, schedule and number of inner steps; grid runs hold their single strength fixed (no outer
update is scheduled). Outputs in ``--output_dir``: the LoRA adapter and ``outer_params.safetensors`` of the
bilevel run (``LoraRegularization.from_pretrained(output_dir)``), ``metrics.json``, and the table printed at the
end. ``--push_to_hub --hub_model_id user/repo`` uploads the learned strengths with a model card; load them back
with ``LoraRegularization.from_pretrained("user/repo")``.

Runs are guarded (``hf_integration.runs.start_run``): an ``--output_dir`` holding another run is refused unless
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
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_integration.classification import (DataArguments, ModelArguments, accuracy_metrics, build_lora_model,
                                           check_sequence_length, evaluate_splits, load_splits, load_tokenizer,
                                           tokenize_splits)
from hf_integration.data_files import check_batch_sizes, resolve_noise_rate
from hf_integration.label_noise import flip_labels
from hf_integration.runs import (InputError, OutputWriter, RunArguments, check_outer_steps, configuring,
                                 describe_steps, format_table, parse_arguments, push_outputs, resume_point, run_main,
                                 scheduled_outer_steps, start_run, total_inner_steps, write_json)

logger = logging.getLogger("peft_regularization")

# Defaults of the demo (a few minutes on a 2-core CPU for the 1 + 6 runs, see README); they override those of
# the argument dataclasses and can all be given on the command line.
# --noise_rate on the embedded generated data (the demo's controlled experiment); the user's own data is never
# corrupted unless --noise_rate says so.
EMBEDDED_NOISE_RATE = 0.2
DEMO_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/peft_regularization",
    "recipe": "lora_regularization",
    "max_train_samples": 64,
    "lora_target_modules": ["query", "value", "classifier"],
    "train_head": False,
    "max_steps": 150,
    "learning_rate": 2e-3,
    "warmup_steps": 10,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 128,
    "logging_steps": 25,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
    "hvp_mode": "rev_rev",
}


@dataclass
class RegularizationArguments:
    """The learned strengths and the grid they are compared with."""

    granularity: str | None = field(
        default=None,
        metadata={"help": "One learned strength per LoRA 'module', per transformer 'layer', or one 'global' "
                  "(default: the recipe's, 'module').", "choices": ["module", "layer", "global"]},
    )
    init_strength: float | None = field(
        default=None, metadata={"help": "Initial value of every learned strength (default: the recipe's, 1e-3)."})
    grid: list[float] = field(
        default_factory=lambda: [0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0],
        metadata={"help": "Global strengths of the grid search (one training run each)."},
    )
    run_grid: bool = field(default=True, metadata={"help": "Run the grid search (False: only the bilevel run)."})

    def __post_init__(self) -> None:
        if self.init_strength is not None and not (self.init_strength > 0 and math.isfinite(self.init_strength)):
            raise InputError(f"--init_strength must be finite and > 0, got {self.init_strength}.")
        if any(not (s >= 0 and math.isfinite(s)) for s in self.grid):
            raise InputError(f"--grid values must be finite and >= 0, got {self.grid}.")


# A log-strength whose exp is exactly 0.0 in float32 and float64: grid point 0 as a finite parameter (never
# -inf, which no checkpoint or saved file may hold).
ZERO_STRENGTH_LOG = -1e4


def parse_args(args: list[str] | None = None):
    """Parse the command line (``args=None``: ``sys.argv``) into the five argument dataclasses."""
    from hf_integration import BilevelTrainingArguments

    parsed = parse_arguments((ModelArguments, DataArguments, RegularizationArguments, RunArguments,
                            BilevelTrainingArguments), DEMO_DEFAULTS, __doc__.split("\n\n")[0], args)
    resolve_noise_rate(parsed[1], EMBEDDED_NOISE_RATE)
    reg_args, training_args = parsed[2], parsed[4]
    if training_args.outer_module not in (None, "lora_regularization"):
        raise InputError(f"--outer_module {training_args.outer_module} cannot be learned here: this script learns "
                         "LoRA regularization strengths (--outer_module lora_regularization, or leave it out).")
    options = dict(training_args.outer_module_options or {})
    options.update({k: v for k, v in (("granularity", reg_args.granularity), ("init_strength", reg_args.init_strength))
                    if v is not None})
    training_args.outer_module, training_args.outer_module_options = "lora_regularization", options
    return parsed


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Run the bilevel run and the grid search (see the module docstring); return the metrics of ``metrics.json``.

    Nothing is written before every run has finished; ``metrics.json`` is written last. A run that could not
    train (NaN/inf it could not skip, no outer step applied) raises and writes nothing."""
    model_args, data_args, reg_args, run_args, training_args = parse_args(args)
    with start_run(training_args, run_args, "user/lora-strengths") as run:
        return _experiment(model_args, data_args, reg_args, training_args, run)


def _experiment(model_args, data_args, reg_args, training_args, run) -> dict[str, Any]:
    from hf_integration import BilevelTrainer, LoraRegularization

    start = time.perf_counter()

    # ---------------------------------------------------------------- data (all checks before training)
    splits = load_splits(data_args)
    train_raw = flip_labels(splits.train, data_args.noise_rate, len(splits.label_names), data_args.dataset_seed)
    check_batch_sizes(len(train_raw), len(splits.validation), training_args,
                      train_argument="--max_train_samples" if data_args.dataset_name is None
                      and data_args.train_file is None else splits.split_names["train"])
    scheduled_outer_steps(training_args, len(train_raw))
    tokenizer = load_tokenizer(model_args)
    roles = {"train": train_raw, "validation": splits.validation}
    if splits.test is not None:
        roles["test"] = splits.test
    tokenized = tokenize_splits(roles, tokenizer, data_args.max_seq_length)
    train_ds, val_ds, test_ds = tokenized["train"], tokenized["validation"], tokenized.get("test")
    eval_sets = {"validation": val_ds, "test": test_ds}

    def new_model():
        model = build_lora_model(model_args, splits.label_names, training_args.seed, tokenizer=tokenizer)
        check_sequence_length(model.config, data_args.max_seq_length)
        return model

    def run_one(model, regularization: LoraRegularization | None, run_args, resume: str | None
                ) -> tuple[BilevelTrainer, dict[str, float], float]:
        with configuring():
            trainer = BilevelTrainer(model=model, args=run_args, train_dataset=train_ds, eval_dataset=val_ds,
                                     outer_module=regularization, dataset_name=data_args.source,
                                     dataset_split=splits.split_names["train"], processing_class=tokenizer,
                                     compute_metrics=accuracy_metrics)
        tic = time.perf_counter()
        trainer.train(resume_from_checkpoint=resume)
        seconds = time.perf_counter() - tic
        return trainer, evaluate_splits(trainer, eval_sets), seconds

    # ---------------------------------------------------------------- bilevel: learned strengths, one run
    # (the trainer builds them from the PEFT model: training_args.outer_module, set by the recipe)
    trainer, bilevel, bilevel_time = run_one(new_model(), None, training_args, run.resume)
    learned = trainer.outer_module
    steps = check_outer_steps(trainer, "L2 strengths")
    metadata = trainer.outer_metadata()
    strengths = {name: float(s) for name, s in zip(learned.group_names, learned.strengths().detach().cpu())}
    logger.info("Learned strengths: %s", strengths)

    # ---------------------------------------------------------------- grid search: one run per global strength
    grid_rows = []
    no_outer = total_inner_steps(training_args, len(train_ds)) + 1  # patience beyond the last step: fixed strength
    for value in reg_args.grid if reg_args.run_grid else []:
        model = new_model()
        fixed = LoraRegularization.from_peft_model(
            model, granularity="global", init_log_strength=math.log(value) if value > 0 else ZERO_STRENGTH_LOG)
        grid_args = dataclasses.replace(training_args, recipe=None, outer_module=None, outer_module_options=None,
                                        outer_patience_steps=no_outer,
                                        output_dir=os.path.join(training_args.output_dir, f"grid_{value:g}"))
        grid_trainer, metrics, seconds = run_one(model, fixed, grid_args,
                                                 resume_point(run, grid_args.output_dir, bilevel=True))
        assert grid_trainer.outer_step == 0
        grid_rows.append({"strength": value, **metrics, "wall_time_s": seconds})
        logger.info("Grid strength %g: %s", value, metrics)
    best = min(grid_rows, key=lambda r: r["validation_loss"]) if grid_rows else None

    results: dict[str, Any] = {
        "data": data_args.source,
        "model": model_args.model_name_or_path,
        "num_train": len(train_ds),
        "num_validation": len(val_ds),
        "num_test": len(test_ds) if test_ds is not None else 0,
        "noise_rate": data_args.noise_rate,
        "lora_modules": list(learned.module_names),
        "granularity": learned.granularity,
        "inner_steps": trainer.state.global_step,
        "learned": {**bilevel, "strengths": strengths, "training_runs": 1, **steps,
                    "hvp_mode": trainer.hvp_mode, "wall_time_s": bilevel_time},
        "grid": grid_rows,
        "best_grid": ({**best, "training_runs": len(grid_rows),
                       "wall_time_s": sum(r["wall_time_s"] for r in grid_rows)} if best else None),
        "learned_no_worse_than_best_grid": (bilevel["validation_loss"] <= best["validation_loss"]) if best else None,
        "resumed_from": run.resume,
        "wall_time_total_s": math.nan,
        "torch_threads": torch.get_num_threads(),
    }
    write = OutputWriter(training_args.output_dir, ["the model and outer parameters", "metrics.json"])
    run.commit()  # from here on the outputs are this run's (a previous run's, moved aside, are deleted)
    # refuses NaN/inf (BilevelTrainer._save)
    write("the model and outer parameters", lambda: trainer.save_model(training_args.output_dir))
    if trainer.is_world_process_zero():
        results["wall_time_total_s"] = time.perf_counter() - start
        write("metrics.json", lambda: write_json(os.path.join(training_args.output_dir, "metrics.json"), results))
        print_summary(results)
        if run.push:
            card_metadata = {**metadata, **{f"learned_{k}": f"{v:.4f}" for k, v in bilevel.items()}}
            if best:
                card_metadata.update({"best_grid_strength": f"{best['strength']:g}",
                                      "best_grid_validation_loss": f"{best['validation_loss']:.4f}"})
            url = push_outputs(learned, training_args, card_metadata)
            results["hub_commit_url"] = url
            print(f"Pushed the learned strengths to {url}\n"
                  f'Load them with: LoraRegularization.from_pretrained("{training_args.hub_model_id}")')
    return results


def print_summary(results: dict[str, Any]) -> None:
    """The end-of-run tables: every grid point, the best one, and the learned strengths."""
    roles = [r for r in ("validation", "test") if f"{r}_loss" in results["learned"]]
    header = (["L2 strength(s)", "training runs"] + [f"{r} loss" for r in roles] + [f"{r} acc" for r in roles]
              + ["wall time (s)"])

    def row(name: str, runs: int, metrics: dict[str, Any]) -> list:
        return ([name, runs] + [metrics[f"{r}_loss"] for r in roles]
                + [f"{100 * metrics[f'{r}_accuracy']:.1f}%" for r in roles] + [f"{metrics['wall_time_s']:.0f}"])

    print()
    print(f"Data: {results['data']}: {results['num_train']} training examples ({results['noise_rate']:.0%} flipped "
          f"labels), {results['inner_steps']} inner steps per run; {len(results['lora_modules'])} LoRA modules. "
          f"Learned run: {describe_steps({'inner_steps': results['inner_steps'], **results['learned']})}.")
    rows = [row(f"grid: {r['strength']:g} (global)", 1, r) for r in results["grid"]]
    best = results["best_grid"]
    if best:
        rows.append(row(f"best of grid: {best['strength']:g}", best["training_runs"], best))
    learned = results["learned"]
    values = list(learned["strengths"].values())
    rows.append(row(f"learned per {results['granularity']} ({min(values):.2g} .. {max(values):.2g})", 1, learned))
    print(format_table(header, rows))
    print(format_table(["learned group", "strength"], [[k, f"{v:.3g}"] for k, v in learned["strengths"].items()]))
    print(f"Total wall time: {results['wall_time_total_s']:.0f} s.")


if __name__ == "__main__":
    run_main(main)
