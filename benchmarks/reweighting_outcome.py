"""Outcome of learned data weights on real text: the main job (`examples/data_reweighting.py`) against its
honest rivals, over data sets, label-noise settings and seeds.

For every (data set, noise, seed) the main job runs with its defaults (plus ``--extra_args``), training the
bilevel model and the baselines of `hf_integration.rivals` with the same model, seed, data order,
optimizer, schedule and inner steps: uniform weights, uniform on train + validation, the loss filter (told the
true noise rate) and the reference filter (dropping as many, by the loss of their labels under a linear probe
fitted on the validation rows). Reported per setting, as mean and per-seed values: AUC of "low weight" as a
detector of the corrupted labels and precision@#corrupted (and the AUC of the loss filter's and of the probe's
ranking), test
accuracy and loss of every model, the validation-test accuracy gap of the bilevel model (how much the outer
problem fits its small validation set; "n/a" when the inner problem also trains on the validation set, the
main job's default with loss-based weights), and the wall time of the bilevel run as a ratio to the uniform run.

Data sets: ``embedded`` (the generated demo set) and the real-text sets of `real_text_sets.py` (``scipy_docs``:
scipy docstring paragraphs by subpackage; ``debian_packages``: Debian package descriptions by archive section),
built once into ``--data_dir``. Each run's folder keeps its ``metrics.json``; a finished run is not run again,
so an interrupted benchmark continues where it stopped::

    python benchmarks/reweighting_outcome.py                      # all sets, 3 noise settings, 3 seeds
    python benchmarks/reweighting_outcome.py --sets scipy_docs --noise symmetric:0.4 --seeds 0

Results: ``<output_dir>/reweighting_outcome.json`` and a markdown table on stdout (and ``.md``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import runpy
import sys
import time
from typing import Any

import numpy as np

from hf_integration.label_noise import NOISE_TYPES

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SETS = ("embedded", "scipy_docs", "debian_packages")
NOISES = ("symmetric:0.2", "symmetric:0.4", "pairwise:0.3")
MODELS = ("bilevel", "uniform", "uniform_train_val", "loss_filter", "reference_filter")


def parse_noise(text: str) -> tuple[str, float]:
    """``"symmetric:0.4"`` -> ``("symmetric", 0.4)``; the kinds of :data:`hf_integration.label_noise.NOISE_TYPES`."""
    kind, _, rate = text.partition(":")
    if kind not in NOISE_TYPES or not rate:
        raise argparse.ArgumentTypeError(f"--noise {text!r}: expected KIND:RATE with KIND one of {NOISE_TYPES}")
    return kind, float(rate)


def data_arguments(name: str, data_dir: str, seed: int) -> list[str]:
    """The main job's data options for set ``name`` (real-text sets are built into ``data_dir`` once)."""
    if name == "embedded":
        return []
    real_text_sets = runpy.run_path(os.path.join(HERE, "real_text_sets.py"))  # this folder's set builder
    folder = os.path.join(data_dir, name)
    if not os.path.isfile(os.path.join(folder, "test.jsonl")):
        real_text_sets["write_splits"](name, folder, seed=0)
    return ["--train_file", os.path.join(folder, "train.jsonl"),
            "--validation_file", os.path.join(folder, "validation.jsonl"),
            "--test_file", os.path.join(folder, "test.jsonl")]


def run_one(name: str, noise: tuple[str, float], seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run of the main job (or its saved metrics when it already finished)."""
    data_reweighting = runpy.run_path(os.path.join(ROOT, "examples", "data_reweighting.py"))  # the main job

    kind, rate = noise
    out = os.path.join(args.output_dir, name, f"{kind}-{rate}", f"seed-{seed}")
    metrics_path = os.path.join(out, "metrics.json")
    if os.path.isfile(metrics_path) and not args.rerun:
        with open(metrics_path, encoding="utf-8") as handle:
            return json.load(handle)
    argv = [*data_arguments(name, args.data_dir, seed), "--noise_type", kind, "--noise_rate", str(rate),
            "--seed", str(seed), "--dataset_seed", str(seed), "--output_dir", out, "--overwrite_output_dir",
            "--disable_tqdm", "True", *args.extra_args]
    logging.getLogger("reweighting_outcome").info("run: %s", " ".join(argv))
    return data_reweighting["main"](argv)


def model_metrics(result: dict[str, Any], model: str) -> dict[str, float] | None:
    if model == "bilevel":
        return {**result["reweighted"], "wall_time_s": result["wall_time_bilevel_s"]}
    return result["baselines"].get(model)


def bilevel_seconds(result: dict[str, Any]) -> float:
    """The bilevel model's cost in seconds: its training, plus fitting the validation probe when its weights read
    the probe's losses (``--loss_reference holdout_probe``; the reference filter rival alone does not charge it)."""
    probe = result.get("holdout_reference", {}).get("time_s", 0.0)
    return result["wall_time_bilevel_s"] + (probe if result.get("loss_reference") == "holdout_probe" else 0.0)


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Means and per-seed values of one setting's runs."""
    def values(get) -> list[float]:
        out = []
        for r in results:
            try:
                out.append(float(get(r)))
            except (KeyError, TypeError):
                out.append(math.nan)
        return out

    summary: dict[str, Any] = {
        "seeds": len(results),
        "auc": values(lambda r: r["auc_low_weight_vs_corrupted"]),
        "precision_at_k": values(lambda r: r["precision_at_num_corrupted"]),
        "loss_filter_auc": values(lambda r: r["baselines"]["loss_filter"]["auc_high_loss_vs_corrupted"]),
        # the validation probe's ranking (--loss_reference holdout_probe, and the reference_filter rival's)
        "reference_auc": values(lambda r: r["holdout_reference"]["auc_high_reference_vs_corrupted"]),
        "bilevel_val_minus_test_acc": values(lambda r: r["reweighted"]["validation_accuracy"]
                                             - r["reweighted"]["test_accuracy"]),
        "time_ratio_to_uniform": values(lambda r: bilevel_seconds(r) / r["baselines"]["uniform"]["wall_time_s"]),
        # the bilevel run over its own time outside the outer steps: what the outer steps add, measured within one
        # run, so immune to the load of a shared machine changing between the bilevel and the uniform run
        "time_ratio_within_run": values(lambda r: bilevel_seconds(r)
                                        / (r["wall_time_bilevel_s"] - r["wall_time_outer_steps_s"])),
        "train_on_validation": any(r.get("train_on_validation", False) for r in results),
    }
    for model in MODELS:
        summary[f"{model}_test_accuracy"] = values(lambda r, m=model: model_metrics(r, m)["test_accuracy"])
        summary[f"{model}_test_loss"] = values(lambda r, m=model: model_metrics(r, m)["test_loss"])
        summary[f"{model}_test_ece"] = values(lambda r, m=model: model_metrics(r, m)["test_ece"])
    summary["mean"] = {k: float(np.nanmean(v)) if v and not all(math.isnan(x) for x in v) else math.nan
                       for k, v in summary.items() if isinstance(v, list)}
    return summary


def _best(mean: dict[str, float], metric: str, pick=min) -> float:
    """The best rival's mean ``metric`` (``pick``: ``min`` for losses, ``max`` for accuracy) among the rivals that
    ran; NaN when none has it (results of an older run)."""
    known = [mean[f"{k}_{metric}"] for k in MODELS[1:] if not math.isnan(mean[f"{k}_{metric}"])]
    return pick(known) if known else math.nan


def table(summaries: dict[str, dict[str, Any]]) -> str:
    header = ["set", "noise", "AUC", "P@k", "loss-filter AUC", "reference AUC", "test acc bilevel", "uniform",
              "uniform train+val", "loss filter", "reference filter", "bilevel - best rival", "test loss bilevel",
              "best rival's", "test ECE bilevel",
              "best rival's", "val-test gap", "time / uniform", "time / its inner steps"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, s in summaries.items():
        m = s["mean"]
        name, noise = key.split("/")
        cells = [name, noise, f"{m['auc']:.3f}", f"{m['precision_at_k']:.3f}", f"{m['loss_filter_auc']:.3f}",
                 f"{m['reference_auc']:.3f}", *(f"{100 * m[f'{k}_test_accuracy']:.1f}" for k in MODELS),
                 f"{100 * (m['bilevel_test_accuracy'] - _best(m, 'test_accuracy', max)):+.1f}",
                 f"{m['bilevel_test_loss']:.3f}", f"{_best(m, 'test_loss'):.3f}",
                 f"{m['bilevel_test_ece']:.3f}", f"{_best(m, 'test_ece'):.3f}",
                 # the validation set is training data there: its accuracy says nothing about overfitting
                 "n/a" if s.get("train_on_validation") else f"{100 * m['bilevel_val_minus_test_acc']:+.1f}",
                 f"{m['time_ratio_to_uniform']:.2f}x", f"{m['time_ratio_within_run']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_run_options(parser: argparse.ArgumentParser, name: str, script: str) -> None:
    """The options every outcome benchmark of a script shares: where runs and data sets go, rerunning, and the
    options passed on to ``script``."""
    parser.add_argument("--output_dir", default=f"outputs/{name}")
    parser.add_argument("--data_dir", default="outputs/real_text_sets")
    parser.add_argument("--rerun", action="store_true", help="Run again even where metrics.json exists.")
    parser.add_argument("--extra_args", nargs=argparse.REMAINDER, default=[],
                        help=f"Options passed on to {script} (last).")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--noise", nargs="+", default=[parse_noise(n) for n in NOISES], type=parse_noise,
                        help="Noise settings, e.g. symmetric:0.4 pairwise:0.3.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    add_run_options(parser, "reweighting_outcome", "examples/data_reweighting.py")
    args = parser.parse_args(argv)
    noises = args.noise
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    started = time.perf_counter()
    summaries: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    for name in args.sets:
        for kind, rate in noises:
            key = f"{name}/{kind}:{rate}"
            runs[key] = [run_one(name, (kind, rate), seed, args) for seed in args.seeds]
            summaries[key] = summarize(runs[key])
            print(table({key: summaries[key]}).splitlines()[-1], flush=True)
    report = {"command": " ".join([os.path.basename(__file__), *(argv if argv is not None else sys.argv[1:])]),
              "seeds": args.seeds, "extra_args": args.extra_args, "summaries": summaries,
              "wall_time_s": time.perf_counter() - started}
    os.makedirs(args.output_dir, exist_ok=True)
    from hf_integration.atomic_files import atomic_write_text
    from hf_integration.runs import write_json

    write_json(os.path.join(args.output_dir, "reweighting_outcome.json"), report)
    text = table(summaries)
    atomic_write_text(os.path.join(args.output_dir, "reweighting_outcome.md"), text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
