"""Fixtures of the example-script tests: offline mode and the examples folder on ``sys.path`` (the tiny BERT
model folder, ``tiny_model_dir``, is in ``tests/conftest.py``)."""

from __future__ import annotations

import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    """No network: the Hub is offline, and `datasets` caches (csv/json loading) go to a temporary folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets_cache"))
