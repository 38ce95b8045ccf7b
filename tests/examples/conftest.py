"""Fixtures of the example-script tests: offline mode (the tiny BERT model folder, ``tiny_model_dir``, is in
``tests/conftest.py``; the scripts load from their files with ``repo_scripts.load``)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    """No network: the Hub is offline, and `datasets` caches (csv/json loading) go to a temporary folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets_cache"))
