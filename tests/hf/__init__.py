"""Tests of the Hugging Face integration (``hf_integration``); a package so module names don't clash."""
