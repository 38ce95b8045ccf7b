"""`benchmarks/hypergradient_rows.py`: the pool of rows a hypergradient batch is drawn from, and the trainer's
methods it replaces only while open."""

from __future__ import annotations

import datasets
import pytest
import torch
from repo_scripts import load

from hf_integration import BilevelTrainer

hypergradient_rows = load("benchmarks/hypergradient_rows.py")


def test_the_pool_holds_the_requested_side_of_the_epoch():
    rows = [10, 11, 12, 13, 14, 15]
    visited = {11, 13, 15}
    assert hypergradient_rows.row_pool(rows, visited, "random", 2) == [0, 1, 2, 3, 4, 5]
    assert hypergradient_rows.row_pool(rows, visited, "unvisited", 2) == [0, 2, 4]
    assert hypergradient_rows.row_pool(rows, visited, "visited", 3) == [1, 3, 5]
    # too few on that side (the start of an epoch): every row
    assert hypergradient_rows.row_pool(rows, {11}, "visited", 2) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="--rows must be one of"):
        hypergradient_rows.row_pool(rows, visited, "newest", 2)


class _Rows:
    """What `_sample_batch` asks of the trainer: the prepared dataset and a collator (here one that returns the rows'
    feature rows), on no device."""

    data_collator = None

    def _prepared_dataset(self, dataset, description):
        return dataset

    def _get_collator_with_removed_columns(self, collator, description):
        return lambda rows: [row["feature_row"] for row in rows]

    def _prepare_inputs(self, batch):
        return batch


def test_training_batches_come_from_the_pool_while_open_and_the_trainer_is_restored():
    original = BilevelTrainer._sample_batch, BilevelTrainer.training_step
    inherited = "_sample_batch" not in BilevelTrainer.__dict__
    dataset = datasets.Dataset.from_dict({"feature_row": list(range(100, 120))})
    with hypergradient_rows.drawing_rows("unvisited") as seen:
        seen["visited"] = set(range(100, 110))
        for seed in range(5):
            batch = BilevelTrainer._sample_batch(_Rows(), dataset, 4, torch.Generator().manual_seed(seed), "training")
            assert len(batch) == 4 and len(set(batch)) == 4 and all(row >= 110 for row in batch)
    assert (BilevelTrainer._sample_batch, BilevelTrainer.training_step) == original
    with pytest.raises(RuntimeError), hypergradient_rows.drawing_rows("visited"):
        raise RuntimeError("a failed run")
    assert (BilevelTrainer._sample_batch, BilevelTrainer.training_step) == original
    assert ("_sample_batch" not in BilevelTrainer.__dict__) == inherited  # still the mixin's


def test_random_rows_and_validation_batches_are_drawn_as_the_trainer_draws_them():
    """``--rows random`` is the job's default draw (the benchmark's control), and validation batches never change."""
    dataset = datasets.Dataset.from_dict({"feature_row": list(range(100, 120))})

    def draw(description, seed):
        return BilevelTrainer._sample_batch(_Rows(), dataset, 4, torch.Generator().manual_seed(seed), description)

    plain = {(d, seed): draw(d, seed) for d in ("training", "evaluation") for seed in range(3)}
    with hypergradient_rows.drawing_rows("random"):
        assert {(d, seed): draw(d, seed) for d in ("training", "evaluation") for seed in range(3)} == plain
    with hypergradient_rows.drawing_rows("unvisited") as seen:
        seen["visited"] = set(range(100, 116))
        assert all(draw("evaluation", seed) == plain["evaluation", seed] for seed in range(3))


def test_table_reports_the_run():
    result = {"rows": "visited", "auc": 0.8896, "test_accuracy": 0.7766, "test_loss": 0.6913, "weight_spread": 0.41,
              "loss_scale": 1.152}
    assert hypergradient_rows.table(result).splitlines()[-1] == "| visited | 0.890 | 77.7 | 0.691 | 0.41 | 1.15 |"
