"""Outcome of learned LoRA regularization strengths on real text: `examples/peft_regularization.py` (one bilevel
run that learns one L2 strength per LoRA module) against the grid search it replaces (one training run per global
strength, the best validation loss kept), over the real-text sets and seeds.

For every (data set, seed) the script runs with its defaults plus ``--max_train_samples`` examples of the set's
training split with ``--noise_rate`` flipped labels (few examples: the regime where regularization matters), and
``--extra_args``. Reported per set, as mean and per-seed values: test loss and accuracy of the learned strengths and
of the validation-selected grid point, the runs where the learned strengths' test loss is below the grid's best,
and the bilevel run's wall time against the grid's total (both measured in the same process, one after the
other). The real-text sets are those of `real_text_sets.py`, built once into ``--data_dir``. Each run's folder
keeps its ``metrics.json``; a finished run is not run again::

    python benchmarks/peft_outcome.py                                  # both real-text sets, 3 seeds
    python benchmarks/peft_outcome.py --sets scipy_docs --seeds 0 --extra_args --nystrom_refresh_steps 5

Results: ``<output_dir>/peft_outcome.json`` and a markdown table on stdout (and ``.md``).
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import sys
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SETS = ("scipy_docs", "debian_packages")


def run_one(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run of the PEFT example on set ``name`` (or its saved metrics when it already finished)."""
    import json

    outcome = runpy.run_path(os.path.join(HERE, "reweighting_outcome.py"))  # the real-text sets' data options
    example = runpy.run_path(os.path.join(ROOT, "examples", "peft_regularization.py"))
    out = os.path.join(args.output_dir, name, f"seed-{seed}")
    metrics_path = os.path.join(out, "metrics.json")
    if os.path.isfile(metrics_path) and not args.rerun:
        with open(metrics_path, encoding="utf-8") as handle:
            return json.load(handle)
    argv = [*outcome["data_arguments"](name, args.data_dir, seed), "--max_train_samples", str(args.max_train_samples),
            "--noise_rate", str(args.noise_rate), "--seed", str(seed), "--dataset_seed", str(seed),
            "--output_dir", out, "--overwrite_output_dir", "--disable_tqdm", "True", *args.extra_args]
    logging.getLogger("peft_outcome").info("run: %s", " ".join(argv))
    return example["main"](argv)


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed values and means of one set's runs."""
    learned = [r["learned"] for r in results]
    best = [r["best_grid"] for r in results]
    summary: dict[str, Any] = {
        "seeds": len(results),
        "learned_test_loss": [m["test_loss"] for m in learned],
        "grid_test_loss": [m["test_loss"] for m in best],
        "learned_test_accuracy": [m["test_accuracy"] for m in learned],
        "grid_test_accuracy": [m["test_accuracy"] for m in best],
        "learned_validation_loss": [m["validation_loss"] for m in learned],
        "grid_validation_loss": [m["validation_loss"] for m in best],
        "grid_strength": [m["strength"] for m in best],
        "bilevel_wall_time_s": [m["wall_time_s"] for m in learned],
        "grid_wall_time_s": [m["wall_time_s"] for m in best],
    }
    summary["time_ratio_to_grid"] = [a / b for a, b in zip(summary["bilevel_wall_time_s"], summary["grid_wall_time_s"])]
    summary["learned_test_loss_below_grid"] = sum(
        a < b for a, b in zip(summary["learned_test_loss"], summary["grid_test_loss"]))
    summary["mean"] = {k: float(np.mean(v)) for k, v in summary.items() if isinstance(v, list)}
    return summary


def table(summaries: dict[str, dict[str, Any]]) -> str:
    header = ["set", "seeds", "test loss: learned", "best grid", "test acc: learned", "best grid",
              "learned loss below grid", "validation loss: learned", "best grid", "bilevel time / grid total"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, s in summaries.items():
        m = s["mean"]
        cells = [name, str(s["seeds"]), f"{m['learned_test_loss']:.3f}", f"{m['grid_test_loss']:.3f}",
                 f"{100 * m['learned_test_accuracy']:.1f}%", f"{100 * m['grid_test_accuracy']:.1f}%",
                 f"{s['learned_test_loss_below_grid']}/{s['seeds']}", f"{m['learned_validation_loss']:.3f}",
                 f"{m['grid_validation_loss']:.3f}", f"{m['time_ratio_to_grid']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(summaries: dict[str, dict[str, Any]]) -> str:
    header = ["set", "seed", "test loss: learned / best grid (strength)", "test acc: learned / best grid",
              "wall time: bilevel / grid total"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, s in summaries.items():
        for i in range(s["seeds"]):
            lines.append(f"| {name} | {s['seed_values'][i]} | {s['learned_test_loss'][i]:.3f} / "
                         f"{s['grid_test_loss'][i]:.3f} ({s['grid_strength'][i]:g}) | "
                         f"{100 * s['learned_test_accuracy'][i]:.1f}% / {100 * s['grid_test_accuracy'][i]:.1f}% | "
                         f"{s['bilevel_wall_time_s'][i]:.0f} s / {s['grid_wall_time_s'][i]:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max_train_samples", type=int, default=128)
    parser.add_argument("--noise_rate", type=float, default=0.2)
    runpy.run_path(os.path.join(HERE, "reweighting_outcome.py"))["add_run_options"](
        parser, "peft_outcome", "examples/peft_regularization.py")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    started = time.perf_counter()
    summaries: dict[str, dict[str, Any]] = {}
    for name in args.sets:
        summaries[name] = summarize([run_one(name, seed, args) for seed in args.seeds])
        summaries[name]["seed_values"] = list(args.seeds)
        print(table({name: summaries[name]}).splitlines()[-1], flush=True)
    report = {"command": " ".join([os.path.basename(__file__), *(argv if argv is not None else sys.argv[1:])]),
              "seeds": args.seeds, "max_train_samples": args.max_train_samples, "noise_rate": args.noise_rate,
              "extra_args": args.extra_args, "summaries": summaries, "wall_time_s": time.perf_counter() - started}
    os.makedirs(args.output_dir, exist_ok=True)
    from hf_integration.atomic_files import atomic_write_text
    from hf_integration.runs import write_json

    write_json(os.path.join(args.output_dir, "peft_outcome.json"), report)
    text = table(summaries) + "\n\n" + per_seed_table(summaries)
    atomic_write_text(os.path.join(args.output_dir, "peft_outcome.md"), text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
