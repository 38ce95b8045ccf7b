"""`benchmarks/reweighting_outcome.py`: the per-setting summary and table of the outcome benchmark."""

from __future__ import annotations

import argparse
import math

import pytest
from repo_scripts import load

reweighting_outcome = load("benchmarks/reweighting_outcome.py")


def _result(auc: float, bilevel: float, uniform: float, train_val: float, loss_filter: float) -> dict:
    def split(acc: float) -> dict:
        return {"test_accuracy": acc, "test_loss": 1.0 - acc, "validation_accuracy": acc + 0.05,
                "validation_loss": 0.9 - acc, "wall_time_s": 10.0}

    return {"auc_low_weight_vs_corrupted": auc, "precision_at_num_corrupted": auc - 0.1,
            "reweighted": split(bilevel), "wall_time_bilevel_s": 20.0, "wall_time_outer_steps_s": 4.0,
            "baselines": {"uniform": split(uniform), "uniform_train_val": split(train_val),
                          "loss_filter": {**split(loss_filter), "auc_high_loss_vs_corrupted": 0.8}}}


def test_summary_means_and_per_seed_values():
    summary = reweighting_outcome.summarize([_result(0.9, 0.80, 0.70, 0.75, 0.72),
                                             _result(0.7, 0.70, 0.70, 0.75, 0.72)])
    assert summary["seeds"] == 2 and summary["auc"] == [0.9, 0.7]
    mean = summary["mean"]
    assert mean["auc"] == pytest.approx(0.8) and mean["bilevel_test_accuracy"] == pytest.approx(0.75)
    assert mean["time_ratio_to_uniform"] == pytest.approx(2.0)
    assert mean["time_ratio_within_run"] == pytest.approx(20.0 / 16.0)  # the run over its time outside outer steps
    assert mean["bilevel_val_minus_test_acc"] == pytest.approx(0.05)
    row = reweighting_outcome.table({"scipy_docs/symmetric:0.4": summary}).splitlines()[-1]
    # bilevel 75.0 against the best rival, uniform on train + validation at 75.0
    assert row.startswith("| scipy_docs | symmetric:0.4 | 0.800 |") and "| +0.0 |" in row
    assert row.endswith("| 2.00x | 1.25x |")


def test_best_rival_is_any_rival_that_ran():
    """The reference filter counts as a rival where it ran: here it has the best accuracy and the lowest loss."""
    result = _result(0.9, 0.80, 0.70, 0.75, 0.72)
    result["baselines"]["reference_filter"] = {"test_accuracy": 0.82, "test_loss": 0.1, "test_ece": 0.05,
                                               "wall_time_s": 10.0}
    result["holdout_reference"] = {"auc_high_reference_vs_corrupted": 0.85}
    summary = reweighting_outcome.summarize([result])
    assert summary["reference_auc"] == [0.85]
    assert summary["time_ratio_to_uniform"] == [2.0]  # the probe fitted for the rival alone is not charged
    result.update(loss_reference="holdout_probe", holdout_reference={"auc_high_reference_vs_corrupted": 0.85,
                                                                     "time_s": 5.0})
    again = reweighting_outcome.summarize([result])
    assert again["time_ratio_to_uniform"] == [2.5] and again["time_ratio_within_run"] == [25.0 / 16.0]
    row = reweighting_outcome.table({"debian_packages/confusable:0.3": summary}).splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == "0.850" and cells[10] == "82.0" and cells[11] == "-2.0"  # 80.0 against the reference filter
    assert cells[13] == "0.100"  # the best rival's test loss


def test_missing_baselines_are_nan():
    result = _result(0.9, 0.8, 0.7, 0.75, 0.72)
    del result["baselines"]["loss_filter"]
    del result["wall_time_outer_steps_s"]  # runs from before it was recorded
    summary = reweighting_outcome.summarize([result])
    assert math.isnan(summary["mean"]["loss_filter_test_accuracy"])
    assert math.isnan(summary["mean"]["time_ratio_within_run"])


def test_noise_settings_parse():
    assert reweighting_outcome.parse_noise("pairwise:0.3") == ("pairwise", 0.3)
    assert reweighting_outcome.parse_noise("confusable:0.2") == ("confusable", 0.2)
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected KIND:RATE with KIND one of \('symmetric', "):
        reweighting_outcome.parse_noise("gaussian:0.1")
