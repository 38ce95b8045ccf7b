"""Which training rows the hypergradient reads, and what that does to the outcome: the main job
(`examples/data_reweighting.py`) with the sampled training batch of every outer step drawn from

* ``random``: all training rows (the job's default);
* ``unvisited``: the rows the current epoch has not trained on yet, the rows ``hypergrad_on_inner_batch`` reads (the
  next inner batches);
* ``visited``: the rows the current epoch has already trained on.

Everything else is the job's (the bilevel model alone unless the job arguments ask for rivals). A diagnosis, not a
setting: ``docs/data-reweighting.md`` reads it. When fewer rows than a batch are on the requested side (the start of
an epoch), the batch is drawn from all rows. Rows are told apart by the frozen-trunk cache's row numbers
(``feature_row``), so the job must run with its default ``--cache_frozen_layers``::

    python benchmarks/hypergradient_rows.py --rows unvisited
    python benchmarks/hypergradient_rows.py --rows visited --out rows_visited.json -- \\
        --train_file train.jsonl --validation_file validation.jsonl --test_file test.jsonl --noise_type pairwise

Reported: the AUC of "low weight" against the corrupted labels, test accuracy and loss, the weight spread and the
final ``loss_scale``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import runpy
from collections.abc import Iterator, Sequence
from typing import Any

from hf_integration.frozen_trunk import FEATURE_ROW

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ROWS = ("random", "unvisited", "visited")


def row_pool(feature_rows: Sequence[int], visited: set[int], rows: str, batch_size: int) -> list[int]:
    """Positions of the prepared training rows a batch may be drawn from: every position for ``random``, else those
    whose ``feature_rows`` the epoch has (``visited``) or has not (``unvisited``) trained on, or every position when
    fewer than ``batch_size`` are on that side."""
    if rows not in ROWS:
        raise ValueError(f"--rows must be one of {ROWS}, got {rows!r}.")
    everything = list(range(len(feature_rows)))
    if rows == "random":
        return everything
    pool = [i for i, row in enumerate(feature_rows) if (row in visited) == (rows == "visited")]
    return pool if len(pool) >= batch_size else everything


@contextlib.contextmanager
def drawing_rows(rows: str) -> Iterator[dict[str, Any]]:
    """While open, `BilevelTrainer` notes the rows each inner step trains on (reset at every epoch) and draws its
    sampled hypergradient batches from :func:`row_pool`; yields a dict that holds the trainer once training starts."""
    from hf_integration import BilevelTrainer

    seen: dict[str, Any] = {"epoch": None, "visited": set(), "trainer": None}
    names = ("training_step", "_sample_batch")
    own = {name: BilevelTrainer.__dict__[name] for name in names if name in BilevelTrainer.__dict__}
    training_step, sample_batch = (getattr(BilevelTrainer, name) for name in names)

    def noting_step(self, model, inputs, num_items_in_batch=None):
        if FEATURE_ROW not in inputs:
            raise ValueError("--rows tells rows apart by the frozen-trunk cache's feature_row column; run the job with "
                             "its default --cache_frozen_layers True.")
        epoch = int(self.state.epoch or 0)
        if epoch != seen["epoch"]:
            seen["epoch"], seen["visited"] = epoch, set()
        seen["visited"].update(int(row) for row in inputs[FEATURE_ROW].tolist())
        seen["trainer"] = self
        return training_step(self, model, inputs, num_items_in_batch)

    def drawing_batch(self, dataset, batch_size, generator, description):
        if description != "training" or rows == "random":
            return sample_batch(self, dataset, batch_size, generator, description)
        feature_rows = self._prepared_dataset(dataset, description)[FEATURE_ROW]
        return sample_batch(self, dataset, batch_size, generator, description,
                            rows=row_pool(feature_rows, seen["visited"], rows, batch_size))

    BilevelTrainer.training_step, BilevelTrainer._sample_batch = noting_step, drawing_batch
    try:
        yield seen
    finally:
        for name in names:  # as they were: defined on the class, or inherited from its mixins
            if name in own:
                setattr(BilevelTrainer, name, own[name])
            else:
                delattr(BilevelTrainer, name)


def run(rows: str, job_args: list[str]) -> dict[str, Any]:
    """The main job with ``job_args`` (after ``--run_baseline False``, which they may override), its hypergradient
    batches drawn from ``rows``; the figures this benchmark reports."""
    main = runpy.run_path(os.path.join(ROOT, "examples", "data_reweighting.py"))["main"]
    with drawing_rows(rows) as seen:
        metrics = main(["--run_baseline", "False", *job_args])
    trainer = seen["trainer"]
    stats = trainer.outer_module.summary_stats() if trainer is not None and trainer.outer_module is not None else {}
    return {"rows": rows, "job_args": job_args, "auc": metrics.get("auc_low_weight_vs_corrupted"),
            "test_accuracy": metrics["reweighted"]["test_accuracy"], "test_loss": metrics["reweighted"]["test_loss"],
            "weight_spread": metrics.get("weight_spread"), "loss_scale": stats.get("loss_scale")}


def table(result: dict[str, Any]) -> str:
    def number(value: Any, digits: int) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    return "\n".join([
        "| rows | AUC | test acc | test loss | weight spread | final loss_scale |", "|---|---|---|---|---|---|",
        (f"| {result['rows']} | {number(result['auc'], 3)} | {100 * result['test_accuracy']:.1f} | "
         f"{result['test_loss']:.3f} | {number(result['weight_spread'], 2)} | {number(result['loss_scale'], 2)} |")])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", choices=ROWS, default="unvisited")
    parser.add_argument("--out", default=None, help="JSON results (and a .md table beside them).")
    parser.add_argument("job_args", nargs=argparse.REMAINDER, help="Arguments of the job, after `--`.")
    args = parser.parse_args(argv)
    job_args = [arg for arg in args.job_args if arg != "--"]  # the job takes no bare "--"
    result = run(args.rows, job_args)
    text = table(result)
    print(text)
    if args.out:
        from hf_integration.atomic_files import atomic_write_text
        from hf_integration.runs import write_json

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_json(args.out, result)
        atomic_write_text(os.path.splitext(args.out)[0] + ".md", text + "\n")
    return result


if __name__ == "__main__":
    main()
