"""`benchmarks/peft_outcome.py`: the per-set summary and tables of the PEFT-regularization outcome benchmark."""

from __future__ import annotations

import pytest
from repo_scripts import load

peft_outcome = load("benchmarks/peft_outcome.py")


def _result(learned_loss: float, grid_loss: float, learned_time: float, grid_time: float) -> dict:
    return {"learned": {"test_loss": learned_loss, "test_accuracy": 0.5, "validation_loss": learned_loss - 0.1,
                        "wall_time_s": learned_time},
            "best_grid": {"test_loss": grid_loss, "test_accuracy": 0.4, "validation_loss": grid_loss - 0.1,
                          "strength": 0.01, "wall_time_s": grid_time}}


def test_summary_counts_wins_and_compares_time_with_the_whole_grid():
    summary = peft_outcome.summarize([_result(1.0, 1.2, 50.0, 100.0), _result(1.3, 1.2, 150.0, 100.0)])
    assert summary["seeds"] == 2 and summary["learned_test_loss_below_grid"] == 1
    assert summary["time_ratio_to_grid"] == [0.5, 1.5]
    assert summary["mean"]["learned_test_loss"] == pytest.approx(1.15)
    assert summary["mean"]["time_ratio_to_grid"] == pytest.approx(1.0)
    summary["seed_values"] = [0, 1]
    row = peft_outcome.table({"scipy_docs": summary}).splitlines()[-1]
    assert row == ("| scipy_docs | 2 | 1.150 | 1.200 | 50.0% | 40.0% | 1/2 | 1.050 | 1.100 | 1.00x |")
    seeds = peft_outcome.per_seed_table({"scipy_docs": summary}).splitlines()
    assert seeds[-1] == "| scipy_docs | 1 | 1.300 / 1.200 (0.01) | 50.0% / 40.0% | 150 s / 100 s |"
