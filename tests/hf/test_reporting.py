"""Outcome metrics against hand computations: the expected calibration error of the classification metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from transformers import EvalPrediction

from hf_integration.classification import accuracy_metrics
from hf_integration.reporting import calibration_error


def test_calibration_error_by_hand():
    # confidence 0.9 twice (one right: accuracy 0.5), 0.6 twice (both right: accuracy 1) in 10 bins:
    # (2 |0.5 - 0.9| + 2 |1 - 0.6|) / 4 = 0.4
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    assert calibration_error(probs, np.array([0, 1, 1, 1]), bins=10) == pytest.approx(0.4, abs=1e-12)
    # calibrated: 80% confident and right 4 times in 5
    calibrated = np.tile([[0.8, 0.2]], (5, 1))
    assert calibration_error(calibrated, np.array([0, 0, 0, 0, 1]), bins=10) == pytest.approx(0.0, abs=1e-12)
    # a confidence of exactly 1 falls in the last bin
    assert calibration_error(np.array([[1.0, 0.0]]), np.array([1]), bins=10) == pytest.approx(1.0)
    assert math.isnan(calibration_error(np.zeros((0, 2)), np.zeros(0, dtype=int)))


def test_accuracy_metrics_report_the_ece_of_the_softmax():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, -1.0]])
    labels = np.array([0, 0, 0])
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    metrics = accuracy_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["ece"] == pytest.approx(calibration_error(probs, labels), abs=1e-12)
