#!/usr/bin/env python
"""Does a user's own script with the library's recipe do what the example job does? The README's "use it in your own
script" section (``examples/bilevel_in_your_script.py``, a plain `Trainer` script with ``recipe="data_weighting"``)
against ``examples/data_reweighting.py`` (bilevel run only) on the real-text sets, on the same noisy files.

For each set, noise and seed the training split gets the noise (``hf_integration.classification.flip_labels``,
``dataset_seed`` = the seed) and is written to a file with its ``corrupted`` flags; both programs then train on that
file (the example with ``--noise_rate 0``, so it keeps the file's labels and flags; both with training seed 42,
the own script's default). Each finished row is kept in its work folder (``row.json``), so a rerun with the same
``--output_dir`` skips what an interrupted one finished. Reported per run: the AUC of "low weight" against the flags, and the test accuracy and
loss of the fine-tuned model. The own script runs every layer (no frozen-trunk cache, whose frozen layers have no
dropout), so the two agree within seed noise, not to the digit.

    python benchmarks/own_script_vs_example.py --data_dir data_cache --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import runpy
import sys
import time

import numpy as np

from hf_integration.atomic_files import atomic_write_text
from hf_integration.runs import write_json

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SETS = ("scipy_docs", "debian_packages")
ROW_NAME = "row.json"  # one finished (set, noise, seed) row in its work folder: a rerun picks up where one stopped
NOISES = ("pairwise:0.3", "symmetric:0.4")


def noisy_files(name: str, kind: str, rate: float, seed: int, data_dir: str, out: str,
                sizes: dict[str, int] | None = None) -> dict[str, str]:
    """The set's splits (built once into ``data_dir``, of ``sizes`` when given) with ``rate`` of the training labels
    flipped (``kind``)."""
    import datasets

    from hf_integration.label_noise import flip_labels

    folder = os.path.join(data_dir, name + ("-" + "-".join(map(str, sizes.values())) if sizes else ""))
    if not os.path.isfile(os.path.join(folder, "test.jsonl")):
        runpy.run_path(os.path.join(HERE, "real_text_sets.py"))["write_splits"](name, folder, seed=0, sizes=sizes)
    train = datasets.load_dataset("json", data_files=os.path.join(folder, "train.jsonl"), split="train")
    names = sorted(set(train["label"]))
    encoded = train.map(lambda row: {"labels": names.index(row["label"])})
    noisy = flip_labels(encoded, rate, len(names), seed, kind)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "train.jsonl")
    with open(path, "w", encoding="utf-8") as handle:
        for row in noisy:
            handle.write(json.dumps({"text": row["text"], "label": names[row["labels"]],
                                     "corrupted": bool(row["corrupted"])}) + "\n")
    return {"train": path, "validation": os.path.join(folder, "validation.jsonl"),
            "test": os.path.join(folder, "test.jsonl")}


def run_example(files: dict[str, str], out: str, model: str | None, extra: list[str]) -> dict[str, float]:
    main = runpy.run_path(os.path.join(ROOT, "examples", "data_reweighting.py"))["main"]
    result = main(["--train_file", files["train"], "--validation_file", files["validation"], "--test_file",
                   files["test"], "--noise_rate", "0", "--run_baseline", "False", "--seed", "42", "--output_dir", out,
                   "--overwrite_output_dir", "--disable_tqdm", "True", *(["--model_name_or_path", model] if model
                                                                           else []), *extra])
    return {"auc": result["auc_low_weight_vs_corrupted"], "test_accuracy": result["reweighted"]["test_accuracy"],
            "test_loss": result["reweighted"]["test_loss"], "seconds": result["wall_time_bilevel_s"]}


def run_own_script(files: dict[str, str], out: str, model: str | None) -> dict[str, float]:
    import datasets

    from hf_integration.reporting import weights_auc

    argv, start = sys.argv, time.perf_counter()
    sys.argv = ["bilevel_in_your_script.py", files["train"], files["validation"], out, *([model] if model else [])]
    try:
        scope = runpy.run_path(os.path.join(ROOT, "examples", "bilevel_in_your_script.py"))
    finally:
        sys.argv = argv
    seconds = time.perf_counter() - start
    trainer, tokenizer, train = scope["trainer"], scope["tokenizer"], scope["train"]
    test = datasets.load_dataset("json", data_files=files["test"], split="train").cast_column(
        "label", train.features["label"]).map(lambda rows: tokenizer(rows["text"], truncation=True, max_length=64),
                                              batched=True)
    from hf_integration.classification import accuracy_metrics

    trainer.compute_metrics = accuracy_metrics
    metrics = trainer.evaluate(eval_dataset=test, metric_key_prefix="test")
    return {"auc": weights_auc(scope["weights"], np.asarray(train["corrupted"], dtype=bool)),
            "test_accuracy": metrics["test_accuracy"], "test_loss": metrics["test_loss"], "seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--noise", nargs="+", default=list(NOISES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data_dir", default="outputs/real_text_sets")
    parser.add_argument("--output_dir", default="outputs/own_script_vs_example")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "own_script_vs_example"))
    parser.add_argument("--model", default=None, help="A classification checkpoint for both (default: MiniLM-L6).")
    parser.add_argument("--sizes", nargs=3, type=int, default=None, metavar=("TRAIN", "VALIDATION", "TEST"),
                        help="Split sizes of the real-text sets (default: real_text_sets' own).")
    parser.add_argument("--extra_args", nargs=argparse.REMAINDER, default=[],
                        help="Options passed on to examples/data_reweighting.py (last).")
    args = parser.parse_args(argv)
    rows = []
    for name in args.sets:
        for noise in args.noise:
            kind, rate = noise.split(":")[0], float(noise.split(":")[1])
            for seed in args.seeds:
                work = os.path.join(args.output_dir, name, noise.replace(":", "-"), f"seed-{seed}")
                done = os.path.join(work, ROW_NAME)
                if os.path.isfile(done):  # finished by an earlier, interrupted invocation: not run again
                    with open(done, encoding="utf-8") as handle:
                        rows.append(json.load(handle))
                    continue
                sizes = dict(zip(("train", "validation", "test"), args.sizes)) if args.sizes else None
                files = noisy_files(name, kind, rate, seed, args.data_dir, work, sizes)
                example = run_example(files, os.path.join(work, "example"), args.model, args.extra_args)
                own = run_own_script(files, os.path.join(work, "own"), args.model)
                rows.append({"set": name, "noise": noise, "seed": seed, "example": example, "own_script": own})
                write_json(done, rows[-1])
                print(json.dumps(rows[-1]), flush=True)
    lines = ["| set | noise | seed | AUC example | AUC own script | test acc example | test acc own script | "
             "test loss example | test loss own script |", "|" + "---|" * 9]
    for r in rows:
        e, o = r["example"], r["own_script"]
        lines.append(f"| {r['set']} | {r['noise']} | {r['seed']} | {e['auc']:.3f} | {o['auc']:.3f} | "
                     f"{100 * e['test_accuracy']:.1f} | {100 * o['test_accuracy']:.1f} | {e['test_loss']:.3f} | "
                     f"{o['test_loss']:.3f} |")
    for name in args.sets:
        for noise in args.noise:
            group = [r for r in rows if r["set"] == name and r["noise"] == noise]
            mean = {who: {k: float(np.mean([r[who][k] for r in group])) for k in ("auc", "test_accuracy", "test_loss")}
                    for who in ("example", "own_script")}
            e, o = mean["example"], mean["own_script"]
            lines.append(f"| {name} | {noise} | mean | {e['auc']:.3f} | {o['auc']:.3f} | {100 * e['test_accuracy']:.1f} "
                         f"| {100 * o['test_accuracy']:.1f} | {e['test_loss']:.3f} | {o['test_loss']:.3f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)

    write_json(args.out + ".json", {"command": " ".join(sys.argv), "rows": rows})
    atomic_write_text(args.out + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"rows": rows, "nan": any(math.isnan(r[w]["auc"]) for r in rows for w in ("example", "own_script"))}


if __name__ == "__main__":
    main()
