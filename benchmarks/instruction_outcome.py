#!/usr/bin/env python
"""Does the instruction job pay off on real instruction data, against the cheap filters practitioners try first?

For every real set of ``real_instruction_sets.py`` (built once into ``--data_dir``) and seed, the instruction job
(``examples/instruction_data_weights.py``) runs with its defaults on the set's files, with ``--noise_rate`` of the
training responses corrupted (``--dataset_seed`` = the seed draws which and how) and every rival: uniform SFT,
uniform SFT on train + validation, and the loss, length and IFD filters dropping the true noise rate. Answers are
free-form sentences, so no exact match is scored: the outcome is the token-mean test loss. Reported per run and as
means: the AUC of "low weight" against the corrupted flags beside each filter's ranking AUC, the test loss of the
bilevel model and of every rival, and the bilevel run's wall time over the uniform one's. A run whose
``metrics.json`` exists is not run again (``--rerun`` forces it), so an interrupted benchmark picks up where it
stopped.

    python benchmarks/instruction_outcome.py --data_dir data_cache --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import runpy
import sys

import numpy as np

from hf_integration.atomic_files import atomic_write_text
from hf_integration.filters import SCORE_FILTERS
from hf_integration.reporting import ranking_aucs
from hf_integration.instruction import INSTRUCTION_RIVALS
from hf_integration.runs import write_json

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SETS = ("scipy_qa", "debian_qa")
FILTERS = ("loss_filter", *SCORE_FILTERS)


def set_files(name: str, data_dir: str) -> dict[str, str]:
    """The set's split files, built into ``data_dir/name`` on first use."""
    folder = os.path.join(data_dir, name)
    if not os.path.isfile(os.path.join(folder, "info.json")):
        runpy.run_path(os.path.join(HERE, "real_instruction_sets.py"))["write_splits"](name, folder)
    return {split: os.path.join(folder, f"{split}.jsonl") for split in ("train", "validation", "test")}


def run_one(name: str, seed: int, args: argparse.Namespace) -> dict:
    out = os.path.join(args.output_dir, name, f"seed-{seed}")
    done = os.path.join(out, "metrics.json")
    if not args.rerun and os.path.isfile(done):
        with open(done, encoding="utf-8") as handle:
            return json.load(handle)
    files = set_files(name, args.data_dir)
    main = runpy.run_path(os.path.join(ROOT, "examples", "instruction_data_weights.py"))["main"]
    main(["--train_file", files["train"], "--validation_file", files["validation"], "--test_file", files["test"],
          "--noise_rate", str(args.noise_rate), "--seed", str(seed), "--dataset_seed", str(seed),
          "--exact_match_splits", "none", "--baselines", *INSTRUCTION_RIVALS, "--output_dir", out,
          "--overwrite_output_dir", "--disable_tqdm", "True", *args.extra_args])
    with open(done, encoding="utf-8") as handle:
        return json.load(handle)


def _ranking_auc(metrics: dict) -> float:
    """A filter rival's ranking AUC against the corrupted flags; NaN when the rival did not run."""
    auc = ranking_aucs(metrics)[0]
    return math.nan if auc is None else auc


def row(name: str, seed: int | str, m: dict) -> dict:
    """One table row of a run's metrics (or of the means of a set's runs)."""
    rivals = m["baselines"]
    return {"set": name, "seed": seed, "auc": m["auc_low_weight_vs_corrupted"],
            **{f"{f} auc": _ranking_auc(rivals.get(f, {})) for f in FILTERS},
            "test loss bilevel": m["reweighted"]["test_loss"],
            **{f"test loss {r}": rivals.get(r, {}).get("test_loss", math.nan) for r in INSTRUCTION_RIVALS},
            "time / uniform": m["wall_time_bilevel_s"] / rivals["uniform"]["wall_time_s"]
            if "uniform" in rivals else math.nan}


def table(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--noise_rate", type=float, default=0.3)
    parser.add_argument("--data_dir", default="outputs/real_instruction_sets")
    parser.add_argument("--output_dir", default="outputs/instruction_outcome")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "instruction_outcome"))
    parser.add_argument("--rerun", action="store_true", help="Run again even where metrics.json exists.")
    parser.add_argument("--extra_args", nargs=argparse.REMAINDER, default=[],
                        help="Options passed on to examples/instruction_data_weights.py (last).")
    args = parser.parse_args(argv)
    rows, runs = [], {}
    for name in args.sets:
        per_set = []
        for seed in args.seeds:
            runs[f"{name}/{seed}"] = metrics = run_one(name, seed, args)
            per_set.append(row(name, seed, metrics))
        rows += per_set
        rows.append({k: (float(np.nanmean([r[k] for r in per_set])) if isinstance(per_set[0][k], float) else
                         ("mean" if k == "seed" else name)) for k in per_set[0]})
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_json(args.out + ".json", {"command": " ".join(sys.argv), "rows": rows})
    atomic_write_text(args.out + ".md", table(rows) + "\n")
    print(table(rows))
    return {"rows": rows, "runs": runs}


if __name__ == "__main__":
    main()
