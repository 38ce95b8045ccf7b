"""How well the cheap per-response signals separate corrupted from clean responses on the real instruction sets,
and how far any linear combination of them can go: the ceiling a weighting built on them can reach.

For each set of ``real_instruction_sets.py`` and each seed, the training responses are corrupted as the instruction
job corrupts them (``--noise_rate``, ``--dataset_seed`` = the seed), and every training row is scored under the
initial model (the embedded SmolLM2-135M-Instruct, as the job's filters score it):

* ``loss``: the response's mean token loss after its prompt, ``L(response | prompt)`` (what the loss filter and the
  job's ``LossWeights`` read, here before training);
* ``prompt_free_loss``: ``L(response)`` scored alone (``hf_integration.filters``), and ``IFD`` = their ratio;
* ``short``: minus the response's token count (the length filter);
* ``loss - prompt_free_loss / 2``: a loss measured against what the response costs without its prompt;
* ``learned weights``: minus the weights of a finished instruction-job run, when ``--runs_dir`` holds one
  (``<runs_dir>/<set>/seed-<seed>/train_with_weights``, e.g. ``instruction_outcome.py``'s output folder);
* ``ceiling (fitted)``: a logistic regression on (loss, prompt-free loss, log length) *fitted to the corrupted
  flags* (5-fold cross-validated decision values): an upper bound for a weighting that combines these signals
  linearly, not a method (it reads the labels).

Reported: ROC AUC of each signal (higher score = more likely corrupted) overall and per corruption kind::

    python benchmarks/real_instruction_sets.py scipy_qa --out_dir data/scipy_qa
    python benchmarks/instruction_signals.py --data_dir data --sets scipy_qa --seeds 0 --out outputs/signals.json

Results: ``--out`` (JSON) and a markdown table on stdout (and next to it, ``.md``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

SETS = ("scipy_qa", "debian_qa")


def prepared_rows(messages: list[list[dict[str, str]]], tokenizer: Any):
    """Causal-LM rows as TRL prepares prompt/completion conversations: the prompt rendered with the generation
    prompt, the completion the rest of the rendered conversation, labels ``-100`` on the prompt."""
    import datasets

    ids, labels = [], []
    for conversation in messages:
        prompt = tokenizer.apply_chat_template(conversation[:-1], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
        ids.append(list(full))
        labels.append([-100] * len(prompt) + list(full[len(prompt):]))
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})


def signal_aucs(scores: np.ndarray, kinds: list[str]) -> dict[str, Any]:
    """The AUC of ``scores`` (higher = corrupted) against the clean rows (kind ``""``), overall and per kind."""
    from hf_integration.reporting import auc_by_kind, weights_auc

    kinds_array = np.asarray(kinds)
    return {"auc": weights_auc(-scores, kinds_array != ""), "by_kind": auc_by_kind(-scores, kinds)}


def fitted_ceiling(features: np.ndarray, corrupted: np.ndarray, seed: int) -> np.ndarray:
    """Cross-validated decision values of a logistic regression of ``corrupted`` on the standardized features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    return cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression()), features, corrupted, cv=folds,
                             method="decision_function")


def measure(name: str, seed: int, args: argparse.Namespace, model: Any, tokenizer: Any) -> dict[str, Any]:
    from hf_integration.filters import response_lengths, response_losses_with_and_without_prompt
    from hf_integration.instruction import InstructionDataArguments, load_instruction_splits

    folder = os.path.join(args.data_dir, name)
    data_args = InstructionDataArguments(
        train_file=os.path.join(folder, "train.jsonl"), validation_file=os.path.join(folder, "validation.jsonl"),
        noise_rate=args.noise_rate, dataset_seed=seed)
    train = load_instruction_splits(data_args).train
    kinds = [k or "" for k in train["corruption"]]
    corrupted = np.array([k != "" for k in kinds])
    rows = prepared_rows(list(train["messages"]), tokenizer)
    loss, alone = response_losses_with_and_without_prompt(model, rows, tokenizer.pad_token_id, args.batch_size)
    length = response_lengths(rows).astype(np.float64)
    alone = np.where(np.isnan(alone), loss, alone)  # one-token responses: no unconditioned prediction
    signals = {"loss": loss, "prompt_free_loss": alone, "IFD": loss / alone, "short": -length,
               "loss - prompt_free_loss / 2": loss - alone / 2,
               "ceiling (fitted)": fitted_ceiling(np.stack([loss, alone, np.log(length)], 1), corrupted, seed)}
    run = os.path.join(args.runs_dir, name, f"seed-{seed}", "train_with_weights") if args.runs_dir else None
    if run and os.path.isdir(run):
        import datasets

        table = datasets.load_from_disk(run)
        if list(table["corruption"]) == list(train["corruption"]):  # the same corrupted rows, in the same order
            signals["learned weights"] = -np.asarray(table["weight"], dtype=np.float64)
    return {"set": name, "seed": seed, "num_train": len(train), "num_corrupted": int(corrupted.sum()),
            "signals": {label: signal_aucs(scores, kinds) for label, scores in signals.items()}}


def table(results: list[dict[str, Any]]) -> str:
    kinds = sorted({k for r in results for s in r["signals"].values() for k in s["by_kind"]})
    lines = ["| set | seed | signal | AUC | " + " | ".join(kinds) + " |", "|" + "---|" * (4 + len(kinds))]
    for r in results:
        for label, s in r["signals"].items():
            cells = [r["set"], str(r["seed"]), label, f"{s['auc']:.3f}",
                     *(f"{s['by_kind'].get(k, float('nan')):.2f}" for k in kinds)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data_dir", default="outputs/real_instruction_sets")
    parser.add_argument("--runs_dir", default=None, help="Finished instruction-job runs, to add their weights.")
    parser.add_argument("--noise_rate", type=float, default=0.3)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--model_name_or_path", default=None,
                        help="The initial chat model (default: the embedded SmolLM2-135M-Instruct, as the job's).")
    parser.add_argument("--out", default="outputs/instruction_signals.json")
    args = parser.parse_args(argv)

    from hf_integration.atomic_files import atomic_write_text
    from hf_integration.instruction import LMModelArguments, load_base_model
    from hf_integration.runs import write_json

    model, tokenizer = load_base_model(LMModelArguments(model_name_or_path=args.model_name_or_path))
    results = [measure(name, seed, args, model, tokenizer) for name in args.sets for seed in args.seeds]
    text = table(results)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json(args.out, {"noise_rate": args.noise_rate, "results": results})
    atomic_write_text(os.path.splitext(args.out)[0] + ".md", text + "\n")
    return results


if __name__ == "__main__":
    main()
